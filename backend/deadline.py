"""A time limit for the work one request starts, so nothing outlives the caller waiting for it.

The server opens a deadline around each prediction request; model loops, downloads and
waits inside it call :func:`check` or bound their own timeouts by :func:`remaining`.
The deadline lives in a context variable: code running outside any request (jobs, the
CLI) has none and is never cut short. Work handed to another thread carries it along
only through :func:`carry`.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_ends_at: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class DeadlineExceeded(RuntimeError):
    """The request's time ran out; the work it started stops."""


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Work inside must finish within ``seconds`` (None: no limit); an enclosing, earlier deadline still holds."""
    ends = None if seconds is None else time.monotonic() + seconds
    outer = _ends_at.get()
    if outer is not None and (ends is None or outer < ends):
        ends = outer
    token = _ends_at.set(ends)
    try:
        yield
    finally:
        _ends_at.reset(token)


def remaining() -> float | None:
    """Seconds left (never negative), or None when no deadline is set."""
    ends = _ends_at.get()
    return None if ends is None else max(0.0, ends - time.monotonic())


def bounded(seconds: float) -> float:
    """``seconds``, or less when the deadline comes sooner."""
    left = remaining()
    return seconds if left is None else min(seconds, left)


def check(doing: str) -> None:
    """Raise :class:`DeadlineExceeded` if the deadline has passed; ``doing`` says what was cut short."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"the request's time limit ran out while {doing}")


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` bound to the current deadline, for running in other threads (each call sets it there)."""
    ends = _ends_at.get()

    def run(*args: object, **kwargs: object) -> T:
        token = _ends_at.set(ends)
        try:
            return fn(*args, **kwargs)
        finally:
            _ends_at.reset(token)

    return run
