"""What a user would otherwise run to label regions and tag images with an MLLM, written the usual way.

Each peer asks the same model the same question (this project's prompts, which the shapes model
was trained on) and turns its free text into a label, as a user's own script would:

- :func:`generate_and_parse`: one chat generation per box, the text parsed into a label (what
  HumanSignal's LLM example backend does per task);
- :func:`pipeline_per_crop`: ``transformers.pipeline("image-text-to-text")`` called per crop;
- :func:`yes_no_per_label`: whole-image tags from one generated yes/no answer per label.

:class:`ForwardCounter` counts the model's forward calls (every generation step is one), the
same way for the peers and for this backend.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image


class ForwardCounter:
    """Counts calls of ``model.forward`` while in use (``with ForwardCounter(model) as counter``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls = model, 0
        self._handle = None

    def _count(self, *_: object) -> None:
        self.calls += 1

    def __enter__(self) -> ForwardCounter:
        self._handle = self.model.register_forward_hook(self._count)
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.remove()


def task_crops(tasks: Iterable[dict], *, min_side: int) -> Iterator[Image.Image]:
    """Each drawn box's crop, task by task, from tasks as Label Studio sends them (a data-URL image each), so a
    peer's time includes reading the image and cropping, as this backend's does."""
    from backend.labelstudio.regions import box_from_region, crop_box

    for task in tasks:
        image = _task_image(task)
        for region in (task.get("annotations") or [{"result": []}])[0]["result"]:
            yield crop_box(image, box_from_region(region), 0.0, min_side)


def task_images(tasks: Iterable[dict]) -> Iterator[Image.Image]:
    return map(_task_image, tasks)


def _task_image(task: dict) -> Image.Image:
    encoded = task["data"]["image"].split(",", 1)[1]  # a data URL, as the shapes world writes them
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a free-text answer names: an exact match (any case, surrounding punctuation stripped), else the
    label named earliest in the text (the longest when two start together), else None."""
    cleaned = text.strip().strip(".\"'` -*").casefold()
    for label in labels:
        if cleaned == label.casefold():
            return label
    found = []
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(label.casefold())}(?!\w)", cleaned)
        if match:
            found.append((match.start(), -len(label), label))
    return min(found)[2] if found else None


def _chat(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def _generate(model, processor, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
    inputs = processor(images=[image], text=[_chat(processor, prompt)], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_and_parse(
    model, processor, crops: Iterable[Image.Image], *, prompt: str, labels: Sequence[str], max_new_tokens: int = 8
) -> list[str | None]:
    """One greedy generation per crop, parsed into one of ``labels`` (None when it names none)."""
    return [parse_label(_generate(model, processor, crop, prompt, max_new_tokens), labels) for crop in crops]


def pipeline_per_crop(
    pipe, crops: Iterable[Image.Image], *, prompt: str, labels: Sequence[str], max_new_tokens: int = 8
) -> list[str | None]:
    """``pipe`` (an image-text-to-text pipeline) called once per crop with a chat message, parsed into a label."""
    answers = []
    for crop in crops:
        messages = [{"role": "user", "content": [{"type": "image", "image": crop}, {"type": "text", "text": prompt}]}]
        output = pipe(text=messages, max_new_tokens=max_new_tokens, return_full_text=False)
        answers.append(parse_label(str(output[0]["generated_text"]), labels))
    return answers


def yes_no_per_label(
    model, processor, images: Iterable[Image.Image], *, questions: dict[str, str], max_new_tokens: int = 3
) -> list[set[str]]:
    """Per image, the labels whose question (label → its yes/no question) was answered "yes": C generations."""
    tags = []
    for image in images:
        answers = {
            label: _generate(model, processor, image, question, max_new_tokens) for label, question in questions.items()
        }
        tags.append({label for label, text in answers.items() if text.strip().casefold().startswith("yes")})
    return tags


# --- the comparison, on a shapes world --------------------------------------------------------------


def _tags_found(prediction: dict, control: str = "tags") -> set[str]:
    return {c for r in prediction.get("result", []) if r.get("from_name") == control for c in r["value"]["choices"]}


def _micro_f1(found: Sequence[set[str]], truth: Sequence[set[str]], labels: Sequence[str]) -> float:
    """Micro F1 over images, as the quality report computes it."""
    from backend.evaluation.metrics import tag_metrics
    from backend.labelstudio.export import TagPair

    pairs = [
        TagPair(n, "tags", frozenset(f), frozenset(t), None) for n, (f, t) in enumerate(zip(found, truth, strict=True))
    ]
    return tag_metrics(pairs, labels)["micro_f1"]


def fastest_seconds(run, repeats: int, before=lambda: None) -> float:
    """The fastest of ``repeats`` timed runs (``before`` each, untimed): the least disturbed by the machine."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _peer_row(seconds: float, count: int, unit: str, passes: int, quality: tuple[str, float]) -> dict:
    """Throughput in ``unit`` ("box" or "image") per second, quality, and model passes, for one timed run."""
    return {f"{unit}es_per_s" if unit == "box" else f"{unit}s_per_s": round(count / seconds, 2),
            quality[0]: round(quality[1], 4), "model_passes": passes,
            f"model_passes_per_{unit}": round(passes / count, 3), "seconds": round(seconds, 3)}  # fmt: skip


def _prefill_lower_bound(engine, asked: Sequence[tuple[Sequence[Image.Image], str]]) -> int:
    """The fewest prompt tokens that can ask these questions: each distinct image's prefix once, then only
    each question's own words (what a perfect prefix cache would prefill)."""
    from backend.models.image_prefixes import image_digest

    total, seen = 0, set()
    for images, prompt in asked:
        split = engine._question_ids(prompt)
        if split is None:  # this prompt cannot share: the whole prefix is its own
            prefix = engine.chat_prefix(prompt)
            total += sum(int(engine._encode_prompt(image, prefix)["input_ids"].shape[1]) for image in images)
            continue
        head, question = split
        for image in images:
            total += len(question)
            key = image_digest(image)
            if key not in seen:
                seen.add(key)
                total += int(engine._encode_prompt(image, head)["input_ids"].shape[1])
    return total


def run_peers(model: str, *, tasks: int, seed: int, work: Path, repeats: int = 3) -> dict:
    """This backend against each peer on the same boxes and images of a ``seed`` world, one model, one process.

    Every method starts from the tasks as Label Studio sends them (data-URL images, drawn boxes). The peer
    ratio compares labelling alone (critic off); ``this_backend_full`` has the critic on. Every timed run of
    the backend starts with an empty image prefix store, so no run profits from an earlier one. The first
    run is counted (answers, model passes); the time is the fastest of ``repeats`` runs after it.
    """
    from transformers import pipeline

    from backend.evaluation.quality import _as_label_studio_sends, _box_outcomes, _predict, _Run
    from backend.models.local import TransformersEngine
    from backend.prompts import PromptBook, format_labels
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import PACKAGE_PROMPTS, Settings
    from backend.shapes.questions import BOX_MIN_SIDE
    from backend.shapes.world import CLASSES, DEFINITIONS, write_world

    engine = TransformersEngine.load(model, "cpu")
    asked: list[tuple[list[Image.Image], str]] = []  # every question the backend asks: (images, prompt)
    score_options = engine.score_options

    def recorded(images, prompt, options):
        asked.append((list(images), prompt))
        return score_options(images, prompt, options)

    engine.score_options = recorded  # type: ignore[method-assign]
    world = write_world(work / "world", tasks=tasks, seed=seed)
    box_config, box_tasks = _as_label_studio_sends(world, "boxes")
    tag_config, tag_tasks = _as_label_studio_sends(world, "tags")
    truth = [shape.cls for scene in world.scenes for shape in scene.shapes]
    tag_truth = [set(scene.tags) for scene in world.scenes]
    book = PromptBook(PACKAGE_PROMPTS)
    box_prompt = book.render("box_label", labels=format_labels(list(CLASSES)))
    questions = {c: book.render("tag_confirm", label=c, definition=book.definition(c, DEFINITIONS[c])) for c in CLASSES}
    pipe = pipeline("image-text-to-text", model=engine.model, processor=engine.processor)

    def accuracy(labels: Sequence[str | None]) -> float:
        return sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth)

    def peer(method, sent: list[dict]) -> tuple[list, float, int]:
        with ForwardCounter(engine.model) as counter:
            answers = method(sent)
        return answers, fastest_seconds(lambda: method(sent), repeats), counter.calls

    def backend(config: str, sent: list[dict], kind: str, critic: str) -> tuple[_Run, float, int, dict]:
        settings = Settings.from_env({"MLLM_MODEL": model, "MODEL_DIR": str(work / f"state-{kind}-{critic}"),
                                      "CRITIC": critic, "SYNC_PROJECT_MODEL_VERSION": "false",
                                      "TRAIN_DEBOUNCE_SECONDS": "1000000", "LOG_LEVEL": "WARNING"})  # fmt: skip
        client = create_app(build_service(settings, lambda: engine)).test_client()
        _predict(client, engine, config, sent[:2])  # warm-up: the service builds its label set once
        engine.image_prefixes.clear()
        before = {"vision": engine.vision_passes, "prefill": engine.prefill_tokens}
        asked.clear()
        with ForwardCounter(engine.model) as counter:
            run = _predict(client, engine, config, sent)
        counts = {"vision_passes": engine.vision_passes - before["vision"],
                  "prefill_tokens": engine.prefill_tokens - before["prefill"],
                  "lower_bound": _prefill_lower_bound(engine, asked)}  # fmt: skip
        seconds = fastest_seconds(lambda: _predict(client, engine, config, sent), repeats, engine.image_prefixes.clear)
        return run, seconds, counter.calls, counts

    def labels_of(run: _Run) -> float:
        return sum(ok for task in _box_outcomes(world, run) for _, ok in task) / len(truth)

    boxes, images = len(truth), len(world.scenes)
    peers: dict[str, dict] = {}
    for name, method in {
        "generate_and_parse": lambda sent: generate_and_parse(
            engine.model, engine.processor, task_crops(sent, min_side=BOX_MIN_SIDE), prompt=box_prompt, labels=CLASSES
        ),
        "pipeline_per_crop": lambda sent: pipeline_per_crop(
            pipe, task_crops(sent, min_side=BOX_MIN_SIDE), prompt=box_prompt, labels=CLASSES
        ),
    }.items():
        answers, seconds, passes = peer(method, box_tasks)
        peers[name] = _peer_row(seconds, boxes, "box", passes, ("accuracy", accuracy(answers)))
    found, seconds, passes = peer(
        lambda sent: yes_no_per_label(engine.model, engine.processor, task_images(sent), questions=questions), tag_tasks
    )
    peers["yes_no_per_label"] = _peer_row(
        seconds, images, "image", passes, ("f1", _micro_f1(found, tag_truth, CLASSES))
    )

    run, seconds, passes, _ = backend(box_config, box_tasks, "boxes", "off")
    ours = _peer_row(seconds, boxes, "box", passes, ("accuracy", labels_of(run)))
    full_run, full_seconds, full_passes, counts = backend(box_config, box_tasks, "boxes", "on")
    full = _peer_row(full_seconds, boxes, "box", full_passes, ("accuracy", labels_of(full_run)))
    engine.shares_images = False  # the same pipeline, each question computing its image prefix again
    _, unshared_seconds, unshared_passes, unshared = backend(box_config, box_tasks, "boxes", "on")
    engine.shares_images = True
    tag_run, tag_seconds, tag_passes, _ = backend(tag_config, tag_tasks, "tags", "off")
    tag_f1 = _micro_f1([_tags_found(p) for p in tag_run.predictions], tag_truth, CLASSES)
    tags = _peer_row(tag_seconds, images, "image", tag_passes, ("f1", tag_f1))

    for row in peers.values():
        unit = "boxes_per_s" if "boxes_per_s" in row else "images_per_s"
        row["speedup"] = round((ours if unit == "boxes_per_s" else tags)[unit] / row[unit], 2)
    return {
        "model": model, "world_seed": seed, "tasks": tasks, "boxes": boxes,
        "this_backend": ours, "this_backend_full": {**full, "critic": True}, "this_backend_tags": tags,
        "peers": peers, "vision_passes_per_crop": round(counts["vision_passes"] / boxes, 3),
        "prefill_tokens_per_box": round(counts["prefill_tokens"] / boxes, 1),
        "prefill_tokens_per_box_lower_bound": round(counts["lower_bound"] / boxes, 1),
        "image_prefix_recomputed": {
            "vision_passes_per_crop": round(unshared["vision_passes"] / boxes, 3),
            "prefill_tokens_per_box": round(unshared["prefill_tokens"] / boxes, 1),
            "boxes_per_s": round(boxes / unshared_seconds, 2), "model_passes": unshared_passes,
            "shared_speedup": round(unshared_seconds / full_seconds, 2),
        },
    }  # fmt: skip
