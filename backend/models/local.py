"""Local transformers provider: any image-text-to-text checkpoint, hub id or local path."""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, DynamicCache
from transformers.cache_utils import DynamicLayer

from backend import deadline
from backend.deadline import DeadlineExceeded
from backend.models.chat import ChatFormat
from backend.models.engine import EngineError, Generation, OptionScores, OptionScoring, normalise
from backend.models.image_prefixes import ImagePrefixes, Prefix, image_digest, split_prefixes, stack_layers
from backend.models.stills import load_processor

log = logging.getLogger(__name__)

Quantization = Literal["none", "4bit", "8bit"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "4bit", "8bit")
_TOKEN_KEYS = {"input_ids", "attention_mask"}
# Vision encoders and projectors stay unquantized: quantizing them costs accuracy and saves little memory.
_KEEP_UNQUANTIZED = [
    ".*vision_tower",
    ".*multi_modal_projector",
    ".*vision_model",
    ".*connector",
    ".*visual",
    "lm_head",
]


def resolve_device(requested: str) -> str:
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"MLLM_DEVICE={requested} but torch sees no CUDA device; set MLLM_DEVICE=cpu or auto")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def load_arguments(device: str, quantization: Quantization, requested_device: str) -> dict:
    """``from_pretrained`` arguments: dtype, quantization, and where the weights go."""
    dtype = default_dtype(device)
    arguments: dict = {"dtype": dtype}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
                llm_int8_skip_modules=_KEEP_UNQUANTIZED,
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_KEEP_UNQUANTIZED)
        arguments["quantization_config"] = config
        arguments["device_map"] = "auto" if requested_device == "auto" and device == "cuda" else {"": device}
    elif requested_device == "auto" and device == "cuda" and torch.cuda.device_count() > 1:
        arguments["device_map"] = "auto"  # spread a large model over every visible GPU
    return arguments


def _load_refusal(model_id: str, reason: str) -> str:
    if "custom code" in reason or "trust_remote_code" in reason:
        return (f"MLLM_MODEL={model_id} runs code of its own from the checkpoint, which is off by default; read it, "
                "then set MLLM_TRUST_REMOTE_CODE=true to run it")  # fmt: skip
    if "Unrecognized configuration class" in reason:
        return (
            f"MLLM_MODEL={model_id} is not a model transformers can load as image-text-to-text "
            f"(AutoModelForImageTextToText): {reason.splitlines()[0][:200]}; choose an image-text-to-text checkpoint"
        )
    return f"cannot load MLLM_MODEL={model_id}: {reason.splitlines()[0][:300] if reason else 'no reason given'}"


def _check_servable(model_id: str, model: torch.nn.Module, processor) -> None:
    """Refuse at load what would load and then fail every task."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise EngineError(f"MLLM_MODEL={model_id} is an encoder-decoder model (Florence-2-like), which this engine "
                          "does not score; choose a decoder-only image-text-to-text checkpoint")  # fmt: skip
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise EngineError(
            f"MLLM_MODEL={model_id}'s processor has no tokenizer; choose an image-text-to-text checkpoint"
        )
    if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
        raise EngineError(f"MLLM_MODEL={model_id} has no chat template, so its questions and answers cannot be "
                          "rendered; set MLLM_CHAT_TEMPLATE to a Jinja template file in its prompt format (the model "
                          "card gives it)")  # fmt: skip


@dataclass
class _Row:
    """One (image prompt, answer) pair to score."""

    prompt: dict[str, torch.Tensor]  # processor output for one image + prompt, batch dim 1
    answer: list[int]

    @property
    def prompt_length(self) -> int:
        return int(self.prompt["input_ids"].shape[1])


def _collate(rows: Sequence[_Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt + answer) rows into one batch; image tensors are concatenated."""
    lengths = [row.prompt_length + len(row.answer) for row in rows]
    width = max(lengths)
    first = rows[0].prompt
    token_keys = [k for k, v in first.items() if k not in _TOKEN_KEYS and v.shape == first["input_ids"].shape]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    extra = {k: torch.zeros((len(rows), width), dtype=first[k].dtype) for k in token_keys}
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        input_ids[i, :length] = torch.cat([row.prompt["input_ids"][0], torch.tensor(row.answer, dtype=torch.long)])
        attention[i, :length] = 1
        for k in token_keys:
            extra[k][i, : row.prompt_length] = row.prompt[k][0]
    batch = {"input_ids": input_ids, "attention_mask": attention, **extra}
    for key in first:
        if key not in batch:
            batch[key] = torch.cat([row.prompt[key] for row in rows], dim=0)
    return batch


