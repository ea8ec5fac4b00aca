"""Serving benchmarks: a sweep of concurrency levels against served ensembles (through the one Triton
client, `coordexp.engines.triton`), and the in-process engine on the same inputs as a baseline.

Per concurrency level C, C workers each send one request at a time (perf_analyzer's "concurrency
mode") until the level's requests are answered; warm-up requests before each level are not counted.
Metrics use GenAI-Perf's names: `request_throughput` (requests/s; one image per request, so also
images/s), `output_token_throughput` (tokens/s), `request_latency` (ms: avg, min, max, p50, p90, p99,
std), `output_sequence_length`, and streamed `time_to_first_token` and `inter_token_latency`.
Time to first token is from sending the request to the first response carrying a token;
inter-token latency is, per request, (last token's arrival - first token's arrival) / (tokens - 1).
"""
from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from coordexp.benchmarks.report import HEADER, level_row


@dataclass(frozen=True)
class SweepOptions:
    urls: tuple[str, ...]
    levels: tuple[int, ...]
    model: str = "coordexp"
    stream: bool = False  # the streaming ensemble (<model>_stream) over the gRPC stream API
    requests: int | None = None  # measured requests per level (None: one per input, at least 2x the level)
    warmup: int | None = None  # None: the level, at least 2
    timeout: float = 300.0
    retries: int = 2
    user_text: str | None = None
    prompt_overrides: dict[str, Any] = field(default_factory=dict)
    explicit_max_new_tokens: bool = True
    explicit_repetition_penalty: bool = True
    # an OpenAI-compatible server instead of Triton (ours or a peer's): its base URL, model, key, and the
    # whole prompt to send a server that is not ours (coordexp.engines.openai_client)
    openai_url: str | None = None
    openai_model: str | None = None
    api_key: str | None = None
    openai_prompt: Any = None


def synthetic_inputs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """N PNG-encoded synthetic shapes images (reproducible)."""
    import numpy as np

    from coordexp.fixtures.synthetic import sample

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


async def drive(pool, inputs: Sequence[bytes], concurrency: int, n: int, params, user_text: str | None,
                texts: dict[int, str] | None = None, stream: bool = False, desc: str | None = None) -> dict[str, Any]:
    """`concurrency` workers, one request in flight each, until `n` requests are answered (a progress
    bar on stderr when `desc` is given).
    Returns latencies of successes (s), their output lengths, error count, wall seconds and, streamed,
    times to first token and mean inter-token times (s)."""
    import asyncio

    counter = iter(range(n))
    lat: list[float] = []
    toks: list[int] = []
    ttft: list[float] = []
    itl: list[float] = []
    errors = 0
    from tqdm import tqdm

    bar = tqdm(total=n, desc=desc, unit="req", leave=False, file=sys.stderr, disable=desc is None)

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            bar.update(1)
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
            toks.append(gen.num_tokens)
            if timing is not None and timing.first_token_s is not None:
                ttft.append(timing.first_token_s)
                if timing.inter_token_s is not None:
                    itl.append(timing.inter_token_s)
            if texts is not None and i < len(inputs):
                texts[i] = gen.text

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.close()
    return {"latencies": lat, "tokens": toks, "errors": errors, "wall": time.perf_counter() - t0,
            "first_token": ttft if stream else None, "inter_token": itl if stream else None}


async def _levels(pool: Any, opts: SweepOptions, params, inputs: list[bytes], log,
                  done: list | None = None) -> tuple[list, dict[int, str]]:
    """Every level of `opts` on a connected pool (a Triton ServerPool or an OpenAIPool); each finished
    level is also appended to `done` (what an interrupted sweep still reports)."""
    results = done if done is not None else []
    texts: dict[int, str] = {}
    log(HEADER)
    for c in opts.levels:
        n = opts.requests or max(len(inputs), 2 * c)
        warm = opts.warmup if opts.warmup is not None else max(2, c)
        if warm:
            await drive(pool, inputs, c, warm, params, opts.user_text, stream=opts.stream, desc=f"c={c} warm-up")
        d = await drive(pool, inputs, c, n, params, opts.user_text, texts, stream=opts.stream, desc=f"c={c}")
        m = level_metrics(c, d["latencies"], d["tokens"], d["errors"], d["wall"], d["first_token"], d["inter_token"])
        results.append(m)
        log(level_row(m))
    return results, texts


