"""Everything a user does, between a real Label Studio 1.23.2 and this backend, asserted on what Label Studio stores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface

from backend.devtools.devstack import (
    Stack,
    add_local_files,
    connect_backend,
    retrieve_predictions,
    upload_images,
)
from tests.e2e.conftest import IMAGES

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "label_config").glob("*.xml"))


def backend_version(stack: Stack) -> str:
    return requests.get(f"{stack.backend_url}/versions", timeout=5).json()["model_version"]


def predictions_of(client, project: int) -> dict[int, list[dict]]:
    tasks = client.tasks.list(project=project, fields="all")
    return {int(t.id): [p if isinstance(p, dict) else p.dict() for p in (t.predictions or [])] for t in tasks}


def export_snapshot(stack: Stack, project: int) -> list[dict]:
    """The project's tasks as a JSON export snapshot with full predictions (Data Manager → Export)."""
    api, headers = f"{stack.label_studio_url}/api/projects/{project}/exports", {"Authorization": f"Token {stack.token}"}
    body = {"serialization_options": {"predictions": {"only_id": False}},
            "task_filter_options": {"only_with_annotations": False}}  # fmt: skip
    created = requests.post(f"{api}/", json=body, headers=headers, timeout=60)
    assert created.status_code == 201, created.text
    export = created.json()["id"]
    for _ in range(60):
        if requests.get(f"{api}/{export}", headers=headers, timeout=10).json()["status"] == "completed":
            break
        time.sleep(0.5)
    download = requests.get(f"{api}/{export}/download", params={"exportType": "JSON"}, headers=headers, timeout=60)
    assert download.status_code == 200, download.text[:300]
    return download.json()


def draw_boxes(client, config: str, task_ids: list[int]) -> None:
    """A person draws two boxes on each task and submits (placeholder label for <RectangleLabels>)."""
    controls = [c for c in LabelInterface(config).controls if c.tag in {"RectangleLabels", "Rectangle"}]
    for task in task_ids:
        result = []
        for control in controls:
            for k in range(2):
                value = {"x": 8 + 45 * k, "y": 15, "width": 35, "height": 50, "rotation": 0}
                if control.tag == "RectangleLabels":
                    value["rectanglelabels"] = [control.labels[-1]]
                result.append({"id": f"t{task}-{control.name}-{k}", "from_name": control.name,
                               "to_name": control.to_name[0], "type": control.tag.lower(),
                               "original_width": 160, "original_height": 120, "value": value})  # fmt: skip
        if result:
            client.annotations.create(id=task, result=result, was_cancelled=False)


def make_project(client, stack: Stack, config_path: Path) -> tuple[int, list[int]]:
    """Create the project, import one uploaded and one local-files image, draw boxes, connect the backend."""
    config = config_path.read_text()
    project = int(client.projects.create(title=config_path.stem, label_config=config).id)
    upload_images(stack, project, IMAGES[:1])
    add_local_files(client, stack, project, IMAGES[1:2], folder=f"p{project}")
    task_ids = sorted(int(t.id) for t in client.tasks.list(project=project))
    assert len(task_ids) == 2
    data = {int(t.id): t.data["image"] for t in client.tasks.list(project=project)}
    assert any("/data/upload/" in url for url in data.values()) and any("local-files" in url for url in data.values())
    draw_boxes(client, config, task_ids)
    connect_backend(client, stack, project)
    return project, task_ids


