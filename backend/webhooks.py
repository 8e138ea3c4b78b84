"""What a Label Studio webhook event means for the backend: review outcomes and training runs."""

from __future__ import annotations

from typing import Any

from backend.jobs import LocalJobs, RedisJobs
from backend.labelstudio.protocol import label_studio_id
from backend.labelstudio.tasks import AnnotationChange, annotation_changes
from backend.reviews import ReviewStore


def handle_webhook(
    reviews: ReviewStore, jobs: RedisJobs | LocalJobs, action: str, body: dict[str, Any]
) -> tuple[int, str | None]:
    """(predicted labels judged by the event, the training job it queued); raises QueueUnavailable."""
    changes = annotation_changes(action, body)
    return record_reviews(reviews, changes), queue_training(jobs, action, body, changes)


def record_reviews(reviews: ReviewStore, changes: list[AnnotationChange]) -> int:
    """Which of our labels the humans kept; returns how many were judged. A deleted or skipped annotation's
    judgements are forgotten."""
    judged = 0
    for change in changes:
        if change.result is None:
            reviews.forget(change.project, task=change.task, annotation=change.annotation)
        elif change.task is not None:
            judged += reviews.record_annotation(
                change.project, change.task, change.result, annotation=change.annotation
            )
    return judged


def queue_training(
    jobs: RedisJobs | LocalJobs, action: str, body: dict[str, Any], changes: list[AnnotationChange]
) -> str | None:
    """Annotation events (debounced, each annotation counted) and "Start training" (at once) queue a training run."""
    if action == "START_TRAINING":
        project = body.get("project")
        number = label_studio_id(project.get("id") if isinstance(project, dict) else project)
        return jobs.train_now(number) if number is not None else None
    job = None
    for project in dict.fromkeys(change.project for change in changes):
        job = jobs.annotation_event(project, count=sum(1 for c in changes if c.project == project))
    return job
