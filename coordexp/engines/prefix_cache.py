"""The shared prompt prefix's KV computed once per loaded model (issue 18, part 3).

Every CoordExp prompt starts with the same text before the image: the system prompt and the chat
header (~150 tokens with the default prompt). Its keys and values do not depend on the image, so
`cached_prefill` computes them once (the decoder graph with an empty past and batch 1), keeps them
in a small LRU keyed by the prefix's token ids (a prompt variant gets its own entry) and runs only
the rest of each prompt through the decoder, against the cached KV as its past.

The prefix of a row is its text before the first vision token (`<|vision_start|>`, image or video
placeholder): there all three M-RoPE rows are `0..P-1` and the dense deepstack input is zero, so
the cached KV is exactly what the full prompt pass computes at those positions. Rows of one batch
may have different prefixes (or none): each row's prefix KV is laid out right-aligned in a past of
the longest prefix's length, the columns before it masked, so the cache the decoder sees is

    [masked | prefix_b] [left pad | rest_b]

and the returned attention mask covers it (pads 0). `OnnxParts.generate` extends that mask step by
step and takes positions from the ORIGINAL prompt lengths, which this layout keeps valid.

Results are the plain prefill's up to float rounding (masked columns add exact zeros, but sums
run over other shapes); tests/test_prefix_cache.py checks greedy tokens are identical.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

DEFAULT_MAX_ENTRIES = 8  # prompt variants kept per loaded model (LRU)
_CREATE_LOCK = threading.Lock()


class PrefixCache:
    """LRU of prefix KV entries for one loaded model (one `OnnxParts`), with counters.

    Thread-safe: Triton's execute thread and an in-flight scheduler thread may prefill at once. A
    missing prefix is computed under the lock, so two requests never compute the same one twice.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # rows whose prefix came from the cache
        self.misses = 0  # prefixes computed (each once, batch 1)
        self.rows = 0  # rows prefilled through `cached_prefill`
        self.prefix_positions = 0  # sum over rows of the prefix length (what a plain prefill would recompute)
        self.prefix_positions_computed = 0  # prefix positions actually run (misses)
        self.prefill_positions = 0  # rows x new columns fed to the decoder after the prefix (padding included)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[int, ...]]:
        with self._lock:
            return [tuple(np.frombuffer(k, dtype=np.int64).tolist()) for k in self._entries]

    def get(self, parts: Any, prefix_ids: np.ndarray, compute: Callable[[Any, np.ndarray], list[Any]] | None = None
            ) -> list[Any]:
        """The presents `[k0, v0, ...]` (each `[1, kv_heads, P, head_dim]`) of `prefix_ids` `[P]`,
        computed on a miss by `compute(parts, prefix_ids)` (default: the ONNX decoder's
        `compute_prefix_kv`; `TorchRows` passes its own, whose entries are torch tensors)."""
        key = np.ascontiguousarray(prefix_ids, dtype=np.int64).tobytes()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            entry = (compute or compute_prefix_kv)(parts, prefix_ids)
            self.misses += 1
            self.prefix_positions_computed += len(prefix_ids)
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return entry

    def count(self, rows: int, prefix_positions: int, prefill_positions: int) -> None:
        """Account one cached prefill: its rows, their prefix positions, the columns run after them."""
        with self._lock:
            self.rows += rows
            self.prefix_positions += prefix_positions
            self.prefill_positions += prefill_positions

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, Any]:
        saved = self.prefix_positions - self.prefix_positions_computed
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses, "rows": self.rows,
                "prefix_positions": self.prefix_positions,
                "prefix_positions_computed": self.prefix_positions_computed,
                "prefill_positions": self.prefill_positions, "positions_saved": saved,
                "positions_saved_per_row": saved / self.rows if self.rows else 0.0}


def cache_of(parts: Any, max_entries: int = DEFAULT_MAX_ENTRIES) -> PrefixCache:
    """The `PrefixCache` of this loaded model, created on first use (it lives on the parts object,
    so it goes when the model is unloaded)."""
    cache = getattr(parts, "_prefix_kv_cache", None)
    if cache is None:
        with _CREATE_LOCK:
            cache = getattr(parts, "_prefix_kv_cache", None)
            if cache is None:
                cache = PrefixCache(max_entries)
                parts._prefix_kv_cache = cache
    return cache


def _vision_ids(parts: Any) -> np.ndarray:
    ids = [parts.image_token_id, parts.video_token_id, parts.meta.get("vision_start_token_id", -1)]
    return np.asarray([int(i) for i in ids if i is not None and int(i) >= 0], dtype=np.int64)


