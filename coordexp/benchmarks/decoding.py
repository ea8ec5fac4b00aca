"""Issue 18's decoding benchmark (parts 1-3), side by side in one run on the demo checkpoint.

- in-flight vs static batching of the streamed `llm_stream`: two repositories written from the
  same ONNX export that differ only in `ServingOptions.llm_batching`, both served at once on
  loopback; each concurrency level runs on one server then the other (alternating which goes
  first, so drift on a shared machine hits both alike), streamed, greedy, answers of their natural
  (mixed) lengths (no ignore_eos). Keys: `inflight.ttft_p50_c4_over_c1`,
  `inflight.images_per_s_c16_ratio` (in-flight / static), and `static.ttft_p50_c4_over_c1`;
- serving overhead: the unary ensemble at concurrency 8 against in-process ONNX Runtime at batch 8,
  a fixed output length (ignore_eos), as bench/bench_serving.py: `served_c8_over_inprocess_b8`;
- `jump_forward.*` (`coordexp.benchmarks.jump_forward.measure_jump_forward`) and `prefix_cache.*`
  (`coordexp.benchmarks.prefix_cache.measure_prefix_cache`), each null with a note when its
  module is not there.

Clients are the project's own (`coordexp.benchmarks.serve.sweep` over `ServerPool`); servers come
from `coordexp.serving.server.start_server` on free ports.
"""
from __future__ import annotations

import asyncio
import importlib
import io
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

DEMO_CKPT = "checkpoints/coordexp-demo-shapes"
DEMO_REPO = "runs/demo/model_repository"
DEMO_DATA = "data/demo_val/val.jsonl"


@dataclass
class DecodingOptions:
    ckpt: str = DEMO_CKPT
    onnx_dir: str | None = None  # None: the --repo's llm/1/onnx, else exported into workdir
    repo: str | None = DEMO_REPO  # an existing repository to take the ONNX export from
    data: str = DEMO_DATA
    workdir: str = "/tmp/coordexp-bench-decoding"
    levels: tuple[int, ...] = (1, 4, 16)
    requests: int = 48  # measured requests per level and server (at least 2x the level)
    max_batch_size: int = 8
    max_new_tokens: int = 160
    overhead_images: int = 32
    overhead_tokens: int = 32
    threads: int = 2
    limit: int | None = None  # records for the jump-forward / prefix-cache measurements
    skip: tuple[str, ...] = ()  # any of "inflight", "torch", "overhead", "jump_forward", "prefix_cache"


def onnx_dir_of(opts: DecodingOptions, log: Callable[[str], None]) -> str:
    if opts.onnx_dir:
        return opts.onnx_dir
    if opts.repo and os.path.isfile(os.path.join(opts.repo, "llm", "1", "onnx", "onnx_meta.json")):
        return os.path.join(opts.repo, "llm", "1", "onnx")
    from coordexp.export.onnx_export import export_onnx

    out = os.path.join(opts.workdir, "onnx")
    if not os.path.isfile(os.path.join(out, "onnx_meta.json")):
        log(f"exporting {opts.ckpt} to {out} ...")
        export_onnx(opts.ckpt, out)
    return out


def write_repos(opts: DecodingOptions, onnx_dir: str) -> dict[str, str]:
    """{"static": repo, "inflight": repo}: the same export and options but `llm_batching`."""
    from coordexp import wire
    from coordexp.export.repository import ServingOptions, write_repository

    repos = {mode: write_repository(os.path.join(opts.workdir, f"repo_{mode}"), wire.ENSEMBLE, onnx_dir, opts.ckpt,
                                    max_batch_size=opts.max_batch_size, max_new_tokens=opts.max_new_tokens,
                                    options=ServingOptions(llm_batching=mode))
             for mode in ("static", "inflight")}
    set_llm_batching(repos["inflight"], "inflight", ("llm",))  # the unary llm as well (served overhead)
    return repos


def write_torch_repos(opts: DecodingOptions) -> dict[str, str]:
    """{"static": repo, "inflight": repo} of `--backend torch` (CPU, fp32) over the checkpoint, each as
    the exporter builds it by default: in flight (`TorchRows` under the one decode loop) with the prefix
    cache, static batches without (their fixed shapes start at position 0)."""
    from coordexp import wire
    from coordexp.export.repository import ServingOptions, write_repository
    from coordexp.serving.torch_parts import TorchOptions

    torch = TorchOptions(device="cpu", dtype="fp32")
    return {mode: write_repository(os.path.join(opts.workdir, f"torch_repo_{mode}"), wire.ENSEMBLE, None, opts.ckpt,
                                   max_batch_size=opts.max_batch_size, max_new_tokens=opts.max_new_tokens,
                                   backend="torch", torch=torch,
                                   options=ServingOptions(llm_batching=mode, prefix_cache=mode == "inflight"))
            for mode in ("static", "inflight")}


