"""`transformers serve` (a real OpenAI-compatible server) on loopback, for tests and the benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from backend.devtools.devstack import free_port


@contextmanager
def transformers_serve(checkpoint: str | Path, *, start_timeout: float = 120.0, torch_threads: int | None = None):
    """Serve ``checkpoint`` with `transformers serve` on a free loopback port; yields its ``/v1`` base URL.

    The server's output goes to a log file, quoted in the error if it dies before answering ``/health``.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(Path(tmp) / "hub")}
        if torch_threads is not None:
            env["OMP_NUM_THREADS"] = str(torch_threads)
        command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()",
                   "serve", "--host", "127.0.0.1", "--port", str(port), str(checkpoint)]  # fmt: skip
        log_path = Path(tmp) / "serve.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                _wait_healthy(process, f"http://127.0.0.1:{port}", log_path, start_timeout)
                yield f"http://127.0.0.1:{port}/v1"
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited ({process.returncode}): {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError(f"transformers serve did not answer /health within {timeout:.0f} s")
