"""Editable prompt templates and concept definitions in ``prompts/``, re-read when a file changes.

A template's leading lines that start with ``#`` document it and are not sent to the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TEMPLATES: dict[str, frozenset[str]] = {
    "box_label": frozenset({"labels"}),
    "box_context_label": frozenset({"labels"}),
    "box_fine_label": frozenset({"label"}),
    "image_choice": frozenset({"labels"}),
    "tag_candidates": frozenset({"labels"}),
    "tag_confirm": frozenset({"label", "definition"}),
    "attribute": frozenset({"attribute", "definition"}),
    "open_label": frozenset(),
    "concept_draft": frozenset({"label", "others", "definition"}),
    "critic": frozenset({"label", "definition", "alternative", "alternative_definition"}),
    "caption": frozenset(),
    "answer": frozenset({"question"}),
    "region_text": frozenset(),
}
CONCEPTS_FILE = "concepts.json"
LETTERS = tuple(string.ascii_uppercase)


class PromptError(ValueError):
    """A prompt template or the concepts file is missing or malformed; the message names the file."""


class PromptBook:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _read(self, filename: str, parse: Callable[[Path, str], Any], missing_ok: bool = False) -> Any:
        path = self.directory / filename
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            if missing_ok:
                return None
            raise PromptError(f"prompt file {path} is missing; restore it from the repository's prompts/") from None
        with self._lock:
            cached = self._cache.get(filename)
            if cached and cached[0] == mtime:
                return cached[1]
            value = parse(path, path.read_text(encoding="utf-8"))
            self._cache[filename] = (mtime, value)
            return value

    def template(self, name: str) -> str:
        def parse(path: Path, text: str) -> str:
            lines = text.splitlines()
            while lines and lines[0].startswith("#"):
                lines.pop(0)
            body = "\n".join(lines).strip()
            _check_fields(path, body, TEMPLATES[name])
            return body

        return self._read(f"{name}.txt", parse)

    def render(self, name: str, **fields: str) -> str:
        return self.template(name).format(**fields)

    def concepts(self) -> dict[str, str]:
        """Label → written definition, from ``concepts.json`` (keys compared case-insensitively)."""
        return self._read(CONCEPTS_FILE, _parse_concepts, missing_ok=True) or {}

    def definition(self, label: str, hint: str | None = None) -> str:
        """The concepts file's definition, else the label config's hint, else the plain meaning."""
        return self.concepts().get(label.casefold()) or hint or f"the usual meaning of “{label}”"

    def fingerprint(self) -> str:
        """Changes whenever any template or definition changes."""
        digest = hashlib.sha256()
        for name in sorted(TEMPLATES):
            digest.update(name.encode() + b"\0" + self.template(name).encode() + b"\0")
        digest.update(json.dumps(self.concepts(), sort_keys=True).encode())
        return digest.hexdigest()

    def check(self) -> None:
        for name in TEMPLATES:
            self.template(name)
        self.concepts()


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


def _parse_concepts(path: Path, text: str) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{path} is not valid JSON ({exc}); fix it or delete it") from None
    definitions = data.get("definitions") if isinstance(data, dict) else None
    if not isinstance(definitions, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in definitions.items()
    ):
        raise PromptError(f'{path} must hold {{"definitions": {{"label": "definition", ...}}}} with text values')
    return {label.casefold(): definition.strip() for label, definition in definitions.items()}


def format_labels(labels: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f"- {label}" for label in labels)


LETTER_INSTRUCTION = "Answer with the letter of one option only."
_OWN_INSTRUCTION = re.compile(r"(?:^|(?<=[.?!:]))[ \t]*(?:Answer|Reply|Respond|Give)\b[^\n]*$", re.MULTILINE)


def lettered_question(prompt: str, options: Sequence[str]) -> str:
    """``prompt`` asked with lettered options and one instruction: answer with a letter.

    Where the prompt lists every option as a "- option" line (the shipped label questions), those lines
    get their letters in place; otherwise the lettered options follow the prompt. The prompt's own answer
    instruction (a last sentence that starts with "Answer", "Reply", "Respond" or "Give", e.g. "Answer with
    exactly one label from the list." or "Answer yes or no.") gives way to the letter instruction, so the two
    never contradict.
    """
    lines = prompt.rstrip().splitlines()
    bullets = {f"- {option}": f"{LETTERS[i]}. {option}" for i, option in enumerate(options)}
    in_place = set(bullets) <= {line.strip() for line in lines}
    if in_place:
        lines = [bullets.get(line.strip(), line) for line in lines]
    if lines and _OWN_INSTRUCTION.search(lines[-1]):
        lines[-1] = _OWN_INSTRUCTION.sub("", lines[-1]).rstrip()
        if not lines[-1]:
            lines.pop()
    if not in_place:
        lines += ["", "Options:", *bullets.values()]
    return "\n".join([*lines, LETTER_INSTRUCTION])
