"""Where the regions a person drew arrive in a /predict request."""

from __future__ import annotations

from typing import Any

from backend.labelstudio.protocol import label_studio_id
from backend.labelstudio.regions import drawn_regions


def user_regions(task: dict[str, Any], context: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The drawn regions (of any shape) to label for this task.

    Interactive requests carry the region the user just drew in ``context["result"]``: only
    those are labelled. Otherwise the regions of the most recently updated draft or
    submitted (not cancelled) annotation are labelled — one person's set of regions,
    so two annotators' copies of the same object do not become two predictions.
    """
    if context and isinstance(context.get("result"), list) and context["result"]:
        return drawn_regions(context["result"])
    sources = [d for d in _list(task.get("drafts")) if isinstance(d, dict)]
    sources += [a for a in _list(task.get("annotations")) if isinstance(a, dict) and not a.get("was_cancelled")]
    sources.sort(key=lambda s: str(s.get("updated_at") or s.get("created_at") or ""), reverse=True)
    for source in sources:
        regions = drawn_regions(_list(source.get("result")))
        if regions:
            return regions
    return []


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def annotation_event(action: str, body: dict[str, Any]) -> tuple[int, int, list[dict] | None] | None:
    """(project id, task id, final result) of an annotation webhook; result None when it was deleted or skipped."""
    if action not in {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATION_DELETED",
                      "ANNOTATIONS_DELETED"}:  # fmt: skip
        return None
    annotation = body.get("annotation") or (body.get("annotations") or [None])[0]
    if not isinstance(annotation, dict):
        return None
    project = body.get("project")
    project_number = label_studio_id(project.get("id") if isinstance(project, dict) else annotation.get("project"))
    task = annotation.get("task")
    task_id = label_studio_id(task.get("id") if isinstance(task, dict) else task)
    if project_number is None or task_id is None:
        return None
    if action.endswith("DELETED") or annotation.get("was_cancelled"):
        return project_number, task_id, None
    result = annotation.get("result")
    return project_number, task_id, [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []
