"""Label Studio 1.23.2's own computer-vision templates in a real Label Studio: each connects, and the regions a
person drew (of every shape), whole images, captions and questions get predictions Label Studio stores."""

from __future__ import annotations

import pytest
import requests

from backend.devtools.devstack import Stack, connect_backend, retrieve_predictions
from backend.labelstudio.config import parse_label_config
from tests.e2e.test_label_studio import backend_version, predictions_of
from tests.test_templates import SERVED, drawn_task, template


def import_tasks(client, stack: Stack, project: int, tasks: list[dict]) -> None:
    """Import the tasks' data, then submit each one's annotation as a person would (an annotation inside an
    import can be lost silently when Label Studio's SQLite is busy)."""
    data = [{"data": task["data"]} for task in tasks]
    response = requests.post(f"{stack.label_studio_url}/api/projects/{project}/import", json=data, timeout=120,
                             headers={"Authorization": f"Token {stack.token}"})  # fmt: skip
    response.raise_for_status()
    created = sorted(int(t.id) for t in client.tasks.list(project=project))
    assert len(created) == len(tasks)
    for task_id, task in zip(created, tasks, strict=True):
        for annotation in task.get("annotations", []):
            client.annotations.create(id=task_id, result=annotation["result"], was_cancelled=False)
        assert len(list(client.annotations.list(id=task_id))) == len(task.get("annotations", []))


@pytest.mark.parametrize("name", SERVED)
def test_each_image_template_gets_stored_predictions_for_what_a_person_drew(client, stack, name):
    config = template(name)
    project = int(client.projects.create(title=f"template {name}", label_config=config).id)
    task = drawn_task(config)
    del task["id"]
    import_tasks(client, stack, project, [task])
    connect_backend(client, stack, project)  # Label Studio calls /setup and refuses a backend that answers 400
    retrieve_predictions(client, project)
    [stored] = predictions_of(client, project).values()
    ours = [p for p in stored if p["model_version"] == backend_version(stack)]
    assert len(ours) == 1, stored
    results = ours[0]["result"]
    spec = parse_label_config(config)
    drawn = {r["id"] for r in task["annotations"][0]["result"]}
    labelled = {r["id"] for r in results if r["type"] not in {"textarea"} and r["id"] in drawn}
    if spec.region_labels:
        assert labelled == drawn  # each drawn region, of whatever shape, got its label, kept by Label Studio
    for control in [t.control for t in spec.image_choices] + [t.control for t in spec.image_texts]:
        assert any(r["from_name"] == control for r in results), (control, results)
    assert 0 <= ours[0]["score"] <= 1


def test_a_pdf_template_is_refused_with_the_reason_shown_to_the_user(client, stack):
    project = int(client.projects.create(title="template pdf_ocr", label_config=template("pdf_ocr")).id)
    response = requests.post(f"{stack.label_studio_url}/api/ml", timeout=60,
                             headers={"Authorization": f"Token {stack.token}"},
                             json={"project": project, "url": stack.backend_url, "title": "MLLM"})  # fmt: skip
    assert response.status_code == 400
    assert "this backend labels images only (found Pdf, OcrLabels)" in response.text  # the dialog renders it as HTML


def test_taxonomy_paths_are_stored_by_label_studio(client, stack):
    from tests.test_templates import GEOMETRY, TAXONOMY, image_url

    project = int(client.projects.create(title="taxonomy", label_config=TAXONOMY).id)
    region = {"id": "r1", "from_name": "box", "to_name": "image", "type": "rectangle", "value": GEOMETRY["rectangle"],
              "original_width": 80, "original_height": 60}  # fmt: skip
    import_tasks(client, stack, project, [{"data": {"image": image_url()}, "annotations": [{"result": [region]}]}])
    connect_backend(client, stack, project)
    retrieve_predictions(client, project)
    [stored] = predictions_of(client, project).values()
    [ours] = [p for p in stored if p["model_version"] == backend_version(stack)]
    by_control = {r["from_name"]: r for r in ours["result"]}
    assert by_control["kind"]["value"]["taxonomy"][0] in [["Animal", "Cat"], ["Animal", "Dog"], ["Plant"]]
    assert by_control["part"]["id"] == "r1" and by_control["part"]["value"]["taxonomy"][0] in [
        ["Head"],
        ["Body", "Leg"],
    ]
