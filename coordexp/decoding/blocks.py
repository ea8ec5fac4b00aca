"""Batch bookkeeping every KV-cache decode loop shares: left padding of caches and masks, and the
block of new ids one decoder call feeds (one id per row, or a jump-forward chunk)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def left_pad(a: Any, length: int, axis: int) -> Any:
    """`a` (a numpy array or torch tensor) zero-padded at the front of `axis` to `length`."""
    extra = length - a.shape[axis]
    if extra <= 0:
        return a
    if isinstance(a, np.ndarray):
        width = [(0, 0)] * a.ndim
        width[axis] = (extra, 0)
        return np.pad(a, width)
    import torch

    shape = list(a.shape)
    shape[axis] = extra
    return torch.cat([a.new_zeros(shape), a], dim=axis)


def chunk_block(chunks: Sequence[Sequence[int]], first: np.ndarray, pad_token_id: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step's new ids of every running row as a block `(ids, new_mask, positions)` [n, width]:
    a row's chunk (one id, or more with jump-forward) right-aligned, the front padding masked out
    (mask 0, pad id, positions repeating the first); `first`: each row's position of its chunk's
    first id (prompt length + M-RoPE delta + tokens fed so far)."""
    n, width = len(chunks), max(len(c) for c in chunks)
    pos = np.asarray(first, dtype=np.int64)[:, None] + np.arange(width)[None, :]
    if width == 1:
        return np.asarray(chunks, dtype=np.int64).reshape(n, 1), np.ones((n, 1), dtype=np.int64), pos
    ids = np.full((n, width), pad_token_id, dtype=np.int64)
    new_mask = np.zeros((n, width), dtype=np.int64)
    for i, c in enumerate(chunks):
        pad = width - len(c)
        ids[i, pad:] = c
        new_mask[i, pad:] = 1
        pos[i] = first[i] + np.maximum(np.arange(width) - pad, 0)
    return ids, new_mask, pos


def trimmed_start(mask: np.ndarray) -> int:
    """The first cache column a row still uses (after the longest rows left, the columns before it
    are padding every row has)."""
    used = np.flatnonzero(mask.any(axis=0))
    return int(used[0]) if len(used) else mask.shape[1]
