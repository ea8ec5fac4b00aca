"""Run folders -> registry records: ours (predictions.jsonl + summary.json [+ eval/]) and CoordExp's
(gt_vs_pred.jsonl + summary.json + resolved_config.json [+ an eval folder]).

Both become a list of eval `ImagePair`s (pixel coordinates), then one function turns pairs and
their IoU-0.5 matches into `ImageRow`s. Matches come from the eval folder's `matches.jsonl` when
there is one (the numbers the metrics were computed from), else from eval's own matcher with
normalised-string label equality.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable

from coordexp.checkpoint import sha256_file

from .registry import ImageRow, RunRecord

PRIMARY_THR = "0.50"
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ImportError_(ValueError):
    """A run folder that cannot be imported; the message names the file and the problem."""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ImportError_(f"{path}: not valid JSON ({e})") from None


def _jsonl(path: str) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImportError_(f"{path} line {n}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ImportError_(f"{path} line {n}: expected a JSON object")
            yield n, d


def flat_metrics(m: dict[str, Any]) -> dict[str, float]:
    """Our metrics.json -> CoordExp's flat names (bbox_AP, f1ish@0.50_f1_full_micro, ...), so runs
    of either origin compare key by key."""
    out: dict[str, float] = {}
    for it, r in (m.get("coco") or {}).items():
        for k in COCO_KEYS:
            if isinstance(r.get(k), (int, float)):
                out[f"{it}_{k}"] = float(r[k])
    for thr, r in (m.get("f1ish") or {}).items():
        for mode in ("loc", "full"):
            for agg in ("micro", "macro"):
                for k in ("precision", "recall", "f1"):
                    v = ((r.get(mode) or {}).get(agg) or {}).get(k)
                    if isinstance(v, (int, float)):
                        out[f"f1ish@{thr}_{k}_{mode}_{agg}"] = float(v)
            for k in ("tp", "fp", "fn"):
                v = ((r.get(mode) or {}).get("micro") or {}).get(k)
                if isinstance(v, (int, float)):
                    out[f"f1ish@{thr}_{k}_{mode}"] = float(v)
    return out


def primary_of(metrics: dict[str, float]) -> tuple[str | None, float | None]:
    for k in ("bbox_AP", f"f1ish@{PRIMARY_THR}_f1_full_micro"):
        if k in metrics:
            return k, metrics[k]
    return None, None


def read_per_class(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append({k: _num_or_str(v) for k, v in r.items()})
    return rows


def _num_or_str(v: str | None) -> Any:
    if v is None or v == "":
        return None
    try:
        x = float(v)
        return int(x) if x.is_integer() and "." not in v else x
    except ValueError:
        return v


def read_matches(path: str) -> dict[int, list[tuple[int, int, float, bool]]]:
    """matches.jsonl (ours or CoordExp's) -> image_id -> [(pred index, gt index, iou, label ok)]."""
    out: dict[int, list[tuple[int, int, float, bool]]] = {}
    for n, d in _jsonl(path):
        if "image_id" not in d:
            raise ImportError_(f"{path} line {n}: no image_id")
        rows = []
        for m in d.get("matches") or []:
            pi = m.get("pred_index", m.get("pred_idx"))
            gi = m.get("gt_index", m.get("gt_idx"))
            ok = m.get("semantic_ok", m.get("sem_ok"))
            if pi is None or gi is None:
                raise ImportError_(f"{path} line {n}: a match without pred/gt index")
            rows.append((int(pi), int(gi), float(m.get("iou") or 0.0), bool(ok)))
        out[int(d["image_id"])] = rows
    return out


def rows_from_pairs(pairs: list, matches: dict[int, list] | None, root: str,
                    latencies: dict[int, float] | None = None) -> list[ImageRow]:
    """ImagePairs + their matches -> ImageRows (matches None: eval's matcher, string labels)."""
    if matches is None:
        from coordexp.eval.pipeline import run_f1ish

        results = run_f1ish(pairs, [0.5], None)[0.5]
        matches = {p.image_id: [(p.preds[m.pred_index].index, p.gts[m.gt_index].index, m.iou, bool(m.semantic_ok))
                                for m in r.pairs] for p, r in zip(pairs, results)}
    out = []
    for p in pairs:
        gts = [{"desc": o.desc, "bbox": [round(v, 2) for v in o.bbox], "index": o.index, "match": None} for o in p.gts]
        preds = [{"desc": o.desc, "bbox": [round(v, 2) for v in o.bbox], "index": o.index, "match": None, "iou": None,
                  "score": o.score} for o in p.preds]
        gpos = {o["index"]: k for k, o in enumerate(gts)}
        ppos = {o["index"]: k for k, o in enumerate(preds)}
        tp = 0
        for pi, gi, iou, ok in matches.get(p.image_id, []):
            if pi not in ppos or gi not in gpos:
                continue
            pr, g = preds[ppos[pi]], gts[gpos[gi]]
            pr["iou"] = round(iou, 4)
            if ok:  # a box in the right place with the wrong label is an FP and an FN (full mode)
                pr["match"], g["match"] = gpos[gi], ppos[pi]
                tp += 1
        path = os.path.normpath(os.path.join(root, p.images[0])) if p.images else None
        out.append(ImageRow(idx=p.image_id, path=path, width=p.width, height=p.height, gt=gts, pred=preds, tp=tp,
                            fp=len(preds) - tp, fn=len(gts) - tp, error=p.error,
                            latency_ms=(latencies or {}).get(p.image_id)))
    return out


def _latency_stats(lat: dict[int, float]) -> tuple[float | None, float | None]:
    if not lat:
        return None, None
    import numpy as np

    v = np.asarray(list(lat.values()), dtype=float)
    return float(np.percentile(v, 50)), float(np.percentile(v, 95))


def _summary_fields(run: RunRecord, s: dict[str, Any]) -> None:
    eng = s.get("engine") or {}
    # a served run names its checkpoint through the export manifest (Triton), or the server's model card
    # (OpenAI API); a local one directly
    manifest = eng.get("manifest") or (eng.get("server_model") or {}).get("coordexp") or {}
    served_ckpt = (manifest.get("checkpoint") or {}).get("path") if isinstance(manifest.get("checkpoint"), dict) \
        else manifest.get("checkpoint")
    run.checkpoint_path = eng.get("checkpoint") or s.get("checkpoint") or served_ckpt
    run.checkpoint_sha256 = s.get("checkpoint_sha256")
    run.engine = eng.get("engine") or eng.get("name")
    run.backend = eng.get("backend") or run.engine
    run.served_model = eng.get("model")
    urls = eng.get("urls") or eng.get("url")
    run.server = ",".join(urls) if isinstance(urls, list) else urls
    run.params = s.get("params") or {}
    run.prompt_variant = (s.get("prompt") or {}).get("variant")
    run.images_per_s = s.get("images_per_s")
    run.status = "completed" if s.get("status", "complete") == "complete" else "failed"
    run.error = s.get("failure") or ("interrupted" if s.get("interrupted") else None)
    if isinstance(s.get("finish_reasons"), dict):
        run.finish = {k: int(v) for k, v in s["finish_reasons"].items()}


def find_eval_dir(run_dir: str) -> str | None:
    """The run folder's evaluation (`eval/` first), not an archived one (`coordexp.run_output.eval_dirs`)."""
    from coordexp.run_output import eval_dirs

    return next(iter(eval_dirs(run_dir)), None)


def _stale_eval(eval_dir: str, m: dict[str, Any], pred: str, pred_sha: str) -> str | None:
    """Why the evaluation in `eval_dir` is not of these predictions (None: it is): it names another
    digest, or (an evaluation older than digests) the predictions changed after it was written."""
    where = os.path.join(eval_dir, "metrics.json")
    had = (m.get("inputs") or {}).get("pred_sha256")
    if had:
        if had != pred_sha:
            return (f"{where} was computed from other predictions (sha256 {had[:12]}, {os.path.basename(pred)} is now "
                    f"{pred_sha[:12]}): left out; run eval again")
        return None
    if os.path.getmtime(pred) > os.path.getmtime(where):
        return f"{pred} changed after {where} was written: its metrics are left out; run eval again"
    return None


def import_our_dir(run_dir: str, gt_path: str | None = None, name: str | None = None,
                   pred_name: str = "predictions.jsonl", eval_dir: str | None = None
                   ) -> tuple[RunRecord, list[ImageRow]]:
    pred = os.path.join(run_dir, pred_name)
    if not os.path.isfile(pred):
        raise ImportError_(f"{run_dir}: neither predictions.jsonl (ours) nor gt_vs_pred.jsonl (CoordExp) found")
    summary_path = os.path.join(run_dir, "summary.json")
    s = _read_json(summary_path) if os.path.isfile(summary_path) else {}
    eval_dir = eval_dir or find_eval_dir(run_dir)
    m = _read_json(os.path.join(eval_dir, "metrics.json")) if eval_dir else {}
    pred_sha = sha256_file(pred)
    stale = _stale_eval(eval_dir, m, pred, pred_sha) if eval_dir else None
    if stale:  # metrics of other predictions never stand beside these
        eval_dir, m = None, {}
    gt_path = gt_path or (m.get("inputs") or {}).get("gt") or s.get("data")
    run = RunRecord(kind="test" if eval_dir else "infer", name=name or os.path.basename(os.path.abspath(run_dir)),
                    run_dir=os.path.abspath(run_dir), pred_sha256=pred_sha, note=stale)
    _summary_fields(run, s)
    if not run.finish:
        from coordexp.run_output import finish_of

        run.finish = {"stop": 0, "length": 0, "error": 0}
        for _n, d in _jsonl(pred):
            run.finish[finish_of(d)] += 1
    vis = os.path.join(run_dir, "vis")
    run.vis_dir = os.path.abspath(vis) if os.path.isdir(vis) else None
    lat = {d["image_id"]: float(d["latency_ms"]) for _n, d in _jsonl(pred)
           if isinstance(d.get("image_id"), int) and isinstance(d.get("latency_ms"), (int, float))}
    run.p50_ms, run.p95_ms = _latency_stats(lat)
    if gt_path and os.path.isfile(gt_path):
        run.dataset_path, run.dataset_sha256 = os.path.abspath(gt_path), sha256_file(gt_path)
    if eval_dir and run.dataset_path:
        from coordexp.eval.io import load_pairs

        try:
            pairs = load_pairs(pred, run.dataset_path)
        except (ValueError, OSError) as e:
            raise ImportError_(f"{pred}: {e}") from None
        mpath = os.path.join(eval_dir, "matches.jsonl") if eval_dir else None
        matches = read_matches(mpath) if mpath and os.path.isfile(mpath) else None
        rows = rows_from_pairs(pairs, matches, os.path.dirname(run.dataset_path), lat)
    else:  # an inference job: predictions only (the input may carry no labels)
        run.kind = "infer"
        rows = infer_rows(pred, os.path.dirname(run.dataset_path or os.path.abspath(pred)), lat)
    if eval_dir:
        run.metrics = flat_metrics(m)
        run.primary_metric_name, run.primary_metric = primary_of(run.metrics)
        run.per_class = read_per_class(os.path.join(eval_dir, "per_class.csv"))
        run.timings = {**(m.get("timings") or {}), "infer_seconds": s.get("seconds")}
    run.num_images = len(rows)
    return run, rows


def infer_rows(pred_path: str, root: str, lat: dict[int, float]) -> list[ImageRow]:
    """An inference job (no GT): predictions only, in pixel coordinates."""
    from coordexp.eval.io import points_to_pixels
    from coordexp.grid import bbox_of

    rows = []
    for n, d in _jsonl(pred_path):
        iid, w, h = d.get("image_id"), d.get("width"), d.get("height")
        if not isinstance(iid, int):
            raise ImportError_(f"{pred_path} line {n}: image_id must be an integer")
        preds = []
        for k, o in enumerate(d.get("preds") or []):
            geom = "bbox_2d" if o.get("type", "bbox_2d") == "bbox_2d" else "poly"
            pts = points_to_pixels(o.get("points") or [], w or 1, h or 1, d.get("coord_mode") or "norm1000")
            box = pts if geom == "bbox_2d" else bbox_of(pts)
            preds.append({"desc": str(o.get("desc", "")), "bbox": [round(v, 2) for v in box], "index": k,
                          "match": None, "iou": None, "score": o.get("score")})
        imgs = d.get("images") or []
        rows.append(ImageRow(idx=iid, path=os.path.normpath(os.path.join(root, imgs[0])) if imgs else None, width=w,
                             height=h, pred=preds, fp=0, error=d.get("error"), latency_ms=lat.get(iid)))
    return rows
