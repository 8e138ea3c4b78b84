"""Label Studio as people run it: slow retrievals, big selections, basic auth, refused keys, the review tab.

A second backend serves with a small per-request budget (MAX_TASKS_PER_REQUEST=10) and basic auth, so a
50-task selection stands in for a 500-task one with a real model: most of it must be predicted in the
background and posted through the API.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from backend.devtools.devstack import Stack, retrieve_predictions, start_backend
from backend.labelstudio.auth import LabelStudioAuth, is_personal_access_token
from backend.labelstudio.client import REVIEW_VIEW_TITLE, LabelStudioSites, ModelVersionSync, connect
from backend.labelstudio.connection import KeyCheck
from backend.shapes.world import write_world

USER, PASSWORD = "studio", "b4sic-pa55"
SELECTION = 50
LIMIT = 10


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    ends = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < ends, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(every)


@pytest.fixture(scope="module")
def guarded(stack: Stack) -> str:
    """A backend with basic auth on every route and a small per-request budget."""
    return start_backend(stack, "guarded-backend", {
        "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "MAX_TASKS_PER_REQUEST": str(LIMIT),
        "CALIBRATION_MIN_REVIEWS": "4", "TRAIN_DEBOUNCE_SECONDS": "600"})  # fmt: skip


@pytest.fixture(scope="module")
def big_project(client, stack: Stack, guarded: str) -> dict:
    """50 shapes-world tasks whose boxes a person drew (no labels), connected to the guarded backend."""
    world = write_world(stack.workdir / "big-world", tasks=SELECTION, seed=4100)
    config_path, tasks_path = world.projects["boxes"]
    project = int(client.projects.create(title="big selection", label_config=config_path.read_text()).id)
    tasks = json.loads(tasks_path.read_text())
    for task in tasks:
        boxes = [r for r in task["annotations"][0]["result"] if r["type"] == "rectanglelabels"]
        task["annotations"] = [{"result": [{**r, "value": {**r["value"], "rectanglelabels": []}} for r in boxes]}]
    requests.post(f"{stack.label_studio_url}/api/projects/{project}/import", json=tasks, timeout=120,
                  headers={"Authorization": f"Token {stack.token}"}).raise_for_status()  # fmt: skip
    ml = client.ml.create(project=project, url=guarded, title="MLLM annotator", is_interactive=True,
                          auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=PASSWORD)  # fmt: skip
    return {"id": project, "ml": int(ml.id)}


def our_predictions(client, project: int, version: str) -> dict[int, int]:
    counts = {}
    for task in client.tasks.list(project=project, fields="all"):
        predictions = [p if isinstance(p, dict) else p.dict() for p in task.predictions or []]
        counts[int(task.id)] = sum(1 for p in predictions if p["model_version"] == version)
    return counts


def test_a_selection_over_the_budget_ends_fully_predicted_and_sorted(client, stack, guarded, big_project):
    project, auth = big_project["id"], (USER, PASSWORD)
    version = requests.get(f"{guarded}/versions", auth=auth, timeout=5).json()["model_version"]
    retrieve_predictions(client, project)  # all 50 in one /predict, as the Data Manager sends them
    counts = our_predictions(client, project, version)
    assert sum(counts.values()) == LIMIT  # what fitted in the request, stored by Label Studio itself
    [job] = wait_for(lambda: requests.get(f"{guarded}/jobs", params={"project": project}, auth=auth,
                                          timeout=5).json()["jobs"], 30, "the background job")  # fmt: skip
    assert job["kind"] == "preannotate"
    finished = wait_for(lambda: (s := requests.get(f"{guarded}/jobs/{job['id']}", auth=auth, timeout=5).json())
                        ["status"] in {"finished", "failed"} and s, 300, "the background job's end")  # fmt: skip
    assert finished["status"] == "finished" and finished["result"]["stored"] == SELECTION - LIMIT, finished
    assert set(our_predictions(client, project, version).values()) == {1}  # every task, once
    wait_for(lambda: client.projects.get(project).model_version == version, 60, "the model_version sync")
    response = requests.get(f"{stack.label_studio_url}/api/tasks", timeout=30,
                            headers={"Authorization": f"Token {stack.token}"},
                            params={"project": project, "page_size": 100, "fields": "all",
                                    "query": json.dumps({"ordering": ["tasks:predictions_score"]})})  # fmt: skip
    scores = [t["predictions_score"] for t in response.json()["tasks"]]
    assert len(scores) == SELECTION and None not in scores and scores == sorted(scores)
    retrieve_predictions(client, project)  # a second retrieval adds nothing
    assert set(our_predictions(client, project, version).values()) == {1}


def test_connecting_creates_the_review_tab_and_gives_the_webhook_its_credentials(client, big_project, guarded):
    project = big_project["id"]

    def review_tabs() -> list:
        return [v for v in client.views.list(project=project) if v.data.get("title") == REVIEW_VIEW_TITLE]

    views = wait_for(review_tabs, 60, "the review tab")
    assert len(views) == 1 and views[0].data["ordering"] == ["tasks:predictions_score"]
    hooks = wait_for(lambda: [h for h in client.webhooks.list(project=str(project)) if (h.headers or {}).get(
        "Authorization")], 60, "the webhook's credentials")  # fmt: skip
    assert [h.url for h in hooks] == [f"{guarded}/webhook"]
    health = requests.get(f"{guarded}/health", timeout=5).json()
    assert health["warnings"] == []


def test_under_basic_auth_an_annotation_reaches_the_review_store(client, big_project, guarded):
    project, auth = big_project["id"], (USER, PASSWORD)
    wait_for(lambda: [h for h in client.webhooks.list(project=str(project)) if (h.headers or {}).get("Authorization")],
             60, "the webhook's credentials")  # fmt: skip
    task = min(t.id for t in client.tasks.list(project=project))
    [prediction] = [p if isinstance(p, dict) else p.dict() for p in client.tasks.get(id=task).predictions]
    client.annotations.create(id=task, result=prediction["result"], was_cancelled=False)  # a person accepts it
    calibration = wait_for(lambda: requests.get(f"{guarded}/versions", auth=auth, timeout=5).json()["calibration"]
                           .get(str(project)), 30, "the review outcome")  # fmt: skip
    assert calibration["reviewed_labels"] == len(prediction["result"]) and calibration["survival_rate"] == 1.0


def test_the_version_sync_outlasts_a_slow_retrieval(client, stack):
    """Label Studio refuses a model_version no prediction carries yet; a retrieval with a real model stores its
    predictions minutes later. The sync keeps trying past the old 15-second window, until they are there."""
    project = int(client.projects.create(title="slow retrieval", label_config="<View><Image name='image' "
                                         "value='$image'/><Choices name='c' toName='image'><Choice value='a'/>"
                                         "<Choice value='b'/></Choices></View>").id)  # fmt: skip
    client.tasks.create(project=project, data={"image": "data:,"})
    [task] = client.tasks.list(project=project)
    sync = ModelVersionSync(LabelStudioSites(stack.label_studio_url, stack.token))
    thread = sync.request(f"{project}.1", "slow-model-v1", patience=120)
    assert thread is not None
    time.sleep(20)
    assert client.projects.get(project).model_version != "slow-model-v1" and thread.is_alive()
    assert sync.request(f"{project}.1", "slow-model-v1") is None  # joins (and keeps) the running sync
    client.predictions.create(task=task.id, model_version="slow-model-v1", score=0.5, result=[])
    wait_for(lambda: client.projects.get(project).model_version == "slow-model-v1", 40, "the late sync")
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_refused_key_is_named_with_the_fix(stack):
    assert KeyCheck(LabelStudioAuth(stack.label_studio_url, stack.token)).check() == (None, False)
    legacy, refused = KeyCheck(LabelStudioAuth(stack.label_studio_url, "0" * 40)).check()
    assert refused and "refused LABEL_STUDIO_API_KEY (HTTP 401)" in legacy and "personal access token" in legacy
    assert "0" * 40 not in legacy


def test_label_studios_own_redirects_are_followed_with_each_key(client, stack):
    """The redirect rule keeps the redirects Label Studio itself sends. Its API routes answer with or without a
    trailing slash, so the same-origin redirect here is one of its pages': ``/swagger`` answers 302 to
    ``/docs/api/schema/swagger-ui/``. Both HTTP clients follow it, with the legacy token and with a personal access
    token Label Studio issued (the SDK's refresh and ours both go through the guarded clients)."""
    issued = requests.post(f"{stack.label_studio_url}/api/token/", headers={"Authorization": f"Token {stack.token}"},
                           timeout=30)  # fmt: skip
    assert issued.status_code in {200, 201}, issued.text[:300]
    pat = issued.json()["token"]
    assert is_personal_access_token(pat)
    for key in (stack.token, pat):
        auth = LabelStudioAuth(stack.label_studio_url, key)
        response = auth.session.get(f"{stack.label_studio_url}/swagger", headers=auth.headers(), timeout=30)
        assert response.status_code == 200 and [r.status_code for r in response.history] == [302], response.url
        assert response.url == f"{stack.label_studio_url}/docs/api/schema/swagger-ui/"
        assert KeyCheck(auth).check() == (None, False)
        sdk = connect(stack.label_studio_url, key)
        answer = sdk._client_wrapper.httpx_client.request("swagger", method="GET")
        assert answer.status_code == 200 and [r.status_code for r in answer.history] == [302]
        assert [p.id for p in sdk.projects.list()] == [p.id for p in client.projects.list()]
