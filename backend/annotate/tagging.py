"""Whole-image choices: one label (single choice) or tags (multiple choice, TagLLM, arXiv 2602.20972).

Multiple choice runs TagLLM's two stages:

1. **Candidates by group-wise prompting.** The labels are split into groups: the
   ``group`` attribute of each ``<Choice>`` where the config sets one, and otherwise runs of
   ``group_size`` labels. Each group is one question ("which of these can be seen?")
   whose answers are the group's labels plus "none of these". A label whose probability
   reaches ``candidate_threshold`` becomes a candidate. That is about C/G questions per
   image instead of C.
2. **Concept disambiguation.** Each candidate is confirmed with a yes/no question that
   states the label's written definition (``prompts/concepts.json``, else the config's
   ``hint``). P(yes) is the tag's probability; tags with P(yes) ≥ ``threshold`` are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from backend.annotate.choice import Choice, choose
from backend.models.engine import Engine
from backend.prompts import PromptBook, format_labels

YES, NO = "yes", "no"
NONE_OF_THESE = "none of these"


@dataclass(frozen=True)
class TagSettings:
    threshold: float = 0.5
    candidate_threshold: float = 0.05
    group_size: int = 10


@dataclass(frozen=True)
class Tags:
    labels: tuple[str, ...]  # the tags kept, in label-set order
    presence: dict[str, float]  # P(present): P(yes) for candidates, the group-stage probability for the rest
    candidates: tuple[str, ...]

    @property
    def confidence(self) -> float:
        """Confidence of the least certain keep/drop decision."""
        return min(max(p, 1.0 - p) for p in self.presence.values())


def classify_images(
    engine: Engine, prompts: PromptBook, images: Sequence[Image.Image], labels: Sequence[str]
) -> list[Choice]:
    prompt = prompts.render("image_choice", labels=format_labels(labels))
    return choose(engine, images, prompt, labels)


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


def tag_images(
    engine: Engine,
    prompts: PromptBook,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    settings: TagSettings,
    hints: dict[str, str] | None = None,
    named_groups: dict[str, str] | None = None,
) -> list[Tags]:
    presence: list[dict[str, float]] = [{} for _ in images]
    candidates: list[list[str]] = [[] for _ in images]
    for group in label_groups(labels, named_groups or {}, settings.group_size):
        question = prompts.render("tag_candidates", labels=format_labels(group))
        answers = choose(engine, images, question, (*group, NONE_OF_THESE))
        for i, answer in enumerate(answers):
            for label, probability in zip(group, answer.probabilities, strict=False):
                presence[i][label] = probability
                if probability >= settings.candidate_threshold:
                    candidates[i].append(label)
    for label in labels:
        holders = [i for i in range(len(images)) if label in candidates[i]]
        if not holders:
            continue
        definition = prompts.definition(label, (hints or {}).get(label))
        question = prompts.render("tag_confirm", label=label, definition=definition)
        for i, answer in zip(holders, choose(engine, [images[i] for i in holders], question, (YES, NO)), strict=True):
            presence[i][label] = answer.probabilities[0]
    return [
        Tags(
            labels=tuple(
                label for label in labels if label in candidates[i] and presence[i][label] >= settings.threshold
            ),
            presence=presence[i],
            candidates=tuple(label for label in labels if label in candidates[i]),
        )
        for i in range(len(images))
    ]
