"""The review sample (ACT): inclusion probabilities by rule, the accuracy estimate from it, and its recording."""

from __future__ import annotations

import numpy as np
import pytest

from backend.review_plan import FLOOR, estimate_accuracy, plan_review
from backend.reviews import ReviewStore


def _project(n: int = 2000, seed: int = 0):
    """Tasks with 1-4 labels each; a task's labels are each wrong with probability 1 - score (scores calibrated)."""
    rng = np.random.default_rng(seed)
    scores = rng.beta(6, 1.2, n)  # most tasks look fine, a tail looks suspicious
    labels = rng.integers(1, 5, n)
    per_label = scores ** (1 / labels)  # P(all labels correct) = score
    correct = rng.binomial(labels, per_label)
    return list(zip(range(1, n + 1), scores.tolist(), strict=True)), labels, correct


@pytest.mark.parametrize("rule", ["threshold", "exponential"])
def test_each_rule_meets_its_budget_never_goes_below_the_floor_and_favours_suspicious_tasks(rule):
    scores, _, _ = _project()
    plan = plan_review(scores, budget=0.2, rule=rule, seed=3)
    pi = np.array([i.probability for i in plan.inclusion])  # most suspicious first
    assert plan.expected_review == pytest.approx(0.2 * len(scores), rel=1e-3)
    assert pi.min() >= FLOOR and (np.diff(pi) <= 1e-12).all()  # never rising as suspicion falls
    assert abs(plan.review - plan.expected_review) < 4 * np.sqrt((pi * (1 - pi)).sum())  # drawn by π
    if rule == "threshold":
        assert set(np.round(pi, 9)) == {1.0, FLOOR}
    assert plan.caught_fraction > 0.2 + 0.1  # the suspicious share is over-sampled
    target = plan_review(scores, target=0.6, rule=rule)
    suspicion = 1 - np.array([i.score for i in target.inclusion])
    caught = (np.array([i.probability for i in target.inclusion]) * suspicion).sum() / suspicion.sum()
    assert caught == pytest.approx(0.6, abs=0.01)


def test_the_draw_is_fixed_by_its_seed_and_changes_with_it():
    scores, _, _ = _project(500)
    assert plan_review(scores, budget=0.2, seed=1) == plan_review(scores, budget=0.2, seed=1)
    drawn = [{i.task for i in plan_review(scores, budget=0.2, seed=seed).inclusion if i.selected} for seed in (1, 2)]
    assert drawn[0] != drawn[1]


def test_the_weighted_estimate_covers_the_true_accuracy_where_the_sample_mean_is_biased():
    scores, labels, correct = _project()
    truth = correct.sum() / labels.sum()
    covered, weighted_errors, naive_errors = 0, [], []
    draws = 200
    for seed in range(draws):
        plan = plan_review(scores, budget=0.15, rule="threshold", seed=seed)
        drawn = [(i.task - 1, i.probability) for i in plan.inclusion if i.selected]
        rows = [t for t, _ in drawn]
        estimate = estimate_accuracy(correct=correct[rows], labels=labels[rows], probabilities=[p for _, p in drawn])
        covered += estimate.low <= truth <= estimate.high
        weighted_errors.append(estimate.value - truth)
        naive_errors.append(correct[rows].sum() / labels[rows].sum() - truth)
    assert covered / draws >= 0.9  # a 95 % interval
    assert abs(np.mean(weighted_errors)) < 0.005  # unbiased
    assert np.mean(naive_errors) < -0.05  # reviewing the suspicious tasks alone says the labels are far worse


def test_the_interval_stays_honest_when_errors_are_rare():
    """80 tasks, about 2 % of labels wrong and most of them in the suspicious tasks: a sample often sees no error
    outside them. A normal interval then covers the truth about half the time; this one about 95 %."""
    covered, tries = 0, 0
    for world in range(20):
        rng = np.random.default_rng(world)
        labels = rng.integers(2, 6, 80)
        scores = rng.beta(8, 0.6, 80)
        correct = labels - rng.binomial(labels, np.clip(0.8 * (1 - scores) / labels, 0, 1))
        truth = correct.sum() / labels.sum()
        for seed in range(20):
            plan = plan_review(list(enumerate(scores.tolist())), budget=0.2, seed=seed)
            rows = [i.task for i in plan.inclusion if i.selected]
            pi = [i.probability for i in plan.inclusion if i.selected]
            estimate = estimate_accuracy(correct=correct[rows], labels=labels[rows], probabilities=pi)
            covered += estimate.low <= truth <= estimate.high
            tries += 1
    assert covered / tries >= 0.9


def test_tasks_drawn_for_sure_add_no_uncertainty():
    exact = estimate_accuracy(correct=[3, 1], labels=[4, 2], probabilities=[1.0, 1.0])
    assert exact.value == exact.low == exact.high == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="inclusion probability"):
        estimate_accuracy(correct=[1], labels=[1], probabilities=[0.0])


def _predicted(store: ReviewStore, project: int, task: int, raw: float) -> None:
    from backend.labelstudio.outcomes import PredictedLabel

    store.record_predictions(project, "v1", [PredictedLabel(task, f"b{task}", "label", "Cat", raw)])


def _review(store: ReviewStore, project: int, task: int, kept: bool) -> None:
    result = [
        {
            "id": f"b{task}",
            "from_name": "label",
            "type": "rectanglelabels",
            "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Cat" if kept else "Dog"]},
        }
    ]
    store.record_annotation(project, task, result, annotation=task)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_store_keeps_the_plan_and_estimates_from_its_reviewed_sample(tmp_path, database, request):
    location = request.getfixturevalue("postgres_url") if database == "postgresql" else tmp_path / "reviews.sqlite3"
    store = ReviewStore(location, min_reviews=4)
    scores = [(task, 0.1 + 0.8 * task / 40) for task in range(1, 41)]
    for task, score in scores:
        _predicted(store, 9, task, score)
    assert store.sample_estimate(9)["plan_id"] is None
    plan = plan_review(scores, budget=0.3, seed=4)
    assert store.record_plan(9, plan) == 1
    drawn = [i for i in plan.inclusion if i.selected]
    for item in drawn[:-1]:  # the last drawn task is not reviewed yet
        _review(store, 9, item.task, kept=item.task % 3 != 0)
    _review(store, 9, next(i.task for i in plan.inclusion if not i.selected), kept=False)  # outside the sample
    estimate = store.sample_estimate(9)
    expected = estimate_accuracy(correct=[int(i.task % 3 != 0) for i in drawn[:-1]], labels=[1] * (len(drawn) - 1),
                                 probabilities=[i.probability for i in drawn[:-1]])  # fmt: skip
    assert estimate["plan_id"] == 1 and estimate["drawn_tasks"] == len(drawn) and not estimate["complete"]
    assert estimate["reviewed_tasks"] == len(drawn) - 1
    assert estimate["accuracy"]["value"] == pytest.approx(expected.value)
    assert estimate["accuracy"]["low"] == pytest.approx(expected.low)
    assert store.inclusion(9) == {i.task: pytest.approx(i.probability) for i in drawn}  # for ACT's loss
    assert store.record_plan(9, plan_review(scores, budget=0.5, seed=5)) == 2  # the next plan counts from here
    assert store.sample_estimate(9)["plan_id"] == 2
