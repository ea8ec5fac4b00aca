"""Peak memory of the ONNX export (`coordexp.export.onnx_export.export_onnx`) on a shape-realistic
random checkpoint, against the float32 size of its weights (issue 18, part 5: target <= 2x).

    python bench/bench_export_memory.py --json OUT.json               # 1B shape (text 2048 x 12, vision 1024 x 24)
    python bench/bench_export_memory.py --shape 2b                     # Qwen3-VL-2B's dimensions
    python bench/bench_export_memory.py --shape 250m --compare-earlier # + the earlier save strategy, same run
    python bench/bench_export_memory.py --text-layers 4 --vision-layers 4   # any dimension overridden

The checkpoint is built once by `coordexp.fixtures.tiny.build_tiny_checkpoint` (random weights, the tiny
tokenizer, so the vocabulary is small; every other dimension as given) and cached under `--cache`.
Each export runs in a child process; this process samples the resident memory of the child and its
whole process tree from /proc every `--interval` seconds (a thread inside the exporter would miss
peaks: the exporter holds the GIL through long serialisation calls). Reported per strategy: peak
RSS, `peak_rss_over_fp32_size`, the child's RSS after its imports (torch alone, before any weight),
export seconds (per graph, from onnx_meta.json), the graphs' size on disk.

`--compare-earlier` also exports with the earlier strategy (graphs up to 1.5 GB of weights saved
inline, i.e. serialised whole in memory) in the same run. It needs several times the checkpoint's
size in memory: the issue measured 13 GB (3.2x) for the 1B shape, so use it at small shapes.
`--json` writes `peak_rss_over_fp32_size` (the current strategy) and the rest of the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "gpu"))
from measure import QWEN3_VL_2B  # noqa: E402 - Qwen3-VL-2B's public dimensions, one spec for the benches

SHAPES = {
    "2b": dict(QWEN3_VL_2B),
    "1b": {**QWEN3_VL_2B, "text_layers": 12},  # the 1B: text 2048 x 12, vision 1024 x 24
    "250m": {**QWEN3_VL_2B, "text_hidden": 1024, "text_layers": 12, "text_heads": 8, "text_kv_heads": 4,
             "text_intermediate": 3072, "vision_hidden": 768, "vision_layers": 12, "vision_heads": 12,
             "vision_intermediate": 3072, "deepstack_visual_indexes": [2, 5, 8]},
    "tiny": {},  # the builder's tiny preset
}
DIM_FLAGS = ("text_hidden", "text_layers", "text_heads", "text_kv_heads", "head_dim", "text_intermediate",
             "vision_hidden", "vision_layers", "vision_heads", "vision_intermediate")
EARLIER_EXTERNAL_DATA_BYTES = 1_500_000_000  # the export's inline-save limit before this benchmark


# ------------------------------------------------------------------------------------ memory sampling
def _parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass  # the process ended while we listed it
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    parents = _parents()
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(_rss(p) for p in tree)


def run_sampled(cmd: list[str], interval: float) -> tuple[int, int, float]:
    """Run `cmd`; (returncode, peak tree RSS in bytes, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # this child's own ru_maxrss (KiB): a floor in case a short spike fell between two samples
    peak = max(peak, usage.ru_maxrss * 1024)
    return proc.returncode, peak, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ helpers
def weights_fp32_bytes(ckpt: Path) -> tuple[int, int]:
    """(parameters, float32 bytes) from the safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                count = 1
                for d in st.get_slice(key).get_shape():
                    count *= int(d)
                n += count
    return n, 4 * n


def checkpoint(shape: dict, cache: Path) -> Path:
    """The random checkpoint of `shape`, built once per shape into `cache`."""
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    out = cache / f"qwen3vl-{key}"
    if not (out / "config.json").is_file():
        tmp = cache / f".building-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"building the random checkpoint {out} ...", flush=True)
        build_tiny_checkpoint(str(tmp), family="qwen3_vl", seed=0, size=dict(shape) if shape else "tiny")
        tmp.rename(out)  # only a complete folder is ever reused
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(ckpt: str, out: str, external_data_bytes: str, result: str) -> int:
    """The measured process: imports, then one export_onnx, then its timings into `result`."""
    import onnx  # noqa: F401 - imported first so that `rss_after_imports` is the libraries' share
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from coordexp.export.onnx_export import export_onnx

    rss_imports = _rss(os.getpid())
    t0 = time.perf_counter()
    kwargs = {} if external_data_bytes == "default" else {"external_data_bytes": int(external_data_bytes)}
    meta = export_onnx(ckpt, out, **kwargs)
    Path(result).write_text(json.dumps({"rss_after_imports": rss_imports, "seconds": time.perf_counter() - t0,
                                        "export_seconds": meta["export_seconds"], "files": meta["files"]}))
    return 0


def measure(ckpt: Path, work: Path, strategy: str, external_data_bytes: str, interval: float) -> dict:
    out, result = work / f"onnx-{strategy}", work / f"{strategy}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(ckpt), str(out), external_data_bytes, str(result)]
    rc, peak, wall = run_sampled(cmd, interval)
    if rc != 0:
        raise SystemExit(f"the {strategy} export failed (exit {rc}); see its output above")
    r = json.loads(result.read_text())
    return {"peak_rss_bytes": peak, "rss_after_imports_bytes": r["rss_after_imports"],
            "export_seconds": r["export_seconds"], "wall_seconds": round(wall, 1), "disk_bytes": disk_bytes(out),
            "files": r["files"], "onnx_dir": str(out)}


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        return child(a[0], a[1], a[2], a[3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    for key in DIM_FLAGS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, dest=key)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "coordexp-bench-export"),
                   help="folder of the cached random checkpoints (default %(default)s)")
    p.add_argument("--work", default=None, help="folder for the exports (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the exported graphs")
    p.add_argument("--compare-earlier", action="store_true",
                   help="also export with the earlier strategy (inline graphs up to 1.5 GB), same run")
    p.add_argument("--interval", type=float, default=0.02, help="RSS sampling period, seconds")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not os.path.isdir("/proc/self"):
        raise SystemExit("error: this benchmark samples memory from /proc (Linux only)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape = {**SHAPES[args.shape], **{k: getattr(args, k) for k in DIM_FLAGS if getattr(args, k) is not None}}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(shape, cache)
    params, fp32 = weights_fp32_bytes(ckpt)
    avail = _available_bytes()
    print(f"checkpoint {ckpt}: {params / 1e6:.0f} M parameters, {_gb(fp32)} in float32; "
          f"{_gb(avail) if avail else '?'} available", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="coordexp-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    strategies = [("current", "default")] + ([("earlier", str(EARLIER_EXTERNAL_DATA_BYTES))]
                                             if args.compare_earlier else [])
    results: dict[str, dict] = {}
    try:
        for name, limit in strategies:
            print(f"exporting ({name} strategy) ...", flush=True)
            results[name] = measure(ckpt, work, name, limit, args.interval)
            results[name]["peak_rss_over_fp32_size"] = round(results[name]["peak_rss_bytes"] / fp32, 3)
            if not args.keep:
                shutil.rmtree(results[name]["onnx_dir"], ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)

    cur = results["current"]
    report = {"shape": args.shape, "dims": shape, "checkpoint": str(ckpt), "parameters": params,
              "fp32_bytes": fp32, "peak_rss_bytes": cur["peak_rss_bytes"],
              "peak_rss_over_fp32_size": cur["peak_rss_over_fp32_size"], "target_peak_rss_over_fp32_size": 2.0,
              "export_seconds": cur["export_seconds"]["total"], "disk_bytes": cur["disk_bytes"],
              "strategies": results, "cpu_count": os.cpu_count(),
              "issue_earlier_measurement": {"shape": "1b", "peak_rss_gb": 13, "peak_rss_over_fp32_size": 3.2}}
    if "earlier" in results:
        report["peak_rss_earlier_over_current"] = round(results["earlier"]["peak_rss_bytes"] / cur["peak_rss_bytes"], 3)

    rows = [("strategy", "peak RSS", "x fp32", "RSS after imports", "export s (vision/embed/decoder)", "disk")]
    for name, r in results.items():
        s = r["export_seconds"]
        rows.append((name, _gb(r["peak_rss_bytes"]), f"{r['peak_rss_over_fp32_size']:.2f}",
                     _gb(r["rss_after_imports_bytes"]),
                     f"{s['total']:.0f} ({s['vision']:.0f}/{s['embed']:.0f}/{s['decoder']:.0f})", _gb(r["disk_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nexport memory, shape {args.shape}: {params / 1e6:.0f} M parameters, float32 {_gb(fp32)} "
          f"(target: peak <= 2.00x)")
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if "peak_rss_earlier_over_current" in report:
        print(f"  earlier / current peak: {report['peak_rss_earlier_over_current']:.2f}x")
    else:
        print("  earlier strategy (the issue's measurement, 1B shape): 13 GB, 3.2x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
