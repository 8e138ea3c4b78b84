"""The evaluation harness on a synthetic project with known ground truth and known errors (hand-computed)."""

from __future__ import annotations

import json

import pytest

from backend.evaluation import metrics
from backend.evaluation.report import Pricing, compare_tasks, evaluate, run_eval, write_report
from backend.labelstudio.config import parse_label_config
from backend.settings import Settings

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
<TextArea name="fine" toName="image" perRegion="true"/>
<Choices name="tags" toName="image" choice="multiple">
<Choice value="A"/><Choice value="B"/><Choice value="C"/></Choices>
</View>"""


def box(region: str, label: str, score: float | None = None) -> dict:
    r = {"id": region, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
         "value": {"x": 1, "y": 1, "width": 10, "height": 10, "rectanglelabels": [label]}}  # fmt: skip
    return {**r, "score": score} if score is not None else r


def tags(chosen: list[str], score: float | None = None) -> list[dict]:
    if not chosen:
        return []
    r = {"id": "tags", "from_name": "tags", "to_name": "image", "type": "choices", "value": {"choices": chosen}}
    return [{**r, "score": score} if score is not None else r]


def text(region: str, name: str) -> dict:
    return {"id": region, "from_name": "fine", "to_name": "image", "type": "textarea",
            "value": {"x": 1, "y": 1, "width": 10, "height": 10, "text": [name]}}  # fmt: skip


def task(task_id: int, score: float, predicted: list[dict], human: list[dict]) -> dict:
    return {"id": task_id, "data": {"image": "data:,"},
            "predictions": [{"model_version": "v1", "score": score, "result": predicted},
                            {"model_version": "old", "score": 0.5, "result": []}],
            "annotations": [{"result": human, "was_cancelled": False}]}  # fmt: skip


TASKS = [
    task(1, 0.27, [box("b1", "Cat", 0.9), box("b2", "Dog", 0.3), *tags(["A", "B"], 0.8), text("b1", "Tabby")],
         [box("b1", "Cat"), box("b2", "Cat"), *tags(["A"]), text("b1", "tabby ")]),
    task(2, 0.95, [box("b1", "Dog", 0.95), *tags(["C"], 0.9)], [box("b1", "Dog"), *tags(["C"])]),
    task(3, 0.2, [box("b1", "Cat", 0.2)], [box("b1", "Dog"), *tags(["B"])]),
    task(4, 0.85, [box("b1", "Cat", 0.85), *tags(["A"], 0.7)], [box("b1", "Cat"), *tags(["A", "C"])]),
    {"id": 5, "data": {}, "predictions": [{"model_version": "v1", "score": 0.5, "result": []}], "annotations": []},
]  # fmt: skip
USAGE = [
    {"task": t, "seconds": 1.0, "images": 1, "boxes": b, "tokens": 100} for t, b in [(1, 2), (2, 1), (3, 1), (4, 1)]
]


@pytest.fixture(scope="module")
def report() -> dict:
    spec = parse_label_config(CONFIG)
    return evaluate(
        compare_tasks(TASKS, spec, "v1"), spec, USAGE, Pricing(2.0, 0.025), {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.5}
    )


def test_box_labels_accuracy_and_confusion(report):
    assert report["tasks_compared"] == 4  # task 5 has no human annotation
    assert report["labels"]["accuracy"] == pytest.approx(3 / 5)
    assert report["labels"]["confusion"] == {"Cat": {"Cat": 2, "Dog": 1}, "Dog": {"Dog": 1, "Cat": 1}}


def test_tag_metrics_equal_their_hand_computed_values(report):
    t = report["tags"]["tags"]
    assert t["per_label"]["A"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "agreement": 1.0}
    assert t["per_label"]["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "agreement": 0.5}
    assert t["per_label"]["C"]["recall"] == 0.5 and t["per_label"]["C"]["f1"] == pytest.approx(2 / 3)
    assert t["per_label"]["C"]["agreement"] == 0.75
    assert t["micro_f1"] == pytest.approx(2 / 3) and t["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    # A: predicted on both true images → AP 1; B: its one true image unpredicted → AP 1/4; C: AP 0.75
    assert t["mAP"] == pytest.approx((1.0 + 0.25 + 0.75) / 3)


def test_suspicion_review_curve_calibration_and_fine_names(report):
    s = report["suspicion"]
    assert (s["labels"], s["wrong"], s["auroc_wrong"]) == (5, 2, 1.0)
    assert s["ece"] == pytest.approx(0.16)
    curve = report["review_curve"]
    # task errors: t1 2 (box + tag B), t2 0, t3 2 (box + missed B), t4 1 (missed C); ascending score: t3, t1, t4, t2
    assert dict(zip(curve["suspicion"]["reviewed"], curve["suspicion"]["caught"], strict=True))[0.25] == 0.4
    assert dict(zip(curve["suspicion"]["reviewed"], curve["suspicion"]["caught"], strict=True))[0.5] == 0.8
    assert curve["annotator_confidence"]["caught"][5] == 0.0  # confidence alone first reviews t2 (0.1), errorless
    assert report["fine_names"] == {"pairs": 1, "exact_agreement": 1.0}


def test_cost_per_image_and_box_beside_a_humans(report):
    c = report["cost"]
    assert c["seconds_per_image"] == 1.0 and c["seconds_per_box"] == pytest.approx(4 / 5)
    assert c["model_cost"] == pytest.approx(4 / 3600 * 2.0, abs=1e-6)
    assert c["human_cost_for_same_labels"] == pytest.approx((5 + 4) * 0.025)
    assert c["tokens_per_image"] == 100


def test_a_perfect_ranker_catches_every_error_first():
    errors = [0, 3, 0, 1, 2, 0, 0, 4]
    curve = metrics.review_curve([-e for e in errors], errors, points=9)
    assert curve["caught"][4] == 1.0  # the 4 tasks with errors come first: all 10 caught at 50% reviewed
    assert curve["caught"] == sorted(curve["caught"]) and curve["caught"][1] == 0.4


def test_report_files_and_plots_are_written(report, tmp_path):
    written = write_report(report, tmp_path)
    names = {path.name for path in written}
    assert {"report.json", "summary.md", "review_curve.png", "reliability.png", "tag_f1.png"} <= names
    for path in written:
        assert path.stat().st_size > 500
    assert (tmp_path / "review_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "top-1 accuracy: 0.600" in (tmp_path / "summary.md").read_text()


def test_eval_command_reads_a_tasks_file(tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps(TASKS))
    (tmp_path / "config.xml").write_text(CONFIG)
    written = run_eval(Settings.from_env({"MLLM_MODEL": "m", "MODEL_DIR": str(tmp_path / "md")}), None,
                       tmp_path / "tasks.json", tmp_path / "config.xml", "v1", tmp_path / "out", Pricing())  # fmt: skip
    assert json.loads((tmp_path / "out" / "report.json").read_text())["labels"]["accuracy"] == pytest.approx(0.6)
    assert len(written) >= 5


VOTE_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="Smiling" toName="image"><Choice value="yes"/><Choice value="no"/></Choices>
<RectangleLabels name="label" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
</View>"""


