"""Did a predicted label survive review? Pairs the backend's predicted labels with a human's annotation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backend.labelstudio.regions import on_region, region_labels


@dataclass(frozen=True)
class PredictedLabel:
    task: int
    region: str  # the box's id, or the control's name for a whole-image choice
    control: str
    label: str
    raw: float  # the raw (uncalibrated) suspicion score: estimated P(correct)

    @property
    def whole_image(self) -> bool:
        return self.region == self.control


def review_outcomes(
    predicted: Sequence[PredictedLabel], annotation_result: Sequence[dict[str, Any]]
) -> list[tuple[PredictedLabel, bool]]:
    """Each predicted label the annotation speaks to, with whether the human kept it.

    A box label survives when the human's region with the same id (the backend reuses the
    user's box ids) carries the same label. A whole-image choice survives when the human's
    result for that control contains it; a control absent from the result means "none".
    A box the human deleted says nothing about its label and is skipped.
    """
    regions = [r for r in annotation_result if isinstance(r, dict) and isinstance(r.get("value"), dict)]
    by_id = {(str(r.get("id")), r.get("from_name")): r for r in regions}
    by_control: dict[str, set[str]] = {}
    for region in regions:
        if not on_region(region):
            by_control.setdefault(str(region.get("from_name")), set()).update(region_labels(region))
    outcomes = []
    for label in predicted:
        if label.whole_image:
            outcomes.append((label, label.label in by_control.get(label.control, set())))
        elif (region := by_id.get((label.region, label.control))) is not None:
            outcomes.append((label, label.label in region_labels(region)))
    return outcomes
