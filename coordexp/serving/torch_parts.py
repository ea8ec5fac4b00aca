"""The Hugging Face checkpoint in PyTorch behind the llm / vision_encoder steps (`--backend torch`).

`TorchParts` has the two methods the step logic calls on `OnnxParts` (`encode_images`, `generate`,
same arguments, same results), so the ONNX step code is reused as is: `VisionEncoder(TorchParts)`
is the vision step and `LlmBatcher(TorchParts)` the llm `Generator` (dynamic batches grouped by
decoding parameters, guided masks from `coordexp.guided`, `DecoupledRun` streaming).

Decoding runs the checkpoint's own modules (`model.model` with `mm_encoder_outputs`, `lm_head`)
with host-side M-RoPE positions (`coordexp.mrope`, as ONNX) and the token choice of `OnnxParts`
(numpy argmax / seeded sampling), so a served greedy answer equals HF `generate` token for token
in fp32. Options (`TorchOptions`): a static KV cache and `torch.compile` of the decode step, with
the batch padded up to a bucket so compiled graphs are reused. `jump_forward` (guided): the
grammar-forced tokens are fed with the chosen one as one chunk, as in `OnnxParts.generate` (not
with `compile`: its step is compiled for one new position).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from coordexp.generation import GenerationParams

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CACHES = ("dynamic", "static")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
LogitsHook = Callable[[int, Sequence[Sequence[int]], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TorchOptions:
    """How the PyTorch steps run: device (cuda|cpu), dtype (fp32|bf16|fp16), KV cache
    (dynamic|static), torch.compile of the decode step, batch buckets (static cache / compile)."""

    device: str = "cuda"
    dtype: str = "bf16"
    cache: str = "dynamic"
    compile: bool = False
    buckets: tuple[int, ...] = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.compile and self.cache != "static":
            # a dynamic cache changes shape every step: every step would recompile
            raise ValueError("compile needs the static KV cache (--kv-cache static)")
        if not self.buckets or sorted(self.buckets) != list(self.buckets) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive sizes, got {self.buckets}")

    def to_params(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "cache": self.cache, "compile": str(self.compile).lower(),
                "buckets": ",".join(str(b) for b in self.buckets)}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TorchOptions":
        d = cls()
        buckets = tuple(int(b) for b in params["buckets"].split(",")) if params.get("buckets") else d.buckets
        return cls(device=params.get("device") or d.device, dtype=params.get("dtype") or d.dtype,
                   cache=params.get("cache") or d.cache, compile=params.get("compile", "false") == "true",
                   buckets=buckets)

    def bucket(self, n: int) -> int:
        """The padded batch size for n rows (n itself past the largest bucket)."""
        return next((b for b in self.buckets if b >= n), n)


class TorchParts:
    """The checkpoint's model on `opts.device` in `opts.dtype`. `vision_only`: keep the vision tower
    and drop the language model (the vision_encoder step's process)."""

    def __init__(self, hf_dir: str | os.PathLike, opts: TorchOptions | None = None, vision_only: bool = False,
                 jump_forward: bool = False, prefix_cache: bool = False):
        import torch
        from transformers import AutoModelForImageTextToText

        self.torch = torch
        self.opts = opts or TorchOptions()
        # guided: grammar-forced tokens fed with the chosen one as one chunk (see `generate`); not with
        # torch.compile, whose decode step is compiled for one new position
        self.jump_forward = bool(jump_forward)
        # in flight (`TorchRows`): the shared prompt prefix's KV computed once (coordexp.engines.prefix_cache)
        self.prefix_cache = bool(prefix_cache)
        self.decoder_calls = 0  # model forwards so far (benchmarks)
        self.hf_dir = Path(hf_dir)
        self.onnx_dir = self.hf_dir  # where guided decoding finds the tokenizer (llm.guided_hook_factory)
        self.config = json.loads((self.hf_dir / "config.json").read_text(encoding="utf-8"))
        text, vision = self.config.get("text_config", self.config), self.config.get("vision_config", {})
        self.family = str(self.config.get("model_type"))
        self.merge = int(vision.get("spatial_merge_size", 2))
        self.image_token_id = int(self.config.get("image_token_id"))
        self.video_token_id = int(self.config.get("video_token_id", -1))
        self.num_deepstack = len(vision.get("deepstack_visual_indexes") or [])
        self.meta = {"family": self.family, "spatial_merge_size": self.merge, "hidden_size": text.get("hidden_size"),
                     "vision_start_token_id": self.config.get("vision_start_token_id")}
        self.dtype = getattr(torch, DTYPES[self.opts.dtype])
        model = AutoModelForImageTextToText.from_pretrained(str(self.hf_dir), dtype=self.dtype)
        if vision_only:
            model.model.language_model = None
            model.lm_head = None
        self.model = model.to(self.opts.device).eval()
        from coordexp.processor import CoordExpProcessor

        proc = CoordExpProcessor.from_pretrained(str(self.hf_dir))
        self.stop_ids = [int(t) for t in proc.stop_token_ids]
        self.pad_token_id = int(proc.pad_token_id)
        self._static: dict[int, Any] = {}  # bucket -> StaticCache
        self._step = self._forward
        if self.opts.compile:
            self._step = torch.compile(self._forward, fullgraph=False, dynamic=False)

    # -------------------------------------------------------------------------------- vision
    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(image_embeds [n_image_tokens, H], deepstack [n_deepstack, n_image_tokens, H])` float32."""
        torch = self.torch
        with torch.inference_mode():
            pv = torch.as_tensor(np.asarray(pixel_values), device=self.opts.device)
            grid = torch.as_tensor(np.asarray(image_grid_thw, dtype=np.int64), device=self.opts.device)
            out = self.model.model.get_image_features(pv, grid, return_dict=True)
            embeds = torch.cat(out.pooler_output, dim=0).float().cpu().numpy()
            feats = getattr(out, "deepstack_features", None) or []
            deep = (np.stack([torch.cat(f, dim=0).float().cpu().numpy() for f in feats]) if feats
                    else np.zeros((0,) + embeds.shape, np.float32))
        return embeds, deep

    # ---------------------------------------------------------------------------------- text
    def _forward(self, input_ids, attention_mask, position_ids, cache, image: Any = None):
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, use_cache=True, mm_encoder_outputs={"image": image} if image else None)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def _image_outputs(self, embeds: np.ndarray, deepstack: np.ndarray) -> Any:
        """Precomputed image features in the form the model's forward takes (`mm_encoder_outputs`)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        t = lambda a: self.torch.as_tensor(np.asarray(a), device=self.opts.device).to(self.dtype)  # noqa: E731
        out = BaseModelOutputWithPooling(pooler_output=(t(embeds),))
        if self.num_deepstack:
            out.deepstack_features = [(t(d),) for d in deepstack]
        return out

    def _cache(self, batch: int, length: int) -> Any:
        from transformers import DynamicCache, StaticCache

        if self.opts.cache == "dynamic":
            return DynamicCache(config=self.model.config.get_text_config())
        # one cache per batch bucket, its length rounded up so that compiled graphs are reused
        have = self._static.get(batch)
        if have is None or have[1] < length:
            size = -(-length // 256) * 256
            have = (StaticCache(config=self.model.config.get_text_config(), max_cache_len=size), size)
            self._static[batch] = have
        else:
            have[0].reset()
        return have[0]

    def _grow(self, mask: Any, filled: int, cache: Any, block: Any = None) -> Any:
        """The attention mask with the next positions on: `block` (a [B, W] 0/1 tensor, default one
        column of ones) at columns filled..filled+W-1. Static cache: a fixed [B, cache length] mask
        (future positions 0), so every decode step has the same shapes and a compiled step is
        reused; dynamic: W columns longer."""
        torch = self.torch
        if block is None:
            block = torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)
        if self.opts.cache == "static":
            if mask.shape[1] < self._static_len(cache):
                full = torch.zeros((mask.shape[0], self._static_len(cache)), dtype=mask.dtype, device=mask.device)
                full[:, :mask.shape[1]] = mask
                mask = full
            mask[:, filled:filled + block.shape[1]] = block
            return mask
        return torch.cat([mask, block], 1)

    def _static_len(self, cache: Any) -> int:
        return next(size for c, size in self._static.values() if c is cache)

    def _padded(self, input_ids: np.ndarray, attention_mask: np.ndarray, grid: np.ndarray, embeds: np.ndarray,
                deep: np.ndarray) -> tuple[np.ndarray, ...]:
        """Static cache / compile: repeat row 0 up to the batch bucket (its outputs are dropped)."""
        bsz = input_ids.shape[0]
        size = self.opts.bucket(bsz) if (self.opts.cache == "static" or self.opts.compile) else bsz
        if size == bsz:
            return input_ids, attention_mask, grid, embeds, deep
        extra = size - bsz
        n0 = int(np.prod(grid[0])) // self.merge ** 2
        return (np.concatenate([input_ids, np.repeat(input_ids[:1], extra, 0)]),
                np.concatenate([attention_mask, np.repeat(attention_mask[:1], extra, 0)]),
                np.concatenate([grid, np.repeat(grid[:1], extra, 0)]),
                np.concatenate([embeds] + [embeds[:n0]] * extra), np.concatenate([deep] + [deep[:, :n0]] * extra, 1))

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
                 image_embeds: np.ndarray, deepstack: np.ndarray, params: GenerationParams,
                 logits_hook: LogitsHook | None = None,
                 on_step: Callable[[list[list[int]], list[int]], None] | None = None) -> list[list[int]]:
        """`OnnxParts.generate` in PyTorch, the same loop (`coordexp.decoding.loop.decode_batch`):
        generated ids per row (stop excluded) of a LEFT padded batch, over `TorchFixedRows`."""
        from coordexp.decoding.loop import decode_batch

        rows = TorchFixedRows(self, self.pad_token_id, params.max_new_tokens)
        return decode_batch(rows, self.stop_ids, input_ids, attention_mask, image_grid_thw, image_embeds, deepstack,
                            params, logits_hook, on_step)

    def prefix_kv(self, prefix_ids: np.ndarray) -> list[Any]:
        """The KV `[k0, v0, ...]` (each `[1, kv_heads, P, head_dim]`) of a text prefix alone: positions
        0..P-1 on all three M-RoPE rows, no image (`coordexp.engines.prefix_cache` keeps it)."""
        from transformers import DynamicCache

        torch, dev = self.torch, self.opts.device
        n = len(prefix_ids)
        ids = torch.as_tensor(np.asarray(prefix_ids, dtype=np.int64)[None], device=dev)
        pos = torch.arange(n, device=dev).expand(3, 1, n)
        cache = DynamicCache(config=self.model.config.get_text_config())
        with torch.inference_mode():
            self.decoder_calls += 1
            self._forward(ids, torch.ones_like(ids), pos, cache)
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    def describe(self) -> dict[str, Any]:
        return {"hf_dir": str(self.hf_dir), "family": self.family, "prefix_cache": self.prefix_cache,
                **self.opts.to_params()}


class TorchRows:
    """`DecodeRows` (the in-flight scheduler, `coordexp.serving.inflight`) on `TorchParts`: one HF
    `DynamicCache` for the running batch, LEFT padded to the longest past as `OnnxRows` pads its
    cache (attention_mask 0 on the padding, positions per row), trimmed when the longest rows leave.
    A row's logits are those of its own prompt and tokens, so greedy answers equal `generate`'s.
    Dynamic cache only: a static cache (and `--compile`) has fixed shapes that rows cannot join."""

    def __init__(self, parts: TorchParts, pad_token_id: int):
        if parts.opts.cache != "dynamic":
            raise ValueError("in-flight batching needs the dynamic KV cache (rows join and leave the batch); "
                             "the static cache / --compile run static batches (--llm-batching static)")
        self.parts = parts
        self.pad_token_id = int(pad_token_id)
        self.cache: Any = None  # DynamicCache of the running rows, [B, kv_heads, P, head_dim] per layer
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, P]
        self.base = np.zeros(0, dtype=np.int64)  # prompt_len + M-RoPE delta per row
        self.steps = np.zeros(0, dtype=np.int64)  # tokens fed per row since its prefill

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def jump_forward(self) -> bool:
        return self.parts.jump_forward

    def _tensor(self, a: np.ndarray) -> Any:
        return self.parts.torch.as_tensor(np.ascontiguousarray(a), device=self.parts.opts.device)

    def admit(self, ids: np.ndarray, mask: np.ndarray, grid: np.ndarray, embeds: np.ndarray,
              deep: np.ndarray) -> np.ndarray:
        from transformers import DynamicCache

        from coordexp import mrope
        from coordexp.decoding.blocks import left_pad
        from coordexp.engines.prefix_cache import split_prompt

        p, torch = self.parts, self.parts.torch
        ids, mask, grid = (np.asarray(a, dtype=np.int64) for a in (ids, mask, grid))
        split = split_prompt(p, ids, mask, grid) if p.prefix_cache else None
        if split is None:
            pos, deltas = mrope.get_rope_index(ids, grid, mask, spatial_merge_size=p.merge,
                                               image_token_id=p.image_token_id, video_token_id=p.video_token_id)
        else:  # only the rest of each prompt runs, against the cached prefixes as its past
            ids, pos, deltas = split.ids, split.positions, split.deltas
        base = mask.sum(-1).astype(np.int64) + np.asarray(deltas, dtype=np.int64).reshape(-1)
        with torch.inference_mode():
            cache = DynamicCache(config=p.model.config.get_text_config())
            if split is not None:
                mask = split.mask
                self._past_of_prefixes(cache, split)
            p.decoder_calls += 1
            logits = p._forward(self._tensor(ids), self._tensor(mask), self._tensor(pos), cache,
                                p._image_outputs(embeds, deep))
            if len(self):  # join the running rows: both caches left padded to the longer past
                length = max(self.mask.shape[1], mask.shape[1])
                merged = [(torch.cat([left_pad(old.keys, length, 2), left_pad(new.keys, length, 2)]),
                           torch.cat([left_pad(old.values, length, 2), left_pad(new.values, length, 2)]))
                          for old, new in zip(self.cache.layers, cache.layers)]
                for layer, (k, v) in zip(self.cache.layers, merged):
                    layer.keys, layer.values = k, v
                mask = np.concatenate([left_pad(self.mask, length, 1), left_pad(mask, length, 1)], axis=0)
            else:
                self.cache = cache
        self.mask = mask
        self.base = np.concatenate([self.base, base])
        self.steps = np.concatenate([self.steps, np.zeros(len(base), dtype=np.int64)])
        return logits.cpu().numpy()

    def _past_of_prefixes(self, cache: Any, split: Any) -> None:
        """Fill an empty cache with each row's prefix KV (from the model's prefix cache), right
        aligned in `split.pmax` columns: the layout `split.mask` describes."""
        from coordexp.engines.prefix_cache import cache_of

        p, torch = self.parts, self.parts.torch
        prefixes = cache_of(p)
        entries = [prefixes.get(p, ids, lambda parts, i: parts.prefix_kv(i)) if len(ids) else None
                   for ids in split.prefix_ids]
        first = next(e for e in entries if e is not None)
        shared = all(e is first for e in entries)
        bsz, pmax = split.rows, split.pmax
        for i in range(len(first) // 2):
            kv = []
            for t in (2 * i, 2 * i + 1):
                if shared:  # the usual case: every row has the same prefix
                    kv.append(first[t].expand(bsz, -1, -1, -1))
                    continue
                past = torch.zeros((bsz, *first[t].shape[1:2], pmax, first[t].shape[3]), dtype=first[t].dtype,
                                   device=first[t].device)
                for b, (e, n) in enumerate(zip(entries, split.lens)):
                    if e is not None:
                        past[b, :, pmax - n:] = e[t][0]
                kv.append(past)
            cache.update(kv[0], kv[1], i)
        prefixes.count(bsz, int(sum(split.lens)), bsz * split.ids.shape[1])

    def step(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        from coordexp.decoding.blocks import chunk_block

        torch = self.parts.torch
        ids, new_mask, pos = chunk_block(chunks, self.base + self.steps, self.pad_token_id)
        mask = np.concatenate([self.mask, new_mask], axis=1)
        with torch.inference_mode():
            self.parts.decoder_calls += 1
            logits = self.parts._forward(self._tensor(ids), self._tensor(mask),
                                         self._tensor(np.broadcast_to(pos[None], (3,) + pos.shape)), self.cache)
        self.mask = mask
        self.steps = self.steps + np.asarray([len(c) for c in chunks], dtype=np.int64)
        return logits.cpu().numpy()

    def keep(self, positions: Sequence[int]) -> None:
        from coordexp.decoding.blocks import trimmed_start

        sel = np.asarray(positions, dtype=np.int64)
        if len(sel) == len(self):
            return
        self.mask, self.base, self.steps = self.mask[sel], self.base[sel], self.steps[sel]
        start = trimmed_start(self.mask)  # the padding columns no remaining row needs: cut them
        self.mask = np.ascontiguousarray(self.mask[:, start:])
        index = self._tensor(sel)
        with self.parts.torch.inference_mode():
            for layer in self.cache.layers:
                layer.keys = layer.keys[index][:, :, start:]
                layer.values = layer.values[index][:, :, start:]


class TorchFixedRows:
    """`DecodeRows` of one static batch on `TorchParts`, with fixed shapes: the batch is padded up to
    its bucket (static cache / compile: row 0 repeated, its outputs dropped) and no row ever leaves
    the tensors; rows that ended keep decoding pad ids (their tokens are dropped), as transformers'
    `generate` keeps them, so every step has the batch's shape (a compiled step is reused, and the
    batch is computed as the reference computes it). One admission only."""

    def __init__(self, parts: TorchParts, pad_token_id: int, max_new_tokens: int):
        self.parts = parts
        self.pad_token_id = int(pad_token_id)
        self.max_new_tokens = int(max_new_tokens)
        self.live: list[int] = []  # tensor row of each running row, batch order
        self.cache: Any = None
        self.t_mask: Any = None
        self.filled = 0  # cache positions written so far
        self.calls = 0  # decode steps so far
        self.base = np.zeros(0, dtype=np.int64)  # prompt_len + M-RoPE delta per tensor row
        self.fed = np.zeros(0, dtype=np.int64)  # tokens fed per tensor row since the prefill

    def __len__(self) -> int:
        return len(self.live)

    @property
    def jump_forward(self) -> bool:  # not under compile: its step is compiled for one new position
        return self.parts.jump_forward and not self.parts.opts.compile

    def admit(self, input_ids: np.ndarray, attention_mask: np.ndarray, grid: np.ndarray, embeds: np.ndarray,
              deep: np.ndarray) -> np.ndarray:
        from coordexp import mrope

        if self.cache is not None:
            raise RuntimeError("a static batch admits its rows once")
        p, torch = self.parts, self.parts.torch
        bsz = int(np.asarray(input_ids).shape[0])
        ids, mask, grid, embeds, deep = p._padded(np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64),
                                                  np.asarray(grid, np.int64), embeds, deep)
        pos, deltas = mrope.get_rope_index(ids, grid, mask, spatial_merge_size=p.merge, image_token_id=p.image_token_id,
                                           video_token_id=p.video_token_id)
        dev = p.opts.device
        with torch.inference_mode():  # the static cache's tensors are inference tensors: reset them in here
            self.cache = p._cache(ids.shape[0], ids.shape[1] + self.max_new_tokens)
            self.t_mask = torch.as_tensor(mask, device=dev)
            p.decoder_calls += 1
            logits = p._forward(torch.as_tensor(ids, device=dev), self.t_mask, torch.as_tensor(pos, device=dev),
                                self.cache, p._image_outputs(embeds, deep))
        self.filled = ids.shape[1]
        self.base = (mask.sum(-1) + deltas[:, 0]).astype(np.int64)
        self.fed = np.zeros(ids.shape[0], dtype=np.int64)
        self.live = list(range(bsz))
        return logits[:bsz].cpu().numpy()

    def step(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        p, torch = self.parts, self.parts.torch
        n, dev = len(self.base), p.opts.device
        width = max(len(c) for c in chunks)
        nxt = np.full((n, width), self.pad_token_id, np.int64)
        # rows that ended: pad ids at the positions a step would give them, attending (width 1) or not
        block = np.zeros((n, width), np.int64) if width > 1 else np.ones((n, 1), np.int64)
        pos = np.repeat((self.base + self.calls)[:, None], width, 1)
        for b, chunk in zip(self.live, chunks):
            pad = width - len(chunk)
            nxt[b, pad:] = chunk
            block[b, pad:] = 1
            pos[b] = self.base[b] + self.fed[b] + np.maximum(np.arange(width) - pad, 0)
            self.fed[b] += len(chunk)
        with torch.inference_mode():
            self.t_mask = p._grow(self.t_mask, self.filled, self.cache,
                                  torch.as_tensor(block, device=dev, dtype=self.t_mask.dtype))
            self.filled += width
            t_pos = torch.as_tensor(np.ascontiguousarray(np.broadcast_to(pos[None], (3,) + pos.shape)), device=dev)
            p.decoder_calls += 1
            logits = p._step(torch.as_tensor(nxt, device=dev), self.t_mask, t_pos, self.cache)
        self.calls += 1
        return logits[self.live].cpu().numpy()

    def keep(self, positions: Sequence[int]) -> None:
        self.live = [self.live[k] for k in positions]
