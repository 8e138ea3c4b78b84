"""The one interface the annotation code uses to reach a multimodal model.

Annotation code asks "how likely is each of these answers, for each image, after
this prompt?" and never learns which provider answers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class OptionScores:
    """Log-likelihood of each option as the model's whole answer, one row per image."""

    options: tuple[str, ...]
    logprobs: np.ndarray  # shape (n_images, n_options)

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax over the options: each row sums to 1."""
        shifted = self.logprobs - self.logprobs.max(axis=1, keepdims=True)
        weights = np.exp(shifted)
        return weights / weights.sum(axis=1, keepdims=True)


class Engine(Protocol):
    """A loaded multimodal model."""

    name: str

    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        """Score every option as the answer to ``prompt`` about each image."""
        ...


class EngineError(RuntimeError):
    """The model could not answer; the message says why."""
