"""Boxes → labels: a person draws a box, the model names what is inside it (arXiv 2503.11096).

Besides a label from the project's label set, a box can get a fine-grained free-text name
("Dachshund (Dog)"). The category in its parentheses (or the whole name) is mapped onto the
label set, so the name can be checked against the box's label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from backend.annotate.mapping import LabelMapper, Mapping
from backend.annotate.texts import READING_TOKENS, as_text
from backend.models.engine import Engine
from backend.prompts import PromptBook

FINE_NAME_TOKENS = 24
_CATEGORY = re.compile(r"\(([^()]+)\)\s*\.?\s*$")


@dataclass(frozen=True)
class FineName:
    text: str
    confidence: float | None  # geometric-mean token probability, when the provider gives log-probs
    category: Mapping | None  # the name's category mapped onto the label set


def name_crops(
    engine: Engine,
    prompts: PromptBook,
    crops: Sequence[Image.Image],
    crop_labels: Sequence[str],
    label_set: Sequence[str],
    mapper: LabelMapper | None,
) -> list[FineName]:
    """A fine-grained name for each crop ("what exactly is this?"), batched per distinct prompt: one batch when
    the template leaves the label out (the default), one per label when it names it ("this is a {label}...")."""
    names: list[FineName | None] = [None] * len(crops)
    asked = [prompts.render("box_fine_label", label=label) for label in crop_labels]
    for prompt in dict.fromkeys(asked):
        indices = [i for i, question in enumerate(asked) if question == prompt]
        generations = engine.generate([crops[i] for i in indices], prompt, max_new_tokens=FINE_NAME_TOKENS)
        for i, generation in zip(indices, generations, strict=True):
            category = name_category(generation.text)
            mapping = mapper.map(category, label_set) if mapper is not None and label_set and category else None
            names[i] = FineName(generation.text, generation.confidence, mapping)
    return [name for name in names if name is not None]


def read_crops(engine: Engine, prompts: PromptBook, crops: Sequence[Image.Image]) -> list[FineName]:
    """The text written in each crop (OCR), with its geometric-mean token probability."""
    generations = engine.generate(list(crops), prompts.render("region_text"), max_new_tokens=READING_TOKENS)
    return [FineName(text.text, text.confidence, None) for text in map(as_text, generations)]


def name_category(text: str) -> str:
    """The general category of a fine-grained name: "Dachshund (Dog)" → "Dog"; no parentheses → the name."""
    found = _CATEGORY.search(text)
    return (found.group(1) if found else text).strip()
