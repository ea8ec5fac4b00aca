"""The GPU check of `--backend torch`, one command: run A (correctness), run B (speed), run C (accuracy parity).

    python bench/gpu/run_gpu_check.py --out runs/gpu_check [--device cuda] [--dtype bf16]
        [--runs a,b,c] [--images 50] [--new-tokens 64] [--concurrency 1,8,32]
        [--url-a HOST:PORT] [--url-b HOST:PORT]      (use a running server instead of starting one)
        [--small]                                    (CPU test sizes: tiny model, few images)
        [--compile]                                  (run B: + static cache with torch.compile)

Run A: the demo checkpoint exported with `--backend torch --dtype fp32 --device DEVICE` (the export
validates it), served by the real Triton; unary, streamed and guided answers on the demo val
images must be token-identical to the CPU fp32 HF-generate reference.
Run B: a random-weight checkpoint with Qwen3-VL-2B's dimensions (`--small`: tiny), `--dtype`:
vision ms per image, TTFT and ms per output token at batch 1 and 8 for the dynamic and the static
KV cache, HF `generate` on the same device side by side, and requests/s at each concurrency
through the served model, in-flight batching (the export's default) and static batches side by side.
Run C: the demo checkpoint in `--dtype` on `--device` against the CPU fp32 reference on the labelled
demo val images: accuracy parity (metric deltas with 95 % intervals, a verdict), for engines that are
not bit-identical. Writes OUT/gpu_check.json and OUT/gpu_check.md (the table); exit 1 when
run A finds a difference. See bench/gpu/README.md for setting up a GPU machine without internet.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import measure  # noqa: E402  (bench/gpu/measure.py, beside this script)

DEMO_CKPT = os.path.join(ROOT, "checkpoints", "coordexp-demo-shapes")
DEMO_VAL = os.path.join(ROOT, "data", "demo_val", "val.jsonl")


@contextlib.contextmanager
def served(ckpt: str, repo: str, url: str | None, device: str, dtype: str, max_new: int, validate: bool,
           extra: tuple[str, ...] = ()) -> Iterator[str]:
    """The gRPC url of a server holding a torch export of `ckpt` (`url` given: that one); `extra`:
    more build_engine flags (e.g. `--llm-batching static`)."""
    if url:
        yield url
        return
    from coordexp.export.build_engine import main as build
    from coordexp.serving.server import start_server

    argv = ["--ckpt", ckpt, "--backend", "torch", "--device", device, "--dtype", dtype, "--repo", repo,
            "--max-new-tokens", str(max_new), "--max-batch-size", "32", *extra]
    if build(argv + ([] if validate else ["--skip-validation"])) != 0:
        raise SystemExit(f"export of {ckpt} failed")
    # torch stubs take seconds each to tear down: a longer exit timeout than Triton's 10 s
    srv = start_server(repo, extra_args=["--exit-timeout-secs=90"])
    try:
        yield srv.grpc_url
    finally:
        srv.stop(timeout=100)


def table(report: dict[str, Any]) -> str:
    """The short Markdown table of a report."""
    lines = [f"GPU check ({report['device']}, run B in {report['dtype']}, {report['model_b']})", ""]
    a = report.get("a")
    if a:
        lines += ["| run A (fp32 vs CPU fp32 reference) | identical answers |", "| --- | --- |"]
        lines += [f"| {m} | {v['identical']}/{v['of']} |" for m, v in a["modes"].items()]
        lines.append("")
    c = report.get("c")
    if c:
        lines += [f"run C: {c['candidate']} vs {c['reference']} on {c['images']} labelled images: "
                  f"**{c['verdict']}** ({c['why']}); identical answers {c['token_agreement']['exact_answers']}/"
                  f"{c['images']}", "", "| metric | CPU fp32 | candidate | delta | 95 % CI |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m['name']} | {m['a']:.4f} | {m['b']:.4f} | {m['delta']:+.4f} | "
                  f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}] |" for m in c["metrics"]]
        lines.append("")
    b = report.get("b")
    if b:
        lines += [f"vision: {b['vision_ms_per_image']} ms per image ({b['image_tokens']} image tokens)", "",
                  "| decode | batch | TTFT ms | ms/token | tokens/s |", "| --- | --- | --- | --- | --- |"]
        for engine in ("torch_dynamic", "torch_static", "torch_static_compiled", "hf_generate"):
            for batch, v in b.get(engine, {}).items():
                lines.append(f"| {engine} | {batch.split('_')[1]} | {v['ttft_ms']} | {v['ms_per_token']} | "
                             f"{v['tokens_per_s']} |")
        for batch in b["hf_generate"]:
            ratio = b["hf_generate"][batch]["ms_per_token"] / max(1e-9, b["torch_dynamic"][batch]["ms_per_token"])
            lines.append(f"| HF / torch (dynamic) ms per token | {batch.split('_')[1]} | | {ratio:.2f}x | |")
        static = b.get("served_static") or {}
        lines += ["", "| served concurrency | requests/s in flight | p50 ms | errors | requests/s static batches | "
                      "in flight / static |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {k.split('_')[1]} | {v['requests_per_s']} | {v['p50_ms']} | {v['errors']} | "
                  f"{static.get(k, {}).get('requests_per_s', '-')} | "
                  f"{(b.get('served_inflight_over_static') or {}).get(k, '-')} |" for k, v in b["served"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="run B's dtype")
    p.add_argument("--runs", default="a,b,c")
    p.add_argument("--small", action="store_true", help="CPU test sizes (tiny model, 3 images, short answers)")
    p.add_argument("--ckpt-a", default=DEMO_CKPT)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--concurrency", default=None)
    p.add_argument("--url-a", default=None)
    p.add_argument("--url-b", default=None)
    p.add_argument("--compile", action="store_true", help="run B: also the static cache with torch.compile")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    small = args.small
    opts = measure.CheckOptions(
        device=args.device, dtype=args.dtype, small=small, images=args.images or (3 if small else 50),
        new_tokens=args.new_tokens or (8 if small else 64), image_size=128 if small else 448,
        levels=tuple(int(c) for c in (args.concurrency or ("1,2" if small else "1,8,32")).split(",")),
        batches=(1, 2) if small else (1, 8), compile=args.compile)
    os.makedirs(args.out, exist_ok=True)
    runs = set(args.runs.split(","))
    report: dict[str, Any] = {"device": opts.device, "dtype": opts.dtype,
                              "model_b": "tiny random (--small)" if small else "random weights, Qwen3-VL-2B dims",
                              "options": opts.__dict__}
    t0 = time.perf_counter()
    if "a" in runs:
        images = measure.demo_images(DEMO_VAL, opts.images)
        with served(args.ckpt_a, os.path.join(args.out, "repo_a"), args.url_a, opts.device, "fp32", 32, True) as url:
            report["a"] = measure.run_a(args.ckpt_a, url, images, 32 if not small else 8)
    if "b" in runs:
        ckpt = measure.random_checkpoint(os.path.join(args.out, "ckpt_b"), small)
        report["b"] = measure.run_b_in_process(ckpt, opts)
        with served(ckpt, os.path.join(args.out, "repo_b"), args.url_b, opts.device, opts.dtype, opts.new_tokens,
                    False) as url:
            report["b"]["served"] = measure.run_b_served(url, opts)  # in-flight batching (the default)
        if not args.url_b:  # the same export with static batches, side by side: what in-flight buys here
            with served(ckpt, os.path.join(args.out, "repo_b_static"), None, opts.device, opts.dtype,
                        opts.new_tokens, False, ("--llm-batching", "static")) as url:
                report["b"]["served_static"] = measure.run_b_served(url, opts)
            report["b"]["served_inflight_over_static"] = {
                k: round(v["requests_per_s"] / max(1e-9, report["b"]["served_static"][k]["requests_per_s"]), 3)
                for k, v in report["b"]["served"].items()}
    if "c" in runs:
        report["c"] = measure.run_c(args.ckpt_a, opts.device, opts.dtype, DEMO_VAL, opts.images,
                                    os.path.join(args.out, "run_c"), 8 if small else 96)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    text = table(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 1 if report.get("a") and not report["a"]["ok"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