def smiling(answer: str) -> dict:
    return {"id": "s", "from_name": "Smiling", "to_name": "image", "type": "choices", "value": {"choices": [answer]}}


def voted_task(answers: list[str], model: str, lead_times: list[float]) -> dict:
    annotations = [{"result": [smiling(a)], "was_cancelled": False, "lead_time": t, "updated_at": f"2026-01-0{i}"}
                   for i, (a, t) in enumerate(zip(answers, lead_times, strict=True))]  # fmt: skip
    return {
        "id": 1,
        "data": {"image": "data:,"},
        "annotations": annotations,
        "predictions": [{"model_version": "v1", "score": 0.6, "result": [{**smiling(model), "score": 0.6}]}],
    }


@pytest.mark.parametrize("answers, model, decided", [
    (["no", "yes", "no"], "yes", "no"),  # two people against one person and the model: a tie keeps the latest
    (["no", "yes"], "yes", "yes"),  # the model breaks the tie between two people
    (["yes", "yes", "no"], "no", "no"),  # 2-2: the latest annotation's answer stands
    (["yes"], "no", "yes"),  # one annotation: no vote
])  # fmt: skip
def test_several_answers_to_an_attribute_are_decided_by_majority_with_the_model_as_a_voter(answers, model, decided):
    from backend.labelstudio.export import compare_task, labelled_items

    spec = parse_label_config(VOTE_CONFIG)
    task = voted_task(answers, model, [4.0] * len(answers))
    comparison = compare_task(task, spec, "v1")
    [pair] = comparison.labels
    assert pair.human == decided and comparison.human_seconds == 4.0 * len(answers)
    [item] = labelled_items(task, spec)
    assert item.labels == (decided,) and item.reviewed


def test_a_label_matching_any_of_several_human_labels_counts_in_accuracy_any():
    from backend.labelstudio.export import LabelPair

    pairs = [LabelPair(1, "c", "r1", "Dog", "Puppy", 0.9, ("Puppy", "Dog")), LabelPair(1, "c", "r2", "Cat", "Cat", 0.9),
             LabelPair(2, "c", "r3", "Cat", "Dog", 0.4, ("Dog",))]  # fmt: skip
    measured = metrics.label_accuracy(pairs)
    assert measured["accuracy"] == pytest.approx(1 / 3) and measured["accuracy_any"] == pytest.approx(2 / 3)
    assert measured["multi_labelled"] == 1
