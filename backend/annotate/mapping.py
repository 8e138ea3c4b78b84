"""Free-text answers → the nearest label, by text embeddings (Kisel et al., arXiv 2603.06578).

An answer outside the label set is never discarded: it maps to the label whose embedding
is most similar, if that similarity reaches ``min_similarity``; otherwise it stays
unmapped. Exact matches (ignoring case and punctuation) need no encoder.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, one row per text."""
        ...


@dataclass(frozen=True)
class Mapping:
    text: str
    label: str | None  # None: nothing in the label set is similar enough
    similarity: float
    exact: bool
    nearest: str | None = None  # the most similar label, even below the floor (None: no label, or empty text)

    @property
    def mapped(self) -> bool:
        """True when the answer was outside the label set and moved onto a label."""
        return self.label is not None and not self.exact


def _fold(text: str) -> str:
    return re.sub(r"[\s\W_]+", " ", text.casefold()).strip()


class LabelMapper:
    def __init__(self, encoder: TextEncoder, min_similarity: float = 0.45) -> None:
        self.encoder = encoder
        self.min_similarity = min_similarity
        self._label_vectors: dict[tuple[str, ...], np.ndarray] = {}
        self._lock = threading.Lock()

    def map(self, text: str, labels: Sequence[str]) -> Mapping:
        folded = _fold(text)
        for label in labels:
            if folded and folded == _fold(label):
                return Mapping(text, label, 1.0, exact=True, nearest=label)
        if not folded or not labels:
            return Mapping(text, None, 0.0, exact=False)
        similarities = self._vectors(tuple(labels)) @ self.encoder.encode([text])[0]
        best = int(np.argmax(similarities))
        similarity = float(similarities[best])
        label = labels[best] if similarity >= self.min_similarity else None
        return Mapping(text, label, similarity, exact=False, nearest=labels[best])

    def index(self, text: str, labels: Sequence[str]) -> int | None:
        """The position of the label ``text`` maps to, or None."""
        label = self.map(text, labels).label
        return list(labels).index(label) if label is not None else None

    def _vectors(self, labels: tuple[str, ...]) -> np.ndarray:
        with self._lock:
            if labels not in self._label_vectors:
                self._label_vectors[labels] = self.encoder.encode(labels)
            return self._label_vectors[labels]


def map_onto(text: str, labels: Sequence[str], mapper: LabelMapper | None) -> Mapping:
    """``mapper.map(text, labels)``; without a mapper, only an exact match (ignoring case and punctuation)."""
    if mapper is not None:
        return mapper.map(text, labels)
    folded = _fold(text)
    label = next((label for label in labels if folded and folded == _fold(label)), None)
    return Mapping(text, label, 1.0 if label else 0.0, exact=label is not None, nearest=label)
