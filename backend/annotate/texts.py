"""Text about images: a caption for a whole image, or the answer to a question about it.

The model answers freely; the confidence is the answer's geometric-mean token probability
(None when the provider returns no log-probabilities), so a long answer is not penalised
for its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from backend.models.engine import Engine, Generation
from backend.prompts import PromptBook

CAPTION_TOKENS = 64
ANSWER_TOKENS = 32
READING_TOKENS = 48


@dataclass(frozen=True)
class Text:
    text: str
    confidence: float | None  # geometric-mean token probability


def write_texts(engine: Engine, prompts: PromptBook, items: Sequence[tuple[Image.Image, str | None]]) -> list[Text]:
    """For each (image, question): the answer to the question, or a caption when the question is None."""
    texts: list[Text | None] = [None] * len(items)
    captions = [i for i, (_, question) in enumerate(items) if question is None]
    if captions:
        prompt = prompts.render("caption")
        generations = engine.generate([items[i][0] for i in captions], prompt, max_new_tokens=CAPTION_TOKENS)
        for i, generation in zip(captions, generations, strict=True):
            texts[i] = as_text(generation)
    for question in dict.fromkeys(q for _, q in items if q is not None):
        asked = [i for i, (_, q) in enumerate(items) if q == question]
        prompt = prompts.render("answer", question=question)
        generations = engine.generate([items[i][0] for i in asked], prompt, max_new_tokens=ANSWER_TOKENS)
        for i, generation in zip(asked, generations, strict=True):
            texts[i] = as_text(generation)
    return [text for text in texts if text is not None]


def as_text(generation: Generation) -> Text:
    return Text(generation.text.strip(), generation.confidence)