def _split_rows(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]] | None:
    """A batched processor output as one batch-1 dict per image (padding removed), or None if it won't split."""
    mask = batch.get("attention_mask")
    if mask is None or any(v.shape[0] != n for v in batch.values()):
        return None  # e.g. Qwen concatenates every image's patches along dim 0
    keep = [mask[i].bool() for i in range(n)]
    rows = []
    for i in range(n):
        row = {}
        for key, value in batch.items():
            row[key] = value[i][keep[i]][None] if value.shape == mask.shape else value[i : i + 1]
        rows.append(row)
    return rows


# A question continuing a stored prefix needs an explicit attention mask (queries x cached keys), which costs
# quadratic memory; a causal prefix without a cache needs none. Past this length (a prompt listing hundreds of
# labels) the mask outweighs the image's share of the work, so such a question prefills its image again.
SHARED_QUESTION_MAX_TOKENS = 2048


class _UnsharedCache(Exception):
    """This model's cache cannot be kept per image: score without the image prefix store."""


def _token_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices whose ``lengths`` add up to at most ``budget`` (an item over it goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for index, length in enumerate(lengths):
        if not groups or total + length > budget:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += length
    return groups


# Positions per slice when picking answer tokens' log-probabilities: an fp32 log-softmax over a 152k vocabulary
# costs 0.6 MB a position, so a slice is bounded (about 150 MB) instead of the whole batch's (GBs at 7B).
_POSITIONS_PER_SLICE = 256


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` at ``targets`` (batch, positions), on the CPU in fp32, without materialising the
    full-vocabulary log-softmax: each slice of positions gathers its targets' logits and subtracts its logsumexp."""
    picked = []
    for start in range(0, logits.shape[1], _POSITIONS_PER_SLICE):
        part = logits[:, start : start + _POSITIONS_PER_SLICE]
        chosen = targets[:, start : start + _POSITIONS_PER_SLICE].to(part.device)
        gathered = part.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).float()
        picked.append((gathered - torch.logsumexp(part.float(), dim=-1)).cpu())
    return torch.cat(picked, dim=1)


def _prefix_group(prompt: dict[str, torch.Tensor]) -> tuple:
    """Prompts that can share one prefix forward: same length and image tensor shapes."""
    return tuple((k, tuple(v.shape[1:])) for k, v in sorted(prompt.items()))


class TransformersEngine:
    """Scores answers with a local ``AutoModelForImageTextToText``.

    An option's tokens are exactly what the chat template renders for an assistant turn
    answering with it (end-of-turn token included). With ``prefix_cache`` (the default),
    the image + prompt prefix runs once per image and its KV cache is shared by every
    option; otherwise each (image, option) pair is one right-padded row.

    ``batch_size`` bounds the images (or, without the cache, the pairs) in one forward;
    ``option_batch_size`` bounds the short option rows that read a shared cache, each of
    which holds a copy of its image's prefix cache.

    With ``image_cache_mb`` > 0 (and the prefix cache on), the image's own prefix (chat opening
    and image tokens) is kept across questions: the label, the critic and the tag questions about
    one crop run its vision tower once and prefill only their own words. Models whose positions
    depend on the image layout (Qwen's multimodal rope) recompute the prefix per question.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        name: str,
        batch_size: int = 16,
        option_scoring: OptionScoring = "mean",
        prefix_cache: bool = True,
        option_batch_size: int = 256,
        image_cache_mb: int = 256,
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.option_batch_size = option_batch_size
        self.option_scoring = option_scoring
        self.prefix_cache = prefix_cache
        self.forward_passes = 0
        self.tokens_processed = 0  # input tokens through the model, for the cost report
        self.requests_sent = 0  # no server
        self.scoring_method = "full-label"
        self.scoring_reason = "in process: every option's tokens are scored by the model itself"
        self.vision_passes = 0  # images through the vision tower
        self.prefill_tokens = 0  # prompt tokens (image tokens included) through the model; answers excluded
        self.image_prefixes = ImagePrefixes(image_cache_mb * 2**20)
        # Multimodal rope keeps per-batch position offsets on the model: a prefix from another batch misplaces them.
        multimodal_rope = any(hasattr(m, "rope_deltas") for m in model.modules())
        self.shares_images = image_cache_mb > 0 and not multimodal_rope
        # Answers side by side under a tree mask need explicit positions and a custom mask: plain rope, and an
        # attention implementation that takes a 4D mask (flash attention does not).
        attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        self.tree_options = not multimodal_rope and attention in {"sdpa", "eager"}
        self._input_device = next(self.model.parameters()).device
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._lock = threading.Lock()
        self.chat = ChatFormat(processor, self.tokenizer)
        self._option_ids = lru_cache(maxsize=65536)(lambda option: self.chat.answer(option).ids)
        self._question_ids = lru_cache(maxsize=1024)(self._split_after_image)
        self._head_ids = lru_cache(maxsize=4)(self.chat.ids)

    @classmethod
    def load(
        cls, model_id: str, device: str = "auto", quantization: Quantization = "none", *,
        trust_remote_code: bool = False, chat_template: str | None = None, **options: object,
    ) -> TransformersEngine:  # fmt: skip
        """Load a hub id or local checkpoint through ``AutoProcessor`` / ``AutoModelForImageTextToText``, or raise
        :class:`EngineError` saying why this checkpoint cannot serve (so ``/health`` is DOWN with the reason, not
        "ready" with every task failing). ``trust_remote_code`` is always passed, so loading never asks on stdin;
        ``chat_template`` is a Jinja file for a checkpoint that has none."""
        if quantization not in QUANTIZATIONS:
            raise EngineError(f"MLLM_QUANTIZATION={quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        resolved = resolve_device(device)
        arguments = load_arguments(resolved, quantization, device)
        try:
            processor = load_processor(model_id, trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                model_id, trust_remote_code=trust_remote_code, **arguments
            )
        except ValueError as exc:
            raise EngineError(_load_refusal(model_id, str(exc))) from None
        if chat_template:
            processor.chat_template = Path(chat_template).read_text()
        _check_servable(model_id, model, processor)
        if "device_map" not in arguments:
            model.to(resolved)
        return cls(model, processor, Path(model_id.rstrip("/")).name or model_id, **options)  # type: ignore[arg-type]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # --- prompt and answer tokens -------------------------------------------------

    @cached_property
    def _tokenizing(self) -> dict[str, bool]:
        """Processor arguments: no second BOS where the chat template writes one."""
        return {} if self.chat.add_special_tokens else {"add_special_tokens": False}

    def chat_prefix(self, prompt: str) -> str:
        return self.chat.prompt(prompt)

    def _split_after_image(self, prompt: str) -> tuple[str, tuple[int, ...]] | None:
        """The chat prefix as (image head, the question's token ids), or None unless they tokenize exactly apart."""
        head, prefix = self.chat.image_head(), self.chat_prefix(prompt)
        if head is None or not prefix.startswith(head):
            return None
        head_ids = self._head_ids(head)
        question_ids = self.tokenizer(prefix[len(head) :], add_special_tokens=False)["input_ids"]
        if not question_ids or len(question_ids) > SHARED_QUESTION_MAX_TOKENS:
            return None
        if self.chat.ids(prefix) != head_ids + question_ids:
            return None  # a token spans the boundary: this prompt gets no shared prefix
        return head, tuple(question_ids)

    def _answer_ids(self, option: str) -> tuple[int, ...]:
        """The option's tokens exactly as the chat template renders them after the generation prompt
        (:class:`backend.models.chat.ChatFormat`), worked out once per option."""
        deadline.check("tokenizing the answers")
        return self._option_ids(option)

    def _encode_prompt(self, image: Image.Image, prefix: str) -> dict[str, torch.Tensor]:
        try:
            encoded = self.processor(images=[image], text=[prefix], return_tensors="pt", **self._tokenizing)
        except Exception as exc:  # processors raise many types for odd images
            raise EngineError(f"the model's processor rejected a {image.width}x{image.height} image: {exc}") from exc
        return dict(encoded)

    def _encode_prompts(self, images: Sequence[Image.Image], prefix: str) -> list[dict[str, torch.Tensor]]:
        """One processor call for all images when its output splits by row; else one call per image."""
        if len(images) > 1:
            try:
                batch = self.processor(
                    images=list(images),
                    text=[prefix] * len(images),
                    return_tensors="pt",
                    padding=True,
                    **self._tokenizing,
                )
                rows = _split_rows(dict(batch), len(images))
                if rows is not None:
                    return rows
            except Exception:  # fall through: one image at a time names the image it fails on
                log.debug("batched processor call failed; encoding images one by one", exc_info=True)
        return [self._encode_prompt(image, prefix) for image in images]

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        return {
            k: (v.to(self._input_device, dtype) if v.is_floating_point() else v.to(self._input_device))
            for k, v in batch.items()
        }

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The model, one request at a time; a request whose deadline passes while it waits gives up its turn."""
        left = deadline.remaining()
        if not self._lock.acquire(timeout=-1 if left is None else left):
            raise DeadlineExceeded("the request's time limit ran out while waiting for the model")
        try:
            yield
        finally:
            self._lock.release()

    def _forward(self, *, prefill: bool = False, **inputs: object):
        """One model call; ``prefill`` marks prompt tokens (counted), as opposed to answer tokens."""
        deadline.check("running the model")  # between forward passes: a request stops within one pass
        tokens = int(inputs["input_ids"].numel())  # type: ignore[union-attr]
        self.forward_passes += 1
        self.tokens_processed += tokens
        if prefill:
            self.prefill_tokens += tokens
        if "pixel_values" in inputs:
            self.vision_passes += int(inputs["input_ids"].shape[0])  # type: ignore[union-attr]
        return self.model(**inputs)

    # --- scoring ------------------------------------------------------------------

    @torch.inference_mode()
    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        if not options:
            raise EngineError("no options to score")
        answers = [list(self._answer_ids(option)) for option in options]
        split = self._question_ids(prompt) if self.shares_images and self.prefix_cache else None
        summed = None
        if split is not None:
            head, question = split
            with self._turn():
                try:
                    summed = self._score_after_images(images, prompt, head, list(question), answers)
                except _UnsharedCache:
                    self.shares_images = False
        if summed is None:
            prompts = self._encode_prompts(images, self.chat_prefix(prompt))
            with self._turn():
                summed = (
                    self._score_with_prefix_cache(prompts, answers)
                    if self.prefix_cache
                    else self._score_pairs(prompts, answers)
                )
        scores = normalise(summed, [len(a) for a in answers], self.option_scoring)
        return OptionScores(options=tuple(options), logprobs=scores)

    def _score_pairs(self, prompts: list[dict], answers: list[list[int]]) -> np.ndarray:
        """One right-padded row per (image, option): the reference the cached path must match."""
        rows = [_Row(p, a) for p in prompts for a in answers]
        totals: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            totals.extend(self._pair_logprobs(rows[start : start + self.batch_size]))
        return np.asarray(totals, dtype=np.float64).reshape(len(prompts), len(answers))

    def _pair_logprobs(self, rows: Sequence[_Row]) -> list[float]:
        first = min(row.prompt_length for row in rows) - 1
        last = max(row.prompt_length + len(row.answer) for row in rows) - 1
        inputs = self._to_model(_collate(rows, self.pad_id))
        if self._keeps_logits:
            keep = torch.arange(first, last, device=self._input_device)
            logits = self._forward(**inputs, prefill=True, logits_to_keep=keep, use_cache=False).logits
        else:
            logits = self._forward(**inputs, prefill=True, use_cache=False).logits[:, first:last]
        logprobs = logits.float().log_softmax(dim=-1).cpu()
        totals = []
        for i, row in enumerate(rows):
            positions = torch.arange(row.prompt_length - 1, row.prompt_length - 1 + len(row.answer)) - first
            totals.append(float(logprobs[i, positions, torch.tensor(row.answer)].sum()))
        return totals

    def _score_with_prefix_cache(
        self, prompts: list[dict], answers: list[list[int]], storing: tuple[list, int] | None = None
    ) -> np.ndarray:
        """Equal-length prompts in one forward each; the options then read its KV cache. With ``storing``
        (each prompt's store key, and the question's length in tokens), each image's prefix is cut from that
        cache and kept for the next question about it."""
        totals = np.empty((len(prompts), len(answers)), dtype=np.float64)
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
        for chunk in self._batches([_prefix_group(prompt) for prompt in prompts]):
            inputs = self._to_model(_collate([_Row(prompts[i], []) for i in chunk], self.pad_id))
            output = self._forward(**inputs, prefill=True, use_cache=True, **keep)
            if storing is not None:
                keys, question_length = storing
                self._store_prefixes(output.past_key_values, inputs["input_ids"], [keys[i] for i in chunk],
                                     question_length)  # fmt: skip
            totals[chunk] = self._score_after(output, len(chunk), answers)
        return totals

    def _score_after(self, output, n_images: int, answers: list[list[int]]) -> np.ndarray:
        """Every answer's log-probability after a prefix forward of ``n_images`` rows (its logits and cache)."""
        first_token = output.logits[:, -1].float().log_softmax(dim=-1).cpu()  # predicts each answer's first token
        cache = output.past_key_values
        totals = np.stack([first_token[:, a[0]].numpy() for a in answers], axis=1).astype(np.float64)
        # Options with more than one token continue from the cache; one-token options are done.
        longer = [j for j, a in enumerate(answers) if len(a) > 1]
        if self.tree_options and all(type(layer) is DynamicLayer for layer in cache.layers):
            for group in _token_groups([len(answers[j]) - 1 for j in longer], self.option_batch_size):
                deadline.check("scoring the options")
                chosen = [longer[g] for g in group]
                totals[:, chosen] += self._continue_options_tree(cache, n_images, [answers[j] for j in chosen])
            return totals
        per_forward = max(1, self.option_batch_size // n_images)
        for start in range(0, len(longer), per_forward):
            deadline.check("scoring the options")  # before copying the cache: that copy is the costly part
            group = longer[start : start + per_forward]
            last = start + per_forward >= len(longer)
            shared = cache if last else copy.deepcopy(cache)  # the last group may consume the cache itself
            totals[:, group] += self._continue_options(shared, n_images, [answers[j] for j in group])
        return totals

    def _score_after_images(
        self, images: Sequence[Image.Image], prompt: str, head: str, question: list[int], answers: list[list[int]]
    ) -> np.ndarray:
        """Score, keeping each image's prefix: an image seen before continues its stored prefix (only the question
        and the answers run); a new one runs whole, once, and its prefix is cut from that cache and stored."""
        keys = [(image_digest(image), head) for image in images]
        stored = {key: prefix for key in set(keys) if (prefix := self.image_prefixes.get(key)) is not None}
        totals = np.empty((len(images), len(answers)), dtype=np.float64)
        new = list(dict.fromkeys(key for key in keys if key not in stored))
        if new:
            prompts = self._encode_prompts([images[keys.index(key)] for key in new], self.chat_prefix(prompt))
            scores = self._score_with_prefix_cache(prompts, answers, storing=(new, len(question)))
            for key, row in zip(new, scores, strict=True):
                totals[[i for i, k in enumerate(keys) if k == key]] = row
        known = [i for i, key in enumerate(keys) if key in stored]
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
        for chunk in self._batches([stored[keys[i]].length for i in known]):
            rows = [known[c] for c in chunk]
            cache = DynamicCache(ddp_cache_data=stack_layers([stored[keys[i]] for i in rows]))
            ids = torch.tensor([question] * len(rows), dtype=torch.long, device=self._input_device)
            output = self._forward(input_ids=ids, past_key_values=cache, use_cache=True, prefill=True, **keep)
            totals[rows] = self._score_after(output, len(rows), answers)
        return totals

    def _store_prefixes(self, cache, ids: torch.Tensor, keys: list, question_length: int) -> list[Prefix]:
        """Cut each row's image prefix (all but the last ``question_length`` tokens: a causal cache's earlier
        positions do not depend on later ones) out of a prompt's cache, and store it under its key."""
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise _UnsharedCache  # e.g. sliding-window layers: they cannot be cut into rows
        length = ids.shape[1] - question_length
        layers = [(layer.keys[..., :length, :], layer.values[..., :length, :]) for layer in cache.layers]
        prefixes = split_prefixes(ids[:, :length], layers)
        for key, prefix in zip(keys, prefixes, strict=True):
            self.image_prefixes.put(key, prefix)
        return prefixes

    def _batches(self, shapes: Sequence[Hashable]) -> list[list[int]]:
        """Indices grouped by shape (equal shapes batch without padding), at most ``batch_size`` per batch."""
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            groups[shape].append(index)
        return [indices[start : start + self.batch_size] for indices in groups.values()
                for start in range(0, len(indices), self.batch_size)]  # fmt: skip

    def _prefixes_of(self, images: Sequence[Image.Image], head: str) -> list[Prefix]:
        """Each image's prefix: from the store, or one batched prefix forward for those it lacks."""
        keys = [(image_digest(image), head) for image in images]
        found = {key: prefix for key in set(keys) if (prefix := self.image_prefixes.get(key)) is not None}
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        if missing:
            prompts = self._encode_prompts([images[keys.index(key)] for key in missing], head)
            keep = {"logits_to_keep": 1} if self._keeps_logits else {}
            for chunk in self._batches([_prefix_group(prompt) for prompt in prompts]):
                inputs = self._to_model(_collate([_Row(prompts[i], []) for i in chunk], self.pad_id))
                cache = self._forward(**inputs, prefill=True, use_cache=True, **keep).past_key_values
                chunk_keys = [missing[i] for i in chunk]
                stored = self._store_prefixes(cache, inputs["input_ids"], chunk_keys, 0)
                found.update(zip(chunk_keys, stored, strict=True))
        return [found[key] for key in keys]

    def _continue_options_tree(self, cache, n_images: int, answers: list[list[int]]) -> np.ndarray:
        """Log-prob of each answer's tokens after the first, for every image: shape (n_images, len(answers)).

        Every answer's tokens go into one row per image, side by side; a tree attention mask lets each
        token see the prefix and its own answer's earlier tokens only, and its position continues the
        prefix. The prefix cache is read in place (not copied per answer) and cut back afterwards.
        """
        past = cache.get_seq_length()
        owner = torch.tensor([j for j, a in enumerate(answers) for _ in a[1:]])
        position = torch.tensor([past + k for a in answers for k in range(len(a) - 1)])
        tokens = torch.tensor([t for a in answers for t in a[:-1]], dtype=torch.long)
        targets = torch.tensor([t for a in answers for t in a[1:]], dtype=torch.long)
        width, dtype = len(tokens), self.model.dtype
        allowed = (owner[:, None] == owner[None, :]) & (position[None, :] <= position[:, None])
        mask = torch.zeros((width, past + width), dtype=dtype)
        mask[:, past:].masked_fill_(~allowed, torch.finfo(dtype).min)
        logits = self._forward(
            input_ids=tokens[None].expand(n_images, width).to(self._input_device),
            position_ids=position[None].expand(n_images, width).to(self._input_device),
            attention_mask=mask[None, None].expand(n_images, 1, width, past + width).to(self._input_device),
            past_key_values=cache,
            use_cache=True,
        ).logits
        cache.crop(-width)  # back to the prefix, for the next group of answers
        picked = _target_logprobs(logits, targets[None].expand(n_images, width))
        totals = torch.zeros((n_images, len(answers)), dtype=torch.float64)
        return totals.index_add_(1, owner, picked.double()).numpy()

    def _continue_options(self, shared, n_images: int, answers: list[list[int]]) -> np.ndarray:
        """Log-prob of each answer's tokens after the first, for every image: shape (n_images, len(answers)).

        ``shared`` (the prefix cache) is extended in place: pass a copy if it is needed again.
        """
        if len(answers) > 1:
            shared.batch_repeat_interleave(len(answers))
        width = max(len(a) for a in answers) - 1
        inputs = torch.full((len(answers), width), self.pad_id, dtype=torch.long)
        targets = torch.zeros((len(answers), width), dtype=torch.long)
        real = torch.zeros((len(answers), width), dtype=torch.bool)
        for j, answer in enumerate(answers):
            inputs[j, : len(answer) - 1] = torch.tensor(answer[:-1])
            targets[j, : len(answer) - 1] = torch.tensor(answer[1:])
            real[j, : len(answer) - 1] = True
        rows = inputs.repeat(n_images, 1)  # image-major rows, as batch_repeat_interleave orders the cache
        # No attention mask: padding sits after each row's real tokens, which causal attention never lets
        # them see, and positions continue from the cache length (Qwen adds its stored rope deltas).
        logits = self._forward(input_ids=rows.to(self._input_device), past_key_values=shared, use_cache=True).logits
        picked = _target_logprobs(logits, targets.repeat(n_images, 1))
        picked = picked.masked_fill(~real.repeat(n_images, 1), 0.0)
        return picked.sum(dim=1).reshape(n_images, len(answers)).double().numpy()

    # --- free text ------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int = 32) -> list[Generation]:
        split = self._question_ids(prompt) if self.shares_images else None
        if split is not None:
            with self._turn():
                try:
                    return self._generate_after_images(images, *split, max_new_tokens)
                except _UnsharedCache:
                    self.shares_images = False
        prefix = self.chat_prefix(prompt)
        results: list[Generation] = []
        with self._turn():
            for image in images:  # one at a time: processors differ in how they batch images
                deadline.check("generating text")
                inputs = self._to_model(self._encode_prompt(image, prefix))
                self.forward_passes += 1
                self.vision_passes += 1
                self.prefill_tokens += int(inputs["input_ids"].shape[1])
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=self.pad_id,
                )
                results.append(self._decode(output, inputs["input_ids"].shape[1]))
        return results

    def _generate_after_images(
        self, images: Sequence[Image.Image], head: str, question: tuple[int, ...], max_new_tokens: int
    ) -> list[Generation]:
        """Greedy answers continuing each image's stored prefix: ``generate`` prefills only the question."""
        prefixes = self._prefixes_of(images, head)
        results: list[Generation | None] = [None] * len(images)
        for chunk in self._batches([prefix.length for prefix in prefixes]):
            deadline.check("generating text")
            asked = torch.tensor([question] * len(chunk), dtype=torch.long)
            ids = torch.cat([torch.cat([prefixes[i].ids.cpu() for i in chunk]), asked], dim=1).to(self._input_device)
            self.forward_passes += 1
            self.prefill_tokens += int(asked.numel())
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=DynamicCache(ddp_cache_data=stack_layers([prefixes[i] for i in chunk])),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=self.pad_id,
            )
            for row, index in enumerate(chunk):
                results[index] = self._decode(output, ids.shape[1], row)
        return results  # type: ignore[return-value]

    def _decode(self, output, prompt_length: int, row: int = 0) -> Generation:
        scores = self.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)[row]
        tokens = output.sequences[row, prompt_length:].tolist()
        eos = self.tokenizer.eos_token_id
        kept = tokens.index(eos) if eos in tokens else len(tokens)
        text = self.tokenizer.decode(tokens[:kept], skip_special_tokens=True).strip()
        return Generation(text, tuple(float(s) for s in scores[:kept].tolist()))
