"""Local transformers provider: any image-text-to-text checkpoint, hub id or local path."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from backend.models.engine import EngineError, OptionScores

log = logging.getLogger(__name__)


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


@dataclass
class _Row:
    """One (image prompt, answer) pair to score."""

    prompt: dict[str, torch.Tensor]  # processor output for one image + prompt, batch dim 1
    answer: list[int]

    @property
    def prompt_length(self) -> int:
        return int(self.prompt["input_ids"].shape[1])


class TransformersEngine:
    """Scores answers with a local ``AutoModelForImageTextToText``.

    Each (image, option) pair becomes one row: the processor's image + prompt
    tokens followed by the option's answer tokens (as the chat template renders an
    assistant turn, end-of-turn token included). Rows are right-padded, so every
    real token keeps its natural position; only the logits at answer positions are
    computed.
    """

    def __init__(self, model_id: str, device: str = "auto", batch_size: int = 16) -> None:
        self.name = Path(model_id.rstrip("/")).name or model_id
        self.model_id = model_id
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(model_id)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=default_dtype(self.device))
        self.model.to(self.device).eval()
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._lock = threading.Lock()
        self._answer_ids = lru_cache(maxsize=4096)(self._tokenize_answer)

    # --- prompt and answer tokens -------------------------------------------------

    def _messages(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    def chat_prefix(self, prompt: str) -> str:
        return self.processor.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def _tokenize_answer(self, prompt: str, option: str) -> tuple[int, ...]:
        """The option's tokens exactly as they follow the prompt in a rendered conversation."""
        prefix = self.chat_prefix(prompt)
        answer_turn = {"role": "assistant", "content": [{"type": "text", "text": option}]}
        full = self.processor.apply_chat_template(self._messages(prompt) + [answer_turn], tokenize=False)
        prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if full.startswith(prefix) and full_ids[: len(prefix_ids)] == prefix_ids and len(full_ids) > len(prefix_ids):
            answer = list(full_ids[len(prefix_ids) :])
            if eos in answer:
                return tuple(answer[: answer.index(eos) + 1])
        else:
            answer = list(self.tokenizer(option, add_special_tokens=False)["input_ids"])
        return tuple(answer + ([eos] if eos is not None else []))

    def _encode_prompt(self, image: Image.Image, prefix: str) -> dict[str, torch.Tensor]:
        try:
            encoded = self.processor(images=[image], text=[prefix], return_tensors="pt")
        except Exception as exc:  # processors raise many types for odd images
            raise EngineError(f"the model's processor rejected a {image.width}x{image.height} image: {exc}") from exc
        return dict(encoded)

    # --- batched forward ----------------------------------------------------------

    def _collate(self, rows: Sequence[_Row]) -> dict[str, torch.Tensor]:
        lengths = [row.prompt_length + len(row.answer) for row in rows]
        width = max(lengths)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        token_keys = [
            k
            for k, v in rows[0].prompt.items()
            if k not in {"input_ids", "attention_mask"} and v.shape == rows[0].prompt["input_ids"].shape
        ]
        extra = {k: torch.zeros((len(rows), width), dtype=rows[0].prompt[k].dtype) for k in token_keys}
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            ids = torch.cat([row.prompt["input_ids"][0], torch.tensor(row.answer, dtype=torch.long)])
            input_ids[i, :length] = ids
            attention[i, :length] = 1
            for k in token_keys:
                extra[k][i, : row.prompt_length] = row.prompt[k][0]
        batch = {"input_ids": input_ids, "attention_mask": attention, **extra}
        for key in rows[0].prompt:
            if key not in batch:
                batch[key] = torch.cat([row.prompt[key] for row in rows], dim=0)
        return batch

    def _forward_logprobs(self, rows: Sequence[_Row]) -> list[float]:
        """Summed log-probability of each row's answer tokens."""
        batch = self._collate(rows)
        first = min(row.prompt_length for row in rows) - 1
        last = max(row.prompt_length + len(row.answer) for row in rows) - 1
        keep = torch.arange(first, last)
        inputs = {
            k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in batch.items()
        }
        if self._keeps_logits:
            logits = self.model(**inputs, logits_to_keep=keep.to(self.device), use_cache=False).logits
        else:
            logits = self.model(**inputs, use_cache=False).logits[:, first:last]
        logprobs = logits.float().log_softmax(dim=-1).cpu()
        totals = []
        for i, row in enumerate(rows):
            positions = torch.arange(row.prompt_length - 1, row.prompt_length - 1 + len(row.answer)) - first
            tokens = torch.tensor(row.answer, dtype=torch.long)
            totals.append(float(logprobs[i, positions, tokens].sum()))
        return totals

    @torch.inference_mode()
    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        if not options:
            raise EngineError("no options to score")
        prefix = self.chat_prefix(prompt)
        answers = [list(self._answer_ids(prompt, option)) for option in options]
        prompts = [self._encode_prompt(image, prefix) for image in images]
        rows = [_Row(p, a) for p in prompts for a in answers]
        totals: list[float] = []
        with self._lock:
            for start in range(0, len(rows), self.batch_size):
                totals.extend(self._forward_logprobs(rows[start : start + self.batch_size]))
        scores = np.asarray(totals, dtype=np.float64).reshape(len(images), len(options))
        return OptionScores(options=tuple(options), logprobs=scores)
