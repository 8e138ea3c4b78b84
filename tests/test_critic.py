"""Critic, suspicion fusion, calibration from review, and the review plan (ACT, arXiv 2511.09833)."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from backend.annotate.critic import judge
from backend.annotate.suspicion import Calibrator, Signals, fuse
from backend.evaluation.metrics import auroc, expected_calibration_error
from backend.labelstudio.outcomes import PredictedLabel, review_outcomes
from backend.prompts import PromptBook
from backend.review_plan import plan_review
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image, png_bytes
from tests.test_tagging import CountingEngine

# --- the critic's plumbing on the tiny model (its verdicts are noise there) ---


def test_critic_verdicts_are_p_no_renormalised_over_yes_no_and_batching_changes_nothing(llava_engine):
    prompts = PromptBook(PACKAGE_PROMPTS)
    images = [noise_image(20, 30, 1), noise_image(40, 10, 2), noise_image(33, 33, 3), noise_image(12, 9, 4)]
    labels, alternatives = ["cat", "dog", "cat", "cat"], ["dog", "cat", "dog", None]
    together = judge(llava_engine, prompts, images, labels, alternatives)
    assert together.shape == (4,) and ((together > 0) & (together < 1)).all()
    for i in range(4):
        alone = judge(llava_engine, prompts, [images[i]], [labels[i]], [alternatives[i]])[0]
        assert alone == pytest.approx(together[i], abs=1e-6)
    question = prompts.render("critic", label="cat", definition=prompts.definition("cat"), alternative="dog",
                              alternative_definition=prompts.definition("dog"))  # fmt: skip
    yes_no = llava_engine.score_options([images[0]], question, ("yes", "no")).logprobs[0]
    # "yes" says the label is wrong: the verdict is P(no)
    assert together[0] == pytest.approx(1 / (1 + math.exp(yes_no[0] - yes_no[1])), abs=1e-6)


def test_the_judge_prompt_states_both_definitions_and_the_runner_up(llava_engine):
    engine = CountingEngine(llava_engine)
    prompts = PromptBook(PACKAGE_PROMPTS)
    judge(engine, prompts, [noise_image(9, 9)], ["mouse"], ["kite"], {"mouse": "a config hint", "kite": "a toy"})
    assert "hand-held pointing device" in engine.prompts[-1]  # concepts.json's definition
    assert '"kite", which means: a toy' in engine.prompts[-1] and "wrong" in engine.prompts[-1]
    judge(engine, prompts, [noise_image(9, 9)], ["kite"], [None], {"kite": "a flying toy"})
    assert "a flying toy" in engine.prompts[-1] and '"none"' in engine.prompts[-1]


# --- fusion maths ---


def test_fusion_is_monotone_and_the_mapping_penalty_halves_the_odds():
    base = fuse(Signals(annotator=0.8))
    assert base == pytest.approx(0.8)
    assert fuse(Signals(annotator=0.8, critic=0.95)) > base > fuse(Signals(annotator=0.8, critic=0.3))
    assert fuse(Signals(annotator=0.9)) > fuse(Signals(annotator=0.6))
    mapped = fuse(Signals(annotator=0.8, mapped=1.0))
    assert (mapped / (1 - mapped)) == pytest.approx((0.8 / 0.2) / 2)
    assert 0 < fuse(Signals(annotator=1.0, critic=0.0)) < 1
    disagreeing = fuse(Signals(annotator=0.8, name_agrees=False))
    assert (disagreeing / (1 - disagreeing)) == pytest.approx((0.8 / 0.2) / 2)
    assert fuse(Signals(annotator=0.8, name_agrees=True)) == pytest.approx(0.8)


def noisy_labels(n: int = 600, wrong_rate: float = 0.25, seed: int = 0):
    """Scripted annotations with known wrong labels, and the signals each would carry."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(n) < wrong_rate
    # the annotator is overconfident and barely tells right from wrong
    annotator = np.where(wrong, rng.uniform(0.55, 0.95, n), rng.uniform(0.6, 1.0, n))
    # wrong labels are often out-of-set answers mapped onto the label set
    mapped = np.where(wrong, rng.random(n) < 0.5, rng.random(n) < 0.05).astype(float)
    # an out-of-sample classifier disagrees with wrong labels more often
    classifier = np.where(wrong, rng.beta(2, 5, n), rng.beta(5, 2, n))
    return wrong, annotator, mapped, classifier


def test_fused_suspicion_ranks_injected_wrong_labels_above_right_ones_better_than_confidence_alone():
    wrong, annotator, mapped, classifier = noisy_labels()
    alone = auroc(-annotator, wrong)  # suspicion = low confidence
    with_mapping = auroc([-fuse(Signals(a, mapped=m)) for a, m in zip(annotator, mapped, strict=True)], wrong)
    fused = auroc(
        [-fuse(Signals(a, mapped=m, classifier=k)) for a, m, k in zip(annotator, mapped, classifier, strict=True)],
        wrong,
    )
    assert alone < with_mapping < fused
    assert fused - alone > 0.15


def test_calibration_fitted_on_review_lowers_the_error_on_held_out_labels():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, 4000)
    survived = rng.random(4000) < scores**3  # raw scores are badly overconfident
    train, test = slice(0, 2000), slice(2000, None)
    raw_error = expected_calibration_error(scores[test], survived[test])
    calibrator = Calibrator().fit(scores[train], survived[train])
    calibrated_error = expected_calibration_error([calibrator(s) for s in scores[test]], survived[test])
    assert raw_error > 0.15
    assert calibrated_error < 0.05