def prefix_lengths(parts: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[int]:
    """Per row: how many of its real (unmasked) tokens come before the first vision token; 0 for a
    row without one (a text-only prompt has no image-independent part worth keeping)."""
    vision = _vision_ids(parts)
    out = []
    for ids, m in zip(np.asarray(input_ids), np.asarray(attention_mask)):
        real = ids[m.astype(bool)]
        hit = np.nonzero(np.isin(real, vision))[0]
        out.append(int(hit[0]) if len(hit) else 0)
    return out


def compute_prefix_kv(parts: Any, prefix_ids: np.ndarray) -> list[np.ndarray]:
    """One decoder call over the prefix alone (batch 1, empty past, positions 0..P-1 on all three
    M-RoPE rows, zero deepstack: the prefix is text): its presents."""
    ids = np.asarray(prefix_ids, dtype=np.int64)[None, :]
    p = ids.shape[1]
    feeds = {"inputs_embeds": np.array(parts.embed(ids), dtype=parts.np_dtype),
             "attention_mask": np.ones((1, p), dtype=np.int64),
             "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(p, dtype=np.int64), (3, 1, p)))}
    if parts.num_deepstack:
        feeds["deepstack"] = np.zeros((parts.num_deepstack, 1, p, parts.hidden), dtype=parts.np_dtype)
    empty = np.zeros((1, parts.kv_heads, 0, parts.head_dim), dtype=parts.np_dtype)
    for i in range(parts.num_layers):
        feeds[f"past_key_{i}"] = empty
        feeds[f"past_value_{i}"] = empty
    _, presents = parts.decoder_step(feeds)
    return [np.ascontiguousarray(x) for x in presents]


@dataclass
class PromptSplit:
    """A LEFT padded prompt batch cut at each row's prefix (see the module docstring): what runs
    after the cached prefixes, and the mask over `[masked | prefix_b] [left pad | rest_b]`."""

    lens: list[int]  # prefix length per row (0: none)
    prefix_ids: list[np.ndarray]  # each row's prefix ids `[lens[b]]`
    ids: np.ndarray  # `[B, W]` the rest of each prompt, left padded
    positions: np.ndarray  # `[3, B, W]` its M-RoPE positions, those of the whole prompt
    mask: np.ndarray  # `[B, Pmax + W]` over the prefix layout and the rest
    deltas: np.ndarray  # `[B, 1]` M-RoPE deltas of the whole prompt

    @property
    def rows(self) -> int:
        return len(self.lens)

    @property
    def pmax(self) -> int:
        return max(self.lens)


def split_prompt(parts: Any, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray
                 ) -> PromptSplit | None:
    """Cut every row at its prefix; None when no row has one (then prefill plainly). `parts`: the
    vision/pad ids and `merge` (`OnnxParts` or `TorchParts`)."""
    from coordexp import mrope

    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape}: "
                         "expected the same [B, T] shape")
    lens = prefix_lengths(parts, input_ids, attention_mask)
    pmax = max(lens) if lens else 0
    if pmax == 0:
        return None
    bsz = input_ids.shape[0]
    # positions of the whole prompt, as the plain path computes them; the rest takes its columns
    pos, deltas = mrope.get_rope_index(input_ids, np.asarray(image_grid_thw, dtype=np.int64), attention_mask,
                                       spatial_merge_size=parts.merge, image_token_id=parts.image_token_id,
                                       video_token_id=parts.video_token_id)
    real = [np.nonzero(m)[0] for m in attention_mask]
    width = max(len(r) - p for r, p in zip(real, lens))
    new_ids = np.full((bsz, width), parts.pad_token_id, dtype=np.int64)
    new_mask = np.zeros((bsz, width), dtype=np.int64)
    new_pos = np.zeros((3, bsz, width), dtype=np.int64)
    past_mask = np.zeros((bsz, pmax), dtype=np.int64)
    for b in range(bsz):
        cols = real[b][lens[b]:]
        new_ids[b, width - len(cols):] = input_ids[b, cols]
        new_mask[b, width - len(cols):] = 1
        new_pos[:, b, width - len(cols):] = pos[:, b, cols]
        past_mask[b, pmax - lens[b]:] = 1
    return PromptSplit(lens=lens, prefix_ids=[input_ids[b, real[b][:p]] for b, p in enumerate(lens)], ids=new_ids,
                       positions=new_pos, mask=np.concatenate([past_mask, new_mask], axis=1),
                       deltas=np.asarray(deltas))


def _plain_prefill(parts, input_ids, attention_mask, image_grid_thw, image_embeds, deepstack):
    feeds, deltas = parts.prefill_feeds(input_ids, attention_mask, image_grid_thw, image_embeds, deepstack)
    logits, presents = parts.decoder_step(feeds)
    return logits, presents, np.asarray(attention_mask, dtype=np.int64), deltas


def cached_prefill(parts: Any, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
                   image_embeds: np.ndarray, deepstack: np.ndarray
                   ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """`OnnxParts.prefill`'s contract, the shared prefix from the cache: `(logits [B, V], presents,
    attention_mask [B, Pmax + R] over every cached position, deltas [B, 1])`. Rows without a prefix
    (no vision token) just get a masked past; a batch where no row has one is prefilled plainly."""
    split = split_prompt(parts, input_ids, attention_mask, image_grid_thw)
    if split is None:
        return _plain_prefill(parts, input_ids, attention_mask, image_grid_thw, image_embeds, deepstack)
    cache = cache_of(parts)
    bsz, pmax, lens = split.rows, split.pmax, split.lens
    embeds, dense = parts.prompt_embeds(split.ids, image_embeds, deepstack)
    feeds = {"inputs_embeds": embeds, "position_ids": split.positions}
    if dense is not None:  # per position of the NEW tokens only (the prefix's is zero)
        feeds["deepstack"] = dense

    entries = [cache.get(parts, ids) if len(ids) else None for ids in split.prefix_ids]
    shared = all(e is entries[0] for e in entries) and lens[0] == pmax
    for i in range(2 * parts.num_layers):
        if shared:  # the usual case: every row has the same prefix
            past = entries[0][i] if bsz == 1 else np.repeat(entries[0][i], bsz, axis=0)
        else:
            past = np.zeros((bsz, parts.kv_heads, pmax, parts.head_dim), dtype=parts.np_dtype)
            for b, (e, p) in enumerate(zip(entries, lens)):
                if e is not None:
                    past[b, :, pmax - p:] = e[i][0]
        feeds[f"past_{'key' if i % 2 == 0 else 'value'}_{i // 2}"] = past
    feeds["attention_mask"] = split.mask
    logits, presents = parts.decoder_step(feeds)
    cache.count(bsz, int(sum(lens)), bsz * split.ids.shape[1])
    return logits, presents, split.mask, split.deltas
