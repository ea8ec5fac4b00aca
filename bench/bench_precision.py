"""Which precision to serve on CPU: fp32 vs int8 / int4 ONNX weights vs torch bf16, served through
Triton at a shape-realistic size, plus each precision's accuracy parity on the demo checkpoint (issue 27).

    python bench/bench_precision.py [--shape 256m] [--engines onnx_fp32,onnx_int8,onnx_int4,torch_bf16]
        [--images 50] [--max-new-tokens 32] [--no-accuracy] [--json OUT.json]

`--json` keys: `best_over_fp32_images_per_s_c8_256m` (goal >= 2.5), `best_engine_256m`,
`accuracy_verdict_demo` ({engine: equivalent | different | inconclusive}), and per engine its export
seconds, peak RSS, images/s, p50/p99 latency and TTFT per level (coordexp/benchmarks/precision.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    from coordexp.benchmarks.precision import ENGINES, SHAPE_256M, PrecisionBenchOptions, format_table, run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("256m",), default="256m")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workdir", default="/tmp/coordexp-bench-precision")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy parity on the demo checkpoint")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    engines = tuple(e for e in a.engines.split(",") if e)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts = PrecisionBenchOptions(workdir=a.workdir, engines=engines, images=a.images,
                                 requests={1: min(16, a.images), 8: a.images}, max_new_tokens=a.max_new_tokens,
                                 shape=dict(SHAPE_256M), shape_name=a.shape,
                                 demo_ckpt=None if a.no_accuracy else os.path.join(ROOT, "checkpoints",
                                                                                   "coordexp-demo-shapes"),
                                 demo_gt=None if a.no_accuracy else os.path.join(ROOT, "data", "demo_val", "val.jsonl"))
    rep = run(opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(rep))
    for k in (f"best_over_fp32_images_per_s_c8_{a.shape}", f"best_engine_{a.shape}", "accuracy_verdict_demo"):
        if k in rep:
            print(f"{k}: {rep[k]}")
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
