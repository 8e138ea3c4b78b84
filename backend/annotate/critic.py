"""The critic: a judge question per predicted label, scored by P(yes) vs P(no) (ACT, arXiv 2511.09833).

The judge can be the annotating model or a separately configured one (``CRITIC_MODEL``);
ACT found a different model family criticises better than the annotator itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from backend.annotate.tagging import NO, YES
from backend.models.engine import Engine
from backend.prompts import PromptBook


def judge(
    engine: Engine,
    prompts: PromptBook,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    hints: dict[str, str] | None = None,
) -> np.ndarray:
    """P(the label is correct) for each (image, label) pair, batched per label."""
    verdicts = np.empty(len(images))
    for label in dict.fromkeys(labels):
        indices = [i for i, item in enumerate(labels) if item == label]
        definition = prompts.definition(label, (hints or {}).get(label))
        question = prompts.render("critic", label=label, definition=definition)
        scores = engine.score_options([images[i] for i in indices], question, (YES, NO))
        verdicts[indices] = scores.probabilities[:, 0]
    return verdicts
