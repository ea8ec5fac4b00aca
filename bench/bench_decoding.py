"""Decoding benchmark of issue 18 (jump-forward, in-flight batching, serving overhead, prefix cache).

    python bench/bench_decoding.py [--json OUT.json] [--quick] [--repo runs/demo/model_repository]
        [--ckpt checkpoints/coordexp-demo-shapes] [--data data/demo_val/val.jsonl] [--requests 48]

Side by side in one run on the demo checkpoint (see coordexp/benchmarks/decoding.py for what each
figure is): in-flight vs static batching of the streamed llm at concurrency 1/4/16,
served unary at concurrency 8 vs in-process ONNX Runtime at batch 8, and the jump-forward and
prefix-cache measurements, and the same in-flight vs static sweep on `--backend torch` (CPU, fp32).
`--json` writes the report with the keys the issues name (`inflight.ttft_p50_c4_over_c1`,
`inflight.images_per_s_c16_ratio`, `inflight_torch.*`, `served_c8_over_inprocess_b8`,
`jump_forward.*`, `prefix_cache.*`). `--quick`: fewer requests and records (a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    from coordexp.benchmarks.decoding import DEMO_CKPT, DEMO_DATA, DEMO_REPO, DecodingOptions, format_table, run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=os.path.join(ROOT, DEMO_CKPT))
    p.add_argument("--repo", default=os.path.join(ROOT, DEMO_REPO),
                   help="repository whose ONNX export is used (else --onnx-dir, else exported from --ckpt)")
    p.add_argument("--onnx-dir", default=None)
    p.add_argument("--data", default=os.path.join(ROOT, DEMO_DATA))
    p.add_argument("--workdir", default="/tmp/coordexp-bench-decoding")
    p.add_argument("--requests", type=int, default=48, help="measured requests per level and server")
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="records for jump-forward / prefix cache")
    p.add_argument("--skip", default="", help="comma list: inflight,torch,overhead,jump_forward,prefix_cache")
    p.add_argument("--quick", action="store_true", help="16 requests per level, 16 overhead images, 8 records")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts = DecodingOptions(ckpt=a.ckpt, onnx_dir=a.onnx_dir, repo=a.repo if os.path.isdir(a.repo) else None,
                           data=a.data, workdir=a.workdir, levels=tuple(int(v) for v in a.levels.split(",") if v),
                           requests=16 if a.quick else a.requests, max_batch_size=a.max_batch_size,
                           max_new_tokens=a.max_new_tokens, overhead_images=16 if a.quick else 32,
                           threads=a.threads, limit=8 if a.quick and a.limit is None else a.limit,
                           skip=tuple(s for s in a.skip.split(",") if s))
    report = run(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"\nCoordExp decoding benchmark: {report['records']} records of {opts.data}, {os.cpu_count()} CPUs")
    print(format_table(report))
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
