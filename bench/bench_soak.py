"""Soak: greedy requests at concurrency 64 for N minutes against one server and then two replicas of a
served tiny checkpoint (loopback only, bounded by time), every answer compared with the sequential
answer for the same image, the servers' RSS (tritonserver + model stubs) sampled after every round.

    python bench/bench_soak.py --minutes 10 --json soak.json     # 10 min per configuration
    python bench/bench_soak.py --minutes 1                        # what tests/test_load.py does, longer

Writes: requests, errors, mismatches, requests/s, RSS samples and growth after the warm-up round.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="per configuration (one server, two replicas)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--round-size", type=int, default=256, help="requests between two RSS samples")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from coordexp.benchmarks.soak import sequential_answers, soak
    from coordexp.fixtures.tiny import build_tiny_checkpoint
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.export.onnx_export import export_onnx
    from coordexp.export.repository import write_repository
    from coordexp.generation import GenerationParams
    from coordexp.serving.server import start_server

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_load import _images  # the same images as the 1-minute test

    work = tempfile.mkdtemp(prefix="coordexp-soak-")
    ckpt = os.path.join(work, "ckpt")
    build_tiny_checkpoint(ckpt, family="qwen3_vl", seed=0)
    export_onnx(ckpt, os.path.join(work, "onnx"))
    repo = write_repository(os.path.join(work, "repo"), onnx_dir=os.path.join(work, "onnx"), ckpt=ckpt,
                            max_new_tokens=max(32, args.max_new_tokens), move_onnx=True)
    images = _images(24)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    servers = [start_server(repo), start_server(repo)]
    out: dict[str, object] = {"minutes_per_config": args.minutes, "concurrency": args.concurrency,
                              "max_new_tokens": args.max_new_tokens}
    try:
        with TritonEngine.connect([servers[0].grpc_url], ClientOptions(max_in_flight=1)) as one:
            reference = sequential_answers(one, images, params)
        opts = ClientOptions(max_in_flight=args.concurrency, timeout=300.0)
        for name, group in (("one_server", servers[:1]), ("two_replicas", servers)):
            with TritonEngine.connect([s.grpc_url for s in group], opts) as engine:
                res = soak(engine, images, params, reference, rounds=10**9, round_size=args.round_size,
                           server_pids=[s.proc.pid for s in group], deadline_s=args.minutes * 60)
            out[name] = res.to_dict()
            d = res.to_dict()
            print(f"{name:>12}: {d['requests']} requests in {d['seconds']:.0f} s ({d['requests_per_s']} req/s), "
                  f"errors {d['errors']}, mismatches {d['mismatches']}, RSS {d['rss_mb'][0]} -> "
                  f"max {max(d['rss_mb'])} MB (growth after warm-up {d['rss_growth_mb']} MB)", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    ok = all(out[k]["errors"] == 0 and out[k]["mismatches"] == 0 for k in ("one_server", "two_replicas"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
