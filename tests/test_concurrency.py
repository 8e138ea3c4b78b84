"""Concurrent callers and processes: one pending training per project, no lost review rows, no stale partial
versions, and a stopping server that refuses instead of hanging. Real Redis, real SQLite, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from redis import Redis
from rq.job import Job, JobStatus

from backend.devtools.devstack import free_port
from backend.labelstudio.outcomes import PredictedLabel
from backend.training.versions import ClassifierVersions

REDIS = "redis://127.0.0.1:6379/14"
ROOT = Path(__file__).resolve().parents[1]


def simultaneously(count: int, call):
    """``call(i)`` from ``count`` threads released together; their results in order."""
    barrier = threading.Barrier(count)

    def run(i: int):
        barrier.wait(timeout=10)
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


@pytest.fixture
def queue_name():
    name = f"race-{uuid.uuid4().hex[:8]}"
    yield name
    redis = Redis.from_url(REDIS)
    for key in redis.scan_iter(f"*{name}*"):
        redis.delete(key)


@pytest.mark.parametrize("jobs", ["redis", "in-process"])
def test_twenty_simultaneous_annotations_leave_exactly_one_pending_training(make_client, queue_name, jobs):
    env = {"TRAIN_AFTER_ANNOTATIONS": "1000", "TRAIN_DEBOUNCE_SECONDS": "600"}  # in-process: nothing may start
    if jobs == "redis":  # no worker serves this queue, so "enough annotations: train now" is raced too
        env.update(REDIS_URL=REDIS, JOB_QUEUE=queue_name, TRAIN_AFTER_ANNOTATIONS="5")
    _, service = make_client(**env)
    from backend.server import create_app

    app = create_app(service)
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 9}, "annotation": {"task": 1, "result": []}}
    replies = simultaneously(20, lambda _: app.test_client().post("/webhook", json=body))
    assert [r.status_code for r in replies] == [200] * 20, [r.get_data(as_text=True) for r in replies]
    ids = [r.get_json()["job"] for r in replies]
    assert all(isinstance(i, str) and i.startswith("train-9-") for i in ids), ids
    if jobs == "redis":
        redis = Redis.from_url(REDIS)
        made = {j.decode() for j in redis.lrange(f"{queue_name}:jobs:9", 0, -1)}
        assert set(ids) <= made
        live = [j for j in made if Job.fetch(j, connection=redis).get_status() != JobStatus.CANCELED]
    else:
        live = [j for j in set(ids) if service.jobs.status(j)["status"] != "canceled"]
        service.jobs._pending[9][1].cancel()  # do not train in the background of the test run
    assert len(live) == 1, live


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from backend.labelstudio.outcomes import PredictedLabel
    from backend.reviews import ReviewStore

    store = ReviewStore(sys.argv[1])
    ends = time.monotonic() + float(sys.argv[2])
    n = 0
    while time.monotonic() < ends and n < 100000:  # bounded in time and count
        labels = [PredictedLabel(100000 + n * 50 + k, "r", "c", "x", 0.5) for k in range(50)]
        store.record_predictions(77, "other-process", labels, usage=[(100000 + n, 0.1, 1, 1, 10)])
        n += 1
    print(n)
""")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_review_webhooks_lose_no_rows_while_another_process_writes_the_same_database(make_client, database, request):
    on_postgres = {"DATABASE_URL": request.getfixturevalue("postgres_url")} if database == "postgresql" else {}
    client, service = make_client(TRAIN_AFTER_ANNOTATIONS="100000", TRAIN_DEBOUNCE_SECONDS="600", **on_postgres)
    assert service.predictor.reviews.postgres == (database == "postgresql")
    store = service.predictor.reviews
    labels = [PredictedLabel(task, box, "label", "cat", 0.7) for task in range(1, 201) for box in ("a", "b")]
    store.record_predictions(5, "v1", labels)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store.location, "8"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.0)  # the other process is writing

    def review(i: int) -> requests.Response:
        task = i + 1
        result = [{"id": box, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                   "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]}}
                  for box in ("a", "b")]  # fmt: skip
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 5}, "annotation": {"task": task, "result": result}}
        return client.application.test_client().post("/webhook", json=body)

    replies = simultaneously(200 // 10, lambda i: [review(i * 10 + k) for k in range(10)])
    flat = [r for group in replies for r in group]
    writes = int(writer.communicate(timeout=60)[0])
    assert writes > 0, "the other process wrote nothing, so nothing was contended"
    assert [r.status_code for r in flat] == [200] * 200, {r.get_data(as_text=True) for r in flat}
    assert sum(r.get_json()["judged_labels"] for r in flat) == 400
    assert len(store.outcomes(5)[0]) == 400


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from backend.training.versions import ClassifierVersions

    version, partial = ClassifierVersions(Path(sys.argv[1])).begin(7)
    (partial / "weights.bin").write_bytes(b"x" * 1000)
    print(partial, flush=True)
    time.sleep(60)
""")


def test_a_sigkilled_training_leaves_no_partial_version_behind_the_next_run(tmp_path):
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    partial = Path(run.stdout.readline().strip())
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    assert partial.is_dir()
    elsewhere = tmp_path / "7" / ".partial-otherhost-123-v20260101-000000-abcdef"  # another host's live run
    elsewhere.mkdir()
    store = ClassifierVersions(tmp_path)
    _, mine = store.begin(7)
    assert not partial.exists() and elsewhere.exists() and mine.exists()
    old = time.time() - 7 * 3600
    os.utime(elsewhere, (old, old))
    assert store.remove_abandoned(7) == [elsewhere]  # older than any job may run: abandoned too
    assert mine.exists()  # this process is alive: its run is kept


def test_a_stopping_server_refuses_new_requests_instead_of_leaving_them_hanging(tiny_llava, tmp_path):
    import socket

    hold = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: keeps one prediction in flight
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLLM_MODEL": str(tiny_llava),
        "MODEL_DIR": str(tmp_path / "md"),
        "ALLOWED_MEDIA_HOSTS": f"127.0.0.1:{hold.getsockname()[1]}",
        "MEDIA_TIMEOUT": "20",
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if requests.get(f"{url}/health", timeout=1).json()["model_state"] == "ready":
                    break
            except requests.RequestException:
                time.sleep(0.2)
        config = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/>' \
                 '<Choice value="b"/></Choices></View>'  # fmt: skip
        task = {"id": 1, "data": {"image": f"http://127.0.0.1:{hold.getsockname()[1]}/x.png"}}
        in_flight = threading.Thread(target=lambda: requests.post(
            f"{url}/predict", json={"tasks": [task], "label_config": config}, timeout=30), daemon=True)  # fmt: skip
        in_flight.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=5)
        assert time.monotonic() - started < 2, "the request waited instead of being refused"
    finally:
        server.kill()
        server.wait(timeout=10)
        hold.close()
