"""Jump-forward decoding's benchmark (issue 18, part 1): guided greedy decoding with and without
jump-forward, and unguided, on the same images, side by side in one run, on one loaded model.

All three variants run on the SAME `OnnxEngine` (same sessions; `parts.jump_forward` toggled),
batch by batch in rotating order, so drift on a shared machine hits them alike. Each variant is
warmed up once first. Images are decoded up front; a variant's time is `generate_batch` (processor,
vision graph, prefill, decode loop, guided masks). Decoder calls come from `OnnxParts.decoder_calls`
(the prefill counts as one).

`bench/bench_decoding.py` reports the `jump_forward.*` keys from `measure_jump_forward`;
`python -m coordexp.benchmarks.jump_forward ONNX_DIR DATA.jsonl [--limit N]` prints them alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

VARIANTS = ("unguided", "guided", "guided_jf")


def measure_jump_forward(onnx_dir: str, data_jsonl: str, limit: int | None = None, max_new_tokens: int = 256,
                         threads: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    """`decoder_calls_ratio` (guided without / with jump-forward), `images_per_s_ratio` (with /
    without), `identical` (guided with == without, every row, token for token),
    `identical_to_unguided` (guided with jump-forward == unguided, every row), `forced_share`
    (share of the guided answers' tokens jump-forward appended without a model choice),
    `guided_jf_over_unguided_images_per_s`, and per variant the raw numbers (seconds, images/s,
    decoder calls, tokens), plus the rows that differ."""
    from coordexp.dataset import iter_dataset
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.generation import GenerationParams

    items = [it for it in iter_dataset(data_jsonl) if it.ok]
    if limit is not None:
        items = items[:int(limit)]
    if not items:
        raise ValueError(f"{data_jsonl}: no readable records to benchmark")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = [it.pil_image() for it in items]
    engine = OnnxEngine(onnx_dir, threads=threads)
    parts = engine.parts
    params = {"unguided": GenerationParams(max_new_tokens=max_new_tokens),
              "guided": GenerationParams(max_new_tokens=max_new_tokens, guided=True),
              "guided_jf": GenerationParams(max_new_tokens=max_new_tokens, guided=True)}
    stats = {v: {"seconds": 0.0, "decoder_calls": 0, "tokens": 0, "forced": 0, "length_cut": 0} for v in VARIANTS}
    answers: dict[str, list[list[int]]] = {v: [] for v in VARIANTS}

    def run(variant: str, batch: list) -> tuple[list, float, int, int]:
        parts.jump_forward = variant == "guided_jf"
        calls0 = parts.decoder_calls
        t0 = time.perf_counter()
        results = engine.generate_batch(batch, params[variant])
        dt = time.perf_counter() - t0
        forced = engine.guided.state.forced if engine.guided is not None else 0
        return results, dt, parts.decoder_calls - calls0, forced

    try:
        for v in VARIANTS:
            run(v, images[:1])
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        for k, batch in enumerate(batches):
            order = VARIANTS[k % 3:] + VARIANTS[:k % 3]
            got = {v: run(v, batch) for v in order}
            for v in VARIANTS:
                results, dt, calls, forced = got[v]
                st = stats[v]
                st["seconds"] += dt
                st["decoder_calls"] += calls
                st["forced"] += forced
                st["tokens"] += sum(len(r.token_ids) for r in results)
                st["length_cut"] += sum(r.finish_reason == "length" for r in results)
                answers[v] += [list(r.token_ids) for r in results]
    finally:
        parts.jump_forward = False

    n = len(images)
    for st in stats.values():
        st["images_per_s"] = n / st["seconds"] if st["seconds"] > 0 else 0.0
        st["decoder_calls_per_answer"] = st["decoder_calls"] / n
    differ = [k for k in range(n) if answers["guided"][k] != answers["guided_jf"][k]]
    differ_unguided = [k for k in range(n) if answers["guided_jf"][k] != answers["unguided"][k]]
    g, j, u = stats["guided"], stats["guided_jf"], stats["unguided"]
    return {
        "images": n, "batch_size": int(batch_size), "max_new_tokens": int(max_new_tokens),
        "decoder_calls_ratio": g["decoder_calls"] / max(1, j["decoder_calls"]),
        "images_per_s_ratio": j["images_per_s"] / g["images_per_s"] if g["images_per_s"] else 0.0,
        "identical": not differ, "identical_to_unguided": not differ_unguided,
        "forced_share": j["forced"] / max(1, j["tokens"]),
        "guided_jf_over_unguided_images_per_s": j["images_per_s"] / u["images_per_s"] if u["images_per_s"] else 0.0,
        "differing_rows": differ, "differing_rows_unguided": differ_unguided,
        **{v: {k: st[k] for k in ("seconds", "images_per_s", "decoder_calls", "decoder_calls_per_answer", "tokens",
                                  "length_cut")} for v, st in stats.items()},
    }


def format_table(res: dict[str, Any]) -> str:
    lines = [f"jump-forward, {res['images']} images, batch {res['batch_size']}, max_new_tokens {res['max_new_tokens']}",
             f"{'variant':<10} {'images/s':>9} {'calls/answer':>13} {'tokens':>7}"]
    for v in VARIANTS:
        st = res[v]
        lines.append(f"{v:<10} {st['images_per_s']:>9.2f} {st['decoder_calls_per_answer']:>13.1f} {st['tokens']:>7}")
    lines.append(f"decoder calls without/with {res['decoder_calls_ratio']:.2f}x, images/s with/without "
                 f"{res['images_per_s_ratio']:.2f}x, guided+jf / unguided images/s "
                 f"{res['guided_jf_over_unguided_images_per_s']:.2f}x, forced share {res['forced_share']:.1%}, "
                 f"identical {res['identical']}, identical to unguided {res['identical_to_unguided']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx_dir")
    ap.add_argument("data_jsonl")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    res = measure_jump_forward(a.onnx_dir, a.data_jsonl, a.limit, a.max_new_tokens, a.threads, a.batch_size)
    print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
