"""The critic: a question per predicted label that looks for the error (ACT, arXiv 2511.09833).

The judge sees the item, the label and its definition, and the label the annotating model
ranked next with its definition, and is asked whether the label is **wrong**: asking "is it
correct?" invites a yes-bias, and a label is easiest to doubt against its strongest rival.
"yes" and "no" are scored; P(no) is the critic's P(correct). The judge can be the annotating
model or a separately configured one (``CRITIC_MODEL``); ACT found a different model family
criticises better than the annotator itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from backend.annotate.tagging import NO, YES
from backend.models.engine import Engine
from backend.prompts import PromptBook

NO_ALTERNATIVE = "none"  # the runner-up when a label set has one label
NO_ALTERNATIVE_MEANS = "no other label is possible"


def judge(
    engine: Engine,
    prompts: PromptBook,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    alternatives: Sequence[str | None],
    hints: dict[str, str] | None = None,
) -> np.ndarray:
    """P(the label is correct) for each (image, label, runner-up) triple, batched per distinct question."""
    hints = hints or {}
    verdicts = np.empty(len(images))
    asked = [_question(prompts, label, alternative, hints) for label, alternative in zip(labels, alternatives,
                                                                                          strict=True)]  # fmt: skip
    for question in dict.fromkeys(asked):
        indices = [i for i, item in enumerate(asked) if item == question]
        scores = engine.score_options([images[i] for i in indices], question, (YES, NO))
        verdicts[indices] = scores.probabilities[:, 1]  # "no, it is not wrong"
    return verdicts


def _question(prompts: PromptBook, label: str, alternative: str | None, hints: dict[str, str]) -> str:
    runner_up = alternative or NO_ALTERNATIVE
    return prompts.render(
        "critic", label=label, definition=prompts.definition(label, hints.get(label)), alternative=runner_up,
        alternative_definition=NO_ALTERNATIVE_MEANS if alternative is None else prompts.definition(
            alternative, hints.get(alternative)),
    )  # fmt: skip
