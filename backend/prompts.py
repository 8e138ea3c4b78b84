"""Editable prompt templates in ``prompts/``, re-read when a file changes."""

from __future__ import annotations

import hashlib
import string
import threading
from pathlib import Path

TEMPLATES: dict[str, frozenset[str]] = {
    "box_label": frozenset({"labels"}),
    "image_choice": frozenset({"labels"}),
    "image_tag": frozenset({"label"}),
}


class PromptError(ValueError):
    """A prompt template is missing or uses a field it cannot have."""


class PromptBook:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def template(self, name: str) -> str:
        path = self.directory / f"{name}.txt"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            raise PromptError(f"prompt template {path} is missing; restore it from the repository's prompts/") from None
        with self._lock:
            cached = self._cache.get(name)
            if cached and cached[0] == mtime:
                return cached[1]
            text = path.read_text(encoding="utf-8").strip()
            _check_fields(path, text, TEMPLATES[name])
            self._cache[name] = (mtime, text)
            return text

    def render(self, name: str, **fields: str) -> str:
        return self.template(name).format(**fields)

    def fingerprint(self) -> str:
        """Changes whenever any template's text changes."""
        digest = hashlib.sha256()
        for name in sorted(TEMPLATES):
            digest.update(name.encode() + b"\0" + self.template(name).encode() + b"\0")
        return digest.hexdigest()

    def check(self) -> None:
        for name in TEMPLATES:
            self.template(name)


def _check_fields(path: Path, text: str, allowed: frozenset[str]) -> None:
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        raise PromptError(
            f"prompt template {path} is malformed ({exc}); write literal braces as {{{{ and }}}}"
        ) from None
    unknown = used - allowed
    if unknown:
        raise PromptError(
            f"prompt template {path} uses {sorted(unknown)}; it can only use {sorted('{' + f + '}' for f in allowed)}"
        )


def format_labels(labels: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f"- {label}" for label in labels)
