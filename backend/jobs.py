"""Background work: retraining after annotations, and pre-annotating whole projects.

With ``REDIS_URL`` the work goes to rq workers (``mllm-backend worker``, any number, on any
machine). Without it an in-process worker thread does it, so a laptop demo works; ``/health``
says which.

Retraining is debounced per project: the first annotation event schedules a run
``TRAIN_DEBOUNCE_SECONDS`` later, or at once when ``TRAIN_AFTER_ANNOTATIONS`` events have
piled up; later events join that pending run, so a project has at most one pending training.
``START_TRAINING`` (Label Studio's "Start training" button) runs one now.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import Any, Protocol

from backend.settings import Settings

log = logging.getLogger(__name__)
STALE_SECONDS = 20.0  # a started job whose heartbeat is older than this has lost its worker
JOB_TIMEOUT = 6 * 3600
RUN_TTL = 7 * 86400  # how long a finished job's status stays readable
Reporter = Callable[[float, str], None]


def _last_line(traceback: str) -> str:
    """A traceback's last line (the exception and its message), or "" for an empty one."""
    lines = traceback.strip().splitlines()
    return lines[-1] if lines else ""


class QueueUnavailable(RuntimeError):
    """The job queue cannot take work; the message says why (never with credentials)."""


class JobQueue(Protocol):
    kind: str

    def annotation_event(self, project: int, count: int = 1) -> str | None: ...
    def train_now(self, project: int) -> str: ...
    def problem(self) -> str | None: ...
    def preannotate(self, project: int, task_ids: list[int] | None = None) -> str: ...
    def status(self, job_id: str) -> dict[str, Any] | None: ...


# --- the work itself (runs in a worker) ------------------------------------------------------

_services: dict[str, Any] = {}


def _service(settings: Settings):
    """The worker's service (model loaded once per worker process, on its first pre-annotation)."""
    from backend.service import build_service

    if "service" not in _services:
        _services["service"] = build_service(settings)
    return _services["service"]


def run_training(settings: Settings, project: int, report: Reporter) -> dict:
    from backend.training.run import train_project

    return train_project(settings, project, report)


def plan_preannotation_job(run_id: str, project: int, task_ids: list[int] | None = None) -> dict:
    """rq entry point: list what is left to predict, and queue it as chunks for every worker to share."""
    from backend.preannotate import label_studio_client, plan_preannotation

    settings = Settings.from_env()
    client = label_studio_client(settings)  # fails fast, naming the settings, before any model loads
    plan = plan_preannotation(client, _service(settings).annotator, project, task_ids)
    return RedisJobs(settings).queue_chunks(run_id, project, plan.todo, tasks=plan.tasks,
                                            model_version=plan.model_version)  # fmt: skip


def preannotate_chunk_job(run_id: str, project: int, task_ids: list[int]) -> dict:
    """rq entry point: predict and post one chunk, then count it in the run's progress."""
    from backend.preannotate import label_studio_client, predict_tasks

    settings = Settings.from_env()
    stop = _rq_heartbeat()
    try:
        done = predict_tasks(label_studio_client(settings), _service(settings).annotator, project, task_ids)
    finally:
        stop.set()
    RedisJobs(settings).chunk_finished(run_id, len(task_ids), done)
    return done


def _chunk_failed(job, connection, *_: object) -> None:  # noqa: ANN001 -- rq's failure callback signature
    """rq calls this when a chunk has failed for good (its retries spent): the run counts it as failed."""
    run_id, _, task_ids = job.args
    RedisJobs(Settings.from_env()).chunk_failed(run_id, len(task_ids), job.exc_info or "")


def _rq_reporter() -> Reporter:
    from rq import get_current_job

    job = get_current_job()

    def report(fraction: float, stage: str) -> None:
        if job is not None:
            job.meta.update(progress=round(fraction, 4), stage=stage, heartbeat=time.time())
            job.save_meta()
        log.info("job %s: %.0f%% %s", job.id if job else "?", 100 * fraction, stage)

    return report


def _rq_heartbeat() -> threading.Event:
    """Keep the job's heartbeat fresh while it works, so a dead worker is noticed within STALE_SECONDS."""
    stop = threading.Event()
    from rq import get_current_job

    job = get_current_job()

    def beat() -> None:
        while not stop.wait(2.0):
            if job is not None:
                job.meta["heartbeat"] = time.time()
                job.save_meta()

    threading.Thread(target=beat, daemon=True).start()
    return stop


