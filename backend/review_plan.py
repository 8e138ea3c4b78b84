"""How many of the most suspicious tasks to review, from the tasks' P(all labels correct) scores.

A task with score s is expected to hold 1 − s wrong-label events (at most one, counted as its
probability). Reviewing tasks in ascending score order, the first k catch Σ (1 − s) of them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from backend.settings import Settings


@dataclass(frozen=True)
class ReviewPlan:
    tasks: int  # tasks with a score
    review: int  # tasks to review, most suspicious first
    review_fraction: float
    expected_errors: float  # in all scored tasks
    expected_errors_caught: float
    caught_fraction: float
    first_task_ids: tuple[int, ...]  # the tasks to review, in order (at most 20 listed)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_review(
    scores: Sequence[tuple[int, float]], budget: float | None = None, target: float | None = None
) -> ReviewPlan:
    """``budget``: the fraction of tasks to review. ``target``: the fraction of expected errors to catch."""
    if (budget is None) == (target is None):
        raise ValueError("give exactly one of budget (fraction of tasks) or target (fraction of expected errors)")
    ordered = sorted(scores, key=lambda item: item[1])
    errors = [1.0 - min(max(score, 0.0), 1.0) for _, score in ordered]
    total = sum(errors)
    if budget is not None:
        count = min(len(ordered), math.ceil(budget * len(ordered)))
    else:
        running, count = 0.0, 0
        while count < len(ordered) and (total == 0 or running < (target or 0) * total - 1e-12):
            running += errors[count]
            count += 1
    caught = sum(errors[:count])
    return ReviewPlan(
        tasks=len(ordered),
        review=count,
        review_fraction=round(count / len(ordered), 4) if ordered else 0.0,
        expected_errors=round(total, 4),
        expected_errors_caught=round(caught, 4),
        caught_fraction=round(caught / total, 4) if total else 1.0,
        first_task_ids=tuple(task for task, _ in ordered[:count][:20]),
    )


def run_review_plan(
    settings: Settings, project: int, budget: float | None, target: float | None, create_view: bool
) -> None:
    """`mllm-backend review-plan`: read the project's scores through the SDK and print the plan as JSON."""
    from backend.labelstudio.client import connect, ensure_review_view, prediction_scores
    from backend.predictor import model_version
    from backend.prompts import PromptBook

    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("mllm-backend: review-plan needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        raise SystemExit(2)
    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    version = model_version(settings, PromptBook(settings.prompts_dir))
    report = {
        "project": project,
        "model_version": version,
        **plan_review(prediction_scores(client, project, version), budget, target).as_dict(),
    }
    if create_view:
        report["view_id"] = ensure_review_view(client, project)
    print(json.dumps(report, indent=2))
