"""The key-value cache of each image's prefix, kept so every question about an image reuses one vision pass.

A prompt laid out image-first renders as ``head + question``: the head (chat opening and the
image's tokens) is the same for every question about that image. Its KV cache, computed once,
is what the label, the critic and the fine name then continue from. The store keeps one
:class:`Prefix` per image (its token ids, and a key and a value tensor per layer, batch
dimension 1), least recently used first out, within a byte budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

Layers = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: (keys, values), each [1, heads, tokens, dim]


@dataclass(frozen=True)
class Prefix:
    """One image's prefix: its token ids (image tokens expanded), shape [1, tokens], and their KV cache."""

    ids: torch.Tensor
    layers: Layers

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    @property
    def nbytes(self) -> int:
        tensors = [self.ids] + [t for pair in self.layers for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


def image_digest(image: Image.Image) -> bytes:
    """A content key: two equal crops share a prefix even when they are different objects."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    hasher.update(image.tobytes())
    return hasher.digest()


class ImagePrefixes:
    """Least-recently-used image prefixes, at most ``budget_bytes`` of tensors in all."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._rows: OrderedDict[tuple[bytes, str], Prefix] = OrderedDict()
        self._bytes = 0
        self.largest_refused = 0  # bytes of the largest prefix that did not fit the whole budget

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: tuple[bytes, str]) -> Prefix | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: tuple[bytes, str], row: Prefix) -> None:
        size = row.nbytes
        if size > self.budget_bytes:
            self.largest_refused = max(self.largest_refused, size)
            return  # one image larger than the whole budget: recompute it each time rather than evict everything
        if key in self._rows:
            self._bytes -= self._rows.pop(key).nbytes
        self._rows[key] = row
        self._bytes += size
        while self._bytes > self.budget_bytes:
            _, evicted = self._rows.popitem(last=False)
            self._bytes -= evicted.nbytes

    def problem(self) -> str | None:
        """Why the store keeps nothing, for ``/health``: a 7B model's prefix (about 290 MiB for LLaVA-1.5-7B)
        outgrows the 256 MiB default."""
        if not self.largest_refused or self._rows:
            return None
        need = -(-self.largest_refused // 2**20)
        return (f"the image prefix store ({self.budget_bytes // 2**20} MiB) is smaller than one image prefix of this "
                f"model ({need} MiB), so it stores nothing and every question prefills its image again; set "
                f"MLLM_IMAGE_CACHE_MB to at least {need * 8} to keep 8 images")  # fmt: skip

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0


def split_prefixes(ids: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Prefix]:
    """A batched prefix (ids [n, tokens] and its cache's (keys, values) per layer) as ``n`` batch-1 prefixes
    (copies: the batch can be freed)."""
    return [
        Prefix(
            ids[i : i + 1].clone(),
            tuple((keys[i : i + 1].clone(), values[i : i + 1].clone()) for keys, values in layers),
        )
        for i in range(ids.shape[0])
    ]


def stack_layers(prefixes: Sequence[Prefix]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefixes of equal length as one batch of (keys, values) per layer."""
    return [
        (torch.cat([p.layers[layer][0] for p in prefixes]), torch.cat([p.layers[layer][1] for p in prefixes]))
        for layer in range(len(prefixes[0].layers))
    ]
