"""Which tasks a person should review: a sample drawn by a rule with known inclusion probabilities (ACT).

A task's suspicion is ε̂ = 1 − s, where s is its P(all labels correct), the prediction score.
A selection rule gives each task an inclusion probability π, never below ``floor``, and each
task is then drawn on its own with probability π (Poisson sampling, seeded). Because every π
is known and positive, what reviewers find in the sample estimates the whole project without
bias by inverse-probability weighting (:func:`estimate_accuracy`), and calibration can learn
from the sample without the bias of seeing only the most suspicious tasks.

Rules (``rule=``), each sized by a ``budget`` (the expected share of tasks reviewed) or a
``target`` (the expected share of wrong-label events caught, Σ π·ε̂ / Σ ε̂):

- ``"threshold"`` (ACT's recommended rule): π = 1 for the most suspicious tasks (ε̂ at or
  above a threshold τ), ``floor`` for the rest.
- ``"exponential"``: π = max(floor, 1 / (1 + exp(−β (ε̂ − α)))), rising smoothly with suspicion.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from backend.settings import Settings

SELECTION_RULES = ("threshold", "exponential")
FLOOR = 0.05  # every task's least chance of review, so that every inverse-probability weight exists
STEEPNESS = 10.0  # β of the exponential rule
LISTED = 20  # drawn task ids printed with a plan


@dataclass(frozen=True)
class Inclusion:
    task: int
    score: float  # P(all labels correct), the prediction score
    probability: float  # π: this task's chance of being drawn for review
    selected: bool


@dataclass(frozen=True)
class ReviewPlan:
    rule: str
    floor: float
    seed: int
    tasks: int  # tasks with a score
    review: int  # tasks drawn for review
    expected_review: float  # Σ π
    review_fraction: float  # review / tasks
    expected_errors: float  # Σ ε̂ over every scored task
    expected_errors_caught: float  # Σ ε̂ over the drawn tasks
    caught_fraction: float
    first_task_ids: tuple[int, ...]  # the drawn tasks, most suspicious first (at most LISTED)
    inclusion: tuple[Inclusion, ...]  # every scored task, most suspicious first

    def as_dict(self, *, with_inclusion: bool = False) -> dict:
        """The plan as JSON-ready data; the per-task probabilities only when asked for (they can be long)."""
        data = asdict(self)
        if not with_inclusion:
            del data["inclusion"]
        return data


@dataclass(frozen=True)
class Estimate:
    value: float | None  # the estimated share of correct labels in the whole project
    low: float | None  # the confidence interval's bounds
    high: float | None
    confidence: float
    reviewed_tasks: int  # drawn tasks whose review arrived
    reviewed_labels: int


def plan_review(
    scores: Sequence[tuple[int, float]], *, budget: float | None = None, target: float | None = None,
    rule: str = "threshold", floor: float = FLOOR, steepness: float = STEEPNESS, seed: int = 0,
) -> ReviewPlan:  # fmt: skip
    """Draw the tasks to review from (task id, P(all labels correct)) pairs.

    Give exactly one of ``budget`` (expected share of tasks reviewed, e.g. 0.2) or ``target``
    (expected share of wrong-label events caught, e.g. 0.9). ``floor`` is every task's least
    inclusion probability (0 gives a deterministic top-k, whose estimates are not unbiased);
    ``seed`` fixes the draw.
    """
    if (budget is None) == (target is None):
        raise ValueError("give exactly one of budget (fraction of tasks) or target (fraction of expected errors)")
    if budget is not None and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget}: give the fraction of tasks to review, above 0 and at most 1 (e.g. 0.2)")
    if target is not None and not 0.0 < target <= 1.0:
        raise ValueError(f"target={target}: give the fraction of expected errors to catch, above 0 and at most 1")
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule={rule!r}; choose one of {', '.join(SELECTION_RULES)}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor={floor} must lie in [0, 1]")
    ordered = sorted(scores, key=lambda item: (item[1], item[0]))  # most suspicious first, ties by task id
    suspicion = np.array([1.0 - min(max(score, 0.0), 1.0) for _, score in ordered])
    if budget is not None:
        floor = min(floor, max(budget, 0.0))  # a budget below the floor samples every task at the budget
    probabilities = _probabilities(suspicion, rule, floor, steepness, budget, target)
    by_task = sorted(range(len(ordered)), key=lambda i: ordered[i][0])  # the draw follows task ids, not scores
    draws = np.empty(len(ordered))
    draws[by_task] = np.random.default_rng(seed).random(len(ordered))
    selected = draws < probabilities
    total = float(suspicion.sum())
    caught = float(suspicion[selected].sum())
    inclusion = tuple(Inclusion(task, float(score), float(p), bool(s))
                      for (task, score), p, s in zip(ordered, probabilities, selected, strict=True))  # fmt: skip
    return ReviewPlan(
        rule=rule, floor=floor, seed=seed, tasks=len(ordered), review=int(selected.sum()),
        expected_review=round(float(probabilities.sum()), 4),
        review_fraction=round(float(selected.mean()), 4) if ordered else 0.0,
        expected_errors=round(total, 4), expected_errors_caught=round(caught, 4),
        caught_fraction=round(caught / total, 4) if total else 1.0,
        first_task_ids=tuple(item.task for item in inclusion if item.selected)[:LISTED], inclusion=inclusion,
    )  # fmt: skip


def _probabilities(
    suspicion: np.ndarray, rule: str, floor: float, steepness: float, budget: float | None, target: float | None
) -> np.ndarray:
    """π per task (``suspicion`` sorted descending), sized so that Σπ/N meets ``budget`` or Σπε̂/Σε̂ ``target``."""
    n = len(suspicion)
    if n == 0:
        return np.zeros(0)

    def meets(pi: np.ndarray) -> bool:
        if budget is not None:
            return float(pi.sum()) >= budget * n - 1e-9
        total = float(suspicion.sum())
        return total == 0 or float((pi * suspicion).sum()) >= (target or 0.0) * total - 1e-9

    if rule == "threshold":
        for k in range(n + 1):  # the k most suspicious tasks for sure, the rest at the floor
            pi = np.where(np.arange(n) < k, 1.0, floor)
            if meets(pi):
                return pi
        return np.ones(n)
    low, high = -1.0, 2.0  # α: the suspicion at which π reaches ½; larger α samples fewer tasks
    for _ in range(60):
        alpha = (low + high) / 2
        low, high = (alpha, high) if meets(_logistic(suspicion, alpha, steepness, floor)) else (low, alpha)
    return _logistic(suspicion, low, steepness, floor)


def _logistic(suspicion: np.ndarray, alpha: float, steepness: float, floor: float) -> np.ndarray:
    return np.maximum(floor, 1.0 / (1.0 + np.exp(-steepness * (suspicion - alpha))))


def estimate_accuracy(
    *, correct: Sequence[float], labels: Sequence[float], probabilities: Sequence[float], confidence: float = 0.95
) -> Estimate:
    """The project's share of correct labels from a reviewed sample, with a confidence interval.

    One entry per reviewed task of the sample: its labels the reviewer kept (``correct``), its
    labels (``labels``) and its inclusion probability π. The estimate is the ratio of
    inverse-probability-weighted sums (Hájek), R = Σ cᵢ/πᵢ / Σ nᵢ/πᵢ; its variance under Poisson
    sampling is linearised, V = Σ (1 − πᵢ)/πᵢ² (cᵢ − R nᵢ)² / (Σ nᵢ/πᵢ)² (tasks drawn with π = 1
    add none: they are known exactly).

    Wrong labels are rare, so a normal interval R ± 1.96√V covers the truth far too seldom (about
    half the time in simulation: a sample that happens to hold no error has V near 0). The
    interval is Korn and Graubard's instead: a Jeffreys interval for a proportion R over the
    effective number of labels R(1 − R)/V (at most the labels reviewed), which stays open on the
    side the sample could not see (95 % coverage in simulation, tested).
    """
    c, n, pi = (np.asarray(values, dtype=float) for values in (correct, labels, probabilities))
    if not (len(c) == len(n) == len(pi)):
        raise ValueError("correct, labels and probabilities need one entry per reviewed task")
    if (pi <= 0).any() or (pi > 1).any():
        raise ValueError("every inclusion probability must lie in (0, 1]")
    weights = 1.0 / pi
    weighted_labels = float((n * weights).sum())
    if weighted_labels == 0:
        return Estimate(None, None, None, confidence, len(c), int(n.sum()))
    ratio = float((c * weights).sum()) / weighted_labels
    variance = float(((1.0 - pi) * weights**2 * (c - ratio * n) ** 2).sum()) / weighted_labels**2
    reviewed = float(n.sum())
    if (pi >= 1).all():  # every task was drawn for sure: a census, known exactly
        return Estimate(ratio, ratio, ratio, confidence, len(c), int(reviewed))
    effective = min(reviewed, ratio * (1 - ratio) / variance) if variance > 0 else reviewed
    low, high = _jeffreys(ratio * effective, effective, confidence)
    return Estimate(ratio, min(low, ratio), max(high, ratio), confidence, len(c), int(reviewed))


def _jeffreys(successes: float, trials: float, confidence: float) -> tuple[float, float]:
    """The Jeffreys interval of a proportion (Beta(½, ½) prior), open to 0 or 1 when the sample is at that end."""
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    low = float(beta.ppf(tail, successes + 0.5, trials - successes + 0.5)) if successes > 0 else 0.0
    high = float(beta.ppf(1 - tail, successes + 0.5, trials - successes + 0.5)) if successes < trials else 1.0
    return low, high


def run_review_plan(
    settings: Settings, project: int, *, budget: float | None, target: float | None, rule: str = "threshold",
    floor: float = FLOOR, seed: int = 0, create_view: bool = False,
) -> None:  # fmt: skip
    """`mllm-backend review-plan`: read the project's scores through the SDK, draw the sample, record every
    task's π in the review store (for the estimate and calibration), and print the plan as JSON."""
    from backend.labelstudio.client import connect, ensure_review_view, prediction_scores, sample_view
    from backend.predictor import model_version
    from backend.prompts import PromptBook
    from backend.reviews import ReviewStore

    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("mllm-backend: review-plan needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        raise SystemExit(2)
    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    version = model_version(settings, PromptBook(settings.prompts_dir))
    scores = prediction_scores(client, project, version)
    try:
        plan = plan_review(scores, budget=budget, target=target, rule=rule, floor=floor, seed=seed)
    except ValueError as exc:
        print(f"mllm-backend: review-plan: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    store = ReviewStore.for_settings(settings)
    report = {"project": project, "model_version": version, "plan_id": store.record_plan(project, plan),
              **plan.as_dict()}  # fmt: skip
    if create_view:
        report["view_id"] = ensure_review_view(client, project)
        report["sample_view_id"] = sample_view(client, project, [i.task for i in plan.inclusion if i.selected])
    print(json.dumps(report, indent=2))


def run_review_estimate(settings: Settings, project: int, confidence: float = 0.95) -> None:
    """`mllm-backend review-estimate`: the project's label accuracy estimated from its review sample (JSON)."""
    from backend.reviews import ReviewStore

    store = ReviewStore.for_settings(settings)
    print(json.dumps(store.sample_estimate(project, confidence), indent=2))
