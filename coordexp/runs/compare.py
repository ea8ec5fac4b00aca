"""`compare RUN_A RUN_B [...]`: is B better than A, by how much, is it noise, where did it change.

- Runs must share the GT: the same dataset digest and the same images in the same order.
- Per-image metrics (F1-ish at IoU 0.5, full = box and label; image accuracy) get a paired
  bootstrap 95 % interval over images and a verdict. Run-level metrics that are not a sum over
  images (COCO AP) are reported as deltas without an interval.
- An image is *right* when its F1 @ 0.5 (full) >= `right_f1` (default 1.0: every GT object found
  with its label and nothing extra). Flips (both / only A / only B / neither) get the exact McNemar test.
- Per-object flips: GT objects found (with their label) by one run and missed by the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .registry import Registry, RegistryError
from .stats import STATISTICS, mcnemar_exact, paired_bootstrap


@dataclass(frozen=True)
class CompareOptions:
    bootstrap: int = 1000
    seed: int = 0
    right_f1: float = 1.0
    topk: int = 10


class CompareError(ValueError):
    """Runs that cannot be compared (different GT, no images, not a test run)."""


def image_metrics(rows: Sequence[Any]) -> dict[str, float]:
    """Run-level F1-ish@0.50 (full) and image accuracy from image rows (objects or dicts)."""
    a = _arrays([r if isinstance(r, dict) else _row_dict(r) for r in rows], 1.0)
    ones = np.ones((1, len(a["tp"])))
    return {k: float(f(ones, a)[0]) for k, f in STATISTICS.items()} if len(a["tp"]) else {}


def _row_dict(r: Any) -> dict[str, Any]:
    p, rc, f1 = r.scores()
    return {"tp": r.tp, "fp": r.fp, "fn": r.fn, "precision": p, "recall": rc, "f1": f1}


def _arrays(images: Sequence[dict[str, Any]], right_f1: float) -> dict[str, np.ndarray]:
    a = {k: np.asarray([float(im[k]) for im in images], dtype=np.float64)
         for k in ("tp", "fp", "fn", "precision", "recall", "f1")}
    a["right"] = (a["f1"] >= right_f1 - 1e-12).astype(np.float64)
    return a


def check_same_gt(runs: Sequence[dict[str, Any]], images: Sequence[Sequence[dict[str, Any]]]) -> None:
    a = runs[0]
    for r, ims in zip(runs[1:], images[1:]):
        if r["kind"] != "test" or a["kind"] != "test":
            raise CompareError(f"run {r['id'] if r['kind'] != 'test' else a['id']} is an inference job (no labels): "
                               "only test runs can be compared")
        if not a["dataset_sha256"] or r["dataset_sha256"] != a["dataset_sha256"]:
            raise CompareError(f"runs {a['id']} and {r['id']} do not share the GT: dataset digests "
                               f"{a['dataset_sha256']} vs {r['dataset_sha256']}")
        pa = [im["path"] for im in images[0]]
        pb = [im["path"] for im in ims]
        if pa != pb:
            k = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
            raise CompareError(f"runs {a['id']} and {r['id']} do not hold the same images in the same order "
                               f"({len(pa)} vs {len(pb)} images; first difference at position {k})")
    if not images[0]:
        raise CompareError(f"run {a['id']} has no images")


def _flips(ia: np.ndarray, ib: np.ndarray, paths: list[str], idx: list[int]) -> dict[str, Any]:
    both, only_a = int(np.sum(ia & ib)), int(np.sum(ia & ~ib))
    only_b, neither = int(np.sum(~ia & ib)), int(np.sum(~ia & ~ib))
    return {"both_right": both, "only_a": only_a, "only_b": only_b, "both_wrong": neither,
            "mcnemar_p": mcnemar_exact(only_a, only_b),
            "only_a_images": [idx[k] for k in np.flatnonzero(ia & ~ib)],
            "only_b_images": [idx[k] for k in np.flatnonzero(~ia & ib)]}


def _object_flips(ims_a, ims_b, topk: int) -> dict[str, Any]:
    only_a, only_b, both, neither = [], [], 0, 0
    for x, y in zip(ims_a, ims_b):
        for j, (ga, gb) in enumerate(zip(x["gt"], y["gt"])):
            fa, fb = ga.get("match") is not None, gb.get("match") is not None
            if fa and fb:
                both += 1
            elif fa:
                only_a.append({"image": x["idx"], "gt_index": j, "desc": ga.get("desc")})
            elif fb:
                only_b.append({"image": x["idx"], "gt_index": j, "desc": gb.get("desc")})
            else:
                neither += 1
    return {"both_found": both, "only_a": len(only_a), "only_b": len(only_b), "both_missed": neither,
            "mcnemar_p": mcnemar_exact(len(only_a), len(only_b)),
            "only_a_examples": only_a[:topk], "only_b_examples": only_b[:topk]}


def _class_recall(ims) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for im in ims:
        for g in im["gt"]:
            c = out.setdefault(g.get("desc", ""), [0, 0])
            c[0] += g.get("match") is not None
            c[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _class_deltas(run_a, run_b, ims_a, ims_b, topk: int) -> dict[str, Any]:
    ra, rb = _class_recall(ims_a), _class_recall(ims_b)
    ap_a = {r.get("category"): r.get("AP") for r in run_a.get("per_class") or []}
    ap_b = {r.get("category"): r.get("AP") for r in run_b.get("per_class") or []}
    rows = []
    for c in sorted(ra):
        fa, n = ra[c]
        fb = rb.get(c, (0, n))[0]
        row = {"class": c, "gt": n, "recall_a": fa / n, "recall_b": fb / n, "delta_recall": (fb - fa) / n}
        if isinstance(ap_a.get(c), (int, float)) and isinstance(ap_b.get(c), (int, float)):
            row.update(ap_a=ap_a[c], ap_b=ap_b[c], delta_ap=ap_b[c] - ap_a[c])
        rows.append(row)
    key = "delta_ap" if rows and all("delta_ap" in r for r in rows) else "delta_recall"
    ranked = sorted(rows, key=lambda r: (-r[key], r["class"]))
    return {"rows": rows, "ranked_by": key, "top_improved": [r for r in ranked if r[key] > 0][:topk],
            "top_degraded": [r for r in reversed(ranked) if r[key] < 0][:topk]}


def _top_images(a: dict, b: dict, idx: list[int], topk: int) -> dict[str, Any]:
    d = b["f1"] - a["f1"]
    order = np.argsort(-d, kind="stable")
    row = lambda k: {"image": idx[k], "f1_a": float(a["f1"][k]), "f1_b": float(b["f1"][k]),  # noqa: E731
                     "delta_f1": float(d[k])}
    return {"top_improved": [row(k) for k in order if d[k] > 0][:topk],
            "top_degraded": [row(k) for k in order[::-1] if d[k] < 0][:topk]}


def _run_metric_deltas(run_a, run_b, intervals) -> list[dict[str, Any]]:
    out = []
    for name in sorted(set(run_a["metrics"]) & set(run_b["metrics"])):
        if name in intervals:
            continue
        va, vb = run_a["metrics"][name], run_b["metrics"][name]
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            why = ("no interval (per-image counts are kept at IoU 0.50 only)" if name.startswith("f1ish@")
                   else "no interval (not a per-image sum)")
            out.append({"metric": name, "a": va, "b": vb, "delta": vb - va, "ci95": None, "verdict": why})
    return out


def compare_pair(run_a, run_b, ims_a, ims_b, opts: CompareOptions) -> dict[str, Any]:
    a, b = _arrays(ims_a, opts.right_f1), _arrays(ims_b, opts.right_f1)
    ones = np.ones((1, len(a["tp"])))
    iv = paired_bootstrap(a, b, STATISTICS, n_boot=opts.bootstrap, seed=opts.seed)
    metrics = [{"metric": k, "a": float(f(ones, a)[0]), "b": float(f(ones, b)[0]), "delta": iv[k].delta,
                "ci95": [iv[k].lo, iv[k].hi], "verdict": iv[k].verdict_of(k)} for k, f in STATISTICS.items()]
    idx = [im["idx"] for im in ims_a]
    return {"a": run_a["id"], "b": run_b["id"], "metrics": metrics + _run_metric_deltas(run_a, run_b, iv),
            "image_flips": _flips(a["right"] > 0, b["right"] > 0, [im["path"] for im in ims_a], idx),
            "object_flips": _object_flips(ims_a, ims_b, opts.topk),
            "classes": _class_deltas(run_a, run_b, ims_a, ims_b, opts.topk),
            "images": _top_images(a, b, idx, opts.topk)}


def compare_runs(reg: Registry, run_ids: Sequence[int], opts: CompareOptions = CompareOptions()) -> dict[str, Any]:
    """Every run after the first against the first (the reference)."""
    if len(run_ids) < 2:
        raise CompareError("give at least two runs to compare")
    try:
        runs = [reg.get_run(i) for i in run_ids]
    except RegistryError as e:
        raise CompareError(str(e)) from None
    images = [reg.all_images(i, preds=False) for i in run_ids]
    check_same_gt(runs, images)
    head = {k: runs[0][k] for k in ("dataset_path", "dataset_sha256", "num_images")}
    return {"reference": runs[0]["id"], **head, "options": opts.__dict__,
            "runs": [{k: r[k] for k in ("id", "name", "checkpoint_path", "checkpoint_sha256", "engine", "params",
                                        "prompt_variant", "created_at")} for r in runs],
            "right_image_rule": f"F1@0.5 (full) >= {opts.right_f1}",
            "comparisons": [compare_pair(runs[0], r, images[0], ims, opts) for r, ims in zip(runs[1:], images[1:])]}
