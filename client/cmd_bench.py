"""`coordexp-client bench`: throughput and latency of a served model over a sweep of concurrencies.

    coordexp-client bench --url localhost:8001 --synthetic 32 --size 128 --concurrency 1,2,4,8 \\
        --max-new-tokens 32 --ignore-eos --baseline onnx --ckpt model_repository/coordexp-demo --out runs/bench

Per concurrency level C, C workers each send one request at a time (perf_analyzer's
"concurrency mode") until `--requests` requests are answered; `--warmup` requests before each
level are not counted. Metrics use GenAI-Perf's names: `request_throughput` (requests/s; one
image per request, so also images/s), `output_token_throughput` (tokens/s), `request_latency`
(ms: avg, min, max, p50, p90, p99, std), `output_sequence_length`, and with `--stream`
`time_to_first_token` and `inter_token_latency` (ms, same statistics).

`--stream` sends the requests to the streaming ensemble (`<model>_stream`: the same pipeline with
a decoupled llm, one response per generated token) over the gRPC stream API. Time to first token
is from sending the request to the first response carrying a token; inter-token latency is, per
request, (last token's arrival - first token's arrival) / (tokens - 1). Without `--stream` the two
are null (one response per request: there is no first token to time) and bench.json says so.

`--baseline torch|onnx --ckpt CKPT` runs the same inputs through the in-process engine
(coordexp.engines.load_engine, one image at a time) in the same run, after the sweep, and
prints the served/in-process throughput ratio per level. `--max-new-tokens` with `--ignore-eos`
fixes the output length, so that every request does the same work.

Writes `<out>/bench.json` and `<out>/bench.png` (throughput and latency vs concurrency).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from coordexp.client.options import (add_decoding_args, add_openai_args, add_prompt_args, add_prompt_source_args,
                                     openai_prompt, params_from_args, prompt_overrides)

STREAMING_NOTE = ("time_to_first_token and inter_token_latency are null: unary requests get one response each, "
                  "so there is no first token to time; pass --stream to bench the streaming ensemble")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput / latency sweep over concurrency levels against Triton",
                       description="Benchmark a served CoordExp model at several concurrencies "
                                   "(GenAI-Perf metric names), optionally against the in-process engine.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="input JSONL: its valid records are the requests")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic shapes images (coordexp.fixtures.synthetic)")
    p.add_argument("--size", type=int, default=128, help="synthetic image size in pixels (default 128)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument("--url", action="append", default=[], help="HOST:PORT of a Triton gRPC endpoint; repeatable")
    p.add_argument("--model", default="coordexp", help="served model (ensemble) name")
    p.add_argument("--stream", action="store_true",
                   help="bench the streaming ensemble (<model>_stream) over the gRPC stream API and measure "
                        "time_to_first_token / inter_token_latency")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="measured requests per level (default: one per input, at least 2x the level)")
    p.add_argument("--warmup", type=int, default=None,
                   help="requests before each level that are not measured (default: the level, at least 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--baseline", choices=("torch", "onnx"), help="also measure this in-process engine")
    p.add_argument("--ckpt", help="checkpoint (torch) or export folder / repository (onnx) for --baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the baseline engine")
    p.add_argument("--out", default=None,
                   help="folder for bench.json and bench.png (default: runs/bench/<UTC date and time>)")
    add_openai_args(p)
    add_prompt_source_args(p.add_argument_group("prompt source (--openai-url to a server that is not ours)"))
    add_decoding_args(p)
    p.set_defaults(max_new_tokens=64)  # a short fixed budget keeps sweeps quick
    add_prompt_args(p)
    p.set_defaults(func=run)


def _out_dir(args: argparse.Namespace) -> str:
    """--out, made (default: runs/bench/<UTC date and time>: never an earlier bench's folder)."""
    if args.out is None:
        import datetime as _dt

        args.out = os.path.join("runs", "bench", _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    os.makedirs(args.out, exist_ok=True)
    return args.out


def run(args: argparse.Namespace) -> int:
    from coordexp.benchmarks import serve as B
    from coordexp.benchmarks.report import level_row, plot
    from coordexp.engines.triton.interface import served_prompt
    from coordexp.engines.triton.connect import PreflightError

    try:
        levels = B.parse_levels(args.concurrency)
        params = params_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.baseline and not args.ckpt:
        print("error: --baseline needs --ckpt", file=sys.stderr)
        return 2
    if bool(args.url) == bool(args.openai_url):
        print("error: give --url HOST:PORT (Triton, repeatable) or --openai-url URL (one of them)", file=sys.stderr)
        return 2
    try:
        full_prompt, parts = openai_prompt(args) if args.openai_url else (None, None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data:
        if not os.path.isfile(args.data):
            print(f"error: input dataset not found: {args.data}", file=sys.stderr)
            return 2
        inputs, skipped = B.dataset_inputs(args.data)
        source = {"source": os.path.abspath(args.data), "count": len(inputs), "skipped_invalid": skipped}
    else:
        if args.synthetic < 1:
            print("error: --synthetic needs N >= 1", file=sys.stderr)
            return 2
        inputs = B.synthetic_inputs(args.synthetic, args.size, args.data_seed)
        source = {"source": "synthetic", "count": len(inputs), "size": args.size, "seed": args.data_seed}
    if not inputs:
        print("error: no valid input image to send", file=sys.stderr)
        return 2
    opts = B.SweepOptions(urls=tuple(args.url), levels=tuple(levels), model=args.model, stream=args.stream,
                          requests=args.requests, warmup=args.warmup, timeout=args.timeout, retries=args.retries,
                          user_text=args.user_text if parts is None else parts, prompt_overrides=prompt_overrides(args),
                          explicit_max_new_tokens=args.max_new_tokens is not None,
                          explicit_repetition_penalty=args.repetition_penalty is not None,
                          openai_url=args.openai_url, openai_model=args.openai_model, api_key=args.api_key,
                          openai_prompt=full_prompt)
    done: list = []
    started = time.perf_counter()
    try:
        served = asyncio.run(B.sweep(opts, params, inputs, done=done))
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the levels that finished, said to be a partial sweep
        out = _out_dir(args)
        path = os.path.join(out, "bench.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"schema_version": "coordexp.bench.v1", "interrupted": True, "params": params.to_dict(),
                       "seconds_until_interrupt": round(time.perf_counter() - started, 3), "levels": done,
                       "inputs": source}, f, indent=2)
        print(f"interrupted: {len(done)} of {len(levels)} levels finished; they are in {path}", file=sys.stderr)
        return 130
    notes = [] if args.stream else [STREAMING_NOTE]
    report = B.bench_report(served, source, params, opts, notes)
    if args.baseline:
        n = args.requests or len(inputs)
        prompt = served_prompt(served["manifest"], args.user_text)
        print(f"baseline: in-process {args.baseline} engine from {args.ckpt} ({n} requests, one at a time)",
              file=sys.stderr)
        try:
            base = B.run_baseline(args.baseline, args.ckpt, inputs, n, max(1, min(2, args.warmup or 2)), params,
                                  prompt, args.threads)
        except (FileNotFoundError, OSError, ValueError) as e:
            print(f"error: cannot load the {args.baseline} baseline from {args.ckpt}: {e}", file=sys.stderr)
            return 2
        print(level_row(base["metrics"], label=f"in-proc {args.baseline}"))
        B.add_baseline(report, served, base, args.baseline, os.path.abspath(args.ckpt))
        print("served / in-process throughput: " + ", ".join(
            f"c={r['concurrency']}: x{r['request_throughput_ratio']}" for r in report["ratios"]))
    _out_dir(args)
    jpath = os.path.join(args.out, "bench.json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    ppath = plot(report, os.path.join(args.out, "bench.png"))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {jpath} and {ppath}", file=sys.stderr)
    return 0
