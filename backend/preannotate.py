"""Pre-annotate a whole project (or a selection) in the background, beyond /predict's 100-second limit.

Tasks are read through the SDK, predicted in batches by the same annotator `/predict` uses,
and stored with ``predictions.create``. Tasks that already hold a prediction from the current
model_version are skipped, so a re-run resumes where an interrupted one stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from backend.labelstudio.client import connect, project_tasks
from backend.settings import Settings

if TYPE_CHECKING:
    from backend.annotator import Annotator

log = logging.getLogger(__name__)
BATCH = 8


def _has_version(task: dict, version: str) -> bool:
    return any(isinstance(p, dict) and p.get("model_version") == version for p in task.get("predictions") or [])


def preannotate_project(
    settings: Settings,
    annotator: Annotator,
    project: int,
    task_ids: list[int] | None,
    report: Callable[[float, str], None],
) -> dict:
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise RuntimeError("pre-annotation needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    label_config = client.projects.get(project).label_config
    version = annotator.model_version
    tasks = project_tasks(client, project)
    if task_ids is not None:
        wanted = set(task_ids)
        tasks = [t for t in tasks if t["id"] in wanted]
    todo = [t for t in tasks if not _has_version(t, version)]
    stored, failed = 0, 0
    report(0.0, f"{len(todo)} of {len(tasks)} tasks to predict")
    for start in range(0, len(todo), BATCH):
        batch = todo[start : start + BATCH]
        for task, prediction in zip(batch, annotator.predict(batch, label_config, project=project), strict=True):
            if isinstance(prediction, dict) and "result" in prediction:
                client.predictions.create(task=task["id"], model_version=version, score=prediction["score"],
                                          result=prediction["result"])  # fmt: skip
                stored += 1
            elif isinstance(prediction, dict):
                failed += 1
                log.warning("pre-annotation: %s", prediction.get("error"))
        report((start + len(batch)) / len(todo), f"{stored} predictions stored")
    return {"tasks": len(tasks), "skipped": len(tasks) - len(todo), "stored": stored, "failed": failed,
            "model_version": version}  # fmt: skip