@pytest.fixture(scope="module")
def boxes_project(client, stack) -> dict:
    project, task_ids = make_project(client, stack, Path(CONFIGS[0]).parent / "boxes.xml")
    return {"id": project, "tasks": task_ids}


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.name)
def test_retrieve_predictions_stores_one_scored_prediction_per_task(client, stack, config_path):
    project, task_ids = make_project(client, stack, config_path)
    retrieve_predictions(client, project, task_ids[:1])  # a Data Manager selection first
    stored = predictions_of(client, project)
    assert len(stored[task_ids[0]]) == 1 and stored[task_ids[1]] == []
    retrieve_predictions(client, project)  # then all tasks
    retrieve_predictions(client, project)  # a second retrieval must not duplicate
    version = backend_version(stack)
    for task, predictions in predictions_of(client, project).items():
        assert len(predictions) == 1, f"task {task}: {predictions}"
        [prediction] = predictions
        assert prediction["model_version"] == version
        assert 0.0 <= prediction["score"] <= 1.0
        assert prediction["result"], f"{config_path.name} task {task} got an empty prediction"
    tag_controls = {c.name: set(c.labels) for c in LabelInterface(config_path.read_text()).controls
                    if c.tag == "Choices" and c.attr.get("choice") == "multiple"}  # fmt: skip
    if tag_controls:  # every label's probability, kept or not, survives storage and export as the backend wrote it
        exported = export_snapshot(stack, project)
        assert {int(t["id"]) for t in exported} == set(task_ids)
        for source in ([p for ps in predictions_of(client, project).values() for p in ps],
                       [p for t in exported for p in t["predictions"]]):  # fmt: skip
            for prediction in source:
                for result in (r for r in prediction["result"] if r["from_name"] in tag_controls):
                    assert set(result["label_scores"]) == tag_controls[result["from_name"]]
                    assert set(result["value"]["choices"]) <= tag_controls[result["from_name"]]


