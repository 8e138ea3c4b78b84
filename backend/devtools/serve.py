"""`transformers serve` (a real OpenAI-compatible server) on loopback, for tests and the benchmark."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from backend.devtools.devstack import ManagedProcess, free_port


@contextmanager
def transformers_serve(checkpoint: str | Path, *, start_timeout: float = 120.0) -> Iterator[str]:
    """Serve ``checkpoint`` with `transformers serve` on a free loopback port; yields its ``/v1`` base URL.

    The server's output goes to a log file, quoted in the error if it dies before answering ``/health``.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(Path(tmp) / "hub")}
        command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()",
                   "serve", "--host", "127.0.0.1", "--port", str(port), str(checkpoint)]  # fmt: skip
        server = ManagedProcess("transformers serve", command, env, Path(tmp) / "serve.log").start()
        try:
            server.wait_until(lambda: requests.get(f"{url}/health", timeout=1).status_code == 200, start_timeout)
            yield f"{url}/v1"
        finally:
            server.stop()
