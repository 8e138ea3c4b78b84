"""Load on the production server (gunicorn via `mllm-backend serve`), loopback only, bounded: 3 rounds x 50 requests."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from backend.devtools.devstack import free_port
from tests.conftest import noise_image, png_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "boxes.xml").read_text()
CONCURRENCY, ROUNDS, TASKS_PER_REQUEST = 50, 3, 4


def payload(seed: int) -> dict:
    tasks = []
    for k in range(TASKS_PER_REQUEST):
        image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(64, 48, seed * 10 + k))).decode()
        value = {"x": 10, "y": 10, "width": 50, "height": 60, "rotation": 0, "rectanglelabels": ["Other"]}
        box = {"id": f"b{k}", "from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": value}
        tasks.append({"id": seed * 10 + k, "data": {"image": image}, "annotations": [{"result": [box]}]})
    return {"tasks": tasks, "label_config": CONFIG, "project": "1.1"}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children  # one gunicorn worker: one copy of the model
    return int(children[0])


@pytest.fixture(scope="module")
def production_server(tmp_path_factory):
    from backend.devtools.tiny import build_tiny_checkpoint

    workdir = tmp_path_factory.mktemp("load")
    model = build_tiny_checkpoint(workdir / "tiny", "llava")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLLM_MODEL": str(model), "MODEL_DIR": str(workdir / "md"),
           "LOG_LEVEL": "WARNING", "MAX_PREDICTS_IN_FLIGHT": "16"}  # fmt: skip
    log = (workdir / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--threads", "8"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip  # 8 is raised to 16 + 4
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir / "server.log").read_text()
        try:
            if requests.get(f"{url}/health", timeout=1).json()["model_state"] == "ready":
                break
        except requests.RequestException:
            pass
        time.sleep(0.3)
    yield url, process.pid
    process.terminate()
    process.wait(timeout=30)
    log.close()


def probe(url: str, stop: threading.Event, seconds: dict[str, list[float]]) -> None:
    """GET /health and POST /setup every 50 ms, as Label Studio calls them (it gives them 1 s and 3 s), timing each."""
    setup = {"project": "1.1", "schema": CONFIG, "hostname": "http://127.0.0.1:1", "access_token": None}
    while not stop.wait(0.05):
        for route, call in (("/health", lambda: requests.get(f"{url}/health", timeout=5)),
                            ("/setup", lambda: requests.post(f"{url}/setup", json=setup, timeout=5))):  # fmt: skip
            started = time.monotonic()
            try:
                call().raise_for_status()
            finally:
                seconds[route].append(time.monotonic() - started)


def test_fifty_concurrent_predicts_three_rounds(production_server):
    url, master = production_server
    payloads = [payload(seed) for seed in range(5)]
    sequential = [requests.post(f"{url}/predict", json=p, timeout=100).json()["results"] for p in payloads]
    pid = worker_pid(master)
    memory, seconds, stop = [], {"/health": [], "/setup": []}, threading.Event()
    prober = threading.Thread(target=probe, args=(url, stop, seconds), daemon=True)
    prober.start()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for _ in range(ROUNDS):
            answers = list(pool.map(
                lambda i: (i % 5, requests.post(f"{url}/predict", json=payloads[i % 5], timeout=100)),
                range(CONCURRENCY),
            ))  # fmt: skip
            for which, response in answers:
                if response.status_code == 503:  # a deliberate, fast overload refusal
                    assert response.headers.get("Retry-After")
                    continue
                assert response.status_code == 200, response.text
                assert response.json()["results"] == sequential[which], "a concurrent answer differs from sequential"
            assert sum(r.status_code == 200 for _, r in answers) >= 8  # MAX_PREDICTS_IN_FLIGHT=16 admitted at once
            memory.append(rss_kb(pid))
            print(f"round: {sum(r.status_code == 200 for _, r in answers)} ok, "
                  f"{sum(r.status_code == 503 for _, r in answers)} refused, worker RSS {memory[-1]} kB")  # fmt: skip
    stop.set()
    prober.join(timeout=10)
    assert memory[-1] < memory[0] * 1.10, f"RSS grew across rounds: {memory} kB"
    for route, budget in (("/health", 1.0), ("/setup", 3.0)):  # Label Studio's timeouts for them
        assert len(seconds[route]) >= 3 and max(seconds[route]) < budget, f"{route} took {sorted(seconds[route])}"