def train_job(project: int) -> dict:
    """rq entry point: clear the project's pending mark, then train."""
    settings = Settings.from_env()
    if settings.redis_url:
        RedisJobs(settings).clear_pending(project)
    report = _rq_reporter()
    stop = _rq_heartbeat()
    try:
        return run_training(settings, project, report)
    finally:
        stop.set()


# --- Redis + rq -----------------------------------------------------------------------------


class RedisJobs:
    kind = "redis"

    def __init__(self, settings: Settings) -> None:
        from redis import Redis
        from rq import Queue

        self.settings = settings
        self.name = settings.job_queue  # several backends can share one Redis under different names
        self.redis = Redis.from_url(settings.redis_url or "", socket_timeout=2, socket_connect_timeout=2)
        # /health's Redis check must fit the 1 s Label Studio gives /health: its own client, short timeouts.
        self._health_probe = Redis.from_url(settings.redis_url or "", socket_timeout=0.3, socket_connect_timeout=0.3)
        self.queue = Queue(self.name, connection=self.redis)

    def _pending_key(self, project: int) -> str:
        return f"{self.name}:pending-training:{project}"

    def _count_key(self, project: int) -> str:
        return f"{self.name}:annotations:{project}"

    def _guard(self, action: Callable[[], Any]) -> Any:
        from redis.exceptions import LockError, RedisError

        try:
            return action()
        except LockError:
            raise QueueUnavailable("the job queue is busy deciding this project's training; retry the event") from None
        except RedisError as exc:
            raise QueueUnavailable(f"the job queue (Redis) is unreachable: {type(exc).__name__}") from None

    def annotation_event(self, project: int, count: int = 1) -> str | None:
        """``count`` annotations changed in ``project``: schedule (or join, or hasten) its training."""
        return self._guard(lambda: self._decide(project, partial(self._after_annotation, count=count)))

    def train_now(self, project: int) -> str:
        return self._guard(lambda: self._decide(project, self._at_once))

    def _decide(self, project: int, decision: Callable[[int, str, bool], str]) -> str:
        """Run ``decision(project, pending job id or "", whether it is still only scheduled)`` alone: one decision
        per project at a time, across every process sharing this Redis, so concurrent events can never queue two
        trainings or cancel one twice. The pending job's status is read once, here."""
        from rq.job import JobStatus

        with self.redis.lock(f"{self.name}:training-lock:{project}", timeout=30, blocking_timeout=10):
            pending = (self.redis.get(self._pending_key(project)) or b"").decode()
            status = self._job_status(pending)
            live = status in {JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.STARTED}
            return decision(project, pending if live else "", status == JobStatus.SCHEDULED)

    def _after_annotation(self, project: int, pending: str, scheduled: bool, count: int = 1) -> str:
        enough = self.redis.incrby(self._count_key(project), count) >= self.settings.train_after_annotations
        if not pending:
            return self._enqueue_training(project, 0.0 if enough else self.settings.train_debounce_seconds)
        if enough and scheduled:
            return self._enqueue_training(project, 0.0, replacing=pending)  # enough piled up: train now
        return pending

    def _at_once(self, project: int, pending: str, scheduled: bool) -> str:
        return self._enqueue_training(project, 0.0, replacing=pending if scheduled else None)

    def _job_status(self, job_id: str):  # noqa: ANN202 -- rq's JobStatus, or None when there is no such job
        """The status of a pending mark's job (None: none, or rq expired it; a dead worker's job may linger)."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if not job_id:
            return None
        try:
            return Job.fetch(job_id, connection=self.redis).get_status()
        except NoSuchJobError:
            return None

    def _enqueue_training(self, project: int, delay: float, replacing: str | None = None) -> str:
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job

        if replacing:
            with contextlib.suppress(InvalidJobOperation, NoSuchJobError):  # a worker took it: it runs, ours follows
                Job.fetch(replacing, connection=self.redis).cancel()
        job_id = f"train-{project}-{uuid.uuid4().hex[:8]}"
        from rq import Retry

        # A failure (Label Studio unreachable during export, ...) is retried after 10 s, 60 s and 5 min.
        options = {
            "job_id": job_id, "job_timeout": JOB_TIMEOUT, "result_ttl": 7 * 86400, "failure_ttl": 7 * 86400,
            "meta": {"project": project, "kind": "train"}, "retry": Retry(max=3, interval=[10, 60, 300]),
        }  # fmt: skip
        if delay > 0:
            self.queue.enqueue_in(timedelta(seconds=delay), train_job, project, **options)
        else:
            self.queue.enqueue(train_job, project, **options)
        self.redis.set(self._pending_key(project), job_id, ex=JOB_TIMEOUT)
        self.redis.lpush(f"{self.name}:jobs:{project}", job_id)
        self.redis.ltrim(f"{self.name}:jobs:{project}", 0, 19)
        return job_id

    def problem(self) -> str | None:
        """Why queued work cannot run now (for /health, which Label Studio gives 1 s), or None."""
        from redis.exceptions import RedisError
        from rq import Queue, Worker

        try:
            workers = Worker.count(connection=self._health_probe, queue=Queue(self.name, connection=self._health_probe))
        except RedisError as exc:
            return f"the job queue (Redis) is unreachable ({type(exc).__name__}): webhooks answer 503 until it is back"
        if workers == 0:
            return (f"no `mllm-backend worker` serves the job queue {self.name!r}: training and background "
                    "pre-annotation wait until one starts (same REDIS_URL and JOB_QUEUE)")  # fmt: skip
        return None

    def clear_pending(self, project: int) -> None:
        """Called when a training starts: later annotations schedule the next run."""
        self.redis.delete(self._pending_key(project), self._count_key(project))

    def _run_key(self, run_id: str) -> str:
        return f"{self.name}:preannotation:{run_id}"

    def preannotate(self, project: int, task_ids: list[int] | None = None) -> str:
        """Queue a pre-annotation run: one planning job lists the tasks left, then chunks of
        ``PREANNOTATE_CHUNK_TASKS`` go to whichever workers are free. The run's id is what ``status`` reads."""

        def enqueue() -> str:
            run_id = f"preannotate-{project}-{uuid.uuid4().hex[:8]}"
            key = self._run_key(run_id)
            self.redis.hset(key, mapping={"project": project, "created": time.time()})
            self.redis.expire(key, RUN_TTL)
            self.queue.enqueue(plan_preannotation_job, run_id, project, task_ids, job_id=f"{run_id}-plan",
                               job_timeout=JOB_TIMEOUT, result_ttl=RUN_TTL, failure_ttl=RUN_TTL,
                               meta={"project": project, "kind": "preannotate"})  # fmt: skip
            self.redis.lpush(f"{self.name}:jobs:{project}", run_id)
            self.redis.ltrim(f"{self.name}:jobs:{project}", 0, 19)
            return run_id

        return self._guard(enqueue)

    def queue_chunks(self, run_id: str, project: int, todo: list[int], *, tasks: int, model_version: str) -> dict:
        """Called by the planning job: record the run's size, then queue its chunks."""
        from rq import Callback, Retry

        size = self.settings.preannotate_chunk_tasks
        chunks = [todo[start : start + size] for start in range(0, len(todo), size)]
        self.redis.hset(self._run_key(run_id), mapping={
            "tasks": tasks, "todo": len(todo), "chunks": len(chunks), "model_version": model_version,
            "stored": 0, "failed": 0, "skipped_late": 0, "chunks_done": 0, "chunks_failed": 0,
            "tasks_done": 0})  # fmt: skip
        for index, chunk in enumerate(chunks):
            self.queue.enqueue(preannotate_chunk_job, run_id, project, chunk, job_id=f"{run_id}-{index:05d}",
                               job_timeout=JOB_TIMEOUT, result_ttl=RUN_TTL, failure_ttl=RUN_TTL,
                               retry=Retry(max=2, interval=[5, 30]), on_failure=Callback(_chunk_failed),
                               meta={"project": project, "kind": "preannotate-chunk"})  # fmt: skip
        return {"tasks": tasks, "todo": len(todo), "chunks": len(chunks)}

    def chunk_finished(self, run_id: str, size: int, done: dict) -> None:
        key = self._run_key(run_id)
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, "stored", done["stored"]).hincrby(key, "failed", done["failed"])
            pipe.hincrby(key, "skipped_late", done["skipped"])  # predicted by someone else since the plan
            pipe.hincrby(key, "tasks_done", size).hincrby(key, "chunks_done", 1).execute()

    def chunk_failed(self, run_id: str, size: int, error: str) -> None:
        key = self._run_key(run_id)
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, "failed", size).hincrby(key, "tasks_done", size).hincrby(key, "chunks_failed", 1)
            pipe.hset(key, "error", (_last_line(error) or "a chunk failed")[:500]).execute()

    def recent(self, project: int) -> list[str]:
        return [j.decode() for j in self._guard(lambda: self.redis.lrange(f"{self.name}:jobs:{project}", 0, 19))]

    def status(self, job_id: str) -> dict[str, Any] | None:
        return self._guard(lambda: self._run_status(job_id) or self._status(job_id))

    def _run_status(self, run_id: str) -> dict[str, Any] | None:
        """A chunked pre-annotation run: its planning job until it has planned, then its chunks' counts."""
        raw = self.redis.hgetall(self._run_key(run_id))
        if not raw:
            return None
        run = {k.decode(): v.decode() for k, v in raw.items()}
        info: dict[str, Any] = {"id": run_id, "kind": "preannotate", "project": int(run["project"])}
        if "chunks" not in run:  # not planned yet: the planning job's own state
            plan = self._status(f"{run_id}-plan") or {"status": "failed", "error": "the planning job expired"}
            stage = "listing the project's tasks" if plan["status"] == "started" else plan.get("stage")
            return {**info, "status": plan["status"], "progress": 0.0, "stage": stage,
                    **({"error": plan["error"]} if "error" in plan else {})}  # fmt: skip
        count = {k: int(run[k]) for k in ("tasks", "todo", "chunks", "chunks_done", "chunks_failed", "tasks_done",
                                           "stored", "failed", "skipped_late")}  # fmt: skip
        finished = count["chunks_done"] + count["chunks_failed"] >= count["chunks"]
        info.update(progress=round(count["tasks_done"] / count["todo"], 4) if count["todo"] else 1.0,
                    stage=f"{count['chunks_done']} of {count['chunks']} chunks done, {count['stored']} predictions "
                    "stored", chunks=count["chunks"], chunks_done=count["chunks_done"])  # fmt: skip
        if not finished:
            started = [self._status(job_id) for job_id in self._started_chunks(run_id)]
            lost = [chunk for chunk in started if chunk is not None and chunk["status"] == "failed"]  # see _status
            if lost:
                return {**info, "status": "failed", "error": f"{lost[0]['error']}; start the pre-annotation again to "
                        "finish it (predicted tasks are skipped)"}  # fmt: skip
            return {**info, "status": "started" if count["tasks_done"] or started else "queued"}
        skipped = count["tasks"] - count["todo"] + count["skipped_late"]
        result = {"tasks": count["tasks"], "skipped": skipped, "stored": count["stored"], "failed": count["failed"],
                  "model_version": run["model_version"]}  # fmt: skip
        if count["chunks_failed"]:
            return {**info, "status": "failed", "error": run.get("error", "a chunk failed"), "result": result}
        return {**info, "status": "finished", "result": result}

    def _started_chunks(self, run_id: str) -> list[str]:
        """The ids of the run's chunk jobs a worker has taken and not finished."""
        from rq.registry import StartedJobRegistry

        return [j for j in StartedJobRegistry(self.name, connection=self.redis).get_job_ids() if j.startswith(run_id)]

    def _status(self, job_id: str) -> dict[str, Any] | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return None
        state = str(job.get_status(refresh=True))
        state = state.split(".")[-1].lower()
        meta = job.get_meta(refresh=True)
        info: dict[str, Any] = {
            "id": job.id, "kind": meta.get("kind"), "project": meta.get("project"), "status": state,
            "progress": meta.get("progress", 0.0), "stage": meta.get("stage"),
        }  # fmt: skip
        heartbeat = meta.get("heartbeat")
        if state == "started" and heartbeat is not None and time.time() - heartbeat > STALE_SECONDS:
            info.update(status="failed", error=f"the worker stopped responding {time.time() - heartbeat:.0f} s ago")
        elif state == "finished":
            info["result"] = job.return_value()
        elif state == "failed" and job.exc_info:
            info["error"] = _last_line(job.exc_info)
        return info


