"""Whole-image choices: one label (single choice) or tags (multiple choice, TagLLM, arXiv 2602.20972).

Tags are found by one of three methods (``TagSettings.method``):

- ``"tagllm"`` (default), TagLLM's two stages:

  1. **Candidates by group-wise prompting.** The labels are split into groups: the
     ``group`` attribute of each ``<Choice>`` where the config sets one, and otherwise runs
     of ``group_size`` labels. Each group is one question ("which of these can be seen?
     Several can be"), whose possible answers are every set of the group's labels that
     fits in ``MAX_ANSWER_SETS`` (all of them for groups of up to 6; by size, smallest first,
     for larger ones) plus "none of these". A label's probability of being present is the
     probability of the answers that name it; a label whose probability reaches
     ``candidate_threshold`` becomes a candidate. About C/G questions per image instead of C,
     and co-occurring labels of one group are all found.
  2. **Concept disambiguation.** Each candidate is confirmed with a yes/no question that
     states the label's written definition (``prompts/concepts.json``, else the config's
     ``hint``). P(yes) is the tag's probability; tags with P(yes) ≥ ``threshold`` are kept.

- ``"yes_no"``: stage 2 for every label (C questions per image): precise, and the baseline
  the candidate stage must keep up with.
- ``"open"``: one question listing every label, answered in free text; each named item is
  mapped onto the label set (exactly, else by the text encoder). One generation per image;
  its tags carry the answer's probability, the others 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from backend.annotate.choice import Choice, choose
from backend.annotate.mapping import LabelMapper, map_onto
from backend.models.engine import Engine
from backend.prompts import PromptBook, format_labels

YES, NO = "yes", "no"
NONE_OF_THESE = "none of these"
MAX_ANSWER_SETS = 64  # answers scored per group question: every subset of a group of 6, pairs of a group of 10

TagMethod = Literal["tagllm", "yes_no", "open"]
TAG_METHODS: tuple[TagMethod, ...] = ("tagllm", "yes_no", "open")


@dataclass(frozen=True)
class TagSettings:
    threshold: float = 0.5
    candidate_threshold: float = 0.1
    group_size: int = 10
    method: TagMethod = "tagllm"


@dataclass(frozen=True)
class Tags:
    labels: tuple[str, ...]  # the tags kept, in label-set order
    presence: dict[str, float]  # every label's P(present): P(yes) for candidates, the group question's for the rest
    candidates: tuple[str, ...]
    questions: int  # distinct questions asked about the image
    confirmed: bool  # each kept tag's probability is P(yes) of a yes/no question about it (tagllm, yes_no)

    @property
    def confidence(self) -> float:
        """Confidence of the least certain keep/drop decision."""
        return min(max(p, 1.0 - p) for p in self.presence.values())


def attribute_images(
    engine: Engine, prompts: PromptBook, images: Sequence[Image.Image], attribute: str, answers: tuple[str, str],
    hint: str | None = None,
) -> list[Choice]:  # fmt: skip
    """A binary attribute asked about by its name and definition (CelebA study, arXiv 2410.09416): "yes" and "no"
    are scored, and each image gets ``answers[0]`` (the control's yes) or ``answers[1]`` (its no)."""
    definition = prompts.definition(attribute, hint)
    question = prompts.render("attribute", attribute=attribute, definition=definition)
    return [Choice(answers[0] if c.label == YES else answers[1], c.probability, answers, c.probabilities, c.mapped)
            for c in choose(engine, images, question, (YES, NO))]  # fmt: skip


def label_groups(labels: Sequence[str], named: dict[str, str], size: int) -> list[tuple[str, ...]]:
    """Named groups first (in order of first appearance), then the ungrouped labels in runs of ``size``."""
    by_name: dict[str, list[str]] = {}
    loose: list[str] = []
    for label in labels:
        if label in named:
            by_name.setdefault(named[label], []).append(label)
        else:
            loose.append(label)
    groups = [tuple(members) for members in by_name.values()]
    groups += [tuple(loose[i : i + size]) for i in range(0, len(loose), size)]
    return groups


def answer_sets(labels: Sequence[str], *, limit: int = MAX_ANSWER_SETS) -> list[tuple[str, ...]]:
    """The answers a "which of these can be seen?" question may get: the empty set ("none of these"), then the
    sets of ``labels`` by size, each in listing order, while the count stays within ``limit``."""
    sets: list[tuple[str, ...]] = [()]
    for size in range(1, len(labels) + 1):
        more = list(itertools.combinations(labels, size))
        if len(sets) + len(more) > limit:
            break
        sets += more
    return sets


def presence(engine: Engine, images: Sequence[Image.Image], prompt: str, labels: Sequence[str]) -> np.ndarray:
    """P(each label is present) per image, shape (images, labels): the probability of every answer set naming it."""
    sets = answer_sets(labels)
    options = [", ".join(members) if members else NONE_OF_THESE for members in sets]
    probabilities = engine.score_options(images, prompt, options).probabilities
    names = np.array([[label in members for label in labels] for members in sets], dtype=np.float64)
    return probabilities @ names


def tag_images(
    engine: Engine,
    prompts: PromptBook,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    settings: TagSettings,
    hints: dict[str, str] | None = None,
    named_groups: dict[str, str] | None = None,
    *,
    mapper: LabelMapper | None = None,
) -> list[Tags]:
    """Each image's tags by ``settings.method`` (see the module's docstring)."""
    if settings.method == "open":
        return _open_question(engine, prompts, images, labels, mapper)
    found: list[dict[str, float]] = [{} for _ in images]
    asked = 0
    if settings.method == "tagllm":
        for group in label_groups(labels, named_groups or {}, settings.group_size):
            question = prompts.render("tag_candidates", labels=format_labels(group))
            for i, row in enumerate(presence(engine, images, question, group)):
                found[i].update(zip(group, (float(p) for p in row), strict=True))
            asked += 1
        candidates = [[label for label in labels if found[i][label] >= settings.candidate_threshold]
                      for i in range(len(images))]  # fmt: skip
    else:
        candidates = [list(labels) for _ in images]
    confirmed = _confirm(engine, prompts, images, labels, candidates, hints or {})
    tags = []
    for i, candidates_i in enumerate(candidates):
        scores = {label: confirmed[i].get(label, found[i].get(label, 0.0)) for label in labels}
        kept = tuple(label for label in candidates_i if scores[label] >= settings.threshold)
        tags.append(Tags(kept, scores, tuple(candidates_i), asked + len(candidates_i), confirmed=True))
    return tags


def _confirm(
    engine: Engine, prompts: PromptBook, images: Sequence[Image.Image], labels: Sequence[str],
    candidates: list[list[str]], hints: dict[str, str],
) -> list[dict[str, float]]:  # fmt: skip
    """P(yes) of each candidate's yes/no question, batched per label over the images holding it."""
    confirmed: list[dict[str, float]] = [{} for _ in images]
    for label in labels:
        holders = [i for i in range(len(images)) if label in candidates[i]]
        if not holders:
            continue
        question = prompts.render("tag_confirm", label=label, definition=prompts.definition(label, hints.get(label)))
        for i, answer in zip(holders, choose(engine, [images[i] for i in holders], question, (YES, NO)), strict=True):
            confirmed[i][label] = answer.probabilities[0]
    return confirmed


def _open_question(
    engine: Engine, prompts: PromptBook, images: Sequence[Image.Image], labels: Sequence[str],
    mapper: LabelMapper | None,
) -> list[Tags]:  # fmt: skip
    question = prompts.render("tag_candidates", labels=format_labels(labels))
    tags = []
    for generation in engine.generate(images, question, max_new_tokens=16 + 8 * len(labels)):
        named = _named_labels(generation.text, labels, mapper)
        sureness = generation.confidence if generation.confidence is not None else 1.0
        scores = {label: sureness if label in named else 0.0 for label in labels}
        kept = tuple(label for label in labels if label in named)
        tags.append(Tags(kept, scores, kept, 1, confirmed=False))
    return tags


def _named_labels(text: str, labels: Sequence[str], mapper: LabelMapper | None) -> set[str]:
    """The labels a comma-separated free answer names: exact (any case), else mapped by the text encoder."""
    items = (part.strip(" .\"'") for part in text.replace("\n", ",").split(","))
    named = {map_onto(item, labels, mapper).label for item in items if item and item.casefold() != NONE_OF_THESE}
    return named - {None}  # type: ignore[return-value]
