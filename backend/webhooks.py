"""What a Label Studio webhook event means for the backend: review outcomes and training runs."""

from __future__ import annotations

from typing import Any

from backend.jobs import LocalJobs, RedisJobs
from backend.labelstudio.protocol import label_studio_id
from backend.labelstudio.tasks import annotation_event
from backend.reviews import ReviewStore


def handle_webhook(
    reviews: ReviewStore, jobs: RedisJobs | LocalJobs, action: str, body: dict[str, Any]
) -> tuple[int, str | None]:
    """(predicted labels judged by the event, the training job it queued); raises QueueUnavailable."""
    return record_review(reviews, action, body), queue_training(jobs, action, body)


def record_review(reviews: ReviewStore, action: str, body: dict[str, Any]) -> int:
    """An annotation event says which of our labels a human kept; returns how many were judged."""
    event = annotation_event(action, body)
    if event is None:
        return 0
    project, task, result = event
    if result is None:
        reviews.forget_task(project, task)
        return 0
    return reviews.record_annotation(project, task, result)


def queue_training(jobs: RedisJobs | LocalJobs, action: str, body: dict[str, Any]) -> str | None:
    """Annotation events (debounced) and "Start training" (at once) queue a training run."""
    if action == "START_TRAINING":
        project = body.get("project")
        number = label_studio_id(project.get("id") if isinstance(project, dict) else project)
        return jobs.train_now(number) if number is not None else None
    event = annotation_event(action, body)
    return jobs.annotation_event(event[0]) if event is not None else None
