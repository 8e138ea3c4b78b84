"""The shapes model: a LLaVA-architecture image-text-to-text checkpoint trained from scratch on the shapes world.

It is a real transformers checkpoint (CLIP vision tower + Llama decoder, a LLaVA processor
that pads images to a square, a chat template), loaded with ``AutoModelForImageTextToText``
and ``AutoProcessor`` like any hub model. It is trained here, on the CPU, on the questions the
backend asks (:mod:`backend.shapes.questions`), with the loss on the answer tokens only, the
same tokens the engine scores. Its training seeds are written beside the weights
(``training.json``) and are disjoint from every seed used to judge it.

``SHIPPED`` is the copy in the repository, so a fresh clone serves it without training;
``train_shapes_model`` reproduces it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from backend.devtools.tiny import LLAVA_TEMPLATE
from backend.prompts import LETTER_INSTRUCTION, LETTERS, PromptBook, format_labels
from backend.settings import PACKAGE_PROMPTS
from backend.shapes.questions import EXTRA, NONE_OF_THESE, PARAPHRASES, Example, examples
from backend.shapes.world import ATTRIBUTES, CLASSES, COLOURS, DEFINITIONS, TEXTURES, WORLD_VERSION, generate_world

SHIPPED = Path(__file__).resolve().parent / "model"
TRAINING_SEEDS = tuple(range(0, 24))  # world seeds the model learns from (the quality harness judges on 1000+)
SCENE_SEEDS = tuple(range(24, 80))  # more whole scenes for stage 1's "which classes" head: scenes need many more
SCENES_PER_SEED = 250
IMAGE_SIZE, PATCH = 48, 8
Log = Callable[[str], None]


def _corpus(prompts: PromptBook) -> list[str]:
    """Text the tokenizer learns its merges from: every prompt, label, name and answer, so each is a few tokens."""
    templates = [prompts.template(k) for k in PARAPHRASES] + [t for group in (*PARAPHRASES.values(),
                 *EXTRA.values()) for t in group]  # fmt: skip
    names = [f"{t} {c} {s} ({s})" for t in TEXTURES for c in COLOURS for s in CLASSES]
    lettered = ["Options: " + " ".join(f"{letter}." for letter in LETTERS[:8]), LETTER_INSTRUCTION]
    attributes = [f'"{name}" {hint}' for name, hint in ATTRIBUTES.items()]
    return [
        *templates,
        format_labels(CLASSES),
        *DEFINITIONS.values(),
        *names,
        f"yes no {NONE_OF_THESE} , .",
        *lettered,
        *attributes,
    ] * 3


def _tokenizer(prompts: PromptBook) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<pad>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(_corpus(prompts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")


def build(seed: int, prompts: PromptBook):
    """A fresh (untrained) model and its processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(prompts)
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=96)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default")  # fmt: skip
    image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )  # padded to a square first: a wide ellipse stays wide, it is not cropped into a circle
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)  # fmt: skip
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


def _messages(item: Example, with_answer: bool) -> list[dict]:
    parts = [{"type": "image"}, {"type": "text", "text": item.prompt}]
    user = {"role": "user", "content": parts[::-1] if item.text_first else parts}
    answer = [{"role": "assistant", "content": [{"type": "text", "text": item.answer}]}] if with_answer else []
    return [user, *answer]


