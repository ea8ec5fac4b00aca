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
import datetime as _dt
import io
import json
import os
import sys
import time
from typing import Any, Sequence

from coordexp.client.options import add_decoding_args, add_prompt_args, params_from_args

STREAMING_NOTE = ("time_to_first_token and inter_token_latency are null: unary requests get one response each, "
                  "so there is no first token to time; pass --stream to bench the streaming ensemble")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput / latency sweep over concurrency levels against Triton",
                       description="Benchmark a served CoordExp model at several concurrencies "
                                   "(GenAI-Perf metric names), optionally against the in-process engine.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="input JSONL: its valid records are the requests")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic shapes images (coordexp.synthetic)")
    p.add_argument("--size", type=int, default=128, help="synthetic image size in pixels (default 128)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument("--url", action="append", required=True, help="HOST:PORT of a Triton gRPC endpoint; repeatable")
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
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    add_decoding_args(p)
    p.set_defaults(max_new_tokens=64)  # a short fixed budget keeps sweeps quick
    add_prompt_args(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_inputs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """N PNG-encoded synthetic shapes images (reproducible)."""
    import numpy as np

    from coordexp.synthetic import sample

    out = []
    for i in range(n):
        img, _ = sample(np.random.default_rng([seed, i]), size)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def dataset_inputs(path: str) -> tuple[list[bytes], int]:
    """Image bytes of the valid records of a JSONL, and how many records were skipped."""
    from coordexp.dataset import iter_dataset

    good, skipped = [], 0
    for item in iter_dataset(path):
        if item.ok:
            good.append(item.image_bytes)
        else:
            skipped += 1
    return good, skipped


# ---------------------------------------------------------------------------------------------
# Metrics (GenAI-Perf names and units)


def latency_stats(seconds: Sequence[float]) -> dict[str, Any]:
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {"unit": "ms", "avg": None, "min": None, "max": None, "p50": None, "p90": None, "p99": None,
                "std": None}
    r = lambda v: round(float(v), 3)  # noqa: E731
    return {"unit": "ms", "avg": r(ms.mean()), "min": r(ms.min()), "max": r(ms.max()),
            "p50": r(np.percentile(ms, 50)), "p90": r(np.percentile(ms, 90)), "p99": r(np.percentile(ms, 99)),
            "std": r(ms.std())}


def level_metrics(concurrency: int, latencies: Sequence[float], tokens: Sequence[int], errors: int,
                  wall: float, first_token: Sequence[float] | None = None,
                  inter_token: Sequence[float] | None = None) -> dict[str, Any]:
    """One level's numbers from the successful requests' latencies (s) and output lengths (and,
    streamed, their times to first token and mean inter-token times, s)."""
    import numpy as np

    n = len(latencies)
    rate = n / wall if wall > 0 else 0.0
    toks = np.asarray(tokens, dtype=np.float64)
    return {
        "concurrency": concurrency,
        "requests": n,
        "errors": errors,
        "duration_s": round(wall, 4),
        "request_throughput": {"unit": "requests/sec", "avg": round(rate, 4)},
        "images_per_s": round(rate, 4),
        "output_token_throughput": {"unit": "tokens/sec", "avg": round(float(toks.sum()) / wall, 4) if wall > 0 else 0.0},
        "request_latency": latency_stats(latencies),
        "output_sequence_length": {"unit": "tokens", "avg": round(float(toks.mean()), 3) if n else None,
                                   "min": int(toks.min()) if n else None, "max": int(toks.max()) if n else None},
        "time_to_first_token": latency_stats(first_token) if first_token is not None else None,
        "inter_token_latency": latency_stats(inter_token) if inter_token is not None else None,
    }


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--concurrency {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not levels or any(v < 1 for v in levels):
        raise ValueError(f"--concurrency {text!r}: levels must be >= 1")
    return sorted(dict.fromkeys(levels))


# ---------------------------------------------------------------------------------------------
# Served model


async def drive(pool, inputs: Sequence[bytes], concurrency: int, n: int, params, user_text: str | None,
                texts: dict[int, str] | None = None, stream: bool = False) -> dict[str, Any]:
    """`concurrency` workers, one request in flight each, until `n` requests are answered.
    Returns latencies of successes (s), their output lengths, error count, wall seconds and, streamed,
    times to first token and mean inter-token times (s)."""
    import asyncio

    counter = iter(range(n))
    lat: list[float] = []
    toks: list[int] = []
    ttft: list[float] = []
    itl: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            data = inputs[i % len(inputs)]
            t0 = time.perf_counter()
            gen, facts = await pool.generate(data, params, user_text, stream=stream)
            dt = time.perf_counter() - t0
            timing = facts.get("timing")
            if timing is not None and timing.end_s is not None and facts.get("attempts", 1) == 1:
                dt = timing.end_s  # the final response's arrival (not the stream's close after it)
            if gen.error:
                errors += 1
                continue
            lat.append(dt)
            toks.append(len(gen.token_ids))
            if timing is not None and timing.first_token_s is not None:
                ttft.append(timing.first_token_s)
                if timing.inter_token_s is not None:
                    itl.append(timing.inter_token_s)
            if texts is not None and i < len(inputs):
                texts[i] = gen.text

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": lat, "tokens": toks, "errors": errors, "wall": time.perf_counter() - t0,
            "first_token": ttft if stream else None, "inter_token": itl if stream else None}


async def sweep(args, params, inputs: list[bytes], levels: list[int], user_text: str | None,
                log=print) -> dict[str, Any]:
    from coordexp.client.remote import (PreflightError, ServerPool, manifest_summary, normalise_url,
                                        request_problems, prompt_variant, fit_params_to_server)

    model = stream_model(args.model) if args.stream else args.model
    try:
        pool, manifest = await ServerPool.connect([normalise_url(u) for u in args.url], model,
                                                  preflight_timeout=10.0, timeout=args.timeout, retries=args.retries,
                                                  wait_for_server=30.0)
    except PreflightError as e:
        if args.stream:
            raise PreflightError(f"{e} (--stream needs the streaming ensemble {model!r}: export without "
                                 "--no-stream)") from None
        raise
    try:
        params = fit_params_to_server(params, manifest, args)
        problems = request_problems(pool.iface, manifest, params, user_text, args)
        if problems:
            raise PreflightError("; ".join(problems))
        results = []
        texts: dict[int, str] = {}
        log(HEADER)
        for c in levels:
            n = args.requests or max(len(inputs), 2 * c)
            warm = args.warmup if args.warmup is not None else max(2, c)
            if warm:
                await drive(pool, inputs, c, warm, params, user_text, stream=args.stream)
            d = await drive(pool, inputs, c, n, params, user_text, texts, stream=args.stream)
            m = level_metrics(c, d["latencies"], d["tokens"], d["errors"], d["wall"], d["first_token"],
                              d["inter_token"])
            results.append(m)
            log(_row(m))
        return {"levels": results, "texts": texts, "manifest": manifest, "iface": pool.iface,
                "servers": pool.stats(), "retries": pool.total_retries,
                "server": {"urls": [s.url for s in pool.servers], "model": model,
                           "model_version": pool.iface.version, "max_batch_size": pool.iface.max_batch_size,
                           "decoupled": pool.iface.decoupled, "manifest": manifest_summary(manifest)},
                "prompt_variant": prompt_variant(manifest, user_text)}
    finally:
        await pool.close()


# ---------------------------------------------------------------------------------------------
# In-process baseline


def run_baseline(kind: str, ckpt: str, inputs: Sequence[bytes], n: int, warmup: int, params, prompt,
                 threads: int | None = None) -> dict[str, Any]:
    """The in-process engine on the same inputs, one image per call (concurrency 1)."""
    from PIL import Image

    from coordexp.engines import load_engine

    engine = load_engine(kind, ckpt, prompt=prompt, threads=threads)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in inputs]
    for i in range(warmup):
        engine.generate_batch([images[i % len(images)]], params)
    lat, toks, errors, texts = [], [], 0, {}
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        try:
            gen = engine.generate_batch([images[i % len(images)]], params)[0]
        except Exception:
            errors += 1
            continue
        lat.append(time.perf_counter() - t)
        toks.append(len(gen.token_ids))
        if i < len(images):
            texts[i] = gen.text
    wall = time.perf_counter() - t0
    m = level_metrics(1, lat, toks, errors, wall)
    m["engine"] = engine.describe()
    return {"metrics": m, "texts": texts}


# ---------------------------------------------------------------------------------------------
# Report


def stream_model(model: str) -> str:
    from coordexp.wire import STREAM_SUFFIX, stream_ensemble_name

    return model if model.endswith(STREAM_SUFFIX) else stream_ensemble_name(model)


def _row(m: dict[str, Any], label: str | None = None) -> str:
    lat = m["request_latency"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    ttft = (m.get("time_to_first_token") or {}).get("p50")
    itl = (m.get("inter_token_latency") or {}).get("avg")
    return (f"{label or str(m['concurrency']):>11}  {m['request_throughput']['avg']:8.2f}  "
            f"{m['output_token_throughput']['avg']:10.1f}  {f(lat['p50']):>8}  {f(lat['p90']):>8}  "
            f"{f(lat['p99']):>8}  {f(ttft):>9}  {f(itl):>7}  {m['errors']:>6}")


HEADER = (f"{'concurrency':>11}  {'img/s':>8}  {'out tok/s':>10}  {'p50 ms':>8}  {'p90 ms':>8}  {'p99 ms':>8}  "
          f"{'TTFT p50':>9}  {'ITL ms':>7}  {'errors':>6}")


def plot(report: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [m["concurrency"] for m in levels]
    base = (report.get("baseline") or {}).get("metrics")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax1.plot(xs, [m["request_throughput"]["avg"] for m in levels], "o-", color="tab:blue", label="served (Triton)")
    if base:
        ax1.axhline(base["request_throughput"]["avg"], color="tab:gray", ls="--",
                    label=f"in-process {report['baseline']['engine']} (batch 1)")
    ax1.set_title("Throughput")
    ax1.set_xlabel("concurrency (requests in flight)")
    ax1.set_ylabel("images / s (= requests / s)")
    ax1.set_ylim(bottom=0)
    ax1b = ax1.twinx()
    ax1b.plot(xs, [m["output_token_throughput"]["avg"] for m in levels], "s:", color="tab:green", alpha=0.7,
              label="output tokens / s")
    ax1b.set_ylabel("output tokens / s", color="tab:green")
    ax1b.set_ylim(bottom=0)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    for key, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s-")):
        ax2.plot(xs, [m["request_latency"][key] for m in levels], style, label=f"served {key}")
    if base and base["request_latency"]["p99"] is not None:
        ax2.axhline(base["request_latency"]["p99"], color="tab:gray", ls="--", label="in-process p99")
    if any(m.get("time_to_first_token") for m in levels):
        ax2.plot(xs, [(m.get("time_to_first_token") or {}).get("p50") for m in levels], "D--", color="tab:purple",
                 label="time to first token p50")
    ax2.set_title("Request latency" + (" (streamed)" if report.get("streaming") else ""))
    ax2.set_xlabel("concurrency (requests in flight)")
    ax2.set_ylabel("ms")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        if len(xs) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
    man = report["server"]["manifest"]
    fig.suptitle(f"{report['server']['model']} ({man.get('prompt_variant') or '?'}), {report['inputs']['count']} "
                 f"inputs, max_new_tokens={report['params']['max_new_tokens']}"
                 f"{' ignore_eos' if report['params']['ignore_eos'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from coordexp.client.remote import PreflightError, served_prompt

    try:
        levels = parse_levels(args.concurrency)
        params = params_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.baseline and not args.ckpt:
        print("error: --baseline needs --ckpt", file=sys.stderr)
        return 2
    if args.data:
        if not os.path.isfile(args.data):
            print(f"error: input dataset not found: {args.data}", file=sys.stderr)
            return 2
        inputs, skipped = dataset_inputs(args.data)
        source = {"source": os.path.abspath(args.data), "count": len(inputs), "skipped_invalid": skipped}
    else:
        if args.synthetic < 1:
            print("error: --synthetic needs N >= 1", file=sys.stderr)
            return 2
        inputs = synthetic_inputs(args.synthetic, args.size, args.data_seed)
        source = {"source": "synthetic", "count": len(inputs), "size": args.size, "seed": args.data_seed}
    if not inputs:
        print("error: no valid input image to send", file=sys.stderr)
        return 2
    user_text = args.user_text
    import asyncio

    try:
        served = asyncio.run(sweep(args, params, inputs, levels, user_text))
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notes = [] if args.stream else [STREAMING_NOTE]
    report: dict[str, Any] = {
        "schema_version": "coordexp.bench.v1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "server": served["server"],
        "inputs": source,
        "params": params.to_dict(),
        "prompt_variant": served["prompt_variant"],
        "warmup_per_level": args.warmup if args.warmup is not None else "max(2, concurrency)",
        "streaming": bool(args.stream),
        "levels": served["levels"],
        "server_stats": served["servers"],
        "retries": served["retries"],
        "baseline": None,
        "notes": notes,
        "client": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
    }
    if args.baseline:
        n = args.requests or len(inputs)
        prompt = served_prompt(served["manifest"], user_text)
        print(f"baseline: in-process {args.baseline} engine from {args.ckpt} ({n} requests, one at a time)",
              file=sys.stderr)
        try:
            base = run_baseline(args.baseline, args.ckpt, inputs, n, max(1, min(2, args.warmup or 2)), params, prompt,
                                args.threads)
        except (FileNotFoundError, OSError, ValueError) as e:
            print(f"error: cannot load the {args.baseline} baseline from {args.ckpt}: {e}", file=sys.stderr)
            return 2
        bm = base["metrics"]
        print(_row(bm, label=f"in-proc {args.baseline}"))
        same = [i for i in base["texts"] if i in served["texts"]]
        report["baseline"] = {
            "engine": args.baseline, "ckpt": os.path.abspath(args.ckpt), "metrics": bm,
            "same_text_fraction": (round(sum(base["texts"][i] == served["texts"][i] for i in same) / len(same), 4)
                                   if same else None),
        }
        b = bm["request_throughput"]["avg"]
        report["ratios"] = [{"concurrency": m["concurrency"],
                             "request_throughput_ratio": round(m["request_throughput"]["avg"] / b, 3) if b else None,
                             "p50_latency_ratio": (round(m["request_latency"]["p50"] / bm["request_latency"]["p50"], 3)
                                                   if m["request_latency"]["p50"] and bm["request_latency"]["p50"]
                                                   else None)}
                            for m in served["levels"]]
        print("served / in-process throughput: " + ", ".join(
            f"c={r['concurrency']}: x{r['request_throughput_ratio']}" for r in report["ratios"]))
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bench.json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    ppath = plot(report, os.path.join(args.out, "bench.png"))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {jpath} and {ppath}", file=sys.stderr)
    return 0
