"""The one-command demo (`make demo`, or `python -m coordexp.demo`).

Export the bundled demo checkpoint to ONNX + a Triton repository, start the real Triton server
on loopback, run `coordexp-client infer` over gRPC on the demo val set, evaluate and visualise
(in parallel), run a short `bench`, stop the server and print where everything is.
Every step is the same public command a user would run; the demo only strings them together.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
DEMO_CKPT = os.path.join(ROOT, "checkpoints", "coordexp-demo-shapes")
DEMO_DATA = os.path.join(ROOT, "data", "demo_val", "val.jsonl")


class Stages:
    """Prints `[k/n] what ... done in s` lines: the progress display of the demo."""

    def __init__(self, total: int):
        self.total, self.k, self.t0 = total, 0, time.perf_counter()

    def start(self, what: str) -> float:
        self.k += 1
        print(f"\n[{self.k}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        return time.perf_counter()

    def done(self, since: float, note: str = "") -> None:
        print(f"      done in {time.perf_counter() - since:.1f}s{'  ' + note if note else ''}", file=sys.stderr,
              flush=True)


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "coordexp.client.cli", *argv]


def _run(cmd: list[str]) -> None:
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"demo: step failed (exit {rc}): {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordexp.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=DEMO_CKPT, help="checkpoint to export (default: the bundled demo model)")
    p.add_argument("--data", default=DEMO_DATA, help="input JSONL with ground truth")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="where everything is written")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--reexport", action="store_true", help="export again even if the repository is current")
    p.add_argument("--no-bench", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.isdir(args.ckpt):
        if args.ckpt != DEMO_CKPT:
            print(f"demo: checkpoint not found: {args.ckpt}", file=sys.stderr)
            return 2
        args.ckpt = _random_tiny_checkpoint(args.out)

    from coordexp.serving.server import TritonError, TritonServer

    t_start = time.perf_counter()
    out = os.path.abspath(args.out)
    repo = os.path.join(out, "model_repository")
    name = "coordexp"
    preds = os.path.join(out, "predictions.jsonl")
    stages = Stages(5 if args.no_bench else 6)

    # 1. export (build_engine skips it when the repository is current: the one check, export/repository.py)
    t = stages.start(f"export {os.path.relpath(args.ckpt, ROOT)} -> ONNX + Triton repository")
    _run([sys.executable, os.path.join(ROOT, "export", "build_engine.py"), "--ckpt", args.ckpt,
          "--repo", repo, "--name", name, "--max-new-tokens", str(args.max_new_tokens),
          "--max-batch-size", "8"] + (["--force"] if args.reexport else []))
    stages.done(t)

    # 2. serve
    t = stages.start("start Triton Inference Server on loopback")
    try:
        server = TritonServer(repo, log_path=os.path.join(out, "tritonserver.log")).start()
    except TritonError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    stages.done(t, f"grpc {server.grpc_url} ({server.install.source})")
    try:
        # 3. infer over gRPC
        t = stages.start(f"coordexp-client infer over gRPC on {os.path.relpath(args.data, ROOT)}")
        _run(_cli("infer", "--url", server.grpc_url, "--model", name, "--data", args.data, "--out", preds, "--force",
                  "--concurrency", str(args.concurrency), "--max-new-tokens", str(args.max_new_tokens)))
        stages.done(t)

        # 4. eval and vis in parallel off the same artifact
        t = stages.start("coordexp-client eval + vis (in parallel)")
        ev = subprocess.Popen(_cli("eval", "--pred", preds, "--gt", args.data, "--out", os.path.join(out, "eval")))
        vi = subprocess.Popen(_cli("vis", "--pred", preds, "--gt", args.data, "--out", os.path.join(out, "vis")))
        rcs = ev.wait(), vi.wait()
        if any(rcs):
            raise SystemExit(f"demo: eval/vis failed (exit codes {rcs})")
        stages.done(t)

        # 5. bench
        if not args.no_bench:
            t = stages.start("coordexp-client bench (concurrency 1, 4, 8; then streamed at 1, 4)")
            fixed = ["--ignore-eos", "--max-new-tokens", str(min(64, args.max_new_tokens))]
            _run(_cli("bench", "--url", server.grpc_url, "--model", name, "--data", args.data,
                      "--concurrency", "1,4,8", "--requests", "24", *fixed, "--out", os.path.join(out, "bench")))
            _run(_cli("bench", "--url", server.grpc_url, "--model", name, "--data", args.data, "--stream",
                      "--concurrency", "1,4", "--requests", "12", *fixed, "--out", os.path.join(out, "bench_stream")))
            stages.done(t)
    finally:
        t = stages.start("stop Triton")
        rc = server.stop()
        stages.done(t, f"exit code {rc}")

    _report(out, preds, time.perf_counter() - t_start)
    return 0


def _random_tiny_checkpoint(out: str) -> str:
    """A checkout without the trained demo model still shows the whole path, on random weights."""
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    ckpt = os.path.join(os.path.abspath(out), "tiny-random-ckpt")
    print(f"demo: the bundled demo checkpoint is missing; using a RANDOM tiny checkpoint at {ckpt} "
          "(its answers are not detections)", file=sys.stderr)
    if not os.path.isdir(ckpt):
        build_tiny_checkpoint(ckpt, family="qwen3_vl", seed=0)
    return ckpt


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def headline_lines(metrics: dict) -> list[str]:
    """The demo's printed headline from eval's metrics.json: AP50, AP and the exact-label F1 (a
    wrong shape is a miss), with the semantic F1 beside it, named, never in its place."""
    coco = (metrics.get("coco") or {}).get("bbox") or {}
    f1 = (metrics.get("f1ish") or {}).get("0.50") or {}
    # older metrics.json (no full_exact): "full" was semantic, so it is not the exact figure
    exact = (f1.get("full_exact") or {}).get("micro") or {}
    sem = (f1.get("full_semantic") or {}).get("micro") or {}

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

    return [f"  AP50 (bbox, exact labels)    {fmt(coco.get('AP50'))}",
            f"  AP (bbox, exact labels)      {fmt(coco.get('AP'))}",
            f"  F1 @ IoU 0.5, exact labels   {fmt(exact.get('f1'))}",
            f"  F1 @ IoU 0.5, semantic       {fmt(sem.get('f1'))}  (MiniLM cosine >= 0.6: can accept a wrong shape)"]


def _report(out: str, preds: str, seconds: float) -> None:
    metrics = _load(os.path.join(out, "eval", "metrics.json"))
    summary = _load(os.path.join(os.path.dirname(preds), "summary.json"))
    bench = _load(os.path.join(out, "bench", "bench.json"))

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

    print("\n" + "=" * 64)
    print(f"CoordExp Serve demo finished in {seconds:.0f}s")
    for line in headline_lines(metrics):
        print(line)
    print(f"  images/s (infer)     {fmt(summary.get('images_per_s'))}")
    print(f"  records / errors     {summary.get('records_written', 'n/a')} / {summary.get('errors', {})}")
    if bench:
        levels = bench.get("levels") or bench.get("results") or []
        best = max((lv.get("images_per_s") or 0 for lv in levels if isinstance(lv, dict)), default=None)
        print(f"  bench best images/s  {fmt(best)}")
    streamed = (_load(os.path.join(out, "bench_stream", "bench.json")).get("levels") or [{}])[0]
    if streamed.get("time_to_first_token"):
        print(f"  streamed, 1 in flight: time to first token {fmt(streamed['time_to_first_token']['p50'])} ms "
              f"(p50), inter-token {fmt(streamed['inter_token_latency']['avg'])} ms")
    print("Artifacts:")
    for rel in ("predictions.jsonl", "summary.json", "eval/metrics.json", "eval/per_class.csv",
                "eval/pr_curve.png", "vis/index.html", "bench/bench.png", "bench_stream/bench.json",
                "model_repository/manifest.json"):
        path = os.path.join(out, rel)
        if os.path.exists(path):
            print(f"  {path}")
    _registry_note(out)
    print("=" * 64)


def _registry_note(out: str) -> None:
    """Where `eval` registered this run, and the command that shows it."""
    try:
        from coordexp.runs.registry import Registry

        with Registry() as reg:
            run = next((r for r in reg.list_runs(limit=50) if r["run_dir"] == out), None)
            path = reg.path
    except Exception as e:  # noqa: BLE001 - the registry is a side product of the demo
        print(f"  (registry not readable: {e})")
        return
    if run is not None:
        print(f"Registered as {run['kind']} run {run['id']} in {path}; browse it with")
        print(f"  coordexp-client ui      # then http://127.0.0.1:8080/run?id={run['id']}")


if __name__ == "__main__":
    sys.exit(main())
