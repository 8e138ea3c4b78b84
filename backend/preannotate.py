"""Pre-annotate a whole project (or a selection) in the background, beyond /predict's 100-second limit.

Tasks are read through the SDK, predicted in batches by the same annotator `/predict` uses,
and stored with ``predictions.create``. Tasks that already hold a prediction from the current
model_version are skipped, so a re-run resumes where an interrupted one stopped. With Redis,
the plan is split into chunks that any number of `mllm-backend worker` processes share
(``backend.jobs``); each chunk's predictions are posted as it finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend.labelstudio.client import connect, project_tasks, set_model_version, tasks_by_id
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


@dataclass(frozen=True)
class Plan:
    """What a pre-annotation run has to do: the tasks without a prediction from ``model_version``, in order."""

    todo: list[int]
    tasks: int
    model_version: str

    @property
    def skipped(self) -> int:
        return self.tasks - len(self.todo)


def plan_preannotation(client, annotator: Annotator, project: int, task_ids: list[int] | None) -> Plan:
    """List the project's tasks once (or ``task_ids`` of them) and keep those our model_version has not predicted,
    so a re-run resumes where an interrupted one stopped. ``client``: see :func:`label_studio_client`."""
    tasks = project_tasks(client, project)
    if task_ids is not None:
        wanted = set(task_ids)
        tasks = [t for t in tasks if t["id"] in wanted]
    version = annotator.model_version
    return Plan([t["id"] for t in tasks if not _has_version(t, version)], len(tasks), version)


def predict_tasks(client, annotator: Annotator, project: int, task_ids: list[int],
                  report: Callable[[float, str], None] | None = None) -> dict:  # fmt: skip
    """Predict these tasks (read afresh, so boxes drawn since the plan count) and post each batch as it finishes;
    a task that meanwhile got a prediction from our model_version is skipped."""
    label_config = client.projects.get(project).label_config
    version = annotator.model_version
    wanted = set(task_ids)
    tasks = [t for t in tasks_by_id(client, project, task_ids) if t["id"] in wanted]
    todo = [t for t in tasks if not _has_version(t, version)]
    stored = failed = 0
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
        if report is not None:
            report((start + len(batch)) / len(todo), f"{stored} predictions stored")
    return {"stored": stored, "failed": failed, "skipped": len(task_ids) - len(todo), "model_version": version}


def preannotate_project(
    settings: Settings,
    annotator: Annotator,
    project: int,
    task_ids: list[int] | None,
    report: Callable[[float, str], None],
) -> dict:
    """The whole run in one process (the in-process queue): plan, then predict every task left."""
    client = label_studio_client(settings)
    plan = plan_preannotation(client, annotator, project, task_ids)
    report(0.0, f"{len(plan.todo)} of {plan.tasks} tasks to predict")
    done = predict_tasks(client, annotator, project, plan.todo, report) if plan.todo else {"stored": 0, "failed": 0}
    return {"tasks": plan.tasks, "skipped": plan.skipped, "stored": done["stored"], "failed": done["failed"],
            "model_version": plan.model_version}  # fmt: skip


def label_studio_client(settings: Settings):
    """The SDK client for the configured Label Studio, or a RuntimeError naming the settings it needs."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise RuntimeError("pre-annotation needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    return connect(settings.label_studio_url, settings.label_studio_api_key)


def _sync_model_version(client, project: int, version: str) -> bool:
    """Make the project's model_version ours once a prediction carries it (so "Prediction score" sorts)."""
    try:
        set_model_version(client, project, version)
    except Exception as exc:  # the predictions still count; sorting waits for the next sync
        log.warning("could not set project %s model_version (%s)", project, type(exc).__name__)
        return False
    return True