# --- in-process fallback ----------------------------------------------------------------------


class LocalJobs:
    """The same behaviour in a background thread of the server, for setups without Redis."""

    kind = "in-process"

    def __init__(self, settings: Settings, annotator_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self._annotator_factory = annotator_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs")
        self._jobs: dict[str, dict[str, Any]] = {}
        self._pending: dict[int, tuple[str, threading.Timer | None]] = {}
        self._counts: dict[int, int] = {}
        self._lock = threading.RLock()  # _schedule runs under it and _submit takes it again

    def annotation_event(self, project: int, count: int = 1) -> str | None:
        with self._lock:  # decide and schedule in one step: concurrent events see one pending training
            self._counts[project] = self._counts.get(project, 0) + count
            pending = self._pending.get(project)
            enough = self._counts[project] >= self.settings.train_after_annotations
            if pending is not None and not (enough and pending[1] is not None):
                return pending[0]
            return self._schedule(project, 0.0 if enough else self.settings.train_debounce_seconds)

    def train_now(self, project: int) -> str:
        with self._lock:
            return self._schedule(project, 0.0)

    def problem(self) -> str | None:
        return None  # the in-process worker lives as long as the server

    def _schedule(self, project: int, delay: float) -> str:
        """Called with the lock held: replaces a scheduled (not yet started) training of the project."""
        pending = self._pending.get(project)
        if pending is not None and pending[1] is not None:
            pending[1].cancel()
            self._jobs[pending[0]]["status"] = "canceled"
        job_id = f"train-{project}-{uuid.uuid4().hex[:8]}"
        self._jobs[job_id] = {"id": job_id, "kind": "train", "project": project, "status": "scheduled",
                              "progress": 0.0, "stage": None}  # fmt: skip
        timer = None
        if delay > 0:
            timer = threading.Timer(delay, self._submit, args=(job_id, project))
            timer.daemon = True
            timer.start()
        self._pending[project] = (job_id, timer)
        if delay <= 0:
            self._submit(job_id, project)
        return job_id

    def _submit(self, job_id: str, project: int) -> None:
        with self._lock:
            if self._jobs[job_id]["status"] == "canceled":  # its timer fired as it was being replaced
                return
            self._jobs[job_id]["status"] = "queued"
            self._pending[project] = (job_id, None)
        self._executor.submit(self._run, job_id, lambda report: self._train(project, job_id, report))

    def _train(self, project: int, job_id: str, report: Reporter) -> dict:
        with self._lock:
            if self._pending.get(project, ("",))[0] == job_id:
                del self._pending[project]
            self._counts[project] = 0
        return run_training(self.settings, project, report)

    def preannotate(self, project: int, task_ids: list[int] | None = None) -> str:
        job_id = f"preannotate-{project}-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._jobs[job_id] = {"id": job_id, "kind": "preannotate", "project": project, "status": "queued",
                                  "progress": 0.0, "stage": None}  # fmt: skip
        self._executor.submit(self._run, job_id, lambda report: self._preannotate(project, task_ids, report))
        return job_id

    def _preannotate(self, project: int, task_ids: list[int] | None, report: Reporter) -> dict:
        from backend.preannotate import preannotate_project

        if self._annotator_factory is None:
            raise RuntimeError("no annotator to pre-annotate with")
        return preannotate_project(self.settings, self._annotator_factory(), project, task_ids, report)

    def _run(self, job_id: str, work: Callable[[Reporter], dict]) -> None:
        job = self._jobs[job_id]
        job["status"] = "started"

        def report(fraction: float, stage: str) -> None:
            job.update(progress=round(fraction, 4), stage=stage)

        try:
            job.update(status="finished", result=work(report))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            job.update(status="failed", error=f"{type(exc).__name__}: {exc}")

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self._jobs.get(job_id)
        return dict(job) if job is not None else None

    def recent(self, project: int) -> list[str]:
        return [job_id for job_id, job in reversed(self._jobs.items()) if job["project"] == project][:20]


