"""The measurements of `run_gpu_check.py` (run A: correctness, run B: speed), one function each.

In-process timings use the served step logic itself (`TorchParts` behind `VisionEncoder` /
`LlmBatcher`), so they are what the `llm` step spends; served numbers go through the real Triton
with the client's bench library (`coordexp.benchmarks.serve.sweep`). CUDA timings are synchronous:
every decoding step copies its logits to the host, and `_sync` waits before each clock read.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

# Qwen3-VL-2B-Instruct's public config (text 2048 x 28 layers, 16 heads / 8 KV heads of 128,
# MLP 6144; vision 1024 x 24, patch 16, merge 2, deepstack at 5/11/17), for shape-realistic
# random weights. init_std 0.02: the tiny default (0.2) overflows bf16 at this depth.
QWEN3_VL_2B = dict(text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=8, head_dim=128,
                   text_intermediate=6144, vision_hidden=1024, vision_layers=24, vision_heads=16,
                   vision_intermediate=4096, patch_size=16, merge_size=2, temporal_patch_size=2,
                   deepstack_visual_indexes=[5, 11, 17], init_std=0.02, max_image_side=512)
SMALL = dict(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=16, text_intermediate=128,
             vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, patch_size=16,
             merge_size=2, temporal_patch_size=2)


@dataclass(frozen=True)
class CheckOptions:
    device: str = "cuda"
    dtype: str = "bf16"  # run B; run A is always fp32
    small: bool = False  # CPU test sizes
    images: int = 50  # run A: demo val images
    new_tokens: int = 64  # run B: tokens per request (ignore_eos)
    levels: tuple[int, ...] = (1, 8, 32)
    batches: tuple[int, ...] = (1, 8)
    image_size: int = 448
    compile: bool = False  # run B: also the static cache with torch.compile (compile time not timed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


# ------------------------------------------------------------------------------------------ run A
def demo_images(data_jsonl: str, n: int) -> list[bytes]:
    from coordexp.benchmarks.serve import dataset_inputs

    return dataset_inputs(data_jsonl)[0][:n]


def served_tokens(url: str, images: Sequence[bytes], params: Any, stream: bool = False) -> list[list[int] | str]:
    """One request per image through the shipped client's pool (unary or the streaming ensemble)."""
    from coordexp import wire
    from coordexp.engines.triton.pool import ServerPool

    async def go():
        model = wire.stream_ensemble_name(wire.ENSEMBLE) if stream else wire.ENSEMBLE
        pool, _ = await ServerPool.connect([url], model, timeout=600.0, retries=0)
        try:
            out = []
            for b in images:
                res, _ = await pool.generate(b, params, stream=stream)
                out.append(res.error or res.token_ids)
            return out
        finally:
            await pool.close()

    return asyncio.run(go())


def run_a(ckpt: str, url: str, images: Sequence[bytes], max_new: int, log=print) -> dict[str, Any]:
    """Served (unary, streamed, guided) on `url` vs the CPU fp32 HF-generate reference, per image."""
    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.generation import GenerationParams

    t0 = time.perf_counter()
    ref = TorchEngine(ckpt, device="cpu", dtype="float32")
    out: dict[str, Any] = {"images": len(images), "modes": {}}
    for mode, guided, stream in (("unary", False, False), ("streamed", False, True), ("guided", True, False)):
        params = GenerationParams(max_new_tokens=max_new, guided=guided)
        expected = [ref.generate_ids([_pil(b)], params)[0][0] for b in images]
        got = served_tokens(url, images, params, stream=stream)
        same = sum(e == g for e, g in zip(expected, got))
        first = next((i for i, (e, g) in enumerate(zip(expected, got)) if e != g), None)
        out["modes"][mode] = {"identical": same, "of": len(images), "first_difference": first}
        log(f"run A {mode:<9}: {same}/{len(images)} answers token-identical to the CPU fp32 reference")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["ok"] = all(m["identical"] == m["of"] for m in out["modes"].values())
    return out


# ------------------------------------------------------------------------------------------ run B
def random_checkpoint(out_dir: str, small: bool) -> str:
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        build_tiny_checkpoint(out_dir, family="qwen3_vl", seed=0, size=dict(SMALL if small else QWEN3_VL_2B))
    return out_dir


def _timed_generate(parts: Any, proc: Any, images: list, new_tokens: int) -> float:
    """Seconds of vision + prefill + `new_tokens` greedy steps for this batch, through TorchParts."""
    import numpy as np

    from coordexp.generation import GenerationParams
    from coordexp.prompt import PromptSpec

    enc = proc.encode(images, PromptSpec())
    _sync(parts.opts.device)
    t0 = time.perf_counter()
    emb, deep = parts.encode_images(enc["pixel_values"].numpy(), enc["image_grid_thw"].numpy())
    parts.generate(enc["input_ids"].numpy(), enc["attention_mask"].numpy(), np.asarray(enc["image_grid_thw"]),
                   emb, deep, GenerationParams(max_new_tokens=new_tokens, ignore_eos=True))
    _sync(parts.opts.device)
    return time.perf_counter() - t0


def _timed_hf(engine: Any, images: list, new_tokens: int) -> float:
    from coordexp.generation import GenerationParams

    _sync(engine.device)
    t0 = time.perf_counter()
    engine.generate_ids(images, GenerationParams(max_new_tokens=new_tokens, ignore_eos=True))
    _sync(engine.device)
    return time.perf_counter() - t0


