"""Property-based fuzzing of /predict, /setup and /webhook (hypothesis, a fixed seed, about a minute in all).

Whatever the JSON: never a 500, never HTML, the process alive, and a well-formed task sent in the same
request still predicted. No generated URL can reach the network: no Label Studio is configured and no
media host is allowed, so every http(s) image is refused before any connection.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import noise_image, png_bytes

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
<TextArea name="name" toName="image" perRegion="true"/>
<Choices name="scene" toName="image" choice="multiple"><Choice value="indoor"/><Choice value="outdoor"/></Choices>
</View>"""
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(48, 40))).decode()
GOOD_VALUE = {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["cat"]}
GOOD_BOX = {"id": "good", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": GOOD_VALUE}
GOOD = {"id": 424242, "data": {"image": IMAGE}, "annotations": [{"result": [GOOD_BOX]}]}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)  # fmt: skip
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)  # fmt: skip
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**20), 10**20),
                    st.text(max_size=6), st.none(), json_values)  # fmt: skip
urls = st.one_of(
    st.just(IMAGE), st.text(max_size=30), json_values,
    st.builds(lambda tail: f"http://127.0.0.1{tail}", st.text(max_size=20)),
    st.builds(lambda a, b: f"http://{a}@{b}/x.png", st.text(max_size=10), st.text(max_size=10)),
    st.sampled_from(["/data/upload/1/x.png", "s3://bucket/x.png", "data:,", "data:image/png;base64,!!", "\\\\x"]),
)  # fmt: skip
values = st.fixed_dictionaries(
    {}, optional={"x": numbers, "y": numbers, "width": numbers, "height": numbers, "rotation": numbers,
                  "rectanglelabels": json_values})  # fmt: skip
regions = st.one_of(json_values, st.fixed_dictionaries(
    {"type": st.sampled_from(["rectanglelabels", "rectangle", "choices", "x"]),
     "value": st.one_of(values, json_values)},
    optional={"id": json_values, "from_name": st.sampled_from(["label", "scene", "x"]),
              "to_name": st.sampled_from(["image", "x"]), "image_rotation": numbers,
              "original_width": numbers, "original_height": numbers}))  # fmt: skip
tasks = st.one_of(json_values, st.fixed_dictionaries(
    {"data": st.one_of(st.fixed_dictionaries({"image": urls}), json_values)},
    optional={"id": json_values, "annotations": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"result": st.one_of(json_values, st.lists(regions, max_size=3))}), max_size=2)),
              "drafts": json_values}))  # fmt: skip
configs = st.one_of(
    st.just(CONFIG),
    st.text(max_size=40),
    json_values,
    st.sampled_from(["<View/>", "<View><Image name='i' value='$i'/></View>", "<", CONFIG[:60]]),
)


@pytest.fixture(scope="module")
def client(tiny_llava, tmp_path_factory):
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    settings_ = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "MODEL_DIR": str(tmp_path_factory.mktemp("fz")),
                                   "CRITIC": "off", "SYNC_PROJECT_MODEL_VERSION": "false"})  # fmt: skip
    service = build_service(settings_)
    app = create_app(service)
    service.slot.get(timeout=120)
    yield app.test_client()
    assert app.test_client().get("/health").status_code == 200  # alive after everything


def answered_cleanly(response) -> None:
    text = response.get_data(as_text=True)
    assert response.status_code < 500, text[:500]
    assert response.is_json and "<html" not in text.lower() and "Traceback" not in text, text[:500]


@FUZZ
@given(fuzzed=st.lists(tasks, max_size=3), config=configs, project=json_values, params=json_values)
def test_predict_never_fails_the_request_for_a_bad_task(client, fuzzed, config, project, params):
    body = {"tasks": [*fuzzed, GOOD], "label_config": config, "project": project, "params": params}
    response = client.post("/predict", json=body)
    answered_cleanly(response)
    config_ok, project_ok = config == CONFIG, project is None or isinstance(project, (str, int))
    if config_ok and project_ok and not isinstance(project, bool):
        assert response.status_code == 200
        results = response.get_json()["results"]
        assert len(results) == len(fuzzed) + 1
        assert "result" in results[-1], results[-1]  # the well-formed task is still predicted


@FUZZ
@given(body=st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "schema": configs, "project": json_values, "hostname": json_values, "access_token": json_values})))  # fmt: skip
def test_setup_answers_every_body_with_json(client, body):
    answered_cleanly(client.post("/setup", json=body))


events = st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATION_DELETED",
                          "ANNOTATIONS_DELETED", "START_TRAINING", "TASKS_CREATED", ""])  # fmt: skip


@FUZZ
@given(action=st.one_of(events, json_values), project=json_values, annotation=st.one_of(json_values,
       st.fixed_dictionaries({"task": json_values, "result": st.one_of(json_values, st.lists(regions, max_size=3))},
                             optional={"was_cancelled": json_values, "project": json_values})))  # fmt: skip
def test_webhook_answers_every_event_with_json(client, action, project, annotation):
    body = {"action": action, "project": project, "annotation": annotation}
    answered_cleanly(client.post("/webhook", json=body))
