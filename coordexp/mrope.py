"""Host-side position glue for exported Qwen3-VL graphs, in numpy only (no torch at serving time).

Everything here depends only on token ids and `image_grid_thw`, is data dependent (loops, ragged
images) and so is kept OUT of the ONNX graphs; the graphs take the results as plain inputs:

- `get_rope_index`: the 3-row M-RoPE position ids of the language model for a (left padded) batch
  of prompts, a port of transformers' `Qwen3VLModel.get_rope_index` (transformers 5.x). Padding
  positions get 0, like there; `deltas[b] = max position + 1 - real length`, so the position of the
  n-th generated token of row b (n = 0, 1, ...) is `real_length[b] + deltas[b] + n`, i.e.
  `next_positions(...)`.
- `vision_position_ids`, `vision_interpolation`, `vision_segments`, `vision_attention_bias`: the
  inputs the Qwen3-VL vision tower computes from `grid_thw` (ports of
  `transformers.vision_utils.get_vision_position_ids` / `get_vision_interpolation_indices_and_weights`
  / `get_vision_cu_seqlens`), the packed per-image attention becoming a block-diagonal additive bias.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NEG_INF = np.float32(-np.inf)


# ------------------------------------------------------------------------------------------ text
def _groups(types: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal values: (value, start, end)."""
    out = []
    n = len(types)
    start = 0
    for i in range(1, n + 1):
        if i == n or types[i] != types[start]:
            out.append((int(types[start]), start, i))
            start = i
    return out


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None, attention_mask: np.ndarray | None = None,
                   *, spatial_merge_size: int, image_token_id: int, video_token_id: int | None = None,
                   mm_token_type_ids: np.ndarray | None = None,
                   video_grid_thw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, B, T]` int64 and deltas `[B, 1]` int64 for a batch of prompts.

    `mm_token_type_ids` (1 image, 2 video, 0 text) defaults to `input_ids == image_token_id` (and
    `video_token_id`). Images are consumed in batch order (row 0's first, ...), as the processor
    lays them out. Videos follow transformers: each frame is its own grid with t = 1.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    bsz, seq = input_ids.shape
    if mm_token_type_ids is None:
        mm_token_type_ids = np.zeros_like(input_ids)
        mm_token_type_ids[input_ids == image_token_id] = 1
        if video_token_id is not None:
            mm_token_type_ids[input_ids == video_token_id] = 2
    mm_token_type_ids = np.asarray(mm_token_type_ids, dtype=np.int64)
    mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = {1: iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)) if image_grid_thw is not None else None,
             2: None}
    if video_grid_thw is not None:
        v = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
        v = np.repeat(v, v[:, 0], axis=0)
        v[:, 0] = 1
        grids[2] = iter(v)
    m = int(spatial_merge_size)
    position_ids = np.zeros((3, bsz, seq), dtype=np.int64)
    deltas = np.zeros((bsz, 1), dtype=np.int64)
    for b in range(bsz):
        types = mm_token_type_ids[b]
        if mask is not None:
            types = types[mask[b]]
        pieces = []
        cur = 0
        for kind, start, end in _groups(types):
            if kind == 0:
                n = end - start
                pieces.append(np.broadcast_to(np.arange(n, dtype=np.int64) + cur, (3, n)))
                cur += n
            else:
                it = grids.get(kind)
                grid = next(it, None) if it is not None else None
                if grid is None:
                    raise ValueError(f"row {b}: more {'image' if kind == 1 else 'video'} placeholder runs than grids")
                t, h, w = int(grid[0]), int(grid[1]) // m, int(grid[2]) // m
                tt, hh, ww = np.meshgrid(np.arange(t, dtype=np.int64), np.arange(h, dtype=np.int64) + cur,
                                         np.arange(w, dtype=np.int64) + cur, indexing="ij")
                block = np.stack([tt + cur, hh, ww]).reshape(3, -1)
                if block.shape[1] != end - start:
                    raise ValueError(f"row {b}: a run of {end - start} placeholder tokens for a grid of "
                                     f"{block.shape[1]} merged patches ({int(grid[0])}x{int(grid[1])}x{int(grid[2])})")
                pieces.append(block)
                cur += max(int(grid[1]), int(grid[2])) // m
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
        if mask is not None:
            position_ids[:, b, mask[b]] = pos
        else:
            position_ids[:, b] = pos
        deltas[b, 0] = (int(pos.max()) + 1 if pos.size else 0) - pos.shape[1]
    return position_ids, deltas


def next_positions(attention_mask: np.ndarray, deltas: np.ndarray, step: int = 0) -> np.ndarray:
    """`[3, B, 1]` positions of the `step`-th generated token (0-based), given the PROMPT's mask.

    transformers continues from the last prompt position + 1 on all three rows; the last prompt
    token is text, so its three rows are equal to `real_length - 1 + delta`.
    """
    lengths = np.asarray(attention_mask).astype(np.int64).sum(-1)
    pos = lengths + np.asarray(deltas, dtype=np.int64).reshape(-1) + int(step)
    return np.broadcast_to(pos[None, :, None], (3, len(pos), 1)).astype(np.int64)


# ---------------------------------------------------------------------------------------- vision
def _grid(grid_thw: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return g


def vision_position_ids(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """`[N, 2]` int64 (row, col) of every patch in spatial-merge-block order (the rotary input)."""
    m = int(spatial_merge_size)
    out = []
    for t, h, w in _grid(grid_thw).tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True, border padding: 2 taps per position (float32 like torch)."""
    index = index.astype(np.float32)
    denom = np.maximum(size - 1, 1).astype(np.float32)
    src = index * np.float32(side - 1) / denom
    floor = np.floor(src)
    offsets = np.arange(0, 2, dtype=np.int64)
    raw = floor.astype(np.int64)[:, None] + offsets
    taps = np.clip(raw, 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - dist, np.float32(0)).astype(np.float32)
    return taps, weights


def vision_interpolation(grid_thw, num_grid_per_side: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`([N, 4] int64, [N, 4] float32)`: taps into the learned square position table and their
    bilinear weights, per patch in merge-block order (Qwen3-VL: bilinear, align_corners=True)."""
    g = _grid(grid_thw)
    side = int(num_grid_per_side)
    m = int(spatial_merge_size)
    counts = g[:, 0] * g[:, 1] * g[:, 2]
    heights = np.repeat(g[:, 1], counts)
    widths = np.repeat(g[:, 2], counts)
    starts = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    within = (np.arange(counts.sum(), dtype=np.int64) - starts) % (heights * widths)
    blocks_w = widths // m
    in_col = within % m
    in_row = (within // m) % m
    block_col = (within // (m * m)) % blocks_w
    block_row = within // (m * m * blocks_w)
    row = block_row * m + in_row
    col = block_col * m + in_col
    h_taps, h_w = _axis_taps(row, heights, side)
    w_taps, w_w = _axis_taps(col, widths, side)
    idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).astype(np.float32)
    return idx.astype(np.int64), wts


def vision_segments(grid_thw) -> np.ndarray:
    """`[N]` int64: the attention segment (image, or video frame) of every patch."""
    g = _grid(grid_thw)
    lens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.repeat(np.arange(len(lens), dtype=np.int64), lens)


def vision_attention_bias(grid_thw) -> np.ndarray:
    """`[N, N]` float32: 0 within an image (frame), -inf across -- the packed `cu_seqlens` attention."""
    seg = vision_segments(grid_thw)
    return np.where(seg[:, None] == seg[None, :], np.float32(0), NEG_INF).astype(np.float32)


def segment_bias(segments: np.ndarray) -> np.ndarray:
    """`[N, N]` float32 additive attention bias: 0 where two patches share a segment, else -inf."""
    seg = np.asarray(segments)
    return np.where(seg[:, None] == seg[None, :], np.float32(0), NEG_INF).astype(np.float32)


def vision_window_index(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window attention: `(window_index [N / m^2] int64, cu_window_seqlens int64)`, a port
    of `transformers.vision_utils.get_vision_window_index` (merged units reordered window by window)."""
    m = int(spatial_merge_size)
    unit = m * m
    vws = int(window_size) // m // int(patch_size)
    window_index: list[np.ndarray] = []
    cu = [0]
    offset = 0
    for t, h, w in _grid(grid_thw).tolist():
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw, dtype=np.int64).reshape(t, lh, lw)
        pad_h = vws - lh % vws
        pad_w = vws - lw % vws
        nwh, nww = (lh + pad_h) // vws, (lw + pad_w) // vws
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nwh, vws, nww, vws).transpose(0, 1, 3, 2, 4).reshape(t, nwh * nww, vws, vws)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # unique_consecutive
    return np.concatenate(window_index), cu_arr[keep]


def segments_from_cu(cu_seqlens: np.ndarray) -> np.ndarray:
    """`[N]` segment id per position from cumulative boundaries `[0, ..., N]`."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    return np.repeat(np.arange(len(cu) - 1, dtype=np.int64), np.diff(cu))


def num_patches(grid_thw) -> np.ndarray:
    g = _grid(grid_thw)
    return g[:, 0] * g[:, 1] * g[:, 2]
