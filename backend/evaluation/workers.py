"""Pre-annotating a project with one `mllm-backend worker`, then two, against a real Label Studio and Redis.

Each worker runs with one torch thread, so on a 2-core machine the two runs get the same
compute per worker. Label Studio, the backend and the workers share the machine, so the
speedup includes Label Studio's own work in storing each prediction.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import requests


def _wait(check, *, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _run(backend_url: str, project: int, timeout: float = 900) -> tuple[dict, float]:
    """Start a pre-annotation of ``project`` and wait for it to finish: (its final status, seconds)."""
    start = time.perf_counter()
    job = requests.post(f"{backend_url}/jobs/preannotate", json={"project": project}, timeout=10).json()["job"]

    def done() -> dict | None:
        status = requests.get(f"{backend_url}/jobs/{job}", timeout=10).json()
        return status if status["status"] in {"finished", "failed"} else None

    status = _wait(done, timeout=timeout, what=f"pre-annotation job {job}", every=0.1)
    seconds = time.perf_counter() - start
    if status["status"] != "finished" or status["result"]["failed"]:
        raise RuntimeError(f"pre-annotation job {job} did not finish cleanly: {status}")
    return status, seconds


def workers_bench(model: str, *, tasks: int, seed: int, work: Path, redis_url: str, chunk_tasks: int = 4) -> dict:
    """Tasks per second pre-annotating the same ``tasks``-task shapes project with 1 and with 2 workers."""
    from redis import Redis
    from rq import Queue, Worker

    from backend.devtools.devstack import ManagedProcess, start_stack
    from backend.labelstudio.client import connect
    from backend.shapes.world import write_world

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": redis_url, "JOB_QUEUE": queue, "MLLM_MODEL": model, "HF_HUB_OFFLINE": "1",
           "PREANNOTATE_CHUNK_TASKS": str(chunk_tasks), "LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
           "SYNC_PROJECT_MODEL_VERSION": "true"}  # fmt: skip
    stack = start_stack(work / "stack", work / "model-dir", backend_env=env)
    workers: list[ManagedProcess] = []
    try:
        client = connect(stack.label_studio_url, stack.token)
        world = write_world(work / "world", tasks=tasks, seed=seed)
        config_path, tasks_path = world.projects["boxes"]
        imports = json.loads(tasks_path.read_text())

        def project(title: str, count: int) -> int:
            created = int(client.projects.create(title=title, label_config=config_path.read_text()).id)
            requests.post(
                f"{stack.label_studio_url}/api/projects/{created}/import",
                json=imports[:count],
                headers={"Authorization": f"Token {stack.token}"},
                timeout=120,
            ).raise_for_status()
            return created

        worker_env = {**{k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}, **env,
                      "LABEL_STUDIO_URL": stack.label_studio_url, "LABEL_STUDIO_API_KEY": stack.token,
                      "MODEL_DIR": str(work / "model-dir")}  # fmt: skip
        connection = Redis.from_url(redis_url)
        measured = {}
        for count in (1, 2):
            name = f"worker-{count}"
            workers.append(ManagedProcess(name, [sys.executable, "-m", "backend.cli", "worker"], worker_env,
                                          work / f"{name}.log").start())  # fmt: skip
            workers[-1].wait_until(lambda n=count: Worker.count(queue=Queue(queue, connection=connection)) >= n, 60)
            _run(stack.backend_url, project(f"warm-up {count}", 2 * chunk_tasks * count))  # every worker loads
            status, seconds = _run(stack.backend_url, project(f"{count} workers", tasks))
            measured[count] = {"tasks_per_s": round(status["result"]["stored"] / seconds, 2),
                               "seconds": round(seconds, 2), "chunks": status["chunks"]}  # fmt: skip
    finally:
        for worker in workers:
            worker.stop()
        stack.stop()
    return {
        "tasks": tasks, "chunk_tasks": chunk_tasks, "torch_threads_per_worker": 1,
        "1": measured[1], "2": measured[2],
        "speedup": round(measured[2]["tasks_per_s"] / measured[1]["tasks_per_s"], 2),
    }  # fmt: skip
