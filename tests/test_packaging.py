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