def test_a_box_drawn_in_the_editor_gets_a_label_back(client, stack, boxes_project):
    [ml] = [m for m in client.ml.list(project=boxes_project["id"])]
    value = {"x": 20, "y": 20, "width": 30, "height": 30, "rotation": 0, "rectanglelabels": ["Other"]}
    box = {"id": "just-drawn", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
           "original_width": 160, "original_height": 120, "value": value}  # fmt: skip
    response = requests.post(
        f"{stack.label_studio_url}/api/ml/{ml.id}/interactive-annotating",
        headers={"Authorization": f"Token {stack.token}"},
        json={"task": boxes_project["tasks"][0], "context": {"result": [box]}},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    [region] = response.json()["data"]["result"]
    assert region["id"] == "just-drawn"
    labels = LabelInterface((Path(CONFIGS[0]).parent / "boxes.xml").read_text()).get_control("label").labels
    assert region["value"]["rectanglelabels"][0] in labels


def test_prediction_score_ordering_is_ascending_suspicion_with_no_manual_step(client, stack, boxes_project):
    retrieve_predictions(client, boxes_project["id"])
    version = backend_version(stack)
    deadline = time.monotonic() + 30
    while client.projects.get(boxes_project["id"]).model_version != version and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.projects.get(boxes_project["id"]).model_version == version
    response = requests.get(
        f"{stack.label_studio_url}/api/tasks/",
        headers={"Authorization": f"Token {stack.token}"},
        params={
            "project": boxes_project["id"],
            "fields": "all",
            "query": json.dumps({"ordering": ["tasks:predictions_score"]}),
        },  # fmt: skip
        timeout=30,
    )
    tasks = response.json()["tasks"]
    scores = [t["predictions_score"] for t in tasks]
    assert None not in scores and scores == sorted(scores)
    assert len(tasks) == len(boxes_project["tasks"])


def test_review_plan_draws_a_sample_records_it_and_saves_its_tab(client, stack, boxes_project, capsys, tmp_path):
    from backend.review_plan import run_review_plan
    from backend.reviews import ReviewStore
    from backend.settings import Settings

    model = requests.get(f"{stack.backend_url}/versions", timeout=5).json()["model"]
    settings = Settings.from_env({"MLLM_MODEL": model, "LABEL_STUDIO_URL": stack.label_studio_url,
                                  "LABEL_STUDIO_API_KEY": stack.token, "MODEL_DIR": str(tmp_path)})  # fmt: skip
    run_review_plan(settings, boxes_project["id"], budget=0.5, target=None, create_view=True)
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_version"] == backend_version(stack) and plan["plan_id"] == 1 and plan["rule"] == "threshold"
    # the threshold rule takes whole tasks for sure: the expected sample reaches the budget by less than one task
    assert plan["tasks"] == len(boxes_project["tasks"]) and 0 <= plan["expected_review"] - 0.5 * plan["tasks"] < 1
    views = {v.id: v for v in client.views.list(project=boxes_project["id"])}
    assert views[plan["view_id"]].data["ordering"] == ["tasks:predictions_score"]
    sample = views[plan["sample_view_id"]].data
    assert sample["title"] == "Review sample"
    assert sorted(item["value"] for item in sample["filters"]["items"]) == sorted(plan["first_task_ids"])
    listed = requests.get(f"{stack.label_studio_url}/api/tasks/", headers={"Authorization": f"Token {stack.token}"},
                          params={"project": boxes_project["id"], "view": plan["sample_view_id"]},
                          timeout=30).json()["tasks"]  # fmt: skip
    assert sorted(t["id"] for t in listed) == sorted(plan["first_task_ids"])  # the tab shows the drawn tasks
    store = ReviewStore(tmp_path / "reviews.sqlite3")
    assert store.sample_estimate(boxes_project["id"])["drawn_tasks"] == plan["review"]


def test_reviewed_annotations_reach_the_backend_as_review_outcomes(client, stack, boxes_project):
    task = boxes_project["tasks"][0]
    [prediction] = predictions_of(client, boxes_project["id"])[task]
    [annotation] = client.annotations.list(id=task)
    reviewed = [dict(region) for region in prediction["result"]]
    first = reviewed[0]["value"]["rectanglelabels"][0]
    reviewed[0]["value"] = {**reviewed[0]["value"], "rectanglelabels": ["Dog" if first != "Dog" else "Cat"]}
    client.annotations.update(id=annotation.id, result=reviewed)  # the reviewer fixes one label, keeps the other
    calibration = requests.get(f"{stack.backend_url}/versions", timeout=5).json()["calibration"]
    entry = calibration[str(boxes_project["id"])]
    assert entry["reviewed_labels"] == 2 and entry["survival_rate"] == 0.5


def classifier_versions(stack: Stack, project: int) -> list[dict]:
    return requests.get(f"{stack.backend_url}/versions", timeout=5).json()["classifiers"].get(str(project), [])


def wait_for_versions(stack: Stack, project: int, count: int, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(classifier_versions(stack, project)) < count:
        assert time.monotonic() < deadline, f"no classifier version {count} for project {project}"
        time.sleep(0.5)
    return classifier_versions(stack, project)


def test_pressing_start_training_trains_a_classifier_version(client, stack, boxes_project):
    before = len(classifier_versions(stack, boxes_project["id"]))
    [ml] = list(client.ml.list(project=boxes_project["id"]))
    client.ml.train(id=ml.id)  # the "Start training" button
    versions = wait_for_versions(stack, boxes_project["id"], before + 1)
    assert versions[-1]["current"] and versions[-1]["data"]["items"] >= 4


def test_submitting_an_annotation_retrains_after_the_debounce(client, stack, boxes_project):
    before = len(classifier_versions(stack, boxes_project["id"]))
    task = boxes_project["tasks"][1]
    [annotation] = client.annotations.list(id=task)
    result = [dict(region) for region in annotation.result]
    client.annotations.update(id=annotation.id, result=result)  # a reviewer submits again → ANNOTATION_UPDATED
    versions = wait_for_versions(stack, boxes_project["id"], before + 1)
    assert versions[-1]["current"]


def test_export_holds_our_predictions_and_the_human_annotations(client, stack, boxes_project):
    response = requests.get(
        f"{stack.label_studio_url}/api/projects/{boxes_project['id']}/export",
        headers={"Authorization": f"Token {stack.token}"},
        params={"exportType": "JSON"},
        timeout=60,
    )
    exported = {t["id"]: t for t in response.json()}
    stored = predictions_of(client, boxes_project["id"])
    version = backend_version(stack)
    for task in boxes_project["tasks"]:
        assert exported[task]["annotations"][0]["result"], "the human's boxes"
        ids = [p if isinstance(p, int) else p["id"] for p in exported[task]["predictions"]]
        ours = [p["id"] for p in stored[task] if p["model_version"] == version]
        assert ours and set(ours) <= set(ids)


def test_the_demo_project_is_listed_with_predictions_from_our_backend(client, stack):
    from backend.devtools.devstack import DEMO_SEED, DEMO_TASKS, create_demo_project
    from backend.labelstudio.client import REVIEW_VIEW_TITLE
    from backend.shapes.world import generate_world

    project = create_demo_project(client, stack, title="demo (e2e)")
    listed = requests.get(f"{stack.label_studio_url}/api/projects/", headers={"Authorization": f"Token {stack.token}"},
                          timeout=30).json()["results"]  # fmt: skip
    assert project in [p["id"] for p in listed]
    stored = predictions_of(client, project)
    assert len(stored) == DEMO_TASKS
    version = backend_version(stack)
    truth = {shape.id: shape.cls for scene, _ in generate_world(tasks=DEMO_TASKS, seed=DEMO_SEED)
             for shape in scene.shapes}  # fmt: skip
    right = []
    for predictions in stored.values():
        assert [p["model_version"] for p in predictions] == [version]
        boxes = [r for r in predictions[0]["result"] if r["type"] == "rectanglelabels"]
        names = [r for r in predictions[0]["result"] if r["type"] == "textarea"]
        assert boxes and len(names) == len(boxes)
        right += [r["value"]["rectanglelabels"][0] == truth[r["id"]] for r in boxes]
    assert sum(right) / len(right) >= 0.8  # a newcomer sees right labels on the boxes
    assert client.projects.get(project).model_version == version  # Label Studio pre-fills from our predictions
    assert all(not task.annotations for task in client.tasks.list(project=project, fields="all"))  # none hides them
    [view] = [v.data for v in client.views.list(project=project) if v.data.get("title") == REVIEW_VIEW_TITLE]
    assert view["ordering"] == ["tasks:predictions_score"]
    assert "tasks:predictions_score" not in view["hiddenColumns"]["explore"]  # the column is shown


def test_eval_reports_on_the_real_project(client, stack, boxes_project, tmp_path):
    from backend.evaluation.report import Pricing, run_eval
    from backend.settings import Settings

    retrieve_predictions(client, boxes_project["id"])  # stores nothing new when earlier tests already did
    model = requests.get(f"{stack.backend_url}/versions", timeout=5).json()["model"]
    settings = Settings.from_env(
        {"MLLM_MODEL": model, "LABEL_STUDIO_URL": stack.label_studio_url, "LABEL_STUDIO_API_KEY": stack.token,
         "MODEL_DIR": str(tmp_path / "md")}
    )  # fmt: skip
    written = run_eval(settings, boxes_project["id"], None, None, None, tmp_path / "report", Pricing(),
                       disagreement_tab=True)  # fmt: skip
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["tasks_compared"] == len(boxes_project["tasks"])
    assert report["labels"]["labels"] >= 2 and 0.0 <= report["labels"]["accuracy"] <= 1.0
    assert all(path.stat().st_size > 0 for path in written)
    # The tab of tasks to annotate again lists exactly the tasks where our labels and the person's differ
    disagree = report["disagreements"]
    listed = {int(t.id) for t in client.tasks.list(project=boxes_project["id"], view=disagree["view_id"])}
    assert listed == set(disagree["task_ids"]) and disagree["tasks"] == len(listed)
    run_eval(settings, boxes_project["id"], None, None, None, tmp_path / "again", Pricing(), disagreement_tab=True)
    again = json.loads((tmp_path / "again" / "report.json").read_text())["disagreements"]
    assert again["view_id"] == disagree["view_id"]  # updated in place, not a second tab
