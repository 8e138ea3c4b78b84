"""Exported tasks → labelled items for training: whole images with their choices, boxes with their labels.

A task's labels come from its latest submitted (not cancelled) annotation: **human-reviewed**,
confidence 1; where several people answered a whole-image class or attribute, their majority
decides, with the model's prediction as one more voter (:func:`voted_results`). A task with no
annotation but a prediction from us contributes that prediction as is: **MLLM-only**, with the
prediction region's score (our estimated P(correct)) as its confidence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from backend.labelstudio.config import ImageField, ProjectSpec
from backend.labelstudio.regions import Box, RegionError, box_from_region, label_scores, on_region, region_labels


@dataclass(frozen=True)
class LabelledItem:
    task: int
    image_url: str
    control: str
    labels: tuple[str, ...]  # one for a box or single choice; any number of tags for multiple choice
    reviewed: bool
    confidence: float
    box: Box | None = None  # None: the whole image
    machine_labels: tuple[str, ...] | None = None  # a reviewed item's labels in our prediction (None: none made)


def _latest(items: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    ordered = sorted(items, key=lambda item: str(item.get("updated_at") or item.get("created_at") or ""))
    return ordered[-1] if ordered else None


def labelled_items(task: dict[str, Any], spec: ProjectSpec, model_version: str | None = None) -> list[LabelledItem]:
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if model_version is not None and any(p.get("model_version") == model_version for p in predictions):
        predictions = [p for p in predictions if p.get("model_version") == model_version]
    source, reviewed = (_latest(annotations), True) if annotations else (_latest(predictions), False)
    if source is None:
        return []
    results = [r for r in source.get("result") or [] if isinstance(r, dict)]
    predicted = [r for r in (_latest(predictions) or {}).get("result") or [] if isinstance(r, dict)]
    if reviewed:  # several people's answers to a class or attribute: their majority (the model votes too)
        results = voted_results(annotations, predicted, spec)
    source_score = source.get("score")
    items = [
        item for handler in spec.handlers for item in handler.training_items(task, results, reviewed, source_score)
    ]
    if not reviewed or not predicted:
        return items
    ours = {_item_key(item): item.labels for handler in spec.handlers
            for item in handler.training_items(task, predicted, False, None)}  # fmt: skip
    return [replace(item, machine_labels=ours.get(_item_key(item))) for item in items]


def _item_key(item: LabelledItem) -> tuple[str, str | None]:
    """An item's place: its control and region id (None for the whole image), the same in prediction and review."""
    return item.control, item.box.id if item.box is not None else None


def region_items(task: dict[str, Any], control: str, image: ImageField, results: list[dict], reviewed: bool,
                 source_score: float | None) -> list[LabelledItem]:  # fmt: skip
    """One item per labelled region of ``control``: its crop's label (the human's, or our prediction's)."""
    items = []
    for result in results:
        labels = region_labels(result)
        if result.get("from_name") != control or not labels or not on_region(result):
            continue
        try:
            box = box_from_region(result)
        except RegionError:
            continue
        confidence = 1.0 if reviewed else float(result.get("score", source_score if source_score is not None else 0.5)
                                                or 0.5)  # fmt: skip
        items.append(LabelledItem(int(task["id"]), image.url(task, box.item_index), control, labels[:1], reviewed,
                                  confidence, box))  # fmt: skip
    return items


def image_items(task: dict[str, Any], control: str, image: ImageField, multiple: bool, results: list[dict],
                reviewed: bool, source_score: float | None) -> list[LabelledItem]:  # fmt: skip
    """The whole image's item for ``control``: its labels (none is an answer for multiple choice)."""
    mine = [r for r in results if r.get("from_name") == control]
    labels = tuple(label for result in mine for label in region_labels(result))
    if not labels and not multiple:
        return []  # a single choice left empty says nothing
    score = mine[0].get("score") if mine else source_score
    confidence = 1.0 if reviewed else float(score if score is not None else 0.5)
    return [LabelledItem(int(task["id"]), image.url(task), control, labels, reviewed, confidence)]


@dataclass(frozen=True)
class LabelPair:
    """One predicted label beside the human's answer for the same region (or whole-image control)."""

    task: int
    control: str
    region: str
    predicted: str
    human: str | None  # None: the human removed the region
    score: float | None
    accepted: tuple[str, ...] = ()  # every label the human gave the region (several, where the object is both)


@dataclass(frozen=True)
class TagPair:
    task: int
    control: str
    predicted: frozenset[str]
    human: frozenset[str]
    score: float | None
    label_scores: dict[str, float] | None = None  # every label's own probability, where the prediction kept them


@dataclass(frozen=True)
class TaskComparison:
    task: int
    score: float | None  # the prediction's task score
    labels: tuple[LabelPair, ...]  # boxes and single choices
    tags: tuple[TagPair, ...]  # multiple-choice controls
    texts: tuple[tuple[str, str], ...]  # (predicted, human) fine-grained names of the same box
    human_seconds: float | None = None  # Label Studio's lead_time, summed over the task's annotations


