"""Which precision to serve on CPU (issue 27): fp32 ONNX vs int8 / int4 ONNX weights vs torch bf16,
each exported with `build_engine` and served through Triton (`coordexp-server`, its own process), on
the same images at the same concurrency levels, exactly `max_new_tokens` tokens each; then the
accuracy parity of each precision on the demo checkpoint against the fp32 torch reference.

Speed uses a shape-realistic random checkpoint (never the 5M demo model): by default the 256M shape
the peer was measured at (text 1024 x 16 layers, vision 512 x 8, patch 16). Random weights say
nothing about accuracy, so accuracy comes from the trained demo checkpoint.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

SHAPE_256M = dict(text_hidden=1024, text_layers=16, text_heads=8, text_kv_heads=4, head_dim=128,
                  text_intermediate=3072, vision_hidden=512, vision_layers=8, vision_heads=8,
                  vision_intermediate=2048, patch_size=16, merge_size=2, temporal_patch_size=2,
                  deepstack_visual_indexes=[1, 3, 5], init_std=0.02, max_image_side=512)
# engine name -> build_engine flags (beside --ckpt/--repo/--max-new-tokens)
ENGINES: dict[str, list[str]] = {
    "onnx_fp32": [],
    "onnx_int8": ["--weights", "int8"],
    "onnx_int4": ["--weights", "int4"],
    "torch_bf16": ["--backend", "torch", "--device", "cpu", "--dtype", "bf16"],
}


@dataclass(frozen=True)
class PrecisionBenchOptions:
    workdir: str = "/tmp/coordexp-bench-precision"
    engines: tuple[str, ...] = tuple(ENGINES)
    levels: tuple[int, ...] = (1, 8)
    requests: dict[int, int] = field(default_factory=lambda: {1: 16, 8: 50})  # measured requests per level
    images: int = 50
    image_size: int = 256
    max_new_tokens: int = 32
    shape: dict[str, Any] = field(default_factory=lambda: dict(SHAPE_256M))
    shape_name: str = "256m"
    demo_ckpt: str | None = None  # accuracy parity on it (None: skipped)
    demo_gt: str | None = None


def _build(ckpt: str, repo: str, flags: list[str], max_new_tokens: int, log: Callable[[str], None]) -> dict[str, Any]:
    """build_engine in a child process: (seconds, the child's peak RSS)."""
    code = ("import json, resource, sys\nfrom coordexp.export.build_engine import main\n"
            "rc = main(sys.argv[1:])\n"
            "print('BUILD ' + json.dumps({'rc': rc, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss / 1024}))\n")
    argv = ["--ckpt", ckpt, "--repo", repo, "--max-new-tokens", str(max_new_tokens), "--force", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BUILD ")), None)
    if proc.returncode or line is None or json.loads(line[6:])["rc"] != 0:
        raise RuntimeError(f"build_engine {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(line[6:])
    log(f"  built {repo} in {seconds:.1f} s (peak RSS {out['peak_rss_mb']:.0f} MB)")
    return {"export_s": round(seconds, 2), "peak_rss_mb": round(out["peak_rss_mb"], 1)}


def _serve(repo: str, opts: PrecisionBenchOptions, inputs: list[bytes], log: Callable[[str], None]) -> dict[str, Any]:
    """Unary levels (images/s, p50/p99) and a streamed pass (time to first token) on one server."""
    from coordexp.benchmarks.openai_api import ServedProcess
    from coordexp.benchmarks.serve import SweepOptions, sweep
    from coordexp.generation import GenerationParams

    params = GenerationParams(max_new_tokens=opts.max_new_tokens, ignore_eos=True)
    server = ServedProcess(repo, log)
    out: dict[str, Any] = {}
    try:
        for stream in (False, True):
            for level in opts.levels:
                so = SweepOptions(urls=(server.grpc,), levels=(level,), stream=stream,
                                  requests=opts.requests.get(level, opts.images), warmup=None)
                m = asyncio.run(sweep(so, params, inputs, log=lambda *_: None))["levels"][0]
                lat = m["request_latency"]
                key = f"c{level}"
                row = out.setdefault(key, {})
                if stream:
                    row["ttft_p50_ms"] = (m["time_to_first_token"] or {}).get("p50")
                else:
                    row.update(images_per_s=m["images_per_s"], latency_p50_ms=lat.get("p50"),
                               latency_p99_ms=lat.get("p99"), errors=m["errors"])
                log(f"    {'stream' if stream else 'unary '} c{level}: {m['images_per_s']:.2f} images/s")
    finally:
        server.stop()
    return out


def _accuracy(opts: PrecisionBenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Each precision's accuracy parity on the demo checkpoint against torch fp32 (in process)."""
    from coordexp.benchmarks.accuracy import EngineSpec, run_spec
    from coordexp.dataset import copy_records
    from coordexp.runs.equivalence import compare_accuracy, score_run

    work = os.path.join(opts.workdir, "demo")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data.jsonl")
    copy_records(opts.demo_gt, data)
    ref_pred = run_spec(EngineSpec.parse(f"torch:{opts.demo_ckpt}"), data, os.path.join(work, "torch_fp32"), 96)
    ref = score_run("torch_fp32", ref_pred, data)
    out: dict[str, Any] = {}
    for name in opts.engines:
        if name.startswith("onnx"):
            repo = os.path.join(work, f"repo_{name}")
            _build(opts.demo_ckpt, repo, ENGINES[name] + ["--skip-validation"], 96, log)
            spec = EngineSpec.parse(f"onnx:{repo}")
        else:
            spec = EngineSpec.parse(f"torch:{opts.demo_ckpt},dtype=bf16")
        pred = run_spec(spec, data, os.path.join(work, name), 96, log=log)
        pair = compare_accuracy(ref, score_run(name, pred, data))
        out[name] = {k: pair[k] for k in ("verdict", "why", "images_needed", "metrics", "token_agreement",
                                           "prediction_agreement", "image_flips")}
        log(f"  accuracy {name}: {pair['verdict']} ({pair['token_agreement']['exact_answers']}/{pair['images']} "
            "identical answers)")
    return out


def run(opts: PrecisionBenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from coordexp.benchmarks.serve import synthetic_inputs
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    os.makedirs(opts.workdir, exist_ok=True)
    ckpt = os.path.join(opts.workdir, f"ckpt_{opts.shape_name}")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        log(f"building the random {opts.shape_name} checkpoint in {ckpt}")
        tmp = f"{ckpt}.building-{os.getpid()}"
        build_tiny_checkpoint(tmp, family="qwen3_vl", seed=0, size=dict(opts.shape))
        os.rename(tmp, ckpt)  # only a complete folder is ever reused
    inputs = synthetic_inputs(opts.images, opts.image_size)
    engines: dict[str, Any] = {}
    for name in opts.engines:
        log(f"{name} ({opts.shape_name})")
        repo = os.path.join(opts.workdir, f"repo_{opts.shape_name}_{name}")
        engines[name] = {**_build(ckpt, repo, ENGINES[name] + ["--skip-validation"], opts.max_new_tokens, log),
                         **_serve(repo, opts, inputs, log)}
    report: dict[str, Any] = {"schema_version": "coordexp.bench_precision.v1", "shape": opts.shape_name,
                              "dims": opts.shape, "images": opts.images, "image_size": opts.image_size,
                              "max_new_tokens": opts.max_new_tokens, "levels": list(opts.levels),
                              "cpu_count": os.cpu_count(), "engines": engines}
    top = max(opts.levels)
    base = (engines.get("onnx_fp32") or {}).get(f"c{top}", {}).get("images_per_s")
    if base:
        best = max(engines, key=lambda n: engines[n][f"c{top}"]["images_per_s"])
        report[f"best_over_fp32_images_per_s_c{top}_{opts.shape_name}"] = round(
            engines[best][f"c{top}"]["images_per_s"] / base, 3)
        report[f"best_engine_{opts.shape_name}"] = best
        for n in engines:
            engines[n][f"over_fp32_c{top}"] = round(engines[n][f"c{top}"]["images_per_s"] / base, 3)
    if opts.demo_ckpt and opts.demo_gt:
        acc = _accuracy(opts, log)
        report["accuracy_demo"] = acc
        report["accuracy_verdict_demo"] = {n: a["verdict"] for n, a in acc.items()}
    return report


def format_table(rep: dict[str, Any]) -> str:
    lv = rep["levels"]
    head = ["engine", "export s", "peak RSS MB"] + [f"c{c} images/s" for c in lv] + \
        [f"c{lv[-1]} p50 / p99 ms", f"c{lv[-1]} TTFT p50 ms", f"c{lv[-1]} vs fp32", "demo accuracy"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = rep.get("accuracy_verdict_demo") or {}
    for name, e in rep["engines"].items():
        top = e[f"c{lv[-1]}"]
        cells = [name, f"{e['export_s']:.0f}", f"{e['peak_rss_mb']:.0f}"]
        cells += [f"{e[f'c{c}']['images_per_s']:.2f}" for c in lv]
        cells += [f"{top.get('latency_p50_ms') or 0:.0f} / {top.get('latency_p99_ms') or 0:.0f}",
                  f"{top.get('ttft_p50_ms') or 0:.0f}", f"{e.get(f'over_fp32_c{lv[-1]}', 0):.2f}x",
                  verdicts.get(name, "-")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
