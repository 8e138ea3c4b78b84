"""Holds the process's one model: loaded once, in the background, at start."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from backend.models.engine import Engine

log = logging.getLogger(__name__)


class ModelNotReady(RuntimeError):
    """The model is still loading or failed to load; the message says which."""


class EngineSlot:
    def __init__(self, factory: Callable[[], Engine], description: str) -> None:
        self._factory = factory
        self.description = description
        self._engine: Engine | None = None
        self._error: str | None = None
        self._ready = threading.Event()
        self._started_at: float | None = None
        self.load_seconds: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def holding(cls, engine: Engine, description: str) -> EngineSlot:
        """A slot around an engine already built (no loader thread)."""
        slot = cls(lambda: engine, description)
        slot._engine, slot._started_at, slot.load_seconds = engine, time.monotonic(), 0.0
        slot._ready.set()
        return slot

    @property
    def state(self) -> str:
        if self._started_at is None:
            return "not started"
        if not self._ready.is_set():
            return "loading"
        return "failed" if self._error else "ready"

    @property
    def error(self) -> str | None:
        return self._error

    def start(self) -> None:
        """Begin loading in a background thread (once)."""
        with self._lock:
            if self._started_at is not None:
                return
            self._started_at = time.monotonic()
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            self._engine = self._factory()
            self.load_seconds = time.monotonic() - (self._started_at or 0.0)
            log.info("model %s ready after %.1f s", self.description, self.load_seconds)
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.description, self._error)
        finally:
            self._ready.set()

    @property
    def loaded(self) -> Engine | None:
        """The engine if it has loaded, without waiting."""
        return self._engine if self._ready.is_set() else None

    def get(self, timeout: float) -> Engine:
        """The loaded engine, waiting up to ``timeout`` seconds for a load in progress."""
        self.start()
        if not self._ready.wait(timeout):
            waited = time.monotonic() - (self._started_at or time.monotonic())
            raise ModelNotReady(
                f"the model {self.description} is still loading ({waited:.0f} s so far); retry in a moment"
            )
        if self._engine is None:
            raise ModelNotReady(
                f"the model {self.description} failed to load: {self._error}; fix MLLM_MODEL and restart"
            )
        return self._engine
