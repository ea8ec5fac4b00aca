"""The OpenAI-compatible API measured beside direct gRPC, on one `coordexp-server` (bench/bench_openai.py).

In one run, on the same server (Triton + the API in its own process, as users run it): the concurrency
sweep of `coordexp-client bench` over gRPC and over the OpenAI API (the same noise PNGs as aiperf sends, greedy,
`--ignore-eos`, a fixed token budget), unary and streamed, in alternating rounds; then, when it is
installed, NVIDIA's `aiperf` (an external OpenAI benchmark client: offline, the repository's own
tokenizer, images it makes itself) at the same concurrencies, streamed. Reported: images/s and time to
first token per path and level, `openai_over_grpc_images_per_s_c{1,8}` (the API's overhead; goal
>= 0.9), and aiperf's figures over `coordexp-client bench --openai-url`'s (do the two clients agree?).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

DEMO_CKPT = "checkpoints/coordexp-demo-shapes"


@dataclass(frozen=True)
class OpenAIBenchOptions:
    repo: str
    levels: tuple[int, ...] = (1, 8)
    requests: int = 48  # measured per level and path
    rounds: int = 2  # gRPC and OpenAI alternate; the median round is reported
    max_new_tokens: int = 32
    image_size: int = 128
    aiperf: str | None = None  # the aiperf command (None: not run)
    workdir: str = "/tmp/coordexp-bench-openai"


class ServedProcess:
    """`coordexp-server --repo R` with free ports, in its own process; the URLs from its ready line."""

    def __init__(self, repo: str, log: Callable[[str], None]):
        self.proc = subprocess.Popen([sys.executable, "-m", "coordexp.serving.server", "--repo", repo,
                                      "--grpc-port", "0", "--http-port", "0", "--openai-port", "0"],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"coordexp-server exited with {self.proc.wait()} before it was ready")
            if line.startswith("ready:"):
                words = line.split()
                self.grpc = words[words.index("grpc") + 1]
                self.openai = words[words.index("openai") + 1]
                log(line.strip())
                return
        raise RuntimeError("coordexp-server was not ready within 600 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _sweep(url: str | None, openai_url: str | None, levels, requests, params, inputs, stream: bool) -> list[dict]:
    from coordexp.benchmarks.serve import SweepOptions, sweep

    opts = SweepOptions(urls=(url,) if url else (), levels=tuple(levels), stream=stream, requests=requests,
                        warmup=None, openai_url=openai_url)
    return asyncio.run(sweep(opts, params, inputs, log=lambda *_: None))["levels"]


def run_aiperf(cmd: str, openai_url: str, tokenizer: str, level: int, requests: int, opts: OpenAIBenchOptions,
               out_dir: str) -> dict[str, Any]:
    """One aiperf profile (streamed chat completions with one synthetic PNG each) -> its figures."""
    base = openai_url[:-3] if openai_url.endswith("/v1") else openai_url
    args = [*cmd.split(), "profile", "--model", "coordexp", "--url", base, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", tokenizer, "--image-width-mean", str(opts.image_size), "--image-height-mean",
            str(opts.image_size), "--image-batch-size", "1", "--image-format", "png",
            "--prompt-input-tokens-mean", "8", "--prompt-input-tokens-stddev", "0",
            "--prompt-output-tokens-mean", str(opts.max_new_tokens), "--extra-inputs", "ignore_eos:true",
            "--concurrency", str(level), "--request-count", str(requests), "--warmup-request-count", str(max(2, level)),
            "--use-server-token-count", "--output-artifact-dir", out_dir, "--no-server-metrics",
            "--no-gpu-telemetry", "--ui-type", "none",
            # its own processes share the server's cores: as few as it allows
            "--workers-max", "1", "--record-processor-service-count", "1"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # aiperf reads a local path online only
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        return {"error": (r.stdout + r.stderr)[-1500:]}
    with open(os.path.join(out_dir, "profile_export_aiperf.json"), encoding="utf-8") as f:
        m = json.load(f)

    def pick(key: str, stat: str = "avg") -> float | None:
        v = m.get(key) or (m.get("records") or {}).get(key) or {}
        return v.get(stat) if isinstance(v, dict) else None

    return {"images_per_s": pick("request_throughput"), "ttft_p50_ms": pick("time_to_first_token", "p50"),
            "latency_p50_ms": pick("request_latency", "p50"), "output_tokens_avg": pick("output_sequence_length")}


def noise_inputs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """PNGs of uniform noise, the kind of image aiperf makes (its default image source), so that every
    client sends images of the same cost to decode."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def run(opts: OpenAIBenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from coordexp.generation import GenerationParams

    os.makedirs(opts.workdir, exist_ok=True)
    inputs = noise_inputs(opts.requests, opts.image_size)
    params = GenerationParams(max_new_tokens=opts.max_new_tokens, ignore_eos=True)
    server = ServedProcess(opts.repo, log)
    rounds: dict[str, list[list[dict]]] = {}
    try:
        for r in range(opts.rounds):
            order = [("grpc", server.grpc, None), ("openai", None, server.openai)]
            for name, url, oa in (order if r % 2 == 0 else order[::-1]):
                for stream in (False, True):
                    key = f"{name}{'_stream' if stream else ''}"
                    log(f"round {r + 1}/{opts.rounds}: {key}")
                    rounds.setdefault(key, []).append(_sweep(url, oa, opts.levels, opts.requests, params, inputs,
                                                             stream))
        aiperf: dict[str, Any] | None = None
        if opts.aiperf:
            from coordexp.serving.common import PROCESSOR_SUBDIR

            aiperf = {}
            for c in opts.levels:
                log(f"aiperf at concurrency {c}")
                aiperf[f"c{c}"] = run_aiperf(opts.aiperf, server.openai, os.path.join(opts.repo, PROCESSOR_SUBDIR),
                                             c, opts.requests, opts, os.path.join(opts.workdir, f"aiperf_c{c}"))
    finally:
        server.stop()
    return report(rounds, aiperf, opts)


