"""The Python API answers what /predict answers, with no server, no SQLite file and no threads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backend import Annotator
from tests.test_templates import drawn_task, template

README = Path(__file__).resolve().parents[1] / "README.md"


def test_predictions_are_the_ones_the_http_route_answers(tiny_llava, make_client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = threading.active_count()
    annotator = Annotator(model=tiny_llava, settings={"CRITIC": "off"})
    config = template("medical-image-classification-with-bboxes")
    tasks = [drawn_task(config, task_id) for task_id in (1, 2)]
    ours = annotator.predict(tasks, config)
    assert threading.active_count() == threads  # nothing left running
    assert list(tmp_path.iterdir()) == []  # no model dir, no SQLite file
    client, _ = make_client(CRITIC="off")
    served = client.post("/predict", json={"tasks": tasks, "label_config": config}).get_json()["results"]
    assert ours == served
    assert [p["model_version"] for p in ours] == [annotator.model_version] * 2


def test_a_task_that_cannot_be_annotated_gets_its_error_and_the_rest_their_labels(tiny_llava):
    annotator = Annotator(model=tiny_llava, settings={"CRITIC": "off"})
    config = template("object-detection-with-bounding-boxes")
    good, bad = drawn_task(config, 1), drawn_task(config, 2)
    bad["data"]["image"] = "data:image/png;base64,bm90IGFuIGltYWdl"
    first, second = annotator.predict([good, bad], config)
    assert first["result"] and "error" not in first
    assert "image" in second["error"]


def test_it_needs_a_model_or_an_engine():
    with pytest.raises(ValueError, match="model="):
        Annotator()


def test_the_readme_example_runs_as_written(tmp_path):
    [example] = re.findall(r"<!-- python-api-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    run = subprocess.run([sys.executable, "-c", example], cwd=README.parent, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and all(0 <= line["score"] <= 1 for line in lines)
    right = sum(p == t for line in lines for p, t in zip(line["predicted"], line["truth"], strict=True))
    assert right / sum(len(line["truth"]) for line in lines) >= 0.7  # the shapes model labels its world
