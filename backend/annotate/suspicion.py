"""Suspicion: how likely each predicted label is correct (ACT, arXiv 2511.09833).

**Fusion** (a log-linear pool of the signals that are available for a label):

    logit(raw) = Σ_k w_k · logit(p_k) / Σ_k w_k  −  β · mapped

over the probability signals p_k:

| signal | p | weight |
| --- | --- | --- |
| annotator | the label's probability from the annotating model | 1 |
| margin | ½ + ½ · (p₁ − p₂), its lead over the runner-up | 0.5 |
| critic | the judge's P("yes, this label is correct") | 1 |
| classifier | the trained classifier's probability for the label | 1 |

``mapped`` is the share of free-text answers that had to be mapped onto the label set
(out-of-set answers are weaker evidence); β = ln 2 halves the odds when every answer was
mapped. A box whose fine-grained name maps to a *different* label than the one chosen
("Siamese (Cat)" on a box labelled Dog) loses another ln 2. Probabilities are clipped to
[0.001, 0.999] first.

**Calibration**: once a project has enough reviewed labels, an isotonic regression from
raw score to "the label survived review" turns the raw score into a calibrated P(correct).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WEIGHTS = {"annotator": 1.0, "margin": 0.5, "critic": 1.0, "classifier": 1.0}
MAPPED_PENALTY = math.log(2.0)
_CLIP = 1e-3


@dataclass(frozen=True)
class Signals:
    annotator: float
    margin: float | None = None
    critic: float | None = None
    classifier: float | None = None
    mapped: float = 0.0
    name_agrees: bool | None = None  # does the box's fine-grained name map back to the same label?


def _logit(p: float) -> float:
    p = min(max(p, _CLIP), 1 - _CLIP)
    return math.log(p / (1 - p))


def fuse(signals: Signals) -> float:
    """The raw (uncalibrated) estimate that the label is correct, in (0, 1)."""
    probabilities = {"annotator": signals.annotator, "critic": signals.critic, "classifier": signals.classifier}
    if signals.margin is not None:
        probabilities["margin"] = 0.5 + 0.5 * signals.margin
    present = {name: p for name, p in probabilities.items() if p is not None}
    total = sum(WEIGHTS[name] for name in present)
    pooled = sum(WEIGHTS[name] * _logit(p) for name, p in present.items()) / total
    pooled -= MAPPED_PENALTY * signals.mapped
    if signals.name_agrees is False:
        pooled -= MAPPED_PENALTY
    return 1.0 / (1.0 + math.exp(-pooled))


def expected_calibration_error(scores: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> float:
    """Σ_b (n_b / n) · |mean score_b − accuracy_b| over equal-width score bins."""
    scores_arr, outcomes_arr = np.asarray(scores, dtype=float), np.asarray(outcomes, dtype=float)
    if len(scores_arr) == 0:
        return 0.0
    which = np.minimum((scores_arr * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(scores_arr[members].mean() - outcomes_arr[members].mean())
    return float(error)


class Calibrator:
    """Isotonic map from raw score to P(label survives review)."""

    def __init__(self) -> None:
        from sklearn.isotonic import IsotonicRegression

        self._model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
        self.fitted = False

    def fit(self, scores: Sequence[float], outcomes: Sequence[bool]) -> Calibrator:
        self._model.fit(np.asarray(scores, dtype=float), np.asarray(outcomes, dtype=float))
        self.fitted = True
        return self

    def __call__(self, score: float) -> float:
        return float(self._model.predict([score])[0]) if self.fitted else score


def cross_fitted_ece(scores: Sequence[float], outcomes: Sequence[bool], folds: int = 2) -> float:
    """ECE of calibrated scores where each half is calibrated by a fit on the other half (no peeking)."""
    scores_arr, outcomes_arr = np.asarray(scores, dtype=float), np.asarray(outcomes, dtype=bool)
    order = np.random.default_rng(0).permutation(len(scores_arr))
    calibrated = np.empty(len(scores_arr))
    for fold in range(folds):
        held = order[fold::folds]
        train = np.setdiff1d(order, held)
        model = Calibrator().fit(scores_arr[train], outcomes_arr[train])
        calibrated[held] = [model(s) for s in scores_arr[held]]
    return expected_calibration_error(calibrated, outcomes_arr)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores_arr, positives_arr = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    pos, neg = scores_arr[positives_arr], scores_arr[~positives_arr]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