def _median(rounds: list[list[dict]], level: int, pick: Callable[[dict], Any]) -> float | None:
    vals = [pick(m) for levels in rounds for m in levels if m["concurrency"] == level]
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def report(rounds: dict[str, list[list[dict]]], aiperf: dict[str, Any] | None, opts: OpenAIBenchOptions) -> dict:
    out: dict[str, Any] = {"schema_version": "coordexp.bench_openai.v1", "levels": list(opts.levels),
                           "requests_per_level": opts.requests, "rounds": opts.rounds,
                           "max_new_tokens": opts.max_new_tokens, "image_size": opts.image_size,
                           "cpu_count": os.cpu_count(), "paths": {}}
    for key, rs in rounds.items():
        out["paths"][key] = {f"c{c}": {"images_per_s": _median(rs, c, lambda m: m["images_per_s"]),
                                        "latency_p50_ms": _median(rs, c, lambda m: m["request_latency"]["p50"]),
                                        "ttft_p50_ms": _median(rs, c, lambda m: (m.get("time_to_first_token") or {})
                                                               .get("p50"))}
                             for c in opts.levels}
    for c in opts.levels:
        g, o = out["paths"]["grpc"][f"c{c}"]["images_per_s"], out["paths"]["openai"][f"c{c}"]["images_per_s"]
        out[f"openai_over_grpc_images_per_s_c{c}"] = round(o / g, 3) if g and o else None
        gs, os_ = out["paths"]["grpc_stream"][f"c{c}"], out["paths"]["openai_stream"][f"c{c}"]
        out[f"openai_over_grpc_stream_images_per_s_c{c}"] = (round(os_["images_per_s"] / gs["images_per_s"], 3)
                                                            if gs["images_per_s"] and os_["images_per_s"] else None)
    out["aiperf"] = aiperf
    if aiperf:
        for c in opts.levels:
            a, b = aiperf.get(f"c{c}") or {}, out["paths"]["openai_stream"][f"c{c}"]
            if a.get("images_per_s") and b["images_per_s"]:
                out[f"aiperf_over_bench_images_per_s_c{c}"] = round(a["images_per_s"] / b["images_per_s"], 3)
            if a.get("ttft_p50_ms") and b["ttft_p50_ms"]:
                out[f"aiperf_over_bench_ttft_p50_c{c}"] = round(a["ttft_p50_ms"] / b["ttft_p50_ms"], 3)
    else:
        out["aiperf_note"] = ("aiperf not run: install it in its own virtualenv (make bench-tools) and pass "
                              "--aiperf .venv-bench/bin/aiperf")
    return out


def format_table(rep: dict[str, Any]) -> str:
    rows = ["| path | " + " | ".join(f"c={c} img/s | c={c} TTFT p50 ms" for c in rep["levels"]) + " |",
            "| --- |" + " --- | --- |" * len(rep["levels"])]
    for key, levels in rep["paths"].items():
        cells = []
        for c in rep["levels"]:
            m = levels[f"c{c}"]
            cells += [str(m["images_per_s"]), str(m["ttft_p50_ms"] if m["ttft_p50_ms"] is not None else "-")]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    for c, a in (rep.get("aiperf") or {}).items():
        rows.append(f"| aiperf (streamed) {c} | {a.get('images_per_s')} img/s, TTFT p50 {a.get('ttft_p50_ms')} ms"
                    + (f" ERROR {a['error'][:200]}" if "error" in a else "") + " |")
    for k, v in rep.items():
        if k.startswith(("openai_over_grpc", "aiperf_over_bench")):
            rows.append(f"{k}: {v}")
    return "\n".join(rows)


def find_aiperf(given: str | None) -> str | None:
    for cand in (given, os.environ.get("AIPERF"), ".venv-bench/bin/aiperf", shutil.which("aiperf")):
        if cand and (shutil.which(cand) or os.path.isfile(cand)):
            return cand
    return None
