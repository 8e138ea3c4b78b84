"""CASCADE=on: boxes the trained classifier is sure about skip the MLLM, and the calls saved are counted."""

from __future__ import annotations

import base64

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.devtools.tiny import build_tiny_checkpoint
from backend.models.local import TransformersEngine
from backend.server import create_app
from backend.service import build_service
from backend.settings import Settings
from backend.training.classifier import Classifier
from backend.training.versions import ClassifierVersions
from tests.conftest import noise_image, png_bytes
from tests.test_tagging import CountingEngine

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels></View>"""


def task(task_id: int) -> dict:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(40, 40, task_id))).decode()
    box = {"id": f"b{task_id}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
           "value": {"x": 5, "y": 5, "width": 60, "height": 60, "rotation": 0, "rectanglelabels": ["Cat"]}}  # fmt: skip
    return {"id": task_id, "data": {"image": image}, "annotations": [{"result": [box]}]}


@pytest.fixture
def model_dir(tmp_path):
    """A current classifier version for project 3's box control (untrained head: it is never very sure)."""
    backbone = build_tiny_checkpoint(tmp_path / "vit", "vit")
    store = ClassifierVersions(tmp_path / "md")
    version, partial = store.begin(3)
    Classifier.build(str(backbone), ["Cat", "Dog"], multi_label=False).save(partial / "label")
    (partial / "metrics.json").write_text("{}")
    store.commit(3, version, partial)
    return tmp_path / "md"


@pytest.mark.parametrize("threshold, skipped", [("0", 3), ("1", 0)])
def test_confident_classifier_labels_replace_mllm_calls(tiny_llava, model_dir, threshold, skipped):
    engine = CountingEngine(TransformersEngine.load(str(tiny_llava), "cpu"))
    settings = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "MODEL_DIR": str(model_dir), "CASCADE": "on",
                                  "CASCADE_THRESHOLD": threshold, "CRITIC": "off"})  # fmt: skip
    client = create_app(build_service(settings, lambda: engine)).test_client()
    body = {"tasks": [task(i) for i in range(3)], "label_config": CONFIG, "project": "3.1"}
    results = client.post("/predict", json=body).get_json()["results"]
    assert all(r["result"][0]["value"]["rectanglelabels"][0] in {"Cat", "Dog"} for r in results)
    assert len(engine.prompts) == (0 if skipped == 3 else 1)  # one batched MLLM question when none is skipped
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    [sample] = [s for s in families["mllm_backend_cascade_skipped"].samples if s.name.endswith("_total")]
    assert sample.value == skipped
