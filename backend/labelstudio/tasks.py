"""Where the regions a person drew arrive in a /predict request."""

from __future__ import annotations

from dataclasses import dataclass
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


ANNOTATION_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
)


@dataclass(frozen=True)
class AnnotationChange:
    """One annotation created, updated or deleted, as a webhook tells it."""

    project: int
    annotation: int | None
    task: int | None  # None for a deletion: Label Studio sends only the annotation's id
    result: list[dict] | None  # the final result; None when deleted or skipped


def annotation_changes(action: str, body: dict[str, Any]) -> list[AnnotationChange]:
    """Every annotation an event is about: one (``ANNOTATION_CREATED``/``_UPDATED``), a list (``ANNOTATIONS_CREATED``
    from the Data Manager's "create annotations from predictions"), or ids only (``ANNOTATIONS_DELETED``)."""
    if action not in ANNOTATION_ACTIONS:
        return []
    project = body.get("project")
    project_number = label_studio_id(project.get("id") if isinstance(project, dict) else project)
    if action == "ANNOTATIONS_DELETED":
        if project_number is None:
            return []
        ids = [label_studio_id(a.get("id")) for a in _list(body.get("annotations")) if isinstance(a, dict)]
        return [AnnotationChange(project_number, i, None, None) for i in ids if i is not None]
    annotations = body.get("annotation")
    changes = []
    for annotation in annotations if isinstance(annotations, list) else [annotations]:
        change = _change(annotation, project_number)
        if change is not None:
            changes.append(change)
    return changes


def _change(annotation: object, project: int | None) -> AnnotationChange | None:
    if not isinstance(annotation, dict):
        return None
    project = project if project is not None else label_studio_id(annotation.get("project"))
    task = annotation.get("task")
    task_id = label_studio_id(task.get("id") if isinstance(task, dict) else task)
    if project is None or task_id is None:
        return None
    result = annotation.get("result")
    if annotation.get("was_cancelled"):
        result = None
    else:
        result = [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []
    return AnnotationChange(project, label_studio_id(annotation.get("id")), task_id, result)
