"""Whole-image choices: one label (single choice) or a set of tags (multiple choice)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from backend.annotate.choice import Choice, choose
from backend.models.engine import Engine
from backend.prompts import PromptBook, format_labels

YES, NO = "yes", "no"


@dataclass(frozen=True)
class Tags:
    labels: tuple[str, ...]  # the tags kept, in label-set order
    presence: dict[str, float]  # P(label present) for every label of the set

    @property
    def confidence(self) -> float:
        """Confidence of the least certain keep/drop decision."""
        return min(max(p, 1.0 - p) for p in self.presence.values())


def classify_images(
    engine: Engine, prompts: PromptBook, images: Sequence[Image.Image], labels: Sequence[str]
) -> list[Choice]:
    prompt = prompts.render("image_choice", labels=format_labels(labels))
    return choose(engine, images, prompt, labels)


def tag_images(
    engine: Engine, prompts: PromptBook, images: Sequence[Image.Image], labels: Sequence[str], threshold: float
) -> list[Tags]:
    """Ask, for every label, whether each image shows it; keep labels with P(yes) ≥ threshold."""
    presence: list[dict[str, float]] = [{} for _ in images]
    for label in labels:
        answers = choose(engine, images, prompts.render("image_tag", label=label), (YES, NO))
        for row, answer in zip(presence, answers, strict=True):
            row[label] = answer.probabilities[0]
    return [Tags(tuple(label for label in labels if row[label] >= threshold), row) for row in presence]
