"""Serving benchmark: HF reference vs in-process ONNX Runtime vs the served Triton ensemble.

    python bench/bench_serving.py [--ckpt CKPT --repo REPO | (default: tiny checkpoint, exported here)]
        [--url HOST:PORT] [--images 32] [--max-new-tokens 32] [--threads 2] [--json out.json]

In one run, on one machine, with the same images and a FIXED output length (`ignore_eos`: every
request generates exactly --max-new-tokens tokens, so the numbers compare):

  hf@1        the checkpoint through HF `generate` (TorchEngine), one image at a time
  onnx@1      ONNX Runtime in process (OnnxEngine), one image at a time
  onnx@8      ONNX Runtime in process, batches of 8 (for reference)
  served@c1   the Triton ensemble over gRPC, one request in flight
  served@c8   the Triton ensemble, 8 requests in flight (the dynamic batcher groups them)
  served@c8/inflight  the same repository with the llm's in-flight batching (`batching` = "inflight",
              a second server from a copy of --repo), 8 requests in flight; --no-inflight skips it

Reported per row: images/s, generated tokens/s, mean / p50 / p90 latency per image and ms per
generated token of a request (mean latency / tokens). Then the two ratios the issue targets:
served@c8 images/s vs hf@1 (target >= 3x) and served@c1 latency vs onnx@1 latency (target <= 1.5x).
The server is started from --repo on free loopback ports unless --url is given.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

SIZES = [(128, 128), (160, 96), (96, 160), (192, 128), (128, 192), (224, 160), (100, 100), (256, 128)]


def make_images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        rng = np.random.default_rng(seed + i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def row(name: str, n_images: int, tokens: int, wall: float, latencies: Sequence[float]) -> dict[str, Any]:
    lat = sorted(latencies)
    mean = statistics.fmean(lat)
    per_req_tokens = tokens / n_images if n_images else 0
    return {"config": name, "images": n_images, "tokens": tokens, "seconds": round(wall, 3),
            "images_per_s": n_images / wall, "tokens_per_s": tokens / wall, "latency_ms_mean": 1000 * mean,
            "latency_ms_p50": 1000 * lat[len(lat) // 2], "latency_ms_p90": 1000 * lat[min(len(lat) - 1, int(0.9 * len(lat)))],
            "ms_per_token": 1000 * mean / per_req_tokens if per_req_tokens else float("nan")}


def bench_local(name: str, generate: Callable[[list], list], images: Sequence[bytes], batch: int,
                warmup: int) -> dict[str, Any]:
    decoded = [pil(b) for b in images]
    for i in range(warmup):
        generate(decoded[i % len(decoded): i % len(decoded) + batch])
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(decoded), batch):
        chunk = decoded[i:i + batch]
        s = time.perf_counter()
        res = generate(chunk)
        d = time.perf_counter() - s
        lat += [d] * len(chunk)  # every image of the batch waited for the whole batch
        tokens += sum(len(r.token_ids) for r in res)
    return row(name, len(decoded), tokens, time.perf_counter() - t0, lat)


def bench_served(name: str, url: str, model: str, images: Sequence[bytes], params: Any, concurrency: int,
                 warmup: int) -> dict[str, Any]:
    """The served ensemble through the client users run (`TritonEngine`), `concurrency` in flight."""
    from coordexp.engines.triton import ClientOptions, TritonEngine

    with TritonEngine.connect([url], ClientOptions(model=model, timeout=300.0, max_in_flight=concurrency)) as engine:
        if warmup:
            engine.generate_batch(list(images[:max(warmup, concurrency)]), params)
        t0 = time.perf_counter()
        out = engine.generate_batch(list(images), params)
        wall = time.perf_counter() - t0
    errors = [r.error for r in out if r.error]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} failed requests, first: {errors[0]}")
    return row(name, len(images), sum(len(r.token_ids) for r in out), wall, [r.latency_s for r in out])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["config", "images/s", "tokens/s", "lat mean ms", "lat p50 ms", "lat p90 ms", "ms/token"]
    body = [[r["config"], f"{r['images_per_s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['latency_ms_mean']:.1f}",
             f"{r['latency_ms_p50']:.1f}", f"{r['latency_ms_p90']:.1f}", f"{r['ms_per_token']:.2f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def prepare(args: argparse.Namespace, workdir: str) -> tuple[str, str]:
    """(ckpt, repo): the given ones, or the tiny checkpoint built and exported here."""
    ckpt, repo = args.ckpt, args.repo
    if not ckpt:
        from coordexp.fixtures.tiny import build_tiny_checkpoint

        ckpt = os.path.join(workdir, "tiny-qwen3vl")
        print(f"building the tiny checkpoint in {ckpt}", file=sys.stderr)
        build_tiny_checkpoint(ckpt, family="qwen3_vl", seed=0)
    if not repo:
        from coordexp.export.build_engine import main as build_engine

        repo = os.path.join(workdir, "model_repository")
        print(f"exporting {ckpt} to {repo} (build_engine, validation skipped)", file=sys.stderr)
        rc = build_engine(["--ckpt", ckpt, "--repo", repo, "--name", "coordexp", "--skip-validation",
                           "--max-new-tokens", str(max(args.max_new_tokens, 64))])
        if rc:
            raise SystemExit(f"build_engine failed with exit code {rc}")
    return ckpt, repo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="HF checkpoint (default: build the tiny one)")
    p.add_argument("--repo", default=None, help="Triton repository exported from --ckpt (default: export here)")
    p.add_argument("--url", default=None, help="HOST:PORT of a running Triton serving --repo (default: start one)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the local engines (torch / ORT)")
    p.add_argument("--concurrency", type=int, default=8, help="in-flight requests of the loaded served run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-inflight", action="store_true", help="skip served@c8/inflight")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint / repository made here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from coordexp.generation import GenerationParams
    from coordexp.prompt import PromptSpec
    from coordexp.serving.common import read_manifest
    from coordexp.wire import ENSEMBLE

    workdir = tempfile.mkdtemp(prefix="coordexp-bench-")
    ckpt, repo = prepare(args, workdir)
    manifest = read_manifest(repo)
    prompt = PromptSpec.from_dict(manifest.get("prompt"))
    model = manifest.get("name") or ENSEMBLE
    if args.max_new_tokens > int(manifest.get("max_new_tokens") or 0):
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} exceeds the repository's limit")
    params = GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    images = make_images(args.images)
    rows: list[dict[str, Any]] = []

    server = None
    inflight_server = None
    url = args.url
    try:
        if not url:
            from coordexp.serving.server import start_server

            print(f"starting Triton from {repo} ...", file=sys.stderr)
            server = start_server(repo)
            url = server.grpc_url
        if not args.skip_hf:
            from coordexp.engines.torch_engine import TorchEngine

            hf = TorchEngine(ckpt, prompt=prompt, threads=args.threads)
            rows.append(bench_local("hf@1", lambda ims: hf.generate_batch(ims, params), images, 1, args.warmup))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            del hf
        from coordexp.engines.onnx_engine import OnnxEngine

        onnx = OnnxEngine(repo, prompt=prompt, threads=args.threads)
        for b in (1, 8):
            rows.append(bench_local(f"onnx@{b}", lambda ims: onnx.generate_batch(ims, params), images, b,
                                    args.warmup))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
        del onnx
        from coordexp.benchmarks.decoding import stats_delta, step_stats

        for c in (1, args.concurrency):
            before = step_stats(url)
            rows.append(bench_served(f"served@c{c}", url, model, images, params, c, args.warmup))
            # where a served request's time goes: Triton's per-model queue / compute times
            rows[-1]["steps"] = stats_delta(before, step_stats(url))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
        if not args.no_inflight:
            import shutil

            from coordexp.benchmarks.decoding import set_llm_batching
            from coordexp.serving.server import start_server

            copy = os.path.join(workdir, "model_repository_inflight")
            shutil.copytree(repo, copy)
            set_llm_batching(copy, "inflight")
            print(f"starting Triton from {copy} (in-flight llm) ...", file=sys.stderr)
            inflight_server = start_server(copy)
            iurl = inflight_server.grpc_url
            before = step_stats(iurl)
            c = args.concurrency
            rows.append(bench_served(f"served@c{c}/inflight", iurl, model, images, params, c, args.warmup))
            rows[-1]["steps"] = stats_delta(before, step_stats(iurl))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        if inflight_server is not None:
            inflight_server.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    by = {r["config"]: r for r in rows}
    cN = f"served@c{args.concurrency}"
    ratios = {}
    if "hf@1" in by:
        ratios[f"{cN} images/s vs hf@1"] = by[cN]["images_per_s"] / by["hf@1"]["images_per_s"]
    ratios["served@c1 latency vs onnx@1"] = by["served@c1"]["latency_ms_mean"] / by["onnx@1"]["latency_ms_mean"]
    ratios[f"{cN} images/s vs onnx@8"] = by[cN]["images_per_s"] / by["onnx@8"]["images_per_s"]
    targets = {f"{cN} images/s vs hf@1": (">=", 3.0), "served@c1 latency vs onnx@1": ("<=", 1.5),
               f"{cN} images/s vs onnx@8": (">=", 0.9), f"{cN}/inflight images/s vs onnx@8": (">=", 0.9)}
    if f"{cN}/inflight" in by:
        ratios[f"{cN}/inflight images/s vs onnx@8"] = by[f"{cN}/inflight"]["images_per_s"] / by["onnx@8"]["images_per_s"]
    print(f"\nCoordExp serving benchmark: {args.images} images ({len(set(SIZES))} sizes), {args.max_new_tokens} "
          f"generated tokens each (ignore_eos), {os.cpu_count()} CPUs, {platform.machine()}")
    print(format_table(rows))
    for r in rows:
        for name, st in (r.get("steps") or {}).items():
            print(f"  {r['config']:<10} {name:<16} {st['requests']:>4} req  mean batch {st['mean_batch']}  queue "
                  f"{st['queue_ms']:.1f} ms  infer {st['compute_infer_ms']:.1f} ms  input {st['compute_input_ms']:.1f}"
                  f"  output {st['compute_output_ms']:.1f} ms per request")
    print()
    ok = True
    for k, v in ratios.items():
        op, t = targets[k]
        hit = v >= t if op == ">=" else v <= t
        ok &= hit
        print(f"{k:<40} {v:6.2f}x   (target {op} {t}x: {'met' if hit else 'NOT met'})")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "ratios": ratios, "params": params.to_dict(), "images": args.images,
                       "cpus": os.cpu_count(), "repo": repo, "ckpt": ckpt,
                       "manifest_versions": manifest.get("versions")},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
