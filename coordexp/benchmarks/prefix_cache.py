"""The prefix cache's benchmark (issue 18, part 3): time to first token with and without the shared
prompt prefix's cached KV, side by side in one run, on one loaded model.

Time to first token here is what a batch-1 request waits for before its first token: the processor
(`encode`), the vision graph, the prefill and the first greedy choice (`generate` with one new
token). Both variants run on the SAME `OnnxParts` (same sessions, the flag toggled), interleaved
image by image with alternating order, so drift on a shared machine hits both alike. The cache is
filled by a warm-up call first: it is computed once per loaded model, not per request.

`bench/bench_decoding.py` reports the `prefix_cache.*` keys from `measure_prefix_cache`;
`python -m coordexp.benchmarks.prefix_cache ONNX_DIR DATA.jsonl` prints them alone.
"""
from __future__ import annotations

import statistics
import time
from typing import Any


def measure_prefix_cache(onnx_dir: str, data_jsonl: str, limit: int | None = None,
                         threads: int | None = None) -> dict[str, Any]:
    """`ttft_ratio` (median with / median without), `identical` (full greedy answers equal),
    `prefix_tokens`, `prefill_positions_without` / `_with` (median decoder positions per request's
    prefill), the medians in ms and the raw timings (seconds per image, in data order)."""
    from coordexp.dataset import iter_dataset
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.engines.prefix_cache import cache_of, prefix_lengths
    from coordexp.generation import GenerationParams

    items = [it for it in iter_dataset(data_jsonl) if it.ok]
    if limit is not None:
        items = items[:int(limit)]
    if not items:
        raise ValueError(f"{data_jsonl}: no readable records to benchmark")
    images = [it.pil_image() for it in items]  # decoded up front: not part of either variant's time
    engine = OnnxEngine(onnx_dir, threads=threads)
    parts, proc, prompt = engine.parts, engine.processor, engine.prompt
    first = GenerationParams(max_new_tokens=1)

    def ttft(image, cached: bool) -> tuple[float, list[int], int, int]:
        parts.prefix_cache = cached
        t0 = time.perf_counter()
        enc = proc.encode([image], prompt, return_tensors="np")
        embeds, deep = parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        rows = parts.generate(enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"], embeds, deep, first)
        dt = time.perf_counter() - t0
        n = int(enc["attention_mask"].sum())
        p = prefix_lengths(parts, enc["input_ids"], enc["attention_mask"])[0]
        return dt, rows[0], n, p

    try:
        for cached in (False, True):  # warm-up: sessions, allocator, and the cache entry itself
            ttft(images[0], cached)
        without, with_, firsts_equal, positions, prefixes = [], [], True, [], []
        for k, image in enumerate(images):
            order = (False, True) if k % 2 == 0 else (True, False)
            got = {}
            for cached in order:
                got[cached] = ttft(image, cached)
            without.append(got[False][0])
            with_.append(got[True][0])
            firsts_equal &= got[False][1] == got[True][1]
            positions.append(got[False][2])
            prefixes.append(got[True][3])
        stats_timed = cache_of(parts).stats()

        # full greedy answers, with and without (the outputs must not change)
        full = GenerationParams()
        answers = {}
        for cached in (False, True):
            parts.prefix_cache = cached
            answers[cached] = [engine.generate_batch([im], full)[0].token_ids for im in images]
        differ = [k for k, (a, b) in enumerate(zip(answers[False], answers[True])) if a != b]
    finally:
        parts.prefix_cache = False

    med_without, med_with = statistics.median(without), statistics.median(with_)
    pos_without = statistics.median(positions)
    pos_with = statistics.median(n - p for n, p in zip(positions, prefixes))
    return {
        "ttft_ratio": round(med_with / med_without, 4),
        "identical": not differ and firsts_equal,
        "differing_images": differ,
        "prefix_tokens": int(statistics.median(prefixes)),
        "prefill_positions_without": pos_without,
        "prefill_positions_with": pos_with,
        "positions_saved_per_request": pos_without - pos_with,
        "ttft_ms_without": round(1000 * med_without, 3),
        "ttft_ms_with": round(1000 * med_with, 3),
        "images": len(images),
        "answer_tokens": sum(len(a) for a in answers[False]),
        "threads": threads,
        "onnx_dir": str(parts.onnx_dir),
        "cache": stats_timed,
        "ttft_s_without": [round(t, 6) for t in without],
        "ttft_s_with": [round(t, 6) for t in with_],
    }


def format_table(r: dict[str, Any]) -> str:
    rows = [("", "without", "with prefix cache"),
            ("ttft p50 ms", f"{r['ttft_ms_without']:.2f}", f"{r['ttft_ms_with']:.2f}"),
            ("prefill positions / request", f"{r['prefill_positions_without']:g}", f"{r['prefill_positions_with']:g}")]
    lines = [f"{a:<30}{b:>12}{c:>20}" for a, b, c in rows]
    lines.append(f"ttft ratio (with / without) {r['ttft_ratio']:.3f}; prefix {r['prefix_tokens']} tokens; "
                 f"{r['images']} images; greedy answers identical: {r['identical']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx_dir", help="ONNX export or model repository")
    ap.add_argument("data", help="JSONL dataset")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    r = measure_prefix_cache(a.onnx_dir, a.data, a.limit, a.threads)
    print(format_table(r))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)
    return 0 if r["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
