"""Benchmark of coordexp.eval on synthetic data (seeded).

    python bench/bench_eval.py [--images 5000] [--preds 20] [--seed 0] [--repeat 1] [--semantic]

Writes a norm1000 GT JSONL + prediction artifact (N images x P predictions, 5..25 GT objects per
image over 30 COCO class names, predictions = jittered GT boxes with some wrong class names plus
random boxes, random scores) to a temp folder, then times on the same data:

- load:        both files -> per-image pairs in pixels (shared by both metric families)
- coco (ours): COCO dicts from the pairs + faster-coco-eval bbox evaluate/accumulate/summarize
- pycocotools: pycocotools COCO + loadRes + COCOeval on exactly the same COCO dicts
- f1ish:       matching at IoU 0.3 and 0.5 + micro/macro aggregation (string semantics; with
               --semantic also with the all-MiniLM-L6-v2 model, timed after it is loaded)
- evaluate():  the whole thing end to end, artifacts and plots included

and prints the ratios. The 12 COCO numbers of both evaluators are compared too.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

CLASSES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
           "fire hydrant", "stop sign", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
           "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis"]


def make_data(folder: str, n_images: int, n_preds: int, seed: int) -> tuple[str, str]:
    from coordexp.grid import from_pixels

    rng = np.random.default_rng(seed)
    gt_path, pred_path = os.path.join(folder, "gt.norm.jsonl"), os.path.join(folder, "predictions.jsonl")
    with open(gt_path, "w") as fg, open(pred_path, "w") as fp:
        for i in range(n_images):
            W, H = int(rng.integers(320, 1280)), int(rng.integers(240, 960))
            n_gt = int(rng.integers(5, 26))
            objs = []
            for _ in range(n_gt):
                w, h = rng.uniform(8, W / 2), rng.uniform(8, H / 2)
                x, y = rng.uniform(0, W - 1 - w), rng.uniform(0, H - 1 - h)
                objs.append((CLASSES[int(rng.integers(len(CLASSES)))], [x, y, x + w, y + h]))
            gt_objs = [{"desc": d, "bbox_2d": from_pixels(b, W, H)} for d, b in objs]
            preds = []
            for k in range(n_preds):
                if k < n_gt and rng.random() < 0.8:  # a jittered GT box, sometimes with a wrong class
                    d, b = objs[k]
                    bw, bh = b[2] - b[0], b[3] - b[1]
                    b = [b[0] + rng.normal(0, 0.08) * bw, b[1] + rng.normal(0, 0.08) * bh,
                         b[2] + rng.normal(0, 0.08) * bw, b[3] + rng.normal(0, 0.08) * bh]
                    if rng.random() < 0.15:
                        d = CLASSES[int(rng.integers(len(CLASSES)))]
                else:
                    w, h = rng.uniform(8, W / 2), rng.uniform(8, H / 2)
                    x, y = rng.uniform(0, W - 1 - w), rng.uniform(0, H - 1 - h)
                    d, b = CLASSES[int(rng.integers(len(CLASSES)))], [x, y, x + w, y + h]
                b = [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]
                preds.append({"type": "bbox_2d", "points": from_pixels(b, W, H), "desc": d,
                              "score": round(float(rng.random()), 3)})
            img = [f"img_{i:06d}.jpg"]
            fg.write(json.dumps({"images": img, "width": W, "height": H, "objects": gt_objs}) + "\n")
            fp.write(json.dumps({"image_id": i, "images": img, "width": W, "height": H, "coord_mode": "norm1000",
                                 "raw_output": "", "preds": preds}) + "\n")
    return pred_path, gt_path


def _best(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--preds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="best of N for each timed part")
    ap.add_argument("--semantic", action="store_true", help="also time F1-ish with the real embedding model")
    args = ap.parse_args(argv)

    from coordexp.eval.coco import STAT_NAMES, build_coco_dets, build_coco_gt, run_cocoeval
    from coordexp.eval.io import attach_predictions, load_gt
    from coordexp.eval.matching import aggregate
    from coordexp.eval.pipeline import evaluate, run_f1ish
    from coordexp.eval.semantic import SemanticScorer

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pred_path, gt_path = make_data(tmp, args.images, args.preds, args.seed)
        print(f"data: {args.images} images x {args.preds} preds (seed {args.seed}) written in "
              f"{time.perf_counter() - t:.1f}s")

        def load():
            gt = load_gt(gt_path)
            attach_predictions(gt, pred_path)
            return gt

        t_load, gt = _best(load, args.repeat)
        pairs, cats = gt.images, gt.categories
        category_of = {c: c for c in cats}
        n_gt = sum(len(p.gts) for p in pairs)
        n_pred = sum(len(p.preds) for p in pairs)

        def ours():
            g = build_coco_gt(pairs, cats)
            d = build_coco_dets(pairs, category_of, cats, "bbox")
            return g, d, run_cocoeval(g, d, "bbox", backend="faster-coco-eval")

        t_ours, (g, d, r_ours) = _best(ours, args.repeat)

        def pyc():
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            with contextlib.redirect_stdout(io.StringIO()):
                cg = COCO()
                cg.dataset = g
                cg.createIndex()
                cd = cg.loadRes([dict(x) for x in d])
                E = COCOeval(cg, cd, "bbox")
                E.evaluate()
                E.accumulate()
                E.summarize()
            return E.stats

        t_pyc, stats_pyc = _best(pyc, args.repeat)
        diff = max(abs(r_ours.stats[n] - s) for n, s in zip(STAT_NAMES, stats_pyc))

        t_f1, res = _best(lambda: {th: aggregate(rs) for th, rs in
                                   run_f1ish(pairs, [0.3, 0.5], SemanticScorer.string_only()).items()}, args.repeat)
        t_sem = None
        if args.semantic:
            sc = SemanticScorer()
            t = time.perf_counter()
            sc.prefetch(cats)
            t_model = time.perf_counter() - t
            t_sem, _ = _best(lambda: run_f1ish(pairs, [0.3, 0.5], sc), args.repeat)

        t = time.perf_counter()
        evaluate(pred_path, gt_path, os.path.join(tmp, "out"), semantic=False)
        t_all = time.perf_counter() - t

    print(f"{len(pairs)} images, {n_gt} GT objects, {n_pred} predictions")
    print(f"load (shared)            {t_load:8.3f} s")
    print(f"COCO bbox, ours          {t_ours:8.3f} s   (faster-coco-eval, incl. building the COCO dicts)")
    print(f"COCO bbox, pycocotools   {t_pyc:8.3f} s   (same COCO dicts; max |diff| of the 12 numbers {diff:.1e})")
    print(f"F1-ish @0.3+0.5, string  {t_f1:8.3f} s")
    if t_sem is not None:
        print(f"F1-ish @0.3+0.5, MiniLM  {t_sem:8.3f} s   (model load + vocab embedding {t_model:.1f} s, not included)")
    print(f"evaluate() end to end    {t_all:8.3f} s   (load + COCO + F1-ish + artifacts + plots)")
    print(f"ratio pycocotools / ours (COCO):    {t_pyc / t_ours:6.2f}x   (target >= 3x)")
    print(f"ratio COCO ours / F1-ish:           {t_ours / t_f1:6.2f}x   (target >= 1: F1-ish not slower)")
    print(f"AP {r_ours.stats['AP']:.4f}  F1-ish@0.50 full micro F1 {res[0.5]['full']['micro']['f1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
