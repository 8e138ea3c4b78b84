"""`mllm-backend bench`: the engine against slower versions of itself, and this backend against its peers.

All figures come from one run on one machine, so their ratios are comparable.

- On a tiny offline checkpoint (16 image tokens, a 2-layer text model): prefix-KV vs per-pair
  scoring, batched vs sequential crops, and the Flask app's throughput and overhead. Real MLLMs
  have hundreds of image tokens per crop, which makes re-running a prefix costlier still.
- On the shipped shapes model, where accuracy is measured too (``backend.evaluation.peers``):
  generate-and-parse, ``pipeline`` per crop and yes/no per label against this backend, on the
  same boxes and images; vision passes and prefill tokens per box against their lower bound;
  the backend in front of `transformers serve` against a direct client
  (``backend.evaluation.through_server``); and a project pre-annotated through a real Label
  Studio and Redis by one worker, then two (``backend.evaluation.workers``).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.devtools.tiny import build_tiny_checkpoint
from backend.evaluation.peers import fastest_seconds
from backend.models.local import TransformersEngine

COCO_20 = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
]  # fmt: skip
PROMPT = "Which label best describes the object in this image? Answer with one label."


def _crops(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(16, 96, size=(count, 2))
    return [Image.fromarray(rng.integers(0, 255, (int(h), int(w), 3), dtype=np.uint8)) for w, h in sizes]


def _boxed_tasks(count: int, seed: int, size: tuple[int, int]) -> list[dict]:
    """Tasks with a data-URL image each and three boxes a person drew on it."""
    import base64
    import io

    tasks = []
    for index, image in enumerate(_crops(count, seed=seed)):
        buffer = io.BytesIO()
        image.resize(size).save(buffer, format="PNG")
        boxes = [
            {"id": f"b{k}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "value": {"x": 5 + 30 * k, "y": 10, "width": 25, "height": 60, "rotation": 0, "rectanglelabels": []}}
            for k in range(3)
        ]  # fmt: skip
        data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        tasks.append({"id": index, "data": {"image": data_url}, "annotations": [{"result": boxes}]})
    return tasks


def _measure(engine: TransformersEngine, run: Callable[[], object], repeats: int) -> dict[str, float]:
    engine.forward_passes = 0
    run()  # counted, and the warm-up
    passes = engine.forward_passes
    return {"seconds": round(fastest_seconds(run, repeats), 5), "forward_passes": passes}


def _request_forward_passes(checkpoint: Path, engine: TransformersEngine) -> dict:
    """Forward passes for one /predict: 4 tasks x 3 drawn boxes (7 labels) + a 3-label multiple-choice tag."""

    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    config = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        + "".join(f'<Label value="{label}"/>' for label in COCO_20[:7])
        + '</RectangleLabels><Choices name="tags" toName="image" choice="multiple"><Choice value="indoor"/>'
        '<Choice value="outdoor"/><Choice value="blurry"/></Choices></View>'
    )
    tasks = _boxed_tasks(4, seed=2, size=(96, 64))
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"MLLM_MODEL": str(checkpoint), "MODEL_DIR": tmp, "CRITIC": "on"})
        service = build_service(settings, lambda: engine)
        client = create_app(service).test_client()
        engine.forward_passes = 0
        answer = client.post("/predict", json={"tasks": tasks, "label_config": config}).get_json()
    if len(answer["results"]) != 4:
        raise RuntimeError(f"the benchmark request failed: {answer}")
    return {"tasks": 4, "boxes": 12, "box_labels": 7, "tag_labels": 3, "forward_passes": engine.forward_passes}


class _TimedEngine:
    """Passes calls to the real engine, adding up the time spent inside it."""

    def __init__(self, inner: TransformersEngine) -> None:
        self.inner, self.name, self.seconds = inner, inner.name, 0.0

    def score_options(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner.score_options(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner.generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str):  # the usage counters and scoring method: the real engine's
        return getattr(self.inner, name)


def _median_ms(run: Callable[[], object], count: int = 50) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1000 * sorted(times)[len(times) // 2], 3)


def _end_to_end(checkpoint: Path, engine: TransformersEngine) -> dict:
    """Through the Flask app (in process, no network): throughput, overhead per task, fast-route latency."""

    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    config = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        + "".join(f'<Label value="{label}"/>' for label in COCO_20[:8])
        + "</RectangleLabels></View>"
    )
    tasks = _boxed_tasks(16, seed=4, size=(128, 96))
    timed = _TimedEngine(engine)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(
            {"MLLM_MODEL": str(checkpoint), "MODEL_DIR": tmp, "TRAIN_DEBOUNCE_SECONDS": "3600", "CRITIC": "on"}
        )
        service = build_service(settings, lambda: timed)
        loader, fetch = service.predictor.loader, {"seconds": 0.0}
        original_load = loader.load

        def timed_load(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original_load(*args, **kwargs)
            finally:
                fetch["seconds"] += time.perf_counter() - start

        loader.load = timed_load  # type: ignore[method-assign]
        client = create_app(service).test_client()
        client.post("/predict", json={"tasks": tasks[:1], "label_config": config})  # warm-up

        def run(batches: list[list[dict]]) -> dict:
            timed.seconds, fetch["seconds"] = 0.0, 0.0
            start = time.perf_counter()
            for batch in batches:
                client.post("/predict", json={"tasks": batch, "label_config": config, "project": "1.1"})
            total = time.perf_counter() - start
            overhead = (total - timed.seconds - fetch["seconds"]) / len(tasks)
            return {
                "seconds": round(total, 4), "tasks_per_s": round(len(tasks) / total, 2),
                "boxes_per_s": round(3 * len(tasks) / total, 2), "model_seconds": round(timed.seconds, 4),
                "image_seconds": round(fetch["seconds"], 4), "overhead_ms_per_task": round(1000 * overhead, 2),
            }  # fmt: skip

        one_by_one = run([[task] for task in tasks])
        batched = run([tasks])
        setup = {"project": "1.1", "schema": config}
        webhook = {"action": "ANNOTATION_CREATED", "project": {"id": 1},
                   "annotation": {"id": 1, "task": 1, "result": [], "was_cancelled": False}}  # fmt: skip
        latency = {"health_ms": _median_ms(lambda: client.get("/health")),
                   "setup_ms": _median_ms(lambda: client.post("/setup", json=setup)),
                   "webhook_ack_ms": _median_ms(lambda: client.post("/webhook", json=webhook))}  # fmt: skip
    return {
        "request": "16 tasks x 3 drawn boxes, 8 labels, critic on, through the Flask app in process",
        "one_task_per_request": one_by_one,
        "one_request_of_16": batched,
        "batched_speedup": round(one_by_one["seconds"] / batched["seconds"], 2),
        "latency_median": latency,
    }


PEER_TASKS, PEER_SEED = 40, 2600  # a held-out world (the shapes model trained on seeds 0-999)
WORKER_TASKS = 96  # pre-annotated through Label Studio with 1, then 2 workers


def _on_the_shapes_model(measure: Callable[..., dict], **options: object) -> dict:
    """``measure`` (one of backend.evaluation's comparisons) on the shipped shapes model and the held-out world."""
    from backend.shapes.training import SHIPPED

    with tempfile.TemporaryDirectory() as tmp:
        return measure(str(SHIPPED), seed=PEER_SEED, work=Path(tmp), **options)


def run_bench(repeats: int = 15, checkpoint: Path | None = None, peer_tasks: int = PEER_TASKS) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint or build_tiny_checkpoint(Path(tmp) / "tiny-llava", "llava")
        engine = TransformersEngine.load(str(path), device="cpu", batch_size=16)
        images_8, crops_32 = _crops(8), _crops(32, seed=1)

        def score_8x20() -> object:
            return engine.score_options(images_8, PROMPT, COCO_20)

        engine.prefix_cache = False
        per_pair = _measure(engine, score_8x20, repeats)
        engine.prefix_cache = True
        prefix_kv = _measure(engine, score_8x20, repeats)
        batched = _measure(engine, lambda: engine.score_options(crops_32, PROMPT, COCO_20[:8]), repeats)
        sequential = _measure(
            engine, lambda: [engine.score_options([crop], PROMPT, COCO_20[:8]) for crop in crops_32], repeats
        )
        request = _request_forward_passes(path, engine)
        end_to_end = _end_to_end(path, engine)
    from backend.evaluation.peers import run_peers
    from backend.evaluation.through_server import openai_vs_direct
    from backend.evaluation.through_vllm import vllm_bench
    from backend.evaluation.workers import workers_bench

    shapes = _on_the_shapes_model(run_peers, tasks=peer_tasks)
    server = _on_the_shapes_model(openai_vs_direct, tasks=max(2, peer_tasks // 4))
    vllm = _on_the_shapes_model(vllm_bench, tasks=peer_tasks)
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    workers = _on_the_shapes_model(workers_bench, tasks=WORKER_TASKS, redis_url=redis_url)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": "tiny random llava (mllm-backend tiny-model), CPU, float32, batch_size=16",
        "scoring_8_images_x_20_options": {
            "per_pair": per_pair,
            "prefix_kv": prefix_kv,
            "speedup": round(per_pair["seconds"] / prefix_kv["seconds"], 2),
        },
        "crops_32_x_8_options": {
            "one_crop_at_a_time": sequential,
            "batched": batched,
            "speedup": round(sequential["seconds"] / batched["seconds"], 2),
        },
        "predict_request": request,
        "end_to_end": end_to_end,
        "peers": shapes["peers"],
        "vision_passes_per_crop": shapes["vision_passes_per_crop"],
        "prefill_tokens_per_box": shapes["prefill_tokens_per_box"],
        "prefill_tokens_per_box_lower_bound": shapes["prefill_tokens_per_box_lower_bound"],
        "openai_vs_direct": server["ratio"],
        "workers": {"1": workers["1"]["tasks_per_s"], "2": workers["2"]["tasks_per_s"], "speedup": workers["speedup"]},
        "shapes_model": shapes,
        "through_openai_server": server,
        "through_vllm": vllm,
        "preannotation_workers": workers,
    }


def main(out: Path | None, repeats: int, peer_tasks: int = PEER_TASKS) -> dict:
    report = run_bench(repeats, peer_tasks=peer_tasks)
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return report
