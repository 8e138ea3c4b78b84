"""Boxes → labels: a person draws a box, the model names what is inside it (arXiv 2503.11096)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from backend.annotate.choice import Choice, choose
from backend.models.engine import Engine
from backend.prompts import PromptBook, format_labels


def label_crops(
    engine: Engine, prompts: PromptBook, crops: Sequence[Image.Image], labels: Sequence[str]
) -> list[Choice]:
    """One label from ``labels`` for each crop, with its probability over the label set."""
    prompt = prompts.render("box_label", labels=format_labels(labels))
    return choose(engine, crops, prompt, labels)