async def sweep_openai(opts: SweepOptions, params, inputs: list[bytes], log=print,
                       done: list | None = None) -> dict[str, Any]:
    """The same sweep against an OpenAI-compatible server (`--openai-url`); streamed levels time the
    server-sent events. Raises OpenAIServerError (as PreflightError) before any work."""
    from coordexp.engines.openai_client import OpenAIEngine, OpenAIPool, OpenAIServerError
    from coordexp.engines.triton.connect import PreflightError

    try:
        pool = await OpenAIPool.connect(opts.openai_url, opts.openai_model, opts.api_key, opts.timeout,
                                        opts.openai_prompt)
    except OpenAIServerError as e:
        raise PreflightError(str(e)) from None
    try:
        facts = OpenAIEngine(pool, None)
        params = facts.fit_params(params, opts.explicit_max_new_tokens, opts.explicit_repetition_penalty)
        problems = facts.problems(params)
        if problems:
            raise PreflightError("; ".join(problems))
        results, texts = await _levels(pool, opts, params, inputs, log, done)
        manifest = pool.ext or None
        return {"levels": results, "texts": texts, "manifest": manifest, "servers": pool.stats(), "retries": 0,
                "server": {"openai_url": pool.base_url, "model": pool.model, "coordexp_server": pool.ours,
                           "manifest": manifest},
                "prompt_variant": facts.prompt.variant}
    finally:
        await pool.close()


async def sweep(opts: SweepOptions, params, inputs: list[bytes], log=print, done: list | None = None) -> dict[str, Any]:
    """Every level of `opts` against the served model; raises PreflightError before any work. `done`:
    a list the finished levels are appended to as they finish (an interrupted sweep reports them)."""
    from coordexp.engines.triton.interface import (fit_params_to_server, manifest_summary, prompt_variant,
                                                   request_problems)
    from coordexp.engines.triton.connect import PreflightError, normalise_url
    from coordexp.engines.triton.pool import ServerPool
    from coordexp.wire import stream_ensemble_name

    if opts.openai_url:
        return await sweep_openai(opts, params, inputs, log, done)
    user_text = opts.user_text
    model = stream_ensemble_name(opts.model) if opts.stream else opts.model
    try:
        pool, manifest = await ServerPool.connect([normalise_url(u) for u in opts.urls], model,
                                                  preflight_timeout=10.0, timeout=opts.timeout, retries=opts.retries,
                                                  wait_for_server=30.0)
    except PreflightError as e:
        if opts.stream:
            raise PreflightError(f"{e} (--stream needs the streaming ensemble {model!r}: export without "
                                 "--no-stream)") from None
        raise
    try:
        params = fit_params_to_server(params, manifest, opts.explicit_max_new_tokens, opts.explicit_repetition_penalty)
        problems = request_problems(pool.iface, manifest, params, user_text, opts.prompt_overrides)
        if problems:
            raise PreflightError("; ".join(problems))
        results, texts = await _levels(pool, opts, params, inputs, log, done)
        return {"levels": results, "texts": texts, "manifest": manifest, "iface": pool.iface,
                "servers": pool.stats(), "retries": pool.total_retries,
                "server": {"urls": [s.url for s in pool.servers], "model": model,
                           "model_version": pool.iface.version, "max_batch_size": pool.iface.max_batch_size,
                           "decoupled": pool.iface.decoupled, "manifest": manifest_summary(manifest)},
                "prompt_variant": prompt_variant(manifest, user_text)}
    finally:
        await pool.close()


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




def bench_report(served: dict[str, Any], source: dict[str, Any], params, opts: SweepOptions,
                 notes: list[str]) -> dict[str, Any]:
    """bench.json's content (schema coordexp.bench.v1) from a sweep's result."""
    import datetime as _dt
    import os
    import sys

    return {
        "schema_version": "coordexp.bench.v1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "server": served["server"],
        "inputs": source,
        "params": params.to_dict(),
        "prompt_variant": served["prompt_variant"],
        "warmup_per_level": opts.warmup if opts.warmup is not None else "max(2, concurrency)",
        "streaming": bool(opts.stream),
        "levels": served["levels"],
        "server_stats": served["servers"],
        "retries": served["retries"],
        "baseline": None,
        "notes": list(notes),
        "client": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
    }


def add_baseline(report: dict[str, Any], served: dict[str, Any], base: dict[str, Any], engine: str,
                 ckpt: str) -> None:
    """The in-process baseline and the served/in-process ratios per level, into `report`."""
    bm = base["metrics"]
    same = [i for i in base["texts"] if i in served["texts"]]
    report["baseline"] = {
        "engine": engine, "ckpt": ckpt, "metrics": bm,
        "same_text_fraction": (round(sum(base["texts"][i] == served["texts"][i] for i in same) / len(same), 4)
                               if same else None),
    }
    b = bm["request_throughput"]["avg"]
    b50 = bm["request_latency"]["p50"]
    report["ratios"] = [{"concurrency": m["concurrency"],
                         "request_throughput_ratio": round(m["request_throughput"]["avg"] / b, 3) if b else None,
                         "p50_latency_ratio": (round(m["request_latency"]["p50"] / b50, 3)
                                               if m["request_latency"]["p50"] and b50 else None)}
                        for m in served["levels"]]
