"""The two commands a newcomer runs, as subprocesses: tiny-model, then serve + curl."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import noise_image, png_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config" / "boxes.xml").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_tiny_model_help_says_what_it_is_for():
    help_text = run_cli("tiny-model", "--help").stdout
    assert "random" in help_text and "without a GPU" in help_text


def test_serve_refuses_a_wrong_setting_naming_it():
    result = run_cli("serve", env={"MLLM_MODEL": "x", "MLLM_DEVICE": "tpu"})
    assert result.returncode == 2
    assert "MLLM_DEVICE" in result.stderr


@pytest.fixture
def served(tmp_path):
    model = tmp_path / "tiny"
    assert run_cli("tiny-model", str(model)).returncode == 0
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLLM_MODEL": str(model), "MODEL_DIR": str(tmp_path / "md")}
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=1).json()["model_state"] == "ready":
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_answers_health_setup_and_predict_as_the_readme_says(served):
    health = requests.get(f"{served}/health", timeout=1)
    assert health.elapsed.total_seconds() < 1 and health.json()["status"] == "UP"
    setup = requests.post(f"{served}/setup", json={"project": "1.1", "schema": CONFIG}, timeout=3).json()
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(64, 48))).decode()
    box = {
        "id": "b1",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["Other"]},
    }
    task = {"id": 1, "data": {"image": image}, "annotations": [{"result": [box]}]}
    body = requests.post(
        f"{served}/predict", json={"tasks": [task], "label_config": CONFIG, "project": "1.1"}, timeout=100
    ).json()
    [prediction] = body["results"]
    assert prediction["model_version"] == setup["model_version"]
    assert prediction["result"][0]["id"] == "b1"
    assert "mllm_backend_predictions_total 1.0" in requests.get(f"{served}/metrics", timeout=1).text