def collate(processor, batch: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded inputs with the loss on the answer tokens (up to and including the end of turn) only."""
    tokenizer = processor.tokenizer
    full = [processor.apply_chat_template(_messages(e, True), tokenize=False) for e in batch]
    prefix = [processor.apply_chat_template(_messages(e, False), add_generation_prompt=True, tokenize=False)
              for e in batch]  # fmt: skip
    encoded = processor(images=[e.image for e in batch], text=full, return_tensors="pt", padding=True)
    labels = torch.full_like(encoded["input_ids"], -100)
    for row, (whole, start) in enumerate(zip(full, prefix, strict=True)):
        after = tokenizer(whole, add_special_tokens=False)["input_ids"][
            len(tokenizer(start, add_special_tokens=False)["input_ids"]) :]  # fmt: skip
        answer = after[: after.index(tokenizer.eos_token_id) + 1]
        end = int(encoded["attention_mask"][row].sum()) - (len(after) - len(answer))  # the newline after is not scored
        labels[row, end - len(answer) : end] = torch.tensor(answer)
    return {**encoded, "labels": labels}


def _scenes(seeds: tuple[int, ...]):
    return [pair for seed in seeds for pair in generate_world(tasks=SCENES_PER_SEED, seed=seed)]


def pretrain_vision(model, processor, scenes, *, steps: int, seed: int, log: Log, more_scenes=()) -> None:
    """Stage 1: teach the vision tower what is in a crop (class, colour, texture) and in a scene (which classes).

    A vision transformer learns this in a couple of minutes from direct labels, while learning it only through
    the language model's answers stalls for thousands of steps; stage 2 then teaches the decoder to read it.
    The features are the ones LLaVA reads: the last hidden state without the class token, mean-pooled here.
    """
    from backend.shapes.questions import region_crop

    tower = model.model.vision_tower
    width = tower.config.hidden_size
    sizes = {"cls": len(CLASSES), "colour": len(COLOURS), "texture": len(TEXTURES), "tags": len(CLASSES)}
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, size) for name, size in sizes.items()})
    crops, targets, scenes_px, tags = [], [], [], []
    for scene, image in scenes:
        for shape in scene.shapes:  # as a box, and as the backend crops a traced outline (rotated) and a keypoint
            styles = ("box", "polygons", "keypoints") if shape.rotation else ("box", "keypoints")
            for style in styles:
                crops.append(region_crop(image, scene, shape, style))
                targets.append((CLASSES.index(shape.cls), list(COLOURS).index(shape.colour),
                                TEXTURES.index(shape.texture)))  # fmt: skip
    for scene, image in [*scenes, *more_scenes]:
        scenes_px.append(image)
        tags.append([float(c in scene.tags) for c in CLASSES])
    crop_px = processor.image_processor(images=crops, return_tensors="pt")["pixel_values"]
    scene_px = processor.image_processor(images=scenes_px, return_tensors="pt")["pixel_values"]
    crop_y, tag_y = torch.tensor(targets), torch.tensor(tags)
    optimiser = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=2e-3, weight_decay=0.05)
    rng = np.random.default_rng([seed, 11])

    def pooled(pixels: torch.Tensor) -> torch.Tensor:
        return tower(pixel_values=pixels).last_hidden_state[:, 1:].mean(1)

    tower.train()
    for step in range(steps):
        pick, scene_pick = torch.tensor(rng.integers(0, len(crop_y), 64)), torch.tensor(rng.integers(0, len(tag_y), 32))
        features, scene_features = pooled(crop_px[pick]), pooled(scene_px[scene_pick])
        loss = sum(torch.nn.functional.cross_entropy(heads[name](features), crop_y[pick, i])
                   for i, name in enumerate(("cls", "colour", "texture")))  # fmt: skip
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(heads["tags"](scene_features),
                                                                           tag_y[scene_pick])  # fmt: skip
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0:
            log(f"vision step {step + 1}/{steps}: loss {float(loss):.3f}")


def train_shapes_model(
    out: Path, *, steps: int = 3500, vision_steps: int = 2500, batch_size: int = 32, learning_rate: float = 1e-3,
    seed: int = 0, seeds: tuple[int, ...] = TRAINING_SEEDS, scene_seeds: tuple[int, ...] = SCENE_SEEDS,
    log: Log = print,
) -> dict:  # fmt: skip
    """Train from scratch into ``out`` (stage 1: the vision tower; stage 2: everything, on the questions) and
    return what ``training.json`` records."""
    prompts = PromptBook(PACKAGE_PROMPTS)
    model, processor = build(seed, prompts)
    scenes, more_scenes = _scenes(seeds), _scenes(scene_seeds)
    started_vision = time.monotonic()
    pretrain_vision(model, processor, scenes, steps=vision_steps, seed=seed, log=log, more_scenes=more_scenes)
    scenes += more_scenes  # stage 2 asks about every scene
    vision_seconds = time.monotonic() - started_vision
    rng = np.random.default_rng([seed, 7])
    tower = set(model.model.vision_tower.parameters())
    groups = [{"params": [p for p in model.parameters() if p not in tower]},
              {"params": list(tower), "lr": learning_rate / 5}]  # fmt: skip
    optimiser = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    started, recent = time.monotonic(), []
    for step in range(steps):
        batch = collate(processor, examples(rng, scenes, batch_size, prompts=prompts))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        recent.append(float(loss))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}: loss {np.mean(recent):.4f} ({time.monotonic() - started:.0f} s)")
            recent = []
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"world_version": WORLD_VERSION, "training_seeds": list(seeds), "scene_seeds": list(scene_seeds),
              "scenes_per_seed":
              SCENES_PER_SEED, "model_seed": seed, "vision_steps": vision_steps, "steps": steps,
              "batch_size": batch_size, "learning_rate": learning_rate,
              "seconds": round(time.monotonic() - started + vision_seconds, 1)}  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


def write_shapes_model(out: Path) -> Path:
    """Copy the shipped, trained checkpoint to ``out`` (no training)."""
    if not (SHIPPED / "config.json").exists():
        raise FileNotFoundError(f"no shipped shapes model at {SHIPPED}; train one with `mllm-backend shapes-model "
                                "DIR --train`")  # fmt: skip
    shutil.copytree(SHIPPED, out, dirs_exist_ok=True)
    return Path(out)
