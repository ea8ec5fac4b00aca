"""CoordExp's own run folders (the research code, Pein2017/CoordExp): `gt_vs_pred.jsonl` (GT and preds in
integer pixels), `summary.json`, `resolved_config.json` and an optional eval folder (`metrics.json` =
{"metrics": {flat}, "counters"}, `matches.jsonl` with pred_idx/gt_idx/sem_ok, `per_class.csv`).

Its evaluator leaves out images without GT; our rows keep every image (no GT: nothing to miss).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .importers import (ImportError_, _jsonl, _read_json, find_eval_dir, primary_of, read_matches, read_per_class,
                        rows_from_pairs, sha256_file)
from .registry import ImageRow, RunRecord


def _objects(lst: Any, where: str) -> list:
    from coordexp.eval.io import EvalObject

    if not isinstance(lst, list):
        raise ImportError_(f"{where}: expected a list of objects")
    out = []
    for k, o in enumerate(lst):
        pts = o.get("points") if isinstance(o, dict) else None
        typ = o.get("type", "bbox_2d") if isinstance(o, dict) else None
        if typ not in ("bbox_2d", "poly") or not isinstance(pts, list) or len(pts) < 4:
            raise ImportError_(f"{where} object {k}: needs type bbox_2d|poly and points")
        out.append(EvalObject(desc=str(o.get("desc", "")).strip(), type=typ, points=[float(v) for v in pts],
                              score=float(o.get("score", 1.0)), index=k))
    return out


def _pairs(path: str) -> tuple[list, str]:
    """gt_vs_pred.jsonl -> (ImagePairs, sha256 of the GT part: image, size and GT objects in order)."""
    from coordexp.eval.io import ImagePair

    pairs, h = [], hashlib.sha256()
    for n, d in _jsonl(path):
        where = f"{path} line {n}"
        img = d.get("image") or (d.get("images") or [None])[0]
        w, hgt = d.get("width"), d.get("height")
        if not isinstance(img, str) or not isinstance(w, int) or not isinstance(hgt, int):
            raise ImportError_(f"{where}: needs image (path), width and height")
        iid = d.get("image_id", len(pairs))
        errs = d.get("errors") or []
        p = ImagePair(image_id=int(iid) if isinstance(iid, int) else len(pairs), images=[img], width=w, height=hgt,
                      gts=_objects(d.get("gt") or [], f"{where} gt"), preds=_objects(d.get("pred") or [], f"{where} pred"),
                      error=str(errs[0]) if errs else None)
        h.update(json.dumps([img, w, hgt, d.get("gt") or []], sort_keys=True).encode())
        pairs.append(p)
    return pairs, h.hexdigest()


def _image_root(run_dir: str, gt_jsonl: str | None, first: str | None) -> str:
    """Where the relative `image` paths resolve: beside the GT JSONL, else the run folder."""
    roots = [os.path.dirname(gt_jsonl)] if gt_jsonl else []
    roots.append(run_dir)
    for r in roots:
        if first and os.path.exists(os.path.join(r, first)):
            return r
    return roots[0]


def import_coordexp_dir(run_dir: str, name: str | None = None) -> tuple[RunRecord, list[ImageRow]]:
    path = os.path.join(run_dir, "gt_vs_pred.jsonl")
    s = _read_json(os.path.join(run_dir, "summary.json")) if os.path.isfile(os.path.join(run_dir, "summary.json")) else {}
    cfg_path = os.path.join(run_dir, "resolved_config.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    pairs, gt_digest = _pairs(path)
    backend = s.get("backend") or {}
    gen = s.get("generation") or {}
    inf = s.get("infer") or {}
    gt_jsonl = inf.get("gt_jsonl")
    run = RunRecord(kind="infer", name=name or os.path.basename(os.path.abspath(run_dir)),
                    run_dir=os.path.abspath(run_dir), backend=backend.get("type"),
                    engine=f"coordexp:{backend.get('type') or 'unknown'}", checkpoint_path=backend.get("model_checkpoint"),
                    params={k: gen[k] for k in gen}, prompt_variant=inf.get("prompt_variant"))
    if cfg:
        run.params = {**run.params, "resolved_config": cfg}
    if gt_jsonl and os.path.isfile(gt_jsonl):
        run.dataset_path, run.dataset_sha256 = os.path.abspath(gt_jsonl), sha256_file(gt_jsonl)
    else:  # the GT travels inside gt_vs_pred.jsonl: its digest names the dataset
        run.dataset_path, run.dataset_sha256 = gt_jsonl, gt_digest
    eval_dir = find_eval_dir(run_dir)
    matches = None
    if eval_dir:
        m = _read_json(os.path.join(eval_dir, "metrics.json"))
        flat = m.get("metrics", m) if isinstance(m, dict) else {}
        run.kind = "test"
        run.metrics = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.primary_metric_name, run.primary_metric = primary_of(run.metrics)
        run.per_class = read_per_class(os.path.join(eval_dir, "per_class.csv"))
        mpath = os.path.join(eval_dir, "matches.jsonl")
        matches = read_matches(mpath) if os.path.isfile(mpath) else None
    elif any(p.gts for p in pairs):
        run.kind = "test"  # labelled: per-image outcomes from our matcher, no COCO metrics without its eval
    root = _image_root(run_dir, gt_jsonl, pairs[0].images[0] if pairs else None)
    rows = rows_from_pairs(pairs, matches, root)
    if run.kind == "test" and not run.metrics:
        from .compare import image_metrics

        run.metrics = image_metrics(rows)
        run.primary_metric_name, run.primary_metric = primary_of(run.metrics)
    run.num_images = len(rows)
    return run, rows
