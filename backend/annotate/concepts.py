"""Concept calibration (TagLLM, arXiv 2602.20972): sharper definitions for the labels people correct most.

TagLLM's second stage asks about each label with a written definition; an LLM refines the
definitions of the categories that get confused. Here the confusions come from a project's
own reviews (our prediction against the person's annotation, as ``mllm-backend eval`` pairs
them): :func:`confusions` ranks the labels people correct most and what they put instead;
:func:`draft_definitions` asks a model for a definition that tells each apart; a person reads
the drafts and accepts them into ``prompts/concepts.json`` (:func:`accept_definitions`), which
changes the model_version, so the next quality or eval report shows the effect.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from backend.labelstudio.export import LabelPair, TagPair
from backend.models.engine import Engine
from backend.prompts import CONCEPTS_FILE, PromptBook

DRAFT_TOKENS = 64


@dataclass(frozen=True)
class Confusion:
    label: str  # a label of ours that people corrected
    predicted: int  # how often we gave it (where a person answered too)
    corrected: int  # how often a person changed it
    instead: tuple[tuple[str, int], ...]  # what people put instead, most often first ("" for "nothing")


def confusions(
    labels: Sequence[LabelPair] = (), tags: Sequence[TagPair] = (), *, top: int = 5, min_corrections: int = 2
) -> list[Confusion]:
    """The ``top`` labels people corrected most (at least ``min_corrections`` times), with what they chose instead.

    A box label or single choice is corrected when the person's label differs; a tag when the person removed it,
    and what they put instead is the tags they added to that image.
    """
    given: Counter[str] = Counter()
    instead: dict[str, Counter[str]] = {}
    for pair in labels:
        if pair.human is None:
            continue
        given[pair.predicted] += 1
        if pair.predicted not in (pair.accepted or (pair.human,)):
            instead.setdefault(pair.predicted, Counter())[pair.human] += 1
    for pair in tags:
        given.update(pair.predicted)
        for wrong in pair.predicted - pair.human:
            instead.setdefault(wrong, Counter()).update(pair.human - pair.predicted or {""})
    ranked = sorted(instead.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    return [Confusion(label, given[label], sum(chosen.values()), tuple(chosen.most_common()))
            for label, chosen in ranked if sum(chosen.values()) >= min_corrections][:top]  # fmt: skip


def draft_definitions(
    engine: Engine, prompts: PromptBook, found: Sequence[Confusion], *, hints: dict[str, str] | None = None
) -> dict[str, str]:
    """A drafted definition per confused label, from ``engine`` (asked about a blank canvas: the question is about
    words). Empty drafts are left out."""
    canvas = Image.new("RGB", (64, 64), "white")
    drafts = {}
    for confusion in found:
        named = [f"“{other}”" for other, _ in confusion.instead if other] or ["other labels"]
        question = prompts.render(
            "concept_draft",
            label=confusion.label,
            others=" or ".join(named[:3]),
            definition=prompts.definition(confusion.label, (hints or {}).get(confusion.label)),
        )
        [answer] = engine.generate([canvas], question, max_new_tokens=DRAFT_TOKENS)
        if answer.text.strip():
            drafts[confusion.label] = answer.text.strip()
    return drafts


def accept_definitions(prompts_dir: Path, drafts: dict[str, str]) -> Path:
    """Merge ``drafts`` into ``prompts_dir/concepts.json`` (a drafted label's old definition is replaced)."""
    path = Path(prompts_dir) / CONCEPTS_FILE
    data = json.loads(path.read_text()) if path.exists() else {"definitions": {}}
    definitions = {k: v for k, v in data.get("definitions", {}).items() if k.casefold() not in
                   {label.casefold() for label in drafts}}  # fmt: skip
    data["definitions"] = {**definitions, **drafts}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path