def test_review_outcomes_pair_predicted_labels_with_the_humans_result():
    predicted = [
        PredictedLabel(1, "box-a", "label", "Cat", 0.9),
        PredictedLabel(1, "box-b", "label", "Dog", 0.4),
        PredictedLabel(1, "box-gone", "label", "Dog", 0.5),
        PredictedLabel(1, "tags", "tags", "Indoor", 0.7),
        PredictedLabel(1, "tags", "tags", "Blurry", 0.6),
    ]
    result = [
        {"id": "box-a", "from_name": "label", "type": "rectanglelabels",
         "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Cat"]}},
        {"id": "box-b", "from_name": "label", "type": "rectanglelabels",
         "value": {"x": 9, "y": 9, "width": 5, "height": 5, "rectanglelabels": ["Cat"]}},
        {"id": "xyz", "from_name": "tags", "type": "choices", "value": {"choices": ["Indoor"]}},
    ]  # fmt: skip
    outcomes = {(p.region, p.label): kept for p, kept in review_outcomes(predicted, result)}
    assert outcomes == {("box-a", "Cat"): True, ("box-b", "Dog"): False, ("tags", "Indoor"): True,
                        ("tags", "Blurry"): False}  # fmt: skip


def test_a_review_plan_without_a_floor_is_the_most_suspicious_tasks_first():
    scores = [(1, 0.95), (2, 0.2), (3, 0.6), (4, 0.99), (5, 0.4)]
    plan = plan_review(scores, budget=0.4, floor=0.0)
    assert plan.review == 2 and plan.first_task_ids == (2, 5)
    assert plan.expected_errors == pytest.approx(0.05 + 0.8 + 0.4 + 0.01 + 0.6)
    assert plan.expected_errors_caught == pytest.approx(1.4)
    target = plan_review(scores, target=0.9, floor=0.0)
    assert target.first_task_ids == (2, 5, 3) and target.caught_fraction >= 0.9
    with pytest.raises(ValueError, match="exactly one"):
        plan_review(scores)
    with pytest.raises(ValueError, match="budget=1.5"):
        plan_review(scores, budget=1.5)


# --- the loop through the app: predict, review by webhook, calibrated scores ---

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Cat"/><Label value="Dog"/></RectangleLabels></View>"""


def _task(task_id: int) -> dict:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(48, 48, task_id))).decode()
    boxes = [{"id": f"t{task_id}b{k}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
              "value": {"x": 5 + 45 * k, "y": 5, "width": 40, "height": 60, "rotation": 0, "rectanglelabels": ["Cat"]}}
             for k in range(2)]  # fmt: skip
    return {"id": task_id, "data": {"image": image}, "annotations": [{"id": task_id, "result": boxes}]}


def test_webhook_reviews_calibrate_the_next_predictions(make_client):
    client, service = make_client(CALIBRATION_MIN_REVIEWS="8")
    tasks = [_task(i) for i in range(1, 7)]
    first = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "5.100"}).get_json()
    assert client.get("/versions").get_json()["calibration"] == {}
    for task, prediction in zip(tasks, first["results"], strict=True):
        result = [dict(r) for r in prediction["result"]]
        if task["id"] % 3 == 0:  # the reviewer fixes this task's first box
            fixed = next(label for label in ("Cat", "Dog") if label != result[0]["value"]["rectanglelabels"][0])
            result[0] = {**result[0], "value": {**result[0]["value"], "rectanglelabels": [fixed]}}
        body = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 5},
            "annotation": {"id": task["id"], "task": task["id"], "result": result, "was_cancelled": False},
        }
        assert client.post("/webhook", json=body).get_json()["judged_labels"] == 2
    status = client.get("/versions").get_json()["calibration"]["5"]
    assert status["reviewed_labels"] == 12 and status["survival_rate"] == pytest.approx(10 / 12, abs=1e-4)
    assert status["calibrated"] is True and "ece_calibrated" in status
    calibrator = service.predictor.reviews.calibrator(5)
    again = client.post("/predict", json={"tasks": tasks[:1], "label_config": CONFIG, "project": "5.100"}).get_json()
    region = again["results"][0]["result"][0]
    raw = service.predictor.reviews._db.execute(
        "SELECT raw FROM predicted WHERE project = 5 AND region = ?", (region["id"],)
    ).fetchone()[0]
    assert region["score"] == pytest.approx(calibrator(raw))


def test_bulk_annotation_events_are_judged_and_their_deletion_is_forgotten(make_client):
    """The Data Manager's "create annotations from predictions" sends ANNOTATIONS_CREATED with lists, and deleting
    annotations sends ANNOTATIONS_DELETED with their ids only (Label Studio 1.23.2's webhooks/models.py)."""
    client, service = make_client(TRAIN_AFTER_ANNOTATIONS="100", TRAIN_DEBOUNCE_SECONDS="600")
    tasks = [_task(i) for i in range(1, 5)]
    predicted = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "6.1"}).get_json()
    results = [prediction["result"] for prediction in predicted["results"]]
    annotations = [{"id": 100 + task["id"], "task": task["id"], "project": 6, "was_cancelled": False,
                    "result": result} for task, result in zip(tasks, results, strict=True)]  # fmt: skip
    created = client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "project": {"id": 6},
                                            "annotation": annotations, "task": tasks}).get_json()  # fmt: skip
    assert created["judged_labels"] == 8 and created["job"] is not None
    assert service.predictor.reviews.status()["6"]["reviewed_labels"] == 8
    deleted = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 6},
                                            "annotations": [{"id": 101}, {"id": 103}]}).get_json()  # fmt: skip
    assert deleted["job"] == created["job"]  # joins the pending training
    assert service.predictor.reviews.status()["6"]["reviewed_labels"] == 4
    remaining = {row[0] for row in service.predictor.reviews._db.execute("SELECT task FROM reviewed WHERE project=6")}
    assert remaining == {2, 4}