def set_llm_batching(repo: str, mode: str, models: Sequence[str] = ("llm", "llm_stream")) -> None:
    """Set the `batching` parameter of these llm models' configs in `repo` (edited through the
    ModelConfig protobuf). The repository writer sets it on llm_stream only (ServingOptions.llm_batching);
    the unary llm honours it too (`coordexp.serving.llm`), which is what the served-overhead figure needs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for name in models:
        path = os.path.join(repo, name, "config.pbtxt")
        if not os.path.isfile(path):
            continue
        with open(path, "r", encoding="utf-8") as f:
            cfg = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
        cfg.parameters["batching"].string_value = mode
        with open(path, "w", encoding="utf-8") as f:
            f.write(text_format.MessageToString(cfg))


def _sweep_level(url: str, level: int, params: Any, inputs: list[bytes], requests: int, stream: bool) -> dict:
    from coordexp.benchmarks.serve import SweepOptions, sweep

    opts = SweepOptions(urls=(url,), levels=(level,), stream=stream, requests=max(requests, 2 * level),
                        warmup=max(2, level), retries=0)
    res = asyncio.run(sweep(opts, params, inputs, log=lambda *a, **k: None))
    return {"metrics": res["levels"][0], "texts": res["texts"]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def measure_inflight(urls: dict[str, str], inputs: list[bytes], levels: Sequence[int], requests: int,
                     max_new_tokens: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Streamed greedy sweeps of both servers, level by level, alternating which goes first."""
    from coordexp.generation import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens)
    levels_out: dict[str, dict[int, dict]] = {"static": {}, "inflight": {}}
    texts: dict[str, dict[int, str]] = {"static": {}, "inflight": {}}
    for k, level in enumerate(levels):
        order = ("static", "inflight") if k % 2 == 0 else ("inflight", "static")
        for mode in order:
            r = _sweep_level(urls[mode], level, params, inputs, requests, stream=True)
            levels_out[mode][level] = r["metrics"]
            texts[mode].update(r["texts"])
            m = r["metrics"]
            log(f"  {mode:<8} c{level:<3} {m['images_per_s']:7.2f} img/s  ttft p50 "
                f"{m['time_to_first_token']['p50']:8.1f} ms  errors {m['errors']}")
    out: dict[str, Any] = {}
    for mode in ("static", "inflight"):
        lv = levels_out[mode]
        t = {c: (m["time_to_first_token"] or {}).get("p50") for c, m in lv.items()}
        out[mode] = {
            "ttft_p50_ms": {str(c): v for c, v in t.items()},
            "images_per_s": {str(c): m["images_per_s"] for c, m in lv.items()},
            "output_tokens_avg": {str(c): m["output_sequence_length"]["avg"] for c, m in lv.items()},
            "errors": sum(m["errors"] for m in lv.values()),
            "ttft_p50_c4_over_c1": _ratio(t.get(4), t.get(1)),
            "levels": list(lv.values()),
        }
    top = max(levels)
    out["inflight"]["images_per_s_c16_ratio" if top == 16 else f"images_per_s_c{top}_ratio"] = _ratio(
        out["inflight"]["images_per_s"][str(top)], out["static"]["images_per_s"][str(top)])
    same = [i for i in texts["static"] if i in texts["inflight"]]
    out["inflight"]["same_answers_as_static"] = (sum(texts["static"][i] == texts["inflight"][i] for i in same),
                                                 len(same))
    return out


def step_stats(url: str) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics of every loaded model (`inventory.inference_statistics`)."""
    from coordexp.engines.triton.inventory import inference_statistics

    return asyncio.run(inference_statistics(url))


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model over a run: requests, executions, mean batch, and per request the mean ms of each part."""
    from coordexp.engines.triton.inventory import STAT_PARTS

    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        n = a["inferences"] - b.get("inferences", 0)
        e = a["executions"] - b.get("executions", 0)
        if not n:
            continue
        row: dict[str, float] = {"requests": n, "executions": e, "mean_batch": round(n / e, 2) if e else None}
        for k in STAT_PARTS:
            row[f"{k}_ms"] = round((a[f"{k}_ns"] - b.get(f"{k}_ns", 0)) / n / 1e6, 3)
        out[name] = row
    return out


