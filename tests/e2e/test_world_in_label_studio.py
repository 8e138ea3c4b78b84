"""The issue's acceptance, in a real Label Studio: a world seed the model never saw, boxes a person drew,
"Retrieve predictions", then what Label Studio stored and how it sorts: with the model in process, and with the
same weights behind a real vLLM."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from backend.devtools.devstack import Stack, retrieve_predictions, start_backend
from backend.evaluation.metrics import auroc
from backend.labelstudio.client import REVIEW_VIEW_TITLE, SUSPICION_ORDER
from backend.shapes.world import write_world

SEED = 2002


def _predicted_and_sorted(client, stack: Stack, backend_url: str, world_dir: Path, tasks: int) -> tuple[float, list]:
    """Import the world's boxes project, connect ``backend_url``, retrieve predictions, and read the tasks in the
    order Label Studio sorts "Prediction score" by: (box accuracy, the ordered tasks)."""
    world = write_world(world_dir, tasks=tasks, seed=SEED)
    config_path, tasks_path = world.projects["boxes"]
    project = int(
        client.projects.create(title=f"shapes world via {backend_url}", label_config=config_path.read_text()).id
    )
    headers = {"Authorization": f"Token {stack.token}"}
    imported = requests.post(f"{stack.label_studio_url}/api/projects/{project}/import", headers=headers,
                             json=json.loads(tasks_path.read_text()), timeout=120)  # fmt: skip
    imported.raise_for_status()
    client.ml.create(project=project, url=backend_url, is_interactive=True, title="MLLM annotator")
    retrieve_predictions(client, project)
    version = requests.get(f"{backend_url}/versions", timeout=5).json()["model_version"]
    deadline = time.monotonic() + 180  # a /predict past its deadline hands the rest to a job that posts them
    while time.monotonic() < deadline:
        ordered = requests.get(f"{stack.label_studio_url}/api/tasks/", headers=headers, timeout=60, params={
            "project": project, "fields": "all", "page_size": 1000,
            "query": json.dumps({"ordering": [SUSPICION_ORDER]})}).json()["tasks"]  # fmt: skip
        stored = all(any(p["model_version"] == version for p in t["predictions"]) for t in ordered)
        if stored and client.projects.get(project).model_version == version:
            break
        time.sleep(1.0)
    assert len(ordered) == tasks
    right = []
    for task in ordered:
        truth = {r["id"]: r["value"]["rectanglelabels"][0] for r in task["annotations"][0]["result"]}
        [ours] = [p for p in task["predictions"] if p["model_version"] == version]
        labels = {r["id"]: r["value"]["rectanglelabels"][0] for r in ours["result"]}
        assert labels.keys() == truth.keys()
        right += [labels[i] == truth[i] for i in truth]
        task["wrong"] = any(labels[i] != truth[i] for i in truth)
    scores = [t["predictions_score"] for t in ordered]
    assert None not in scores and scores == sorted(scores)  # the Prediction score column is filled and sorted
    views = [v for v in client.views.list(project=project) if v.data.get("title") == REVIEW_VIEW_TITLE]
    assert views and views[0].data["ordering"] == [SUSPICION_ORDER]  # the "Most suspicious first" tab sorts so
    return sum(right) / len(right), ordered


def _wrong_first(ordered: list) -> float:
    """AUROC of Label Studio's order (most suspicious first) for finding tasks with a wrong label."""
    assert any(t["wrong"] for t in ordered), "nothing wrong to find"
    return auroc([-rank for rank in range(len(ordered))], [t["wrong"] for t in ordered])


def test_world_labels_are_in_the_band_and_sorting_by_score_puts_wrong_labels_first(client, stack: Stack, tmp_path):
    accuracy, ordered = _predicted_and_sorted(client, stack, stack.backend_url, tmp_path / "world", 60)
    assert 0.80 <= accuracy <= 0.995, accuracy  # the model is good, and honestly imperfect
    assert _wrong_first(ordered) >= 0.7


@pytest.mark.vllm
def test_through_a_real_vllm_label_studio_stores_scored_sorted_labels_as_good(client, stack: Stack, vllm_url,
                                                                              tmp_path):  # fmt: skip
    """The production path: the backend asks a shared vLLM serving the same weights (MLLM_PROVIDER=openai)."""
    backend_url = start_backend(stack, "through-vllm", {"MLLM_PROVIDER": "openai", "OPENAI_BASE_URL": vllm_url,
                                                        "MLLM_MODEL": "shapes"})  # fmt: skip
    accuracy, ordered = _predicted_and_sorted(client, stack, backend_url, tmp_path / "world", 30)
    assert accuracy >= 0.9, accuracy  # lettered options through vLLM labelled 0.24 of the boxes right
    scoring = requests.get(f"{backend_url}/versions", timeout=5).json()["scoring"]["annotator"]
    assert scoring["method"] == "full-label", scoring
