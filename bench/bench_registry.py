"""Registry + viewer at real sizes: API latencies on a run of 50,000 images, and import speed.

    python bench/bench_registry.py                 # 50,000-image runs, a 5,000-image import
    python bench/bench_registry.py --images 5000 --json out.json

1. registers two synthetic test runs of --images images (3 GT objects each; B misses some) and
   times the inserts;
2. writes a real run folder of --import-images images (GT JSONL + predictions.jsonl), scores it with
   the real `coordexp.eval` and times `runs import` (folder -> rows -> SQLite);
3. starts the real viewer (uvicorn on a free loopback port) and times each API call --repeat times
   (p50 / p95 / max, ms), the deep page and the filters included, and one /api/compare of the two runs.
Load stays on loopback and bounded (sequential requests).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from tqdm import tqdm

from coordexp.runs.registry import ImageRow, Registry, RunRecord

CLASSES = [f"{c} {s}" for c in ("red", "green", "blue", "orange", "yellow") for s in ("circle", "square", "triangle")]


def synthetic_rows(n: int, seed: int, miss_rate: float) -> list[ImageRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        gt, pred = [], []
        for j in range(3):
            x, y = rng.uniform(0, 400, 2)
            desc = CLASSES[int(rng.integers(len(CLASSES)))]
            found = rng.random() > miss_rate
            gt.append({"desc": desc, "bbox": [x, y, x + 50, y + 40], "index": j, "match": len(pred) if found else None})
            if found:
                pred.append({"desc": desc, "bbox": [x + 1, y, x + 51, y + 40], "index": len(pred), "match": j,
                             "iou": 0.96, "score": 1.0})
        tp = len(pred)
        rows.append(ImageRow(i, f"/data/images/{i:06d}.jpg", 640, 480, gt, pred, tp=tp, fp=0, fn=3 - tp,
                             latency_ms=float(rng.uniform(50, 150))))
    return rows


def register_synthetic(reg: Registry, n: int) -> tuple[list[int], float]:
    ids, t0 = [], time.perf_counter()
    for name, seed, miss in (("A", 0, 0.05), ("B", 0, 0.10)):
        rows = synthetic_rows(n, seed, miss)
        ids.append(reg.add_run(RunRecord(kind="test", name=f"bench-{name}", dataset_sha256="d" * 64,
                                         dataset_path="/data/val.jsonl"), rows))
    return ids, time.perf_counter() - t0


def import_folder(reg: Registry, base: str, n: int) -> dict[str, float]:
    from coordexp.eval.pipeline import evaluate
    from coordexp.runs.folders import import_run_dir

    rng = np.random.default_rng(1)
    gt_path, run_dir = os.path.join(base, "val.jsonl"), os.path.join(base, "run")
    os.makedirs(run_dir)
    with open(gt_path, "w") as g, open(os.path.join(run_dir, "predictions.jsonl"), "w") as p:
        for i in range(n):
            objs = []
            for _ in range(4):
                x, y = (int(v) for v in rng.integers(0, 800, 2))
                objs.append({"desc": CLASSES[int(rng.integers(len(CLASSES)))], "bbox_2d": [x, y, x + 150, y + 150]})
            g.write(json.dumps({"images": [f"images/{i:06d}.jpg"], "width": 640, "height": 480, "objects": objs}) + "\n")
            preds = [{"type": "bbox_2d", "points": o["bbox_2d"], "desc": o["desc"]} for o in objs[: 3 + i % 2]]
            p.write(json.dumps({"image_id": i, "images": [f"images/{i:06d}.jpg"], "width": 640, "height": 480,
                                "coord_mode": "norm1000", "preds": preds}) + "\n")
    t = time.perf_counter()
    evaluate(os.path.join(run_dir, "predictions.jsonl"), gt_path, os.path.join(run_dir, "eval"), semantic=False,
             plots=False)
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    run, rows = import_run_dir(run_dir)
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    reg.add_run(run, rows)
    t_write = time.perf_counter() - t
    return {"images": n, "eval_s": t_eval, "read_s": t_read, "write_s": t_write,
            "import_s": t_read + t_write, "images_per_s": n / (t_read + t_write)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_viewer(registry: str):
    import uvicorn

    from coordexp.ui.app import UiOptions, create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(UiOptions(registry=registry)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    return server, th, f"http://127.0.0.1:{port}"


def time_get(url: str, repeat: int) -> dict[str, float]:
    ms = []
    for _ in range(repeat):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=300) as r:
            r.read()
            assert r.status == 200, url
        ms.append(1e3 * (time.perf_counter() - t))
    v = np.asarray(ms)
    return {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)), "max_ms": float(v.max()),
            "n": repeat}


def api_latencies(base: str, a: int, b: int, n: int, repeat: int) -> dict[str, dict[str, float]]:
    deep = max(1, n // 50 - 1)
    calls = {
        "GET /api/health": "/api/health",
        "GET /api/runs": "/api/runs",
        "GET /api/runs/{id}": f"/api/runs/{a}",
        "images page 1, worst first": f"/api/runs/{a}/images?per_page=50&sort=worst",
        f"images page {deep}, worst first": f"/api/runs/{a}/images?per_page=50&sort=worst&page={deep}",
        "images page 1, input order": f"/api/runs/{a}/images?per_page=50&sort=index",
        "images filter class": f"/api/runs/{a}/images?per_page=50&cls=red%20circle",
        "images filter FN": f"/api/runs/{a}/images?per_page=50&outcome=fn",
        "images filter class + FN, page 5": f"/api/runs/{a}/images?per_page=50&cls=red%20circle&outcome=fn&page=5",
        "GET /api/runs/{id}/images/{idx}": f"/api/runs/{a}/images/{n // 2}",
        "GET /run (page)": f"/run?id={a}",
    }
    out = {}
    for name, path in tqdm(calls.items(), desc="api", file=sys.stderr):
        out[name] = time_get(base + path, repeat)
    out["GET /api/compare (bootstrap 1000)"] = time_get(f"{base}/api/compare?a={a}&b={b}", 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--import-images", type=int, default=5_000)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sqlite")
        with Registry(path) as reg:
            print(f"registering 2 runs x {args.images} images ...", file=sys.stderr)
            (a, b), t_reg = register_synthetic(reg, args.images)
            print(f"importing a scored run folder of {args.import_images} images ...", file=sys.stderr)
            imp = import_folder(reg, tmp, args.import_images)
        server, th, base = start_viewer(path)
        try:
            lat = api_latencies(base, a, b, args.images, args.repeat)
        finally:
            server.should_exit = True
            th.join(timeout=10)
        size_mb = os.path.getsize(path) / 2**20
    res = {"images_per_run": args.images, "register_2_runs_s": t_reg,
           "register_images_per_s": 2 * args.images / t_reg, "registry_mb": size_mb, "import": imp, "api": lat}
    print(f"\nregistered 2 x {args.images} images in {t_reg:.1f}s ({res['register_images_per_s']:.0f} images/s), "
          f"registry {size_mb:.0f} MB")
    print(f"import of a {imp['images']}-image run folder: {imp['import_s']:.2f}s ({imp['images_per_s']:.0f} images/s;"
          f" its eval took {imp['eval_s']:.1f}s)")
    print(f"\n| API call ({args.images} images) | p50 ms | p95 ms | max ms |\n| --- | ---: | ---: | ---: |")
    for k, v in lat.items():
        print(f"| {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['max_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
