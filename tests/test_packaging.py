"""An installed wheel works outside a source checkout: it carries the default prompts and the shapes model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from backend.prompts import TEMPLATES, PromptBook

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_prompts_and_the_shapes_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)  # fmt: skip
    [wheel] = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert "backend/shapes/model/model.safetensors" in names
    book = PromptBook(tmp_path / "site" / "backend" / "default_prompts")
    book.check()  # every template the backend renders, read from the installed package
    assert set(TEMPLATES) <= {p.stem for p in (tmp_path / "site" / "backend" / "default_prompts").glob("*.txt")}


def test_the_compose_file_serves_the_model_once_with_vllm_and_the_flags_devtools_passes():
    """Docker cannot run here: the compose file is read instead. Backend and worker ask the `vllm` service, whose
    flags after the model and address are the ones backend/devtools/vllm.py passes (device and dtype aside)."""
    import re

    import yaml

    from backend.devtools.vllm import SERVE_FLAGS

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("backend", "worker"):
        env = services[name]["environment"]
        assert re.fullmatch(r"\$\{OPENAI_BASE_URL:-http://vllm:(\d+)/v1\}", env["OPENAI_BASE_URL"]), env
        assert env["MLLM_PROVIDER"] == "${MLLM_PROVIDER:-openai}" and "vllm" in services[name]["depends_on"]
    command = services["vllm"]["command"]
    port = command[command.index("--port") + 1]
    assert services["backend"]["environment"]["OPENAI_BASE_URL"].endswith(f":{port}/v1}}")
    flags = list(command)
    for taken in ("--model", "--served-model-name", "--host", "--port", "--dtype"):  # where and what, not how
        index = flags.index(taken)
        del flags[index : index + 2]
    assert tuple(flags) == SERVE_FLAGS
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