def make_queue(settings: Settings, annotator_factory: Callable[[], Any] | None = None) -> RedisJobs | LocalJobs:
    return RedisJobs(settings) if settings.redis_url else LocalJobs(settings, annotator_factory)


def _in_process_worker_class():
    from rq import SimpleWorker

    class InProcessWorker(SimpleWorker):
        """rq's worker that runs jobs in its own process, not a forked work horse per job: the MLLM the first
        pre-annotation chunk loads stays loaded for the next (a horse would load it again for every chunk, and a
        forked CUDA context cannot be used at all).

        rq registers a worker before it installs its signal handlers; a SIGTERM in between would kill it still
        registered, and /health would count a dead worker. Until rq's handlers are in, a signal only asks the
        loop to stop, so the worker leaves cleanly.
        """

        def bootstrap(self, *args: Any, **kwargs: Any) -> None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._stop_when_started)
            super().bootstrap(*args, **kwargs)

        def _stop_when_started(self, signum: int, frame: object) -> None:
            self._stop_requested = True  # rq's loop checks it before taking a job

    return InProcessWorker


def run_worker(settings: Settings) -> None:
    """`mllm-backend worker`: take jobs from Redis until stopped (with the scheduler for debounced runs)."""
    if not settings.redis_url:
        raise SystemExit("mllm-backend worker needs REDIS_URL, e.g. redis://127.0.0.1:6379/0")
    import torch  # noqa: F401  -- imported once, before the first job waits for it
    import transformers  # noqa: F401

    queue = RedisJobs(settings).queue
    _in_process_worker_class()([queue], connection=queue.connection).work(with_scheduler=True)
