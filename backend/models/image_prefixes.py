"""The key-value cache of each image's prefix, kept so every question about an image reuses one vision pass.

A prompt laid out image-first renders as ``head + question``: the head (chat opening and the
image's tokens) is the same for every question about that image. Its KV cache, computed once,
is what the label, the critic and the fine name then continue from. The store keeps one row
per image (a key and a value tensor per layer, batch dimension 1), least recently used first
out, within a byte budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
from PIL import Image

Row = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: (keys, values), each [1, heads, tokens, dim]


def image_digest(image: Image.Image) -> bytes:
    """A content key: two equal crops share a prefix even when they are different objects."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    hasher.update(image.tobytes())
    return hasher.digest()


def _row_bytes(row: Row) -> int:
    return sum(keys.numel() * keys.element_size() + values.numel() * values.element_size() for keys, values in row)


class ImagePrefixes:
    """Least-recently-used image prefix rows, at most ``budget_bytes`` of tensors in all."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._rows: OrderedDict[tuple[bytes, str], Row] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: tuple[bytes, str]) -> Row | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: tuple[bytes, str], row: Row) -> None:
        size = _row_bytes(row)
        if size > self.budget_bytes:
            return  # one image larger than the whole budget: recompute it each time rather than evict everything
        if key in self._rows:
            self._bytes -= _row_bytes(self._rows.pop(key))
        self._rows[key] = row
        self._bytes += size
        while self._bytes > self.budget_bytes:
            _, evicted = self._rows.popitem(last=False)
            self._bytes -= _row_bytes(evicted)

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0


def split_rows(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[Row]:
    """A batched cache's (keys, values) per layer as ``n`` batch-1 rows (copies: the batch can be freed)."""
    return [tuple((keys[i : i + 1].clone(), values[i : i + 1].clone()) for keys, values in layers) for i in range(n)]


def stack_rows(rows: Sequence[Row]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batch-1 rows of equal length as one batch of (keys, values) per layer."""
    return [
        (torch.cat([row[layer][0] for row in rows]), torch.cat([row[layer][1] for row in rows]))
        for layer in range(len(rows[0]))
    ]
