"""Exported tasks → labelled items for training: whole images with their choices, boxes with their labels.

A task's labels come from its latest submitted (not cancelled) annotation: **human-reviewed**,
confidence 1. A task with no annotation but a prediction from us contributes that
prediction as is: **MLLM-only**, with the prediction region's score (our estimated P(correct))
as its confidence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.labelstudio.config import ProjectSpec
from backend.labelstudio.regions import Box, RegionError, box_from_region


@dataclass(frozen=True)
class LabelledItem:
    task: int
    image_url: str
    control: str
    labels: tuple[str, ...]  # one for a box or single choice; any number of tags for multiple choice
    reviewed: bool
    confidence: float
    box: Box | None = None  # None: the whole image


def _latest(items: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    ordered = sorted(items, key=lambda item: str(item.get("updated_at") or item.get("created_at") or ""))
    return ordered[-1] if ordered else None


def _region_labels(region: dict[str, Any]) -> tuple[str, ...]:
    value = region.get("value") or {}
    return tuple(str(label) for key in ("rectanglelabels", "choices", "labels") for label in (value.get(key) or []))


def labelled_items(task: dict[str, Any], spec: ProjectSpec, model_version: str | None = None) -> list[LabelledItem]:
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if model_version is not None and any(p.get("model_version") == model_version for p in predictions):
        predictions = [p for p in predictions if p.get("model_version") == model_version]
    source, reviewed = (_latest(annotations), True) if annotations else (_latest(predictions), False)
    if source is None:
        return []
    task_id, regions = int(task["id"]), [r for r in source.get("result") or [] if isinstance(r, dict)]
    items: list[LabelledItem] = []
    for target in spec.boxes:
        for region in regions:
            labels = _region_labels(region)
            if region.get("from_name") != target.control or not labels or "x" not in (region.get("value") or {}):
                continue
            try:
                box = box_from_region(region)
            except RegionError:
                continue
            confidence = 1.0 if reviewed else float(region.get("score", source.get("score", 0.5)) or 0.5)
            items.append(LabelledItem(task_id, target.image.url(task), target.control, labels[:1], reviewed,
                                      confidence, box))  # fmt: skip
    for target in spec.choices:
        mine = [r for r in regions if r.get("from_name") == target.control]
        labels = tuple(label for region in mine for label in _region_labels(region))
        if not labels and not target.multiple:
            continue  # a single choice left empty says nothing
        score = mine[0].get("score") if mine else source.get("score")
        confidence = 1.0 if reviewed else float(score if score is not None else 0.5)
        items.append(LabelledItem(task_id, target.image.url(task), target.control, labels, reviewed, confidence))
    return items
