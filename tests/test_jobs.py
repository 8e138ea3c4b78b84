"""The job queue against the real Redis on loopback (database 15, flushed per test)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis
from rq import Queue
from rq.registry import ScheduledJobRegistry

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
