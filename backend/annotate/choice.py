"""Constrained choice: the model picks one of a fixed set of answers, scored by log-probability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from backend.models.engine import Engine


@dataclass(frozen=True)
class Choice:
    label: str
    probability: float  # of ``label``, normalised over ``labels``
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]  # one per label, summing to 1
    mapped: float = 0.0  # share of the model's free-text answers that had to be mapped onto the label set

    @property
    def margin(self) -> float:
        """How far the chosen label is ahead of the runner-up (0 when there is only one label)."""
        ranked = sorted(self.probabilities, reverse=True)
        return ranked[0] - ranked[1] if len(ranked) > 1 else ranked[0]


def choose(engine: Engine, images: Sequence[Image.Image], prompt: str, labels: Sequence[str]) -> list[Choice]:
    """For each image, the most probable of ``labels`` as the answer to ``prompt``."""
    scores = engine.score_options(images, prompt, labels)
    mapped = scores.mapped if scores.mapped is not None else [0.0] * len(images)
    choices = []
    for row, share in zip(scores.probabilities, mapped, strict=True):
        best = int(row.argmax())
        choices.append(
            Choice(labels[best], float(row[best]), tuple(labels), tuple(float(p) for p in row), float(share))
        )
    return choices
