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


class Calibrator:
    """Isotonic map from raw score to P(label survives review)."""

    def __init__(self) -> None:
        from sklearn.isotonic import IsotonicRegression

        self._model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
        self.fitted = False

    def fit(
        self, scores: Sequence[float], outcomes: Sequence[bool], weights: Sequence[float] | None = None
    ) -> Calibrator:
        """Fit on reviewed labels; ``weights`` (1/π for a label drawn with probability π) undo how they were
        selected for review."""
        self._model.fit(np.asarray(scores, dtype=float), np.asarray(outcomes, dtype=float),
                        sample_weight=None if weights is None else np.asarray(weights, dtype=float))  # fmt: skip
        self.fitted = True
        return self

    def __call__(self, score: float) -> float:
        return float(self._model.predict([score])[0]) if self.fitted else score
