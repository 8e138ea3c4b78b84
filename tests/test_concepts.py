"""Concept calibration: the labels people correct most, drafted definitions, accepted into concepts.json."""

from __future__ import annotations

import json
import shutil

from backend.annotate.concepts import confusions
from backend.labelstudio.export import LabelPair, TagPair
from backend.settings import PACKAGE_PROMPTS, Settings


def test_the_labels_people_correct_most_come_first_with_what_they_chose_instead():
    answers = [
        ("circle", "ellipse"),
        ("circle", "ellipse"),
        ("circle", "square"),
        ("circle", "circle"),
        ("star", "cross"),
        ("star", "star"),
        ("square", "square"),
    ]
    labels = [LabelPair(t, "c", f"r{t}", predicted, human, 0.5) for t, (predicted, human) in enumerate(answers)]
    tags = [TagPair(1, "t", frozenset({"star", "circle"}), frozenset({"cross", "circle"}), 0.5),
            TagPair(2, "t", frozenset({"star"}), frozenset(), 0.5)]  # fmt: skip
    found = confusions(labels, tags, top=5, min_corrections=2)
    assert [c.label for c in found] == ["circle", "star"]
    circle, star = found
    assert (circle.predicted, circle.corrected, circle.instead) == (5, 3, (("ellipse", 2), ("square", 1)))
    assert (star.predicted, star.corrected) == (4, 3) and dict(star.instead) == {"cross": 2, "": 1}
    assert confusions(labels, tags, top=1)[0].label == "circle"


def box(task: int, label: str, score: float | None = None) -> dict:
    result = {"id": f"b{task}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
              "value": {"x": 1, "y": 1, "width": 20, "height": 20, "rectanglelabels": [label]}}  # fmt: skip
    return {**result, "score": score} if score is not None else result


def test_drafts_are_written_into_concepts_json_only_when_accepted_and_change_the_model_version(tiny_llava, tmp_path):
    from backend.evaluation.report import run_concepts
    from backend.predictor import model_version
    from backend.prompts import PromptBook

    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
              '<Label value="Cat"/><Label value="Dog"/></RectangleLabels></View>')  # fmt: skip
    tasks = [{"id": t, "data": {"image": "data:,"}, "annotations": [{"result": [box(t, "Dog")]}],
              "predictions": [{"model_version": "v1", "score": 0.4, "result": [box(t, "Cat", 0.4)]}]}
             for t in range(1, 4)]  # fmt: skip
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    (tmp_path / "config.xml").write_text(config)
    shutil.copytree(PACKAGE_PROMPTS, tmp_path / "prompts")
    settings = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "PROMPTS_DIR": str(tmp_path / "prompts"),
                                  "MODEL_DIR": str(tmp_path / "md")})  # fmt: skip
    before = model_version(settings, PromptBook(settings.prompts_dir))
    drafted = run_concepts(settings, None, tmp_path / "tasks.json", tmp_path / "config.xml", "v1", top=3, accept=False)
    assert json.loads(json.dumps(drafted["confusions"])) == [{"label": "Cat", "predicted": 3, "corrected": 3,
                                                              "instead": [["Dog", 3]]}]  # fmt: skip
    assert "Cat" not in json.loads((tmp_path / "prompts" / "concepts.json").read_text())["definitions"]
    assert set(drafted["drafts"]) == {"Cat"}  # the tiny checkpoint's greedy answer is never empty
    accepted = run_concepts(settings, None, tmp_path / "tasks.json", tmp_path / "config.xml", "v1", top=3, accept=True)
    definitions = json.loads((tmp_path / "prompts" / "concepts.json").read_text())["definitions"]
    assert definitions["Cat"] == accepted["drafts"]["Cat"] and "mouse" in definitions  # merged, nothing lost
    assert accepted["model_version"] != before
