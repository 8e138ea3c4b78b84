"""An attacker's inputs: the Label Studio key never leaves for another host, and no input yields a 500 or HTML.

Every network peer is a real HTTP server on 127.0.0.1; a "canary" records every connection made to it.
"""

from __future__ import annotations

import base64
import json

import pytest

from backend.labelstudio.media import ImageLoader, MediaError, MediaLimits, parse_target, pinned_session
from backend.settings import Settings, SettingsError
from tests.conftest import LEGACY_TOKEN, noise_image, png_bytes
from tests.loopback import LoopbackServer, Reply

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels></View>"""
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(96, 64))).decode()
UPLOAD = "/data/upload/1/c962f976-a.png"  # served by the `label_studio` fixture to the legacy token only


def box(**value: object) -> dict:
    return {"id": "b", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["cat"],
                      **value}}  # fmt: skip


def task(task_id: object, image: object = IMAGE, region: dict | None = None) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": [{"result": [region or box()]}]}


@pytest.fixture
def canary():
    with LoopbackServer({"GET /data/upload/1/c962f976-a.png": lambda _: Reply(200, png_bytes(noise_image(8, 8)))}) as s:
        yield s


def test_urls_two_parsers_read_differently_never_reach_the_canary_or_carry_the_key(make_client, label_studio, canary):
    ls, bad = label_studio.port, canary.port
    client, _ = make_client(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=LEGACY_TOKEN,
                            ALLOWED_MEDIA_HOSTS=f"127.0.0.1:{bad}")  # fmt: skip
    hostile = [
        f"http://127.0.0.1:{bad}\\@127.0.0.1:{ls}{UPLOAD}",  # urlsplit reads the host after @, urllib3 before \
        f"http://127.0.0.1:{bad}@127.0.0.1:{ls}{UPLOAD}",  # credentials before the host
        f"http://user:pw@127.0.0.1:{ls}{UPLOAD}",
        f"http://127.0.0.1:{ls}\t@127.0.0.1:{bad}{UPLOAD}",
        f"http://127.0.0.1:{ls}%0d%0a@127.0.0.1:{bad}{UPLOAD}",
        f"/\\127.0.0.1:{bad}{UPLOAD}",
        f"http://127.0.0.1:{ls}:{bad}{UPLOAD}",
        f"http://[127.0.0.1:{bad}]{UPLOAD}",
    ]
    tasks = [task(i + 1, url) for i, url in enumerate(hostile)] + [task(99, UPLOAD)]
    before = len(canary.seen)
    results = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).get_json()["results"]
    for url, result in zip(hostile, results, strict=False):
        assert "error" in result and "result" not in result, (url, result)
        assert LEGACY_TOKEN not in json.dumps(result)
    assert results[-1]["result"][0]["value"]["rectanglelabels"][0] in {"cat", "dog"}, results[-1]
    assert canary.seen[before:] == []
    key_check = "/api/current-user/whoami"  # the backend's own check of its key, at start
    assert all(seen.path in {UPLOAD, key_check} for seen in label_studio.seen if "Authorization" in seen.headers)


def test_a_redirect_through_an_allowed_host_cannot_smuggle_a_differential(make_client, label_studio, canary):
    hop = f"http://127.0.0.1:{canary.port}\\@127.0.0.1:{label_studio.port}{UPLOAD}"
    with LoopbackServer({"GET /go": lambda _: Reply(302, headers={"Location": hop})}) as allowed:
        client, _ = make_client(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=LEGACY_TOKEN,
                                ALLOWED_MEDIA_HOSTS=f"127.0.0.1:{allowed.port},127.0.0.1:{canary.port}")  # fmt: skip
        result = client.post("/predict", json={"tasks": [task(1, f"{allowed.url}/go")], "label_config": CONFIG})
    assert "backslash" in result.get_json()["results"][0]["error"]
    assert canary.seen == []


@pytest.mark.parametrize(
    "url",
    ["http://a\\@b/x", "http://u@h/x", "http://h:99999/x", "http://h:abc/x", "ftp://h/x", "http://h /x", "http:///x"],
)
def test_parse_target_refuses_what_parsers_could_disagree_on(url):
    with pytest.raises(MediaError):
        parse_target(url)


def test_parse_target_reads_as_the_connection_does():
    target = parse_target("http://EXAMPLE.com:8080/a b?q=1")
    assert (target.host, target.port, target.url) == ("example.com", 8080, "http://example.com:8080/a%20b?q=1")
    assert parse_target("https://[::1]/x").origin == ("https", "::1", 443)


def test_a_pinned_session_connects_to_the_checked_address_not_a_fresh_lookup(canary):
    """The name never resolves (.invalid): the connection can only have gone to the pinned address."""
    with pinned_session("images.invalid", "127.0.0.1") as session:
        response = session.get(f"http://images.invalid:{canary.port}/data/upload/1/c962f976-a.png", timeout=5)
    assert response.status_code == 200
    assert canary.seen[-1].headers["Host"] == f"images.invalid:{canary.port}"


def test_a_loader_checks_a_name_once_and_connects_where_it_checked(monkeypatch, canary):
    """DNS rebinding: the name answers a public address to the check and the canary afterwards. The connection
    goes to the address that was checked; no packet leaves the machine (the connect is recorded, not made)."""
    import socket

    import urllib3.util.connection

    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"])  # a public address; every later answer is the canary on loopback

    def rebinding(host, *args, **kwargs):
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), canary.port))]

    connected = []

    def record(address, *args, **kwargs):
        connected.append(address)
        raise OSError("not connecting in a test")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", record)
    loader = ImageLoader(MediaLimits(10**6, 10**6, 5.0, ("rebind.example",)))
    with pytest.raises(MediaError, match="could not fetch"):
        loader.load(f"http://rebind.example:{canary.port}/data/upload/1/c962f976-a.png", None)
    assert connected == [("93.184.216.34", canary.port)]
    assert canary.seen == []


def test_a_key_without_its_label_studio_url_is_a_start_up_error():
    for name in ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"):
        with pytest.raises(SettingsError, match="LABEL_STUDIO_URL") as error:
            Settings.from_env({"MLLM_MODEL": "m", name: "secret-key-123"})
        assert "secret-key-123" not in str(error.value)
    settings = Settings.from_env({"MLLM_MODEL": "m", "LABEL_STUDIO_HOST": "http://ls:8080",
                                  "LABEL_STUDIO_ACCESS_TOKEN": "k"})  # fmt: skip
    assert (settings.label_studio_url, settings.label_studio_api_key) == ("http://ls:8080", "k")


def test_setup_cannot_send_the_operators_key_to_another_host(make_client, label_studio, canary):
    client, service = make_client(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=LEGACY_TOKEN,
                                  SYNC_PROJECT_MODEL_VERSION="false")  # fmt: skip
    setup = {"project": "5.1700000000", "schema": CONFIG, "hostname": canary.url, "access_token": "attacker"}
    assert client.post("/setup", json=setup).status_code == 200
    body = {"tasks": [task(1, UPLOAD)], "label_config": CONFIG, "project": "5.1700000000"}
    result = client.post("/predict", json=body).get_json()["results"][0]
    assert "result" in result, result  # fetched from the configured Label Studio, with the operator's key
    assert canary.seen == []
    assert service.sites.for_project("5.1700000000").base_url == label_studio.url


def test_a_host_learned_from_setup_gets_only_its_own_token_and_only_for_its_project(make_client, canary):
    client, service = make_client(SYNC_PROJECT_MODEL_VERSION="false", REVIEW_TAB="false")
    setup = {"project": "5.1700000000", "schema": CONFIG, "hostname": canary.url, "access_token": "its-own-token"}
    assert client.post("/setup", json=setup).status_code == 200
    client.post("/predict", json={"tasks": [task(1, UPLOAD)], "label_config": CONFIG, "project": "5.1700000000"})
    assert [seen.headers.get("Authorization") for seen in canary.seen] == ["Token its-own-token"]
    other = client.post("/predict", json={"tasks": [task(1, UPLOAD)], "label_config": CONFIG, "project": "6.1"})
    assert "Label Studio's URL is unknown" in other.get_json()["results"][0]["error"]
    assert len(canary.seen) == 1


# --- no input yields a 500 ------------------------------------------------------------------------------------------

GOOD = task(50)
PER_TASK = {  # each of these once answered 500 for the whole request; now it fails alone
    "data is a string": {**task(1), "data": "abc"},
    "data is a list": {**task(1), "data": [1]},
    "id 2**70": task(2**70),
    "id is a list": task([1]),
    "port 99999": task(1, "http://127.0.0.1:99999/x.png"),
    "port abc": task(1, "http://127.0.0.1:abc/x.png"),
    "image_rotation abc": task(1, region={**box(), "image_rotation": "abc"}),
    "rotation is a list": task(1, region=box(rotation=[1])),
    "rotated box 1e12 wide": task(1, region=box(rotation=30, width=1e12)),
    "rotated box 1e4 tall": task(1, region=box(rotation=30, width=1e4, height=1e4)),
    "value is a string": task(1, region={**box(), "value": "abc"}),
    "original_width is NaN-like": task(1, region={**box(), "original_width": "nan", "original_height": [1]}),
}
NOTHING_TO_LABEL = {  # no usable box in them: answered [] (nothing stored), as for a task nobody drew on yet
    "type is a list": task(1, region={**box(), "type": ["rectanglelabels"]}),
    "annotations is a number": {"id": 1, "data": {"image": IMAGE}, "annotations": 5},
    "result is a string": {"id": 1, "data": {"image": IMAGE}, "annotations": [{"result": "abc"}]},
}


@pytest.mark.parametrize("case", list(PER_TASK))
def test_a_bad_task_fails_alone_with_a_clear_error(make_client, case):
    client, _ = make_client()
    response = client.post("/predict", json={"tasks": [PER_TASK[case], GOOD], "label_config": CONFIG,
                                             "project": "3.1"})  # fmt: skip
    assert response.status_code == 200, response.get_data(as_text=True)
    bad, good = response.get_json()["results"]
    assert "result" in good, good
    if case == "original_width is NaN-like":  # not a dimension: ignored, the box is still labelled
        assert "original_width" not in bad["result"][0]
    else:
        assert bad["error"].startswith("task ") and "Traceback" not in bad["error"], bad


def test_a_task_with_nothing_usable_to_label_gets_nothing(make_client):
    client, _ = make_client()
    tasks = [*NOTHING_TO_LABEL.values(), GOOD]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    *nothing, good = response.get_json()["results"]
    assert nothing == [[]] * len(NOTHING_TO_LABEL) and "result" in good


REQUEST_ERRORS = {  # each once answered 500 (HTML); now a 4xx JSON error naming the field
    ("/predict", "label_config is a list"): {"tasks": [GOOD], "label_config": [CONFIG]},
    ("/predict", "label_config is an object"): {"tasks": [GOOD], "label_config": {"a": 1}},
    ("/predict", "project is a list"): {"tasks": [GOOD], "label_config": CONFIG, "project": [1]},
    ("/predict", "project is an object"): {"tasks": [GOOD], "label_config": CONFIG, "project": {"id": 1}},
    ("/setup", "schema is a list"): {"schema": [CONFIG], "project": "1.1"},
    ("/setup", "schema is an object"): {"schema": {"a": 1}, "project": "1.1"},
    ("/setup", "hostname is a number"): {"schema": CONFIG, "project": "1.1", "hostname": 5},
    ("/jobs/preannotate", "tasks is a number"): {"project": 1, "tasks": 5},
    ("/jobs/preannotate", "project 2**70"): {"project": 2**70},
}


@pytest.mark.parametrize("route, case", list(REQUEST_ERRORS))
def test_a_malformed_request_gets_a_json_400_naming_the_field(make_client, route, case):
    client, _ = make_client()
    response = client.post(route, json=REQUEST_ERRORS[(route, case)])
    assert response.status_code == 400 and response.is_json, response.get_data(as_text=True)
    assert "'" in response.get_json()["error"]  # names the field


@pytest.mark.parametrize("route", ["/predict", "/setup", "/webhook", "/jobs/preannotate"])
def test_json_nested_100k_deep_or_with_nan_is_a_json_400(make_client, route):
    client, _ = make_client()
    for body in ("[" * 100_000 + "]" * 100_000, '{"tasks": [], "x": NaN}', "{", "\xff"):
        response = client.post(route, data=body.encode("utf-8", "surrogateescape"), content_type="application/json")
        assert response.status_code == 400 and response.is_json, (body[:10], response.get_data(as_text=True)[:200])


def test_project_ids_past_64_bits_are_not_a_500(make_client):
    client, _ = make_client()
    body = {"tasks": [GOOD], "label_config": CONFIG, "project": "99999999999999999999999.1"}
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and "result" in response.get_json()["results"][0]


def test_webhooks_with_odd_results_or_huge_ids_are_acknowledged(make_client):
    client, _ = make_client()
    bodies = [
        {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"task": 1, "result": [1, "x", None]}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 1},
         "annotation": {"task": 1, "result": [{"value": 5}, {"value": "x"}, {"id": [1], "value": {"x": 1}}]}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 2**70}, "annotation": {"task": 2**70, "result": []}},
        {"action": "START_TRAINING", "project": {"id": 2**70}},
        {"action": ["x"], "project": "x"},
    ]  # fmt: skip
    for body in bodies:
        response = client.post("/webhook", json=body)
        assert response.status_code == 200 and response.is_json, (body, response.get_data(as_text=True))
    assert client.post("/webhook", json=bodies[3]).get_json()["job"] is None  # no job for a project that cannot exist


def test_unknown_routes_and_methods_answer_json(make_client):
    client, _ = make_client()
    for response in (client.get("/nope"), client.delete("/predict"), client.get("/predict")):
        assert response.status_code in (404, 405) and response.is_json
        assert "<html" not in response.get_data(as_text=True).lower()


def test_health_shows_the_deployment_only_to_an_authenticated_caller(make_client):
    client, _ = make_client(BASIC_AUTH_USER="u", BASIC_AUTH_PASS="pw")
    anonymous = client.get("/health").get_json()
    assert set(anonymous) == {"status", "model_state", "model_version", "warnings"}
    assert client.get("/").get_json() == anonymous  # HumanSignal's health alias
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:pw").decode()}
    detailed = client.get("/health", headers=auth).get_json()
    assert detailed["model"].endswith("llava") and detailed["jobs"] == "in-process"


def test_setup_calls_cannot_grow_the_remembered_sites_without_bound():
    from backend.labelstudio.client import MAX_REMEMBERED, LabelStudioSites, SetupInfo

    sites = LabelStudioSites(None, None)
    for n in range(MAX_REMEMBERED + 50):
        sites.remember(f"{n}.1", SetupInfo("http://127.0.0.1:9", f"token-{n}"))
        sites.for_project(f"{n}.1")
    assert len(sites._setups) == MAX_REMEMBERED and len(sites._auths) == MAX_REMEMBERED
    assert sites.for_project("0.1") is None  # the oldest was forgotten
    assert sites.for_project(f"{MAX_REMEMBERED + 49}.1").base_url == "http://127.0.0.1:9"
