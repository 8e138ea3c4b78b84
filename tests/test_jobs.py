"""The job queue against the real Redis on loopback (database 15, flushed per test)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis
from rq import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from backend.jobs import LocalJobs, QueueUnavailable, RedisJobs
from backend.settings import Settings

REDIS = "redis://127.0.0.1:6379/15"


def settings(**env: str) -> Settings:
    return Settings.from_env({"MLLM_MODEL": "m", "TRAIN_DEBOUNCE_SECONDS": "60", "TRAIN_AFTER_ANNOTATIONS": "50",
                              **env})  # fmt: skip


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A queue of this test's own, so runs sharing the Redis never see each other's jobs."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    redis = Redis.from_url(REDIS)
    for key in redis.scan_iter(f"*{name}*"):
        redis.delete(key)


@pytest.fixture
def redis_jobs(queue_name) -> RedisJobs:
    return RedisJobs(settings(REDIS_URL=REDIS, JOB_QUEUE=queue_name))


def scheduled(jobs: RedisJobs) -> list[str]:
    return ScheduledJobRegistry(queue=jobs.queue).get_job_ids()


def test_twenty_annotation_events_make_one_pending_training(redis_jobs):
    ids = {redis_jobs.annotation_event(3) for _ in range(20)}
    assert len(ids) == 1
    [job_id] = ids
    assert scheduled(redis_jobs) == [job_id] and redis_jobs.queue.count == 0
    assert redis_jobs.status(job_id)["status"] == "scheduled"
    assert redis_jobs.annotation_event(4) != job_id  # another project gets its own


def test_start_training_replaces_the_pending_run_with_one_that_runs_now(redis_jobs):
    pending = redis_jobs.annotation_event(3)
    now = redis_jobs.train_now(3)
    assert now != pending
    assert redis_jobs.status(pending)["status"] == "canceled"
    assert redis_jobs.queue.job_ids == [now] and scheduled(redis_jobs) == []
    assert redis_jobs.annotation_event(3) == now  # later events join the queued run


def test_enough_annotations_train_at_once(redis_jobs, queue_name):
    jobs = RedisJobs(settings(REDIS_URL=REDIS, TRAIN_AFTER_ANNOTATIONS="5", JOB_QUEUE=queue_name))
    first = jobs.annotation_event(8)
    for _ in range(4):
        latest = jobs.annotation_event(8)
    assert scheduled(jobs) == [] and jobs.queue.job_ids == [latest] and latest != first


def test_a_started_job_whose_worker_died_reports_failed(redis_jobs):
    job_id = redis_jobs.train_now(5)
    job = Queue(redis_jobs.name, connection=redis_jobs.redis).fetch_job(job_id)
    job.set_status("started")
    job.meta.update(heartbeat=time.time() - 60, progress=0.4)
    job.save_meta()
    status = redis_jobs.status(job_id)
    assert status["status"] == "failed" and "stopped responding" in status["error"]


def test_redis_down_is_a_clear_error_not_a_hang():
    jobs = RedisJobs(settings(REDIS_URL="redis://127.0.0.1:1/0"))
    with pytest.raises(QueueUnavailable, match="Redis"):
        jobs.annotation_event(1)


def test_webhook_answers_503_when_redis_is_down_and_says_so(make_client):
    client, _ = make_client(REDIS_URL="redis://127.0.0.1:1/0")
    body = {"action": "START_TRAINING", "project": {"id": 1}}
    response = client.post("/webhook", json=body)
    assert response.status_code == 503 and "not queued" in response.get_json()["error"]
    assert client.get("/versions").get_json()["jobs"] == "redis"


def test_in_process_queue_debounces_the_same_way_and_reports_failures():
    jobs = LocalJobs(settings(TRAIN_DEBOUNCE_SECONDS="30"))
    ids = {jobs.annotation_event(2) for _ in range(20)}
    assert len(ids) == 1 and jobs.status(ids.pop())["status"] == "scheduled"
    now = jobs.train_now(2)
    deadline = time.monotonic() + 30
    while jobs.status(now)["status"] not in {"finished", "failed"} and time.monotonic() < deadline:
        time.sleep(0.1)
    status = jobs.status(now)
    assert status["status"] == "failed" and "LABEL_STUDIO_URL" in status["error"]  # no Label Studio configured


def test_health_says_when_no_worker_serves_the_queue(redis_jobs, queue_name):
    import os
    import subprocess
    import sys

    assert "no `mllm-backend worker` serves the job queue" in redis_jobs.problem()
    env = {**os.environ, "MLLM_MODEL": "m", "REDIS_URL": REDIS, "JOB_QUEUE": queue_name}
    worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        ends = time.monotonic() + 60
        while redis_jobs.problem() is not None and time.monotonic() < ends:
            time.sleep(0.2)
        assert redis_jobs.problem() is None
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert "no `mllm-backend worker`" in redis_jobs.problem()  # a worker that stops says goodbye


def test_a_preannotation_run_reports_its_chunks_as_workers_finish_them(redis_jobs):
    run = redis_jobs.preannotate(7, [1, 2, 3])
    assert redis_jobs.status(run)["status"] == "queued" and redis_jobs.status(run)["kind"] == "preannotate"
    assert redis_jobs.recent(7) == [run]
    # what the planning job does once it has listed the project: 45 tasks, 40 without our prediction
    planned = redis_jobs.queue_chunks(run, 7, list(range(1, 41)), tasks=45, model_version="m-v1")
    assert planned == {"tasks": 45, "todo": 40, "chunks": 3}
    chunk_jobs = [job for job in redis_jobs.queue.job_ids if job.startswith(run) and not job.endswith("-plan")]
    assert [redis_jobs.queue.fetch_job(job).args[2] for job in sorted(chunk_jobs)] == [
        list(range(1, 17)), list(range(17, 33)), list(range(33, 41))]  # fmt: skip
    assert redis_jobs.status(run)["status"] == "queued" and redis_jobs.status(run)["progress"] == 0.0
    redis_jobs.chunk_finished(run, 16, {"stored": 15, "failed": 1, "skipped": 0})
    status = redis_jobs.status(run)
    assert status["status"] == "started" and status["progress"] == 0.4 and status["chunks_done"] == 1
    redis_jobs.chunk_finished(run, 16, {"stored": 16, "failed": 0, "skipped": 0})
    redis_jobs.chunk_finished(run, 8, {"stored": 6, "failed": 0, "skipped": 2})  # two predicted since the plan
    status = redis_jobs.status(run)
    assert status["status"] == "finished" and status["progress"] == 1.0
    assert status["result"] == {"tasks": 45, "skipped": 7, "stored": 37, "failed": 1, "model_version": "m-v1"}


def test_a_chunk_that_failed_for_good_fails_the_run_with_its_error(redis_jobs):
    run = redis_jobs.preannotate(7)
    redis_jobs.queue_chunks(run, 7, [1, 2, 3], tasks=3, model_version="m-v1")
    redis_jobs.chunk_failed(run, 3, "Traceback ...\nConnectionError: Label Studio is unreachable\n")
    status = redis_jobs.status(run)
    assert status["status"] == "failed" and status["error"] == "ConnectionError: Label Studio is unreachable"
    assert status["result"]["failed"] == 3


def test_a_run_whose_plan_cannot_reach_label_studio_fails_naming_the_settings(redis_jobs, queue_name, monkeypatch):
    from rq import SimpleWorker

    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLLM_MODEL", "m")
    monkeypatch.setenv("REDIS_URL", REDIS)
    monkeypatch.setenv("JOB_QUEUE", queue_name)
    run = redis_jobs.preannotate(7)
    SimpleWorker([redis_jobs.queue], connection=redis_jobs.redis).work(burst=True)
    status = redis_jobs.status(run)
    assert status["status"] == "failed" and "LABEL_STUDIO_URL" in status["error"]


def test_a_run_whose_worker_died_mid_chunk_reports_failed_and_says_how_to_finish(redis_jobs):
    run = redis_jobs.preannotate(7)
    redis_jobs.queue_chunks(run, 7, list(range(1, 9)), tasks=8, model_version="m-v1")
    chunk = Queue(redis_jobs.name, connection=redis_jobs.redis).fetch_job(f"{run}-00000")
    redis_jobs.queue.remove(chunk)
    chunk.meta["heartbeat"] = time.time()
    chunk.save_meta()
    chunk.set_status("started")  # as a worker takes it: rq 3 registers an execution of the job
    registry = StartedJobRegistry(redis_jobs.name, connection=redis_jobs.redis)
    redis_jobs.redis.zadd(registry.key, {f"{chunk.id}:execution-1": time.time() + 600})
    assert redis_jobs.status(run)["status"] == "started"
    chunk.meta["heartbeat"] = time.time() - 60  # its worker died a minute ago
    chunk.save_meta()
    status = redis_jobs.status(run)
    assert status["status"] == "failed" and "start the pre-annotation again" in status["error"]
