"""The OpenAI-compatible API beside direct gRPC (issue 24), and an external benchmark client.

    python bench/bench_openai.py [--repo REPO] [--requests 48] [--rounds 2] [--levels 1,8]
        [--aiperf .venv-bench/bin/aiperf] [--json OUT.json]

One `coordexp-server` (Triton + the API, its own process) serving the demo checkpoint (exported with
build_engine into --repo unless it is current there): `coordexp-client bench` over gRPC and over
`--openai-url`, unary and streamed, alternating rounds, then aiperf (NVIDIA's OpenAI benchmark client;
`make bench-tools` installs it into .venv-bench) at the same levels. `--json` keys:
`openai_over_grpc_images_per_s_c1`, `..._c8` (goal >= 0.9), `aiperf_over_bench_images_per_s_c*`,
`aiperf_over_bench_ttft_p50_c*`, and every path's images/s, latency and TTFT per level
(coordexp/benchmarks/openai_api.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    from coordexp.benchmarks.openai_api import DEMO_CKPT, OpenAIBenchOptions, find_aiperf, format_table, run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=os.path.join(ROOT, DEMO_CKPT))
    p.add_argument("--repo", default="/tmp/coordexp-bench-openai/repo", help="the repository served (exported here "
                   "from --ckpt unless current)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--aiperf", default=None, help="the aiperf command (default: $AIPERF, .venv-bench/bin/aiperf, PATH)")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from coordexp.export.build_engine import main as build_engine

    if build_engine(["--ckpt", a.ckpt, "--repo", a.repo, "--max-new-tokens", str(max(a.max_new_tokens, 96)),
                     "--threads", "2"]) != 0:
        return 1
    opts = OpenAIBenchOptions(repo=a.repo, levels=tuple(int(v) for v in a.levels.split(",") if v),
                              requests=a.requests, rounds=a.rounds, max_new_tokens=a.max_new_tokens,
                              aiperf=find_aiperf(a.aiperf))
    rep = run(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(rep))
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
