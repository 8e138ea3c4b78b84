from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.loopback import LoopbackServer, Reply, Seen

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REQUESTS_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "label-studio-requests.jsonl"
BUNDLED_REQUESTS = Path(__file__).resolve().parent / "data" / "label-studio-requests.jsonl"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # what the captured /setup requests carry


def captured_requests() -> list[dict]:
    path = REQUESTS_FILE if REQUESTS_FILE.exists() else BUNDLED_REQUESTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def png_bytes(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.devtools.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava", "llava")


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.devtools.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "idefics3", "idefics3")


@pytest.fixture(scope="session")
def llava_engine(tiny_llava: Path):
    from backend.models.local import TransformersEngine

    return TransformersEngine.load(str(tiny_llava), "cpu", batch_size=8)


def token_guard(token: str, body: bytes, content_type: str = "image/png") -> Callable[[Seen], Reply]:
    """A route that serves ``body`` only to ``Authorization: Token <token>``."""

    def route(request: Seen) -> Reply:
        if request.headers.get("Authorization") != f"Token {token}":
            return Reply(401, b'{"detail": "Authentication credentials were not provided."}')
        return Reply(200, body, {"Content-Type": content_type})

    return route


@pytest.fixture
def label_studio() -> Iterator[LoopbackServer]:
    """A loopback stand-in for Label Studio's file serving and project API, demanding the captured token."""
    projects: dict[int, dict] = {1: {"id": 1, "model_version": "backend-title"}}

    def project_get(request: Seen) -> Reply:
        if request.headers.get("Authorization") != f"Token {LEGACY_TOKEN}":
            return Reply(401)
        return Reply.json(projects[1])

    def project_patch(request: Seen) -> Reply:
        if request.headers.get("Authorization") != f"Token {LEGACY_TOKEN}":
            return Reply(401)
        projects[1].update(json.loads(request.body))
        return Reply.json(projects[1])

    routes = {
        "GET /data/upload/1/c962f976-a.png": token_guard(LEGACY_TOKEN, png_bytes(noise_image(64, 48, 1))),
        "GET /data/local-files/": token_guard(LEGACY_TOKEN, png_bytes(noise_image(64, 48, 2))),
        "GET /api/projects/1/": project_get,
        "PATCH /api/projects/1/": project_patch,
    }
    with LoopbackServer(routes) as server:
        server.projects = projects  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def make_client(tiny_llava: Path, tmp_path: Path):
    """Build the real app (real tiny model) with extra environment; returns (client, service)."""
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    def make(**env: str):
        settings = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "MODEL_DIR": str(tmp_path / "md"), **env})
        service = build_service(settings)
        app = create_app(service)
        service.slot.get(timeout=120)
        return app.test_client(), service

    return make


POSTGRES = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The machine's PostgreSQL (TEST_DATABASE_URL), in a schema of this test's own, dropped afterwards."""
    import uuid

    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def vllm_url() -> Iterator[str]:
    """A real vLLM (CPU build, own virtualenv) serving the shipped shapes model as "shapes", once per test run;
    ``VLLM_BASE_URL`` points at one already running instead."""
    if os.environ.get("VLLM_BASE_URL"):
        yield os.environ["VLLM_BASE_URL"].rstrip("/")
        return
    from backend.devtools.vllm import vllm_server
    from backend.shapes.training import SHIPPED

    with vllm_server(SHIPPED) as url:
        yield url