def decode_numbers(time_of, images: list, batches: Sequence[int], new_tokens: int) -> dict[str, Any]:
    """TTFT (vision + prefill + 1 token, batch 1) and ms per output token ((t(N) - t(1)) / (N - 1))."""
    out: dict[str, Any] = {}
    for b in batches:
        batch = (images * b)[:b]
        time_of(batch, 2)  # warm-up (allocations, kernels, compile)
        one = min(time_of(batch, 1) for _ in range(2))
        full = time_of(batch, new_tokens)
        out[f"batch_{b}"] = {"ttft_ms": round(one * 1000, 2),
                             "ms_per_token": round((full - one) * 1000 / max(1, new_tokens - 1), 3),
                             "tokens_per_s": round(b * new_tokens / full, 2)}
    return out


def vision_ms(parts: Any, proc: Any, images: list, repeats: int = 5) -> float:
    from coordexp.prompt import PromptSpec

    enc = proc.encode(images[:1], PromptSpec())
    pv, grid = enc["pixel_values"].numpy(), enc["image_grid_thw"].numpy()
    parts.encode_images(pv, grid)
    _sync(parts.opts.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        parts.encode_images(pv, grid)
    _sync(parts.opts.device)
    return round((time.perf_counter() - t0) * 1000 / repeats, 2)


def run_b_in_process(ckpt: str, opts: CheckOptions, log=print) -> dict[str, Any]:
    """Vision ms/image; TTFT and ms/token at each batch for dynamic and static cache; HF generate."""
    from coordexp.benchmarks.serve import synthetic_inputs
    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.processor import CoordExpProcessor
    from coordexp.prompt import PromptSpec
    from coordexp.serving.torch_parts import DTYPES, TorchOptions, TorchParts

    images = [_pil(b) for b in synthetic_inputs(2, opts.image_size, seed=1)]
    proc = CoordExpProcessor.from_pretrained(ckpt)
    out: dict[str, Any] = {}
    variants = [("dynamic", False), ("static", False)] + ([("static", True)] if opts.compile else [])
    for cache, compiled in variants:
        parts = TorchParts(ckpt, TorchOptions(device=opts.device, dtype=opts.dtype, cache=cache, compile=compiled))
        key = f"torch_{cache}" + ("_compiled" if compiled else "")
        if cache == "dynamic":
            out["vision_ms_per_image"] = vision_ms(parts, proc, images)
            grid = proc.encode(images[:1], PromptSpec())["image_grid_thw"]
            out["image_tokens"] = int(grid.prod()) // parts.merge ** 2
        out[key] = decode_numbers(lambda b, n: _timed_generate(parts, proc, b, n), images, opts.batches,
                                  opts.new_tokens)  # its warm-up call compiles
        log(f"run B {key}: {json.dumps(out[key])}")
        del parts
    hf = TorchEngine(ckpt, device=opts.device, dtype=DTYPES[opts.dtype])
    out["hf_generate"] = decode_numbers(lambda b, n: _timed_hf(hf, b, n), images, opts.batches, opts.new_tokens)
    log(f"run B HF generate: {json.dumps(out['hf_generate'])}")
    return out


def run_b_served(url: str, opts: CheckOptions, log=print) -> dict[str, Any]:
    """requests/s (and latency) at each concurrency, unary, through the client's bench library."""
    from coordexp.benchmarks.serve import SweepOptions, sweep, synthetic_inputs
    from coordexp.generation import GenerationParams

    inputs = synthetic_inputs(16, opts.image_size, seed=2)
    sweep_opts = SweepOptions(urls=(url,), levels=tuple(opts.levels), requests=None, warmup=None, retries=0)
    res = asyncio.run(sweep(sweep_opts, GenerationParams(max_new_tokens=opts.new_tokens, ignore_eos=True),
                            inputs, log=log))
    return {f"concurrency_{m['concurrency']}": {"requests_per_s": m["request_throughput"]["avg"],
                                                "p50_ms": m["request_latency"]["p50"], "errors": m["errors"]}
            for m in res["levels"]}


def run_c(ckpt: str, device: str, dtype: str, data_jsonl: str, n: int, out_dir: str, max_new: int,
          log=print) -> dict[str, Any]:
    """Run C: accuracy parity of `dtype` on `device` against the CPU fp32 reference on labelled images
    (the torch engine in process, through the one dataset loop; `coordexp.runs.equivalence`)."""
    from coordexp.benchmarks.accuracy import EngineSpec, run_spec
    from coordexp.dataset import copy_records
    from coordexp.runs.equivalence import compare_accuracy, score_run

    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, "data.jsonl")
    copy_records(data_jsonl, data, n)
    ref = run_spec(EngineSpec.parse(f"torch:{ckpt}"), data, os.path.join(out_dir, "cpu_fp32"), max_new, log=log)
    cand = run_spec(EngineSpec.parse(f"torch:{ckpt},dtype={dtype},device={device}"), data,
                    os.path.join(out_dir, f"{device}_{dtype}"), max_new, log=log)
    pair = compare_accuracy(score_run("cpu fp32", ref, data), score_run(f"{device} {dtype}", cand, data))
    log(f"run C: {device} {dtype} vs CPU fp32: {pair['verdict']} ({pair['why']})")
    return {k: pair[k] for k in ("candidate", "reference", "images", "verdict", "why", "images_needed", "metrics",
                                 "token_agreement", "prediction_agreement", "image_flips")}