def measure_overhead(urls: dict[str, str], onnx_dir: str, manifest: dict[str, Any], n_images: int, tokens: int,
                     threads: int, inputs: list[bytes], log: Callable[[str], None]) -> dict[str, Any]:
    """The unary ensemble at concurrency 8 on each server (static, in-flight llm) vs OnnxEngine at
    batch 8, a fixed output length (ignore_eos). The in-process figure is the mean of a run before
    and one after the served runs (drift on a shared machine)."""
    from PIL import Image

    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.generation import GenerationParams
    from coordexp.prompt import PromptSpec

    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    data = [inputs[i % len(inputs)] for i in range(n_images)]
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in data]
    engine = OnnxEngine(onnx_dir, prompt=PromptSpec.from_dict(manifest.get("prompt")), threads=threads)
    engine.generate_batch(images[:8], params)  # warm-up

    def local() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(images), 8):
            engine.generate_batch(images[i:i + 8], params)
        return len(images) / (time.perf_counter() - t0)

    runs = [local()]
    out: dict[str, Any] = {}
    for mode, url in urls.items():
        before = step_stats(url)
        served = _sweep_level(url, 8, params, data, n_images, stream=False)["metrics"]
        steps = stats_delta(before, step_stats(url))  # warm-up included: where a request's time goes
        out[mode] = {"served_c8_images_per_s": served["images_per_s"], "served_errors": served["errors"],
                     "steps": steps}
        log(f"  served unary c8, {mode} llm: {served['images_per_s']:7.2f} img/s")
        for name, r in steps.items():
            log(f"    {name:<16} {r['requests']:>4} req  batch {r['mean_batch']}  queue {r['queue_ms']:.1f} ms  "
                f"infer {r['compute_infer_ms']:.1f} ms  in {r['compute_input_ms']:.1f}  out {r['compute_output_ms']:.1f}")
    runs.append(local())
    base = sum(runs) / len(runs)
    log(f"  in-process onnx@b8 {base:7.2f} img/s (runs {', '.join(f'{r:.2f}' for r in runs)})")
    for r in out.values():
        r["served_c8_over_inprocess_b8"] = _ratio(r["served_c8_images_per_s"], base)
    return {"inprocess_b8_images_per_s": round(base, 4), "inprocess_runs": [round(r, 4) for r in runs],
            **out, "images": n_images, "tokens_per_answer": tokens, "threads": threads}


