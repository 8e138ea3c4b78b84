"""The one interface the annotation code uses to reach a multimodal model.

Annotation code asks two things and never learns which provider answers:
"how likely is each of these answers, for each image, after this prompt?"
(:meth:`Engine.score_options`) and "what would you say?" (:meth:`Engine.generate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from PIL import Image

OptionScoring = Literal["mean", "sum"]
OPTION_SCORING: tuple[OptionScoring, ...] = ("mean", "sum")
"""How an option's token log-probabilities become its score.

- ``"mean"`` (default): the mean log-probability per answer token (end-of-turn token
  included), i.e. the log of the geometric-mean token probability. An option does not
  win or lose for having more tokens.
- ``"sum"``: the summed log-probability, i.e. log P(whole answer). Exact, but every extra
  token costs probability, so longer labels lose when the model is unsure.
"""


@dataclass(frozen=True)
class OptionScores:
    """A score per option (higher = more likely), one row per image."""

    options: tuple[str, ...]
    logprobs: np.ndarray  # shape (n_images, n_options)
    mapped: np.ndarray | None = None  # per image: share of free-text answers mapped onto an option

    def __post_init__(self) -> None:
        """A NaN or +inf score (fp16 overflowing on a GPU without bf16, say) never reaches a response: the batch
        fails with a reason, and the predictor retries its items one by one, each getting the error if it stays."""
        scores = np.asarray(self.logprobs, dtype=np.float64)
        if scores.size and (
            np.isnan(scores).any() or np.isposinf(scores).any() or np.isneginf(scores).all(axis=1).any()
        ):
            raise EngineError(
                "the model returned non-finite scores (NaN or infinity) for these images, as float16 can overflow; "
                "run it in bfloat16 or float32 (a GPU with bf16, or MLLM_DEVICE=cpu)"
            )

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax over the options: each row sums to 1."""
        shifted = self.logprobs - self.logprobs.max(axis=1, keepdims=True)
        weights = np.exp(shifted)
        return weights / weights.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Generation:
    """A free-text answer; ``token_logprobs`` is None when the provider does not return them."""

    text: str
    token_logprobs: tuple[float, ...] | None = None

    @property
    def logprob(self) -> float | None:
        return float(sum(self.token_logprobs)) if self.token_logprobs is not None else None

    @property
    def confidence(self) -> float | None:
        """The geometric-mean token probability (a long answer is not penalised for its length), or None."""
        logprobs = self.token_logprobs
        return math.exp(sum(logprobs) / len(logprobs)) if logprobs else None


class Engine(Protocol):
    """A multimodal model behind some provider.

    Its usage counters only grow: ``forward_passes`` (model calls: forward passes in process, one prefill per
    request through a server), ``tokens_processed`` (input tokens), ``requests_sent`` (HTTP requests; 0 in
    process). ``scoring_method`` is how :meth:`score_options` scores ("full-label": every option's own tokens;
    "letters": the first answer token of lettered options; "agreement": shares of sampled answers), and
    ``scoring_reason`` why that method (what the server offers).
    """

    name: str
    forward_passes: int
    tokens_processed: int
    requests_sent: int
    scoring_method: str
    scoring_reason: str

    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        """Score every option as the whole answer to ``prompt`` about each image."""
        ...

    def generate(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int = 32) -> list[Generation]:
        """Answer ``prompt`` about each image in free text (greedy)."""
        ...


class EngineError(RuntimeError):
    """The model could not answer for these inputs; the message says why."""


class EngineUnavailable(EngineError):
    """The provider itself is down or too slow: retrying item by item would not help."""


def normalise(summed: np.ndarray, token_counts: Sequence[int], method: OptionScoring) -> np.ndarray:
    """Turn summed option log-probabilities (n_images, n_options) into scores by ``method``."""
    if method == "sum":
        return summed
    if method == "mean":
        return summed / np.maximum(np.asarray(token_counts, dtype=np.float64), 1.0)[None, :]
    raise ValueError(f"unknown option scoring {method!r}; choose one of {', '.join(OPTION_SCORING)}")