def compare_task(task: dict[str, Any], spec: ProjectSpec, model_version: str | None) -> TaskComparison | None:
    """Our prediction (of ``model_version``, else the latest) against the latest human annotation."""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if model_version is not None:
        predictions = [p for p in predictions if p.get("model_version") == model_version]
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    prediction, annotation = _latest(predictions), _latest(annotations)
    if prediction is None or annotation is None:
        return None
    task_id = int(task["id"])
    predicted = [r for r in prediction.get("result") or [] if isinstance(r, dict)]
    human = voted_results(annotations, predicted, spec)
    found = [handler.compare(task_id, predicted, human, prediction.get("score")) for handler in spec.handlers]
    lead_times = [float(a["lead_time"]) for a in annotations if isinstance(a.get("lead_time"), (int, float))]
    return TaskComparison(
        task_id,
        prediction.get("score"),
        tuple(pair for part in found for pair in part.labels),
        tuple(pair for part in found for pair in part.tags),
        tuple(pair for part in found for pair in part.texts),
        sum(lead_times) if lead_times else None,
    )


def voted_results(annotations: list[dict[str, Any]], predicted: list[dict], spec: ProjectSpec) -> list[dict]:
    """The latest annotation's results, with each whole-image single choice (a class, a yes/no attribute) decided
    by a majority vote when several people answered it: every annotation is a voter, and so is the model's
    prediction; a tie keeps the latest annotation's answer (the CelebA study's re-annotation protocol)."""
    latest = _latest(annotations)
    results = [dict(r) for r in (latest or {}).get("result") or [] if isinstance(r, dict)]
    if len(annotations) < 2:
        return results
    for target in (t for t in spec.image_choices if not t.multiple):
        votes: Counter[str] = Counter()
        for source in [*(a.get("result") or [] for a in annotations), predicted]:
            answer = next((region_labels(r) for r in source if isinstance(r, dict) and r.get("from_name") ==
                           target.control and region_labels(r)), None)  # fmt: skip
            if answer:
                votes[answer[0]] += 1
        mine = next((r for r in results if r.get("from_name") == target.control), None)
        if mine is None or not votes or not region_labels(mine):
            continue
        kept = region_labels(mine)[0]
        winner = max(votes, key=lambda label: (votes[label], label == kept))
        if winner != kept and mine.get("type") == "choices":
            mine["value"] = {**mine.get("value", {}), "choices": [winner]}
    return results


@dataclass(frozen=True)
class Comparison:
    """What one control's prediction and the human's answer say of each other in one task."""

    labels: tuple[LabelPair, ...] = ()
    tags: tuple[TagPair, ...] = ()
    texts: tuple[tuple[str, str], ...] = ()


def compare_labels(task_id: int, control: str, predicted: list[dict], human: list[dict], whole_image: bool
                   ) -> Comparison:  # fmt: skip
    """Each label ``control`` predicted beside the human's for the same region (or, whole-image, the control)."""
    by_id = {(str(r.get("id")), r.get("from_name")): r for r in human}
    pairs = []
    for result in predicted:
        values = region_labels(result)
        if result.get("from_name") != control or not values:
            continue
        mine = by_id.get((str(result.get("id")), control))
        if mine is None and whole_image:  # the human's result for the control, whatever its id
            mine = next((r for r in human if r.get("from_name") == control), None)
        answer = region_labels(mine)
        pairs.append(LabelPair(task_id, control, str(result.get("id")), values[0], answer[0] if answer else None,
                               result.get("score"), answer))  # fmt: skip
    return Comparison(labels=tuple(pairs))


def compare_tags(task_id: int, control: str, predicted: list[dict], human: list[dict], score: float | None
                 ) -> Comparison:  # fmt: skip
    """The tags ``control`` predicted beside the human's (none is an answer too)."""
    mine_predicted = [r for r in predicted if r.get("from_name") == control]
    mine_human = [r for r in human if r.get("from_name") == control]
    return Comparison(tags=(TagPair(
        task_id, control,
        frozenset(label for r in mine_predicted for label in region_labels(r)),
        frozenset(label for r in mine_human for label in region_labels(r)),
        mine_predicted[0].get("score") if mine_predicted else score,
        label_scores(mine_predicted[0]) if mine_predicted else None,
    ),))  # fmt: skip


def compare_texts(control: str, predicted: list[dict], human: list[dict], whole_image: bool) -> Comparison:
    """Each text ``control`` predicted beside the human's text for the same region (or the whole image)."""
    by_id = {(str(r.get("id")), r.get("from_name")): r for r in human}
    pairs = []
    for result in predicted:
        if result.get("from_name") != control or result.get("type") != "textarea":
            continue
        mine = by_id.get((str(result.get("id")), control))
        if mine is None and whole_image:
            mine = next((r for r in human if r.get("from_name") == control), None)
        if mine is not None and (mine.get("value") or {}).get("text"):
            pairs.append((str(result["value"]["text"][0]), str(mine["value"]["text"][0])))
    return Comparison(texts=tuple(pairs))
