"""The benchmark on one real vLLM: this backend, generate-and-parse, and the limit, on the same boxes.

- (a) this backend in front of the server (``MLLM_PROVIDER=openai``, critic off), as Label Studio
  calls it: with full-label scoring (the default), and with ``OPENAI_SCORING=first-token``;
- (b) generate-and-parse through the same server: one chat generation per box (the backend's own
  question with the label list, ``max_tokens=16``, temperature 0), its text mapped onto a label by
  an exact or case-folded match, else by the text encoder. That is how Label Studio's LLM examples
  and X-AnyLabeling use a VLM;
- (c) the limit: one prefill of each box's question with ``max_tokens=1``. Nothing that labels a
  box can do less.

All three send the same crops (cropped from the tasks as the backend crops them) at the same
concurrency; accuracy is counted alike, against the world's truth. Requests, prompt tokens and
vLLM's prefix- and multimodal-cache hit rates come from the server's own ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from backend.models.strategies import match_answer

_COUNTERS = ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:mm_cache_queries_total", "vllm:mm_cache_hits_total", "vllm:request_success_total")  # fmt: skip


def server_counters(base_url: str) -> dict[str, float]:
    """vLLM's cumulative counters (summed over their labels) from its Prometheus ``/metrics``."""
    text = requests.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    totals = dict.fromkeys(_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _usage(before: dict[str, float], after: dict[str, float], boxes: int) -> dict:
    spent = {name: after[name] - before[name] for name in _COUNTERS}

    def rate(hits: str, queries: str) -> float | None:
        return round(spent[hits] / spent[queries], 3) if spent[queries] else None

    return {"requests_per_box": round(spent["vllm:request_success_total"] / boxes, 2),
            "prompt_tokens_per_box": round(spent["vllm:prompt_tokens_total"] / boxes, 1),
            "prefix_cache_hit_rate": rate("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
            "mm_cache_hit_rate": rate("vllm:mm_cache_hits_total", "vllm:mm_cache_queries_total")}  # fmt: skip


def _measured(base_url: str, run: Callable[[], list[str | None] | None], truth: Sequence[str]) -> dict:
    """Boxes per second, accuracy (None for a run that labels nothing) and the server's usage, for one run."""
    before, start = server_counters(base_url), time.perf_counter()
    labels = run()
    seconds = time.perf_counter() - start
    right = [label == true for label, true in zip(labels, truth, strict=True)] if labels is not None else None
    return {"boxes_per_s": round(len(truth) / seconds, 2),
            "accuracy": round(sum(right) / len(right), 4) if right is not None else None,
            **_usage(before, server_counters(base_url), len(truth))}  # fmt: skip


def vllm_bench(model: str, *, tasks: int, seed: int, work: Path, base_url: str | None = None,
               served_model: str = "shapes", concurrency: int = 8) -> dict:  # fmt: skip
    """(a), (b) and (c) above on a ``seed`` world of ``tasks`` scenes; vLLM serves ``model`` (or is at
    ``base_url`` already, serving it as ``served_model``)."""
    if base_url is None:
        from backend.devtools.vllm import vllm_server

        with vllm_server(model, served_name=served_model) as url:
            return _bench(model, url, served_model, tasks=tasks, seed=seed, work=work, concurrency=concurrency)
    return _bench(model, base_url, served_model, tasks=tasks, seed=seed, work=work, concurrency=concurrency)


def _bench(model: str, base_url: str, served: str, *, tasks: int, seed: int, work: Path, concurrency: int) -> dict:
    from backend.annotate.mapping import LabelMapper
    from backend.evaluation.peers import task_crops
    from backend.evaluation.quality import _as_label_studio_sends, _backend, _predict
    from backend.models import wire
    from backend.models.remote import OpenAIEngine
    from backend.models.text_encoder import SentenceEncoder
    from backend.models.wire import image_data_url
    from backend.prompts import PromptBook, format_labels
    from backend.settings import Settings
    from backend.shapes.world import CLASSES, write_world

    world = write_world(work / "world", tasks=tasks, seed=seed)
    config, sent = _as_label_studio_sends(world, "boxes")
    env = {"MLLM_PROVIDER": "openai", "OPENAI_BASE_URL": base_url, "MLLM_MODEL": served, "CRITIC": "off",
           "OPENAI_CONCURRENCY": str(concurrency)}  # fmt: skip
    settings = Settings.from_env({**env, "MODEL_DIR": str(work / "settings")})  # the defaults: prompts, encoder
    truth = [shape.cls for scene in world.scenes for shape in scene.shapes]
    crops = list(task_crops(sent, min_side=settings.box_min_side))
    question = PromptBook(settings.prompts_dir).render("box_label", labels=format_labels(CLASSES))
    urls = [image_data_url(crop) for crop in crops]

    def backend(scoring: str) -> Callable[[], list[str | None]]:
        client, engine = _backend(model, work / f"state-{scoring}", **env, OPENAI_SCORING=scoring)
        _predict(client, engine, config, sent[:1])  # warm-up: the probe, and the server's first requests

        def run() -> list[str | None]:
            labels = {}
            for scene, prediction in zip(world.scenes, _predict(client, engine, config, sent).predictions,
                                         strict=True):  # fmt: skip
                for region in prediction.get("result", []):
                    labels[(scene.name, region["id"])] = region["value"]["rectanglelabels"][0]
            if engine.scoring_method != scoring:
                raise RuntimeError(f"asked for {scoring} scoring, got {engine.scoring_method}: {engine.scoring_reason}")
            return [labels.get((scene.name, shape.id)) for scene in world.scenes for shape in scene.shapes]

        return run

    direct = OpenAIEngine(base_url, served, concurrency=concurrency)
    mapper = LabelMapper(SentenceEncoder(settings.text_encoder), settings.mapping_min_similarity)

    def ask(max_tokens: int) -> list[str]:
        return direct.transport.map(
            lambda url: wire.content(direct.chat(url, question, max_tokens=max_tokens, temperature=0)), urls
        )

    def generate_and_parse() -> list[str | None]:
        return [_mapped(text, CLASSES, mapper) for text in ask(16)]

    results = {"(a) this backend, full-label": _measured(base_url, backend("full-label"), truth),
               "(a) this backend, first-token": _measured(base_url, backend("first-token"), truth),
               "(b) generate-and-parse": _measured(base_url, generate_and_parse, truth),
               "(c) one prefill per box": _measured(base_url, lambda: ask(1) and None, truth)}  # fmt: skip
    a, first, b, c = (results[k]["boxes_per_s"] for k in results)
    return {"server": f"vLLM (CPU build) at {base_url}, serving {model} as {served}", "tasks": tasks, "seed": seed,
            "boxes": len(truth), "concurrency": concurrency, "methods": results,
            "c_over_b": round(c / b, 2), "a_goal_over_b": round(min(3.0, 0.5 * c / b), 2),
            "full_label": {"a_over_c": round(a / c, 3), "a_over_b": round(a / b, 2)},
            "first_token": {"a_over_c": round(first / c, 3), "a_over_b": round(first / b, 2)}}  # fmt: skip


def _mapped(text: str, labels: Sequence[str], mapper) -> str | None:
    """An exact or case-folded match, else the text encoder's nearest label (None when nothing is similar)."""
    cleaned = text.strip().strip(".\"'` -*")
    index = match_answer(cleaned, labels, lettered=False)
    if index is None and cleaned:
        index = mapper.index(cleaned, labels)
    return labels[index] if index is not None else None
