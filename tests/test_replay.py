"""Replay every request a real Label Studio 1.23.2 sent, and check the answers against what it stores."""

from __future__ import annotations

import math

import pytest

from backend.labelstudio.config import parse_label_config
from tests.conftest import captured_requests

REGION_KEYS = {"id", "from_name", "to_name", "type", "value", "score"}


def _replay(client, request: dict):
    path = request["path"].split("?")[0]
    if request["method"] == "GET":
        return client.get(path)
    return client.post(path, json=request["json"])


def _check_prediction(prediction: dict, task: dict, label_config: str, model_version: str) -> None:
    assert prediction["model_version"] == model_version
    assert isinstance(prediction["score"], float) and 0.0 <= prediction["score"] <= 1.0
    spec = parse_label_config(label_config)
    controls = {t.control: t for t in (*spec.region_labels, *spec.image_choices)}
    if not prediction["result"]:
        # only a multiple-choice control may legitimately predict "no tags" for an unboxed task
        assert any(t.multiple for t in spec.image_choices), f"task {task['id']} got an empty result"
        return
    for region in prediction["result"]:
        assert region.keys() >= REGION_KEYS
        target = controls[region["from_name"]]
        assert region["to_name"] == target.image.name
        labels = region["value"][region["type"]]
        assert set(labels) <= set(target.labels)
        assert labels or getattr(target, "multiple", False), "only tags may be empty (no tag applies)"
        if getattr(target, "multiple", False):  # every label's own probability, kept or not
            assert set(region["label_scores"]) == set(target.labels)
        assert 0.0 <= region["score"] <= 1.0
    # the task score is P(every label correct): the product over its label regions
    labelled = [r["score"] for r in prediction["result"] if r["type"] != "textarea" and r["value"][r["type"]]]
    if not labelled:  # no label predicted: the least certain decision ranks the task
        return
    assert math.isclose(prediction["score"], math.prod(labelled), rel_tol=1e-9)


def test_every_captured_request_gets_the_answer_label_studio_expects(make_client, label_studio):
    client, _ = make_client(LABEL_STUDIO_URL=label_studio.url)
    versions = set()
    predicted_tasks = 0
    for request in captured_requests():
        response = _replay(client, request)
        path = request["path"].split("?")[0]
        assert response.status_code == 200, (path, response.get_json())
        body = response.get_json()
        if path == "/setup":
            versions.add(body["model_version"])
        elif path == "/predict":
            tasks = request["json"]["tasks"]
            assert len(body["results"]) == len(tasks), "one prediction per task, in order"
            for task, prediction in zip(tasks, body["results"], strict=True):
                _check_prediction(prediction, task, request["json"]["label_config"], next(iter(versions)))
                predicted_tasks += 1
        elif path == "/webhook":
            assert body["action"] == request["json"]["action"]
        elif path == "/versions":
            assert body["versions"] == list(versions)
    assert len(versions) == 1, "one stable model_version for /setup and every prediction"
    assert predicted_tasks == sum(
        len(r["json"]["tasks"]) for r in captured_requests() if r["path"].startswith("/predict")
    )


def _connected_client(make_client, label_studio):
    """An app that has had Label Studio's /setup, as every real session starts."""
    client, service = make_client(LABEL_STUDIO_URL=label_studio.url, SYNC_PROJECT_MODEL_VERSION="false")
    setup = next(r for r in captured_requests() if r["path"].startswith("/setup"))
    assert client.post("/setup", json=setup["json"]).status_code == 200
    return client


def test_interactive_request_labels_the_drawn_box_under_its_id(make_client, label_studio):
    client = _connected_client(make_client, label_studio)
    interactive = [
        r for r in captured_requests() if r["path"].startswith("/predict") and r["json"]["params"]["context"]
    ]
    assert interactive, "the capture holds interactive requests"
    for request in interactive:
        drawn = request["json"]["params"]["context"]["result"]
        body = client.post("/predict", json=request["json"]).get_json()
        [prediction] = body["results"]
        assert [r["id"] for r in prediction["result"]] == [r["id"] for r in drawn]
        for region, box in zip(prediction["result"], drawn, strict=True):
            for key in ("x", "y", "width", "height", "rotation"):
                assert region["value"][key] == pytest.approx(box["value"][key])
            assert region["type"] == "rectanglelabels"


def test_batch_request_labels_boxes_from_the_submitted_annotation(make_client, label_studio):
    client = _connected_client(make_client, label_studio)
    request = next(
        r
        for r in captured_requests()
        if r["path"].startswith("/predict")
        and not r["json"]["params"]["context"]
        and any(t.get("annotations") for t in r["json"]["tasks"])
    )
    [task] = request["json"]["tasks"]
    user_box_ids = [r["id"] for a in task["annotations"] for r in a["result"] if r["type"] == "rectanglelabels"]
    [prediction] = client.post("/predict", json=request["json"]).get_json()["results"]
    box_ids = [r["id"] for r in prediction["result"] if r["type"] == "rectanglelabels"]
    assert box_ids == user_box_ids


def test_setup_makes_the_project_model_version_ours(make_client, label_studio):
    client, service = make_client(LABEL_STUDIO_URL=label_studio.url)
    setup = next(r for r in captured_requests() if r["path"].startswith("/setup"))
    version = client.post("/setup", json=setup["json"]).get_json()["model_version"]
    _wait_for(lambda: label_studio.projects[1]["model_version"] == version)
    patches = [s for s in label_studio.seen if s.method == "PATCH"]
    assert len(patches) == 1
    client.post("/setup", json=setup["json"])  # within the throttle window: no second PATCH
    assert len([s for s in label_studio.seen if s.method == "PATCH"]) == 1


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