def optional_measure(module: str, fn: str, *args: Any) -> tuple[dict[str, Any] | None, str | None]:
    """`module.fn(*args)`, or (None, why) when that module or function is not there (yet)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return None, f"{module} is not available ({e})"
    f = getattr(mod, fn, None)
    if f is None:
        return None, f"{module}.{fn} is not there"
    return f(*args), None


def run(opts: DecodingOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything above -> the report (nested keys as issue 18 names them)."""
    import platform

    from coordexp.benchmarks.serve import dataset_inputs
    from coordexp.serving.common import read_manifest
    from coordexp.serving.server import start_server

    os.makedirs(opts.workdir, exist_ok=True)
    onnx_dir = onnx_dir_of(opts, log)
    inputs, skipped = dataset_inputs(opts.data)
    if not inputs:
        raise SystemExit(f"{opts.data}: no readable records")
    report: dict[str, Any] = {
        "schema_version": "coordexp.bench_decoding.v1", "ckpt": opts.ckpt, "onnx_dir": onnx_dir, "data": opts.data,
        "records": len(inputs), "skipped_records": skipped, "cpus": os.cpu_count(), "machine": platform.machine(),
        "options": {k: v for k, v in vars(opts).items()}, "notes": [],
        "inflight": None, "static": None, "served_c8_over_inprocess_b8": None,
        "served_c8_over_inprocess_b8_static_llm": None, "overhead": None,
        "jump_forward": None, "prefix_cache": None, "inflight_torch": None, "static_torch": None,
    }
    if "inflight" not in opts.skip or "overhead" not in opts.skip:
        repos = write_repos(opts, onnx_dir)
        manifest = read_manifest(repos["static"])
        servers = {}
        try:
            for mode, repo in repos.items():
                log(f"starting Triton ({mode}) from {repo} ...")
                servers[mode] = start_server(repo)
            urls = {m: s.grpc_url for m, s in servers.items()}
            if "inflight" not in opts.skip:
                log(f"streamed sweep, levels {list(opts.levels)}, {opts.requests} requests per level and server")
                r = measure_inflight(urls, inputs, opts.levels, opts.requests, opts.max_new_tokens, log)
                report["inflight"], report["static"] = r["inflight"], r["static"]
            if "overhead" not in opts.skip:
                o = measure_overhead(urls, onnx_dir, manifest, opts.overhead_images, opts.overhead_tokens,
                                     opts.threads, inputs, log)
                report["overhead"] = o
                # the served path as it stands with the in-flight llm; the static llm's figure beside it
                report["served_c8_over_inprocess_b8"] = o["inflight"]["served_c8_over_inprocess_b8"]
                report["served_c8_over_inprocess_b8_static_llm"] = o["static"]["served_c8_over_inprocess_b8"]
        finally:
            for s in servers.values():
                s.stop()
    if "torch" not in opts.skip:  # the same sweep on --backend torch (CPU, fp32): inflight_torch.*
        servers = {}
        try:
            for mode, repo in write_torch_repos(opts).items():
                log(f"starting Triton (torch, {mode}) from {repo} ...")
                servers[mode] = start_server(repo, extra_args=["--exit-timeout-secs=90"])
            log(f"torch backend: streamed sweep, levels {list(opts.levels)}")
            r = measure_inflight({m: s.grpc_url for m, s in servers.items()}, inputs, opts.levels, opts.requests,
                                 opts.max_new_tokens, log)
            report["inflight_torch"], report["static_torch"] = r["inflight"], r["static"]
        finally:
            for s in servers.values():
                s.stop(timeout=100)
    if "jump_forward" not in opts.skip:
        log("jump-forward ...")
        res, note = optional_measure("coordexp.benchmarks.jump_forward", "measure_jump_forward", onnx_dir, opts.data,
                                     opts.limit, opts.max_new_tokens, opts.threads)
        report["jump_forward"] = res if res is not None else {
            "decoder_calls_ratio": None, "images_per_s_ratio": None, "identical": None, "note": note}
        if note:
            report["notes"].append(note)
    if "prefix_cache" not in opts.skip:
        log("prefix cache ...")
        res, note = optional_measure("coordexp.benchmarks.prefix_cache", "measure_prefix_cache", onnx_dir, opts.data,
                                     opts.limit, opts.threads)
        report["prefix_cache"] = res if res is not None else {"ttft_ratio": None, "identical": None, "note": note}
        if note:
            report["notes"].append(note)
    return report


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for suffix, title in (("", "onnx"), ("_torch", "torch")):
        inf, st = report.get("inflight" + suffix), report.get("static" + suffix)
        if not (inf and st):
            continue
        levels = list(inf["images_per_s"])
        lines.append(f"{title + ': streamed (greedy, mixed lengths)':<34}" + "".join(f"{'c' + c:>20}" for c in levels))
        for mode, r in (("static", st), ("inflight", inf)):
            lines.append(f"{mode + ' images/s':<34}" + "".join(f"{_f(r['images_per_s'][c]):>20}" for c in levels))
            lines.append(f"{mode + ' ttft p50 ms':<34}" + "".join(f"{_f(r['ttft_p50_ms'][c], '{:.1f}'):>20}"
                                                                  for c in levels))
        lines.append("")
        lines.append(f"{'inflight' + suffix + '.ttft_p50_c4_over_c1':<42}{_f(inf['ttft_p50_c4_over_c1'])}   (target <= 2)")
        lines.append(f"{'static' + suffix + '.ttft_p50_c4_over_c1':<42}{_f(st['ttft_p50_c4_over_c1'])}")
        key = next((k for k in inf if k.startswith("images_per_s_c") and k.endswith("_ratio")), None)
        if key:
            lines.append(f"{'inflight' + suffix + '.' + key:<42}{_f(inf[key])}   (target >= 1.3)")
        lines.append("")
    o = report.get("overhead")
    if o:
        lines.append(f"{'served_c8_over_inprocess_b8':<42}{_f(report['served_c8_over_inprocess_b8'])}   "
                     f"(target >= 0.9; in-flight llm {o['inflight']['served_c8_images_per_s']:.2f} vs in-process "
                     f"{o['inprocess_b8_images_per_s']:.2f} img/s)")
        lines.append(f"{'  same, static llm':<42}{_f(report['served_c8_over_inprocess_b8_static_llm'])}   "
                     f"({o['static']['served_c8_images_per_s']:.2f} img/s)")
    for name, keys in (("jump_forward", ("decoder_calls_ratio", "images_per_s_ratio", "identical")),
                       ("prefix_cache", ("ttft_ratio", "identical"))):
        r = report.get(name)
        if r:
            for k in keys:
                v = r.get(k)
                lines.append(f"{name + '.' + k:<42}{v if isinstance(v, bool) or v is None else _f(v, '{:.3f}')}")
            if r.get("note"):
                lines.append(f"  ({r['note']})")
    return "\n".join(lines)
