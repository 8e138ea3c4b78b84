"""Pre-annotate a whole project (or a selection) in the background, beyond /predict's 100-second limit.

Tasks are read through the SDK, predicted in batches by the same annotator `/predict` uses,
and stored with ``predictions.create``. Tasks that already hold a prediction from the current
model_version are skipped, so a re-run resumes where an interrupted one stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from backend.labelstudio.client import connect, project_tasks, set_model_version
from backend.labelstudio.protocol import label_studio_id, project_id
from backend.settings import Settings

if TYPE_CHECKING:
    from backend.annotator import Annotator
    from backend.jobs import LocalJobs, RedisJobs

log = logging.getLogger(__name__)
BATCH = 8


def hand_over(
    tasks: list,
    positions: list[int],
    *,
    project: str | None,
    jobs: LocalJobs | RedisJobs,
    cannot_post: str | None,
    model_version: str,
    limits: str,
) -> tuple[dict[int, dict | list], str | None]:
    """What ``/predict`` answers for the tasks at ``positions``, which did not fit in the request, and the job that
    predicts them in the background.

    Label Studio stores nothing for a ``[]`` answer; the job then posts those tasks' predictions
    through the API, so a selection of any size ends fully predicted. Where no job can post
    (``cannot_post`` says why, or a task has no id), the task gets an error saying so instead, naming the
    request's ``limits``.
    """
    from backend.jobs import QueueUnavailable

    pid = project_id(project)
    ids = {p: label_studio_id(tasks[p].get("id")) if isinstance(tasks[p], dict) else None for p in positions}
    postable = [p for p in positions if ids[p] is not None]
    why = cannot_post or (None if pid is not None else "the request names no project")
    job = None
    if postable and why is None:
        try:
            job = jobs.preannotate(pid, [ids[p] for p in postable])  # type: ignore[arg-type,misc]
        except QueueUnavailable as exc:
            why = str(exc)
    answers: dict[int, dict | list] = {}
    for position in positions:
        if job is not None and ids[position] is not None:
            answers[position] = []
            continue
        reason = why if ids[position] is not None else "it has no task id to post a prediction to"
        answers[position] = {"model_version": model_version, "error": (
            f"task {str(ids[position])[:40]}: not predicted within this request's limits ({limits}), and the "
            f"backend cannot predict it in the background: {reason}")}  # fmt: skip
    if job is not None:
        log.info("%d tasks did not fit in the request: pre-annotation job %s posts them", len(postable), job)
    return answers, job


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
    synced = False
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
        if stored and not synced:
            synced = _sync_model_version(client, project, version)
        report((start + len(batch)) / len(todo), f"{stored} predictions stored")
    return {"tasks": len(tasks), "skipped": len(tasks) - len(todo), "stored": stored, "failed": failed,
            "model_version": version}  # fmt: skip


def _sync_model_version(client, project: int, version: str) -> bool:
    """Make the project's model_version ours once a prediction carries it (so "Prediction score" sorts)."""
    try:
        set_model_version(client, project, version)
    except Exception as exc:  # the predictions still count; sorting waits for the next sync
        log.warning("could not set project %s model_version (%s)", project, type(exc).__name__)
        return False
    return True
