"""A real Label Studio 1.23.2 (own virtualenv, cached) and `mllm-backend serve`, started once per test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.devtools.devstack import Stack, start_stack
from backend.shapes.training import SHIPPED

_STACK: Stack | None = None


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    global _STACK
    workdir = tmp_path_factory.mktemp("e2e")
    model = SHIPPED  # the trained shapes model: world projects get real labels, other configs plausible ones
    env = {
        "MLLM_MODEL": str(model),
        "CALIBRATION_MIN_REVIEWS": "4",
        "TRAINING_EPOCHS": "2",
        "TRAIN_DEBOUNCE_SECONDS": "2",
    }  # in-process jobs (no REDIS_URL); the default classifier backbone: the model's own vision tower
    if os.environ.get("E2E_BACKEND_ENV"):  # e.g. "CRITIC=off" to debug
        env.update(dict(item.split("=", 1) for item in os.environ["E2E_BACKEND_ENV"].split(",")))
    _STACK = start_stack(workdir, workdir / "model-dir", env)
    try:
        yield _STACK
    finally:
        _STACK.stop()
        _STACK = None


@pytest.fixture(scope="session")
def client(stack: Stack):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=stack.label_studio_url, api_key=stack.token, timeout=120)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _STACK is not None:
        report.sections.append(("Label Studio and backend logs", _STACK.logs()))


IMAGES = sorted((Path(__file__).resolve().parents[2] / "demo" / "images").glob("*.png"))
