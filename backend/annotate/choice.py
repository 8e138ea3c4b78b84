"""Choosing one label from a fixed set for an image or crop, in one of three modes (arXiv 2603.06578).

- ``"closed"`` (default): every label is scored as the answer by log-probability, and the
  probabilities are a softmax over the label set.
- ``"multiple-choice"``: the labels are listed with letters (A, B, …) and the letters are
  scored; the letters carry no meaning of their own, so a label's wording does not favour it.
- ``"open-world"``: the model answers freely ("Dachshund (Dog)"); the answer's category is
  mapped onto the nearest label by the text encoder. An answer no label is similar enough to
  (below ``MAPPING_MIN_SIMILARITY``) is kept as an out-of-set **suggestion**, a candidate new
  class, beside the nearest label, which it still gets so that nothing is dropped.

Option order: a model may favour labels by their place in the list. ``orders`` > 1 asks
again with the list rotated (cyclic orders, evenly spaced) and averages the probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from backend.annotate.mapping import map_onto
from backend.models.engine import Engine
from backend.prompts import LETTERS, PromptBook, format_labels, lettered_question

LabelMode = Literal["closed", "multiple-choice", "open-world"]
LABEL_MODES: tuple[LabelMode, ...] = ("closed", "multiple-choice", "open-world")
OPEN_ANSWER_TOKENS = 24


@dataclass(frozen=True)
class Choice:
    label: str
    probability: float  # of ``label``, normalised over ``labels``
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]  # one per label, summing to 1
    mapped: float = 0.0  # share of the model's free-text answers that had to be mapped onto the label set
    suggestion: str | None = None  # an open answer no label was similar enough to: a candidate new class

    @property
    def runner_up(self) -> str | None:
        """The label ranked next after ``label`` (None when there is only one label)."""
        ranked = sorted(zip(self.probabilities, self.labels, strict=True), key=lambda pair: -pair[0])
        return next((label for _, label in ranked if label != self.label), None)

    @property
    def margin(self) -> float:
        """How far the chosen label is ahead of the runner-up (0 when there is only one label)."""
        ranked = sorted(self.probabilities, reverse=True)
        return ranked[0] - ranked[1] if len(ranked) > 1 else ranked[0]


def choose(engine: Engine, images: Sequence[Image.Image], prompt: str, labels: Sequence[str]) -> list[Choice]:
    """For each image, the most probable of ``labels`` as the answer to ``prompt`` (closed, as listed)."""
    scores = engine.score_options(images, prompt, labels)
    mapped = scores.mapped if scores.mapped is not None else [0.0] * len(images)
    return [_choice(labels, row, share) for row, share in zip(scores.probabilities, mapped, strict=True)]


def choose_label(
    engine: Engine, prompts: PromptBook, template: str, images: Sequence[Image.Image], labels: Sequence[str], *,
    mode: LabelMode = "closed", orders: int = 1, mapper=None,
) -> list[Choice]:  # fmt: skip
    """For each image (or crop), one of ``labels``, asked with the prompt file ``template`` ("box_label",
    "image_choice") listing the labels, in the way ``mode`` says and averaged over ``orders`` cyclic orders of the
    list (see the module's docstring); open-world asks ``open_label`` instead and maps with ``mapper``."""
    if mode == "open-world":
        return _open(engine, images, prompts.render("open_label"), labels, mapper)
    if mode == "multiple-choice" and len(labels) > len(LETTERS):
        mode = "closed"  # more labels than letters: scored by their text
    totals = np.zeros((len(images), len(labels)))
    mapped = np.zeros(len(images))
    rotations = _rotations(len(labels), orders)
    for shift in rotations:
        order = [*labels[shift:], *labels[:shift]]
        prompt = prompts.render(template, labels=format_labels(order))
        if mode == "multiple-choice":
            scores = engine.score_options(images, lettered_question(prompt, order), LETTERS[: len(order)])
        else:
            scores = engine.score_options(images, prompt, order)
        back = [order.index(label) for label in labels]  # each label's column in this order
        totals += scores.probabilities[:, back]
        mapped += scores.mapped if scores.mapped is not None else 0.0
    return [_choice(labels, row / len(rotations), share / len(rotations))
            for row, share in zip(totals, mapped, strict=True)]  # fmt: skip


def _rotations(count: int, orders: int) -> list[int]:
    """``orders`` cyclic shifts of a list of ``count``, evenly spaced (0 first: the order as configured)."""
    k = max(1, min(orders, count))
    return sorted({round(i * count / k) % count for i in range(k)})


def _choice(labels: Sequence[str], row: np.ndarray, mapped: float = 0.0, suggestion: str | None = None) -> Choice:
    best = int(np.argmax(row))
    return Choice(labels[best], float(row[best]), tuple(labels), tuple(float(p) for p in row), float(mapped),
                  suggestion)  # fmt: skip


def _open(engine: Engine, images: Sequence[Image.Image], prompt: str, labels: Sequence[str], mapper) -> list[Choice]:
    """Free answers mapped onto the labels. The chosen label's probability is the answer's geometric-mean token
    probability (times its similarity when mapped); the rest is shared by the other labels."""
    from backend.annotate.boxes import name_category

    choices = []
    for generation in engine.generate(images, prompt, max_new_tokens=OPEN_ANSWER_TOKENS):
        mapping = map_onto(name_category(generation.text), labels, mapper)
        if mapping.nearest is None:  # nothing to map with: the answer is a suggestion, every label equally likely
            choices.append(_choice(labels, np.full(len(labels), 1 / len(labels)), 1.0, generation.text or None))
            continue
        sureness = generation.confidence if generation.confidence is not None else 0.5
        p = min(max(sureness * max(0.0, mapping.similarity), 1e-3), 1.0)
        row = np.full(len(labels), (1.0 - p) / max(1, len(labels) - 1)) if len(labels) > 1 else np.ones(1)
        row[list(labels).index(mapping.nearest)] = p if len(labels) > 1 else 1.0
        below_floor = mapping.label is None
        choices.append(_choice(labels, row, 0.0 if mapping.exact else 1.0, generation.text if below_floor else None))
    return choices
