"""Every config in label_config/ works with the backend unchanged: each control gets its predictions."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from tests.conftest import noise_image, png_bytes

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "label_config").glob("*.xml"))


def task_for(config: str) -> dict:
    interface = LabelInterface(config)
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(80, 60, 4))).decode()
    result = []
    for control in interface.controls:
        if control.tag not in {"RectangleLabels", "Rectangle"}:
            continue
        for k in range(2):
            value = {"x": 10 + 40 * k, "y": 20, "width": 30, "height": 50, "rotation": 0}
            if control.tag == "RectangleLabels":
                value["rectanglelabels"] = [control.labels[0]]
            result.append(
                {
                    "id": f"{control.name}-{k}",
                    "from_name": control.name,
                    "to_name": control.to_name[0],
                    "type": control.tag.lower(),
                    "value": value,
                }
            )
    return {"id": 1, "data": {"image": image}, "annotations": [{"id": 1, "result": result}]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_shipped_config_yields_valid_predictions_for_all_its_controls(make_client, path):
    # Thresholds at 0 keep every tag, so multiple-choice controls always answer with the random model.
    config = re.sub(r'\smllm\w+="[^"]*"', "", path.read_text())
    client, _ = make_client(TAG_THRESHOLD="0", TAG_CANDIDATE_THRESHOLD="0")
    assert client.post("/setup", json={"project": "1.1", "schema": config}).status_code == 200
    task = task_for(config)
    [prediction] = client.post("/predict", json={"tasks": [task], "label_config": config}).get_json()["results"]
    assert "result" in prediction, prediction
    interface = LabelInterface(config)
    box_ids = {r["id"] for r in task["annotations"][0]["result"]}
    by_control: dict[str, list[dict]] = {}
    for region in prediction["result"]:
        by_control.setdefault(region["from_name"], []).append(region)
    for control in interface.controls:
        if control.tag == "Rectangle":
            continue  # the person's boxes: labelled through the per-region controls
        regions = by_control.get(control.name)
        assert regions, f"{path.name}: no prediction for <{control.tag} name={control.name}>"
        for region in regions:
            assert region["to_name"] == control.to_name[0]
            values = region["value"].get(region["type"]) or region["value"].get("text")
            assert values, region
            if region["type"] in {"rectanglelabels", "choices"}:
                assert set(values) <= set(control.labels)
        per_region = control.tag in {"RectangleLabels", "TextArea"} or control.attr.get("perRegion") == "true"
        if per_region:
            assert {r["id"] for r in regions} <= box_ids
    assert 0.0 <= prediction["score"] <= 1.0
