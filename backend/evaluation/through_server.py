"""The backend in front of an OpenAI-compatible server, against a client sending the same requests directly.

Both send the same chat completions to one `transformers serve` at the same concurrency; the
ratio of their throughputs is the share of the server's speed the backend passes on. Below 1.0
by the backend's own work per request (reading tasks, cropping, encoding images, parsing answers).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

JSON = {"Content-Type": "application/json"}


def openai_vs_direct(model: str, *, tasks: int, seed: int, work: Path, concurrency: int = 8, rounds: int = 3) -> dict:
    """Serve ``model`` with `transformers serve`; label a ``seed`` world's boxes through the backend (critic off),
    then replay the exact request bodies it sent from a direct client with ``concurrency`` threads. The two take
    turns for ``rounds`` rounds after that first, recorded run; each keeps its fastest round."""
    from backend.devtools.serve import transformers_serve
    from backend.evaluation.quality import _as_label_studio_sends, _predict
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings
    from backend.shapes.world import write_world

    world = write_world(work / "world", tasks=tasks, seed=seed)
    config, sent = _as_label_studio_sends(world, "boxes")
    with transformers_serve(model) as base_url:
        settings = Settings.from_env({"MLLM_PROVIDER": "openai", "OPENAI_BASE_URL": base_url, "MLLM_MODEL": model,
                                      "OPENAI_CONCURRENCY": str(concurrency), "CRITIC": "off",
                                      "MODEL_DIR": str(work / "state"), "SYNC_PROJECT_MODEL_VERSION": "false",
                                      "LOG_LEVEL": "WARNING"})  # fmt: skip
        service = build_service(settings)
        client = create_app(service).test_client()
        engine = service.slot.get(timeout=120)
        _predict(client, engine, config, sent[:1])  # warm-up: the server loads the model on its first request
        post = engine.session.post
        bodies = _recording(engine.session)
        _predict(client, engine, config, sent)
        engine.session.post = post  # type: ignore[method-assign]
        url = f"{base_url}/chat/completions"
        times: dict[str, list[float]] = {"backend": [], "direct": []}
        with requests.Session() as session, ThreadPoolExecutor(concurrency) as pool:
            for _ in range(rounds):
                start = time.perf_counter()
                _predict(client, engine, config, sent)
                times["backend"].append(time.perf_counter() - start)
                start = time.perf_counter()
                statuses = set(
                    pool.map(lambda body: session.post(url, data=body, headers=JSON, timeout=120).status_code, bodies)
                )
                times["direct"].append(time.perf_counter() - start)
                if statuses != {200}:
                    raise RuntimeError(f"the direct client's requests failed: {sorted(statuses)}")
    through_backend, direct = min(times["backend"]), min(times["direct"])
    return {
        "server": "transformers serve (no log-probabilities: the backend scores by sampling agreement)",
        "tasks": tasks, "requests": len(bodies), "concurrency": concurrency,
        "backend_requests_per_s": round(len(bodies) / through_backend, 2),
        "direct_requests_per_s": round(len(bodies) / direct, 2),
        "ratio": round(direct / through_backend, 3),
    }  # fmt: skip


def _recording(session: requests.Session) -> list[bytes]:
    """Record every request body ``session`` posts from now on (as bytes, replayed exactly)."""
    bodies: list[bytes] = []
    post = session.post

    def recorded(url, *args, **kwargs):
        bodies.append(json.dumps(kwargs["json"]).encode())  # the engine posts every body as json=
        return post(url, *args, **kwargs)

    session.post = recorded  # type: ignore[method-assign]
    return bodies
