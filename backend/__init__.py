"""A Label Studio ML backend that turns multimodal LLMs into annotators. Python API: :class:`Annotator`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.annotator import Annotator

__all__ = ["Annotator"]


def __getattr__(name: str) -> Any:  # `import backend` stays cheap; the model stack loads on first use
    if name == "Annotator":
        from backend.annotator import Annotator

        return Annotator
    raise AttributeError(f"module 'backend' has no attribute {name!r}")
