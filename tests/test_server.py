"""The HTTP protocol: auth, metrics, bad input, per-task isolation, model loading states."""

from __future__ import annotations

import base64
import logging
import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.models.local import TransformersEngine
from backend.models.slot import ModelNotReady
from backend.server import create_app
from backend.service import build_service
from backend.settings import Settings
from tests.conftest import LEGACY_TOKEN, noise_image, png_bytes

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
</View>"""


def data_url(width=64, height=48, seed=0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(width, height, seed))).decode()


def boxed_task(task_id, image, boxes=((10, 10, 30, 40),)):
    result = [
        {
            "id": f"b{i}",
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Cat"]},
        }
        for i, (x, y, w, h) in enumerate(boxes)
    ]
    return {"id": task_id, "data": {"image": image}, "annotations": [{"id": 1, "result": result}]}


def predict(client, tasks, config=CONFIG, **extra):
    return client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1", **extra})


def test_three_boxes_on_one_image_in_one_request(make_client):
    client, _ = make_client()
    response = predict(client, [boxed_task(1, data_url(), [(0, 0, 20, 20), (30, 30, 40, 40), (70, 5, 25, 90)])])
    [prediction] = response.get_json()["results"]
    assert [r["id"] for r in prediction["result"]] == ["b0", "b1", "b2"]
    assert all(r["value"]["rectanglelabels"][0] in {"Cat", "Dog"} for r in prediction["result"])
    # the task's score is P(every label correct): the product of its regions' P(correct)
    assert prediction["score"] == pytest.approx(math.prod(r["score"] for r in prediction["result"]))
    assert "ascending" in prediction["score_meaning"]


def test_one_bad_task_does_not_sink_the_others(make_client, label_studio):
    client, _ = make_client(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=LEGACY_TOKEN)
    tasks = [
        boxed_task(1, data_url()),
        {"id": 2, "data": {"picture": data_url()}, "annotations": [boxed_task(0, "")["annotations"][0]]},
        boxed_task(3, "/data/upload/1/missing.png"),
        boxed_task(4, data_url(), [(10, 10, 0, 5)]),
        boxed_task(5, "http://169.254.169.254/latest/meta-data"),
        boxed_task(6, "data:image/png;base64,bm90IGFuIGltYWdl"),
        boxed_task(7, data_url(seed=3)),
    ]
    results = predict(client, tasks).get_json()["results"]
    assert len(results) == 7
    assert "result" in results[0] and "result" in results[6]
    errors = {i: results[i]["error"] for i in range(1, 6)}
    assert "no image URL under 'image'" in errors[1]
    assert "HTTP 404" in errors[2]
    assert "zero or negative size" in errors[3]
    assert "ALLOWED_MEDIA_HOSTS" in errors[4]
    assert "not an image" in errors[5]
    assert all("result" not in results[i] for i in range(1, 6)), "a failed task stores nothing in Label Studio"
    assert client.get("/health").get_json()["model_state"] == "ready"


def test_task_without_boxes_gets_no_prediction_so_a_later_retrieval_retries(make_client):
    client, _ = make_client()
    [result] = predict(client, [{"id": 1, "data": {"image": data_url()}}]).get_json()["results"]
    assert result == []


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"label_config": "<View/>"}', 400, "no 'tasks' list"),
        (b'{"tasks": [], "label_config": "<View><Text name=\\"t\\" value=\\"$t\\"/></View>"}', 400, "supports"),
    ],
)
def test_bad_requests_get_a_clear_error(make_client, body, status, message):
    client, _ = make_client()
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == status
    assert message in response.get_json()["error"]


def test_setup_refuses_a_config_it_cannot_serve_and_says_what_it_supports(make_client):
    client, _ = make_client()
    schema = '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
    response = client.post("/setup", json={"project": "1.1", "schema": schema})
    assert response.status_code == 400
    assert "<RectangleLabels>" in response.get_json()["error"]


def test_basic_auth_guards_everything_but_health(make_client):
    client, _ = make_client(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")
    assert client.get("/health").status_code == 200
    assert client.post("/setup", json={"schema": CONFIG}).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    assert client.get("/versions", headers=wrong).status_code == 401
    right = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    assert client.post("/setup", json={"schema": CONFIG}, headers=right).status_code == 200


def test_metrics_parse_as_prometheus_text_and_count_the_requests(make_client):
    client, _ = make_client()
    for _ in range(3):
        client.get("/health")
    predict(client, [boxed_task(1, data_url()), boxed_task(2, "")])
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    health = [
        s
        for s in families["mllm_backend_requests"].samples
        if s.name.endswith("_total") and s.labels["route"] == "/health"
    ]
    assert sum(s.value for s in health) == 3
    predictions = [s for s in families["mllm_backend_predictions"].samples if s.name.endswith("_total")]
    assert predictions[0].value == 1
    errors = {
        s.labels["reason"]: s.value for s in families["mllm_backend_task_errors"].samples if s.name.endswith("_total")
    }
    assert errors == {"data": 1.0}  # the task with an empty image field
    assert families["mllm_backend_model_ready"].samples[0].value == 1


def test_predict_says_the_model_is_loading_and_health_answers_meanwhile(tiny_llava, tmp_path):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return TransformersEngine.load(str(tiny_llava), "cpu")

    settings = Settings.from_env(
        {"MLLM_MODEL": str(tiny_llava), "MODEL_DIR": str(tmp_path), "PREDICT_WAIT_SECONDS": "0"}
    )
    service = build_service(settings, slow_load)
    client = create_app(service).test_client()
    assert client.get("/health").get_json()["model_state"] == "loading"
    assert client.post("/setup", json={"schema": CONFIG}).status_code == 200
    response = predict(client, [boxed_task(1, data_url())])
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "still loading" in response.get_json()["error"]
    release.set()
    service.slot.get(timeout=60)
    assert "result" in predict(client, [boxed_task(1, data_url())]).get_json()["results"][0]


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    settings = Settings.from_env({"MLLM_MODEL": str(tmp_path / "no-such-model"), "MODEL_DIR": str(tmp_path)})
    service = build_service(settings)
    client = create_app(service).test_client()
    with pytest.raises(ModelNotReady, match="failed to load"):
        service.slot.get(timeout=60)
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "DOWN"
    response = predict(client, [boxed_task(1, data_url())])
    assert response.status_code == 503 and "failed to load" in response.get_json()["error"]


def test_the_api_key_never_reaches_logs_or_answers(make_client, label_studio, caplog):
    secret = "a-very-secret-key-0123456789"
    client, _ = make_client(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=secret)
    with caplog.at_level(logging.DEBUG):
        client.post("/setup", json={"project": "1.1", "schema": CONFIG, "access_token": "other"})
        body = predict(client, [boxed_task(1, "/data/upload/1/c962f976-a.png")]).get_data(as_text=True)
        health = client.get("/health").get_data(as_text=True)
        metrics = client.get("/metrics").get_data(as_text=True)
    assert "HTTP 401" in body
    for text in (body, health, metrics, caplog.text):
        assert secret not in text


def test_an_interactive_request_that_fails_says_why_in_the_status_line(make_client):
    """Label Studio's editor shows an interactive request's HTTP error (its status line), and nothing at all for an
    error entry in a 200 answer."""
    client, _ = make_client()
    drawn = boxed_task(7, "data:image/png;base64,bm90IGFuIGltYWdl")["annotations"][0]["result"]
    task = {"id": 7, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    response = predict(client, [task], params={"context": {"result": drawn}})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error.startswith("task 7: ") and response.status.split(" ", 1)[1] == error
    good = predict(client, [{**task, "data": {"image": data_url()}}], params={"context": {"result": drawn}})
    assert good.status_code == 200 and good.get_json()["results"][0]["result"][0]["id"] == "b0"
