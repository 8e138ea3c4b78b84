"""The issue's acceptance, in a real Label Studio: a world seed the model never saw, boxes a person drew,
"Retrieve predictions", then what Label Studio stored and how it sorts."""

from __future__ import annotations

import json
import time

import requests

from backend.devtools.devstack import Stack, connect_backend, retrieve_predictions
from backend.evaluation.metrics import auroc
from backend.shapes.world import write_world


def test_world_labels_are_in_the_band_and_sorting_by_score_puts_wrong_labels_first(client, stack: Stack, tmp_path):
    world = write_world(tmp_path / "world", tasks=60, seed=2002)
    config_path, tasks_path = world.projects["boxes"]
    project = int(client.projects.create(title="shapes world (e2e)", label_config=config_path.read_text()).id)
    headers = {"Authorization": f"Token {stack.token}"}
    imported = requests.post(f"{stack.label_studio_url}/api/projects/{project}/import", headers=headers,
                             json=json.loads(tasks_path.read_text()), timeout=120)  # fmt: skip
    imported.raise_for_status()
    connect_backend(client, stack, project)
    retrieve_predictions(client, project)
    version = requests.get(f"{stack.backend_url}/versions", timeout=5).json()["model_version"]
    deadline = time.monotonic() + 60
    while client.projects.get(project).model_version != version and time.monotonic() < deadline:
        time.sleep(0.5)
    ordered = requests.get(f"{stack.label_studio_url}/api/tasks/", headers=headers, timeout=60, params={
        "project": project, "fields": "all", "page_size": 1000,
        "query": json.dumps({"ordering": ["tasks:predictions_score"]})}).json()["tasks"]  # fmt: skip
    assert len(ordered) == 60
    right, wrong_tasks = [], []
    for task in ordered:
        truth = {r["id"]: r["value"]["rectanglelabels"][0] for r in task["annotations"][0]["result"]}
        [ours] = [p for p in task["predictions"] if p["model_version"] == version]
        labels = {r["id"]: r["value"]["rectanglelabels"][0] for r in ours["result"]}
        assert labels.keys() == truth.keys()
        right += [labels[i] == truth[i] for i in truth]
        wrong_tasks.append(any(labels[i] != truth[i] for i in truth))
    accuracy = sum(right) / len(right)
    assert 0.80 <= accuracy <= 0.995, accuracy  # the model is good, and honestly imperfect
    ranks = list(range(len(ordered)))  # Label Studio's order, most suspicious first
    assert any(wrong_tasks), "nothing wrong to find"
    scores = [t["predictions_score"] for t in ordered]
    assert None not in scores and scores == sorted(scores)  # the Prediction score column is filled and sorted
    assert auroc([-r for r in ranks], wrong_tasks) >= 0.7
