"""CoordExp's own artifacts, both ways: read its `gt_vs_pred.jsonl` / `gt_vs_pred_scored.jsonl`
(GT and predictions in one file, integer pixels) and write its flat metric names.

Upstream's line (docs/eval/README.md of Pein2017/CoordExp; /work/shared/notes/upstream-formats.md):
`image` (or `images`), `width`, `height`, `coord_mode: "pixel"`, `gt` and `pred` lists of
`{"type": "bbox_2d"|"poly", "points": [...], "desc": str}` (the scored file adds `pred[*].score`
and `pred_score_source` / `pred_score_version`), `errors`, optional `image_id`. Our pipeline's
`gt_vs_pred.jsonl` has the same shape (plus `preds`, our name), so both read here.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from coordexp.schema import read_jsonl

from .io import PRED_WITHOUT_PREDS, EvalObject, GroundTruth, ImagePair, _pred_objects

__all__ = ["is_gt_vs_pred", "load_gt_vs_pred", "load_inputs", "check_not_swapped", "flat_metrics", "PRED_WITHOUT_PREDS"]



def _first_record(path: str) -> dict | None:
    for _, d in read_jsonl(path):
        if isinstance(d, dict):
            return d
    return None


def is_gt_vs_pred(path: str) -> bool:
    """A file whose first readable line carries its GT (`gt` list) beside `pred`/`preds`."""
    d = _first_record(path)
    return isinstance(d, dict) and isinstance(d.get("gt"), list) and ("pred" in d or "preds" in d)


def _size(d: dict, where: str) -> tuple[int, int]:
    w, h = d.get("width"), d.get("height")
    for k, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: {k!r} must be a positive integer, got {v!r}")
    return w, h


def _gt_objects(raw: list, d: dict, pair: ImagePair, mode: str, where: str) -> list[EvalObject]:
    objs, bad = _pred_objects(raw, d, pair, mode)  # same shape as a pred: {type, points, desc}
    if bad:
        raise ValueError(f"{where}: {bad} GT object(s) without a valid type/points/desc")
    for o in objs:  # a GT object carries no score; COCO area/iscrowd may ride along
        src = raw[o.index]
        o.score = 1.0
        if isinstance(src, dict):
            if src.get("area") is not None:
                o.area = float(src["area"])
            o.iscrowd = int(bool(src.get("iscrowd", 0)))
    return objs


def load_gt_vs_pred(path: str) -> tuple[GroundTruth, dict[str, Any]]:
    """One ImagePair per line (image_id = line order: upstream guarantees no image_id), GT and
    preds in the file's pixel coordinates. Returns the pairs and line-level counts/errors."""
    images: list[ImagePair] = []
    cats: dict[str, None] = {}
    counts: Counter = Counter()
    errors: Counter = Counter()
    listed: Counter = Counter()
    for line_no, d in read_jsonl(path):
        where = f"{path} line {line_no}"
        counts["pred_lines"] += 1
        if isinstance(d, Exception) or not isinstance(d, dict):
            raise ValueError(f"{where}: not a JSON object ({d})")
        if not isinstance(d.get("gt"), list):
            raise ValueError(f"{where}: no `gt` list: not a gt_vs_pred.jsonl line")
        raw_preds = d["preds"] if "preds" in d else d.get("pred")
        if not isinstance(raw_preds, list):
            raise ValueError(f"{where}: neither `pred` nor `preds` is a list (got {raw_preds!r}); "
                             "refusing to score it as no predictions")
        w, h = _size(d, where)
        images_field = d.get("images") or ([d["image"]] if isinstance(d.get("image"), str) else [])
        md = d.get("metadata")
        pair = ImagePair(image_id=len(images), images=list(images_field), width=w, height=h,
                         metadata=md if isinstance(md, dict) else {})
        mode = d.get("coord_mode") or "pixel"
        pair.gts = _gt_objects(d["gt"], d, pair, mode, where)
        pair.preds, pair.preds_invalid = _pred_objects(raw_preds, d, pair, mode)
        pair.pred_coord_mode = mode
        counts["preds_invalid"] += pair.preds_invalid
        err = d.get("error")
        line_errors = [str(e) for e in (d.get("errors") or [])]
        listed.update(line_errors)
        if err is None and line_errors and not raw_preds:
            err = line_errors[0]  # upstream has only the list; a line left without preds is an error line
        if err is not None:
            pair.error, pair.error_message = str(err), d.get("error_message")
            raw = d.get("raw_output")
            pair.raw_output = raw if isinstance(raw, str) else None
            errors[str(err)] += 1
            counts["pred_lines_with_error"] += 1
        for o in pair.gts:
            cats.setdefault(o.desc, None)
        images.append(pair)
    if not images:
        raise ValueError(f"{path}: no lines")
    return GroundTruth(images=images, categories=list(cats), source_format="gt_vs_pred"), \
        {"counts": dict(counts), "errors": dict(errors), "errors_listed": dict(listed)}


_PRED_KEYS = ("preds", "pred", "raw_output", "error")


def _looks_like_gt(path: str) -> str | None:
    """Why `path` looks like ground truth (a COCO instances json, or JSONL records with `objects`
    and none of a prediction line's keys), or None."""
    from .io import _looks_like_coco_json

    if _looks_like_coco_json(path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return "a COCO instances json (`images` + `annotations`)"
    d = _first_record(path)
    if isinstance(d, dict) and isinstance(d.get("objects"), list) and not any(k in d for k in _PRED_KEYS):
        return "an input/GT JSONL (records with `objects`, no `preds` / `raw_output`)"
    return None


def _looks_like_predictions(path: str) -> bool:
    d = _first_record(path)
    return isinstance(d, dict) and "objects" not in d and any(k in d for k in ("preds", "raw_output"))


def check_not_swapped(pred_path: str, gt_path: str) -> None:
    """Refuse, naming the mistake, when --pred holds GT (and --gt holds predictions): otherwise the
    first complaint would be a confusing "image_id must be an integer"."""
    why = _looks_like_gt(pred_path)
    if why is None:
        return
    if _looks_like_predictions(gt_path):
        raise ValueError(f"--pred and --gt look swapped: --pred {pred_path} is {why}, and --gt {gt_path} holds "
                         "prediction lines (`preds` / `raw_output`); pass --pred PREDICTIONS.jsonl --gt GT")
    raise ValueError(f"--pred {pred_path} is {why}, not a prediction artifact: is it the GT "
                     "(--pred and --gt swapped?); --pred takes predictions.jsonl or a gt_vs_pred.jsonl")


def load_inputs(pred_path: str, gt_path: str | None, reparse: bool = False,
                gt_coord_mode: str | None = None, bbox_format: str | None = None) -> tuple[GroundTruth, dict[str, Any]]:
    """What eval and vis read: predictions.jsonl + GT, or one gt_vs_pred file (GT inside; its boxes
    are pixel x1 y1 x2 y2 whatever the model wrote, so `bbox_format` does not apply)."""
    from .io import attach_predictions, load_gt

    if gt_path is None:
        if not is_gt_vs_pred(pred_path):
            raise ValueError(f"{pred_path}: no GT inside (no `gt` list beside `pred`/`preds`): pass --gt")
        if reparse:
            raise ValueError("--reparse needs raw model text; a gt_vs_pred.jsonl keeps only parsed preds")
        return load_gt_vs_pred(pred_path)
    check_not_swapped(pred_path, gt_path)
    gt = load_gt(gt_path, coord_mode=gt_coord_mode)
    return gt, attach_predictions(gt, pred_path, reparse=reparse, bbox_format=bbox_format)


# ----------------------------------------------------------------------------------------------
# Upstream's flat metric names (metrics.json `{"metrics": {...}}` of scripts/evaluate_detection.py).

# Score provenance our scored gt_vs_pred.jsonl declares (upstream's evaluator refuses COCO without it):
# the contract's constant score 1.0 per pred, generation order kept.
SCORE_SOURCE = "coordexp_serve_constant_1.0"
SCORE_VERSION = 1

STAT_NAMES_LVIS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
                   "AR@300", "ARs@300", "ARm@300", "ARl@300")
_COCO_FLAT = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def flat_metrics(result: dict[str, Any]) -> dict[str, float | int | None]:
    """`bbox_AP`, ..., `segm_*`, `f1ish@0.50_f1_full_micro`, ... and the F1-ish counters, from our
    metrics dict, so scripts written for upstream's metrics.json read the same keys."""
    flat: dict[str, Any] = {}
    for it, res in (result.get("coco") or {}).items():
        for name in _COCO_FLAT:  # CocoResult.to_dict(): the 12 numbers at top level
            if name in res:
                flat[f"{it}_{name}"] = res[name]
    lvis = result.get("lvis") or {}
    for name in STAT_NAMES_LVIS:  # upstream: bbox_AP.., bbox_APr/c/f, bbox_AR@300 and the alias bbox_AR300
        if name in lvis:
            flat[f"bbox_{name}"] = lvis[name]
            if "@" in name:
                flat[f"bbox_{name.replace('@', '')}"] = lvis[name]
    for key, agg in (result.get("f1ish") or {}).items():
        pre = f"f1ish@{key}_"
        for mode in ("loc", "full"):
            micro, macro = agg[mode]["micro"], agg[mode]["macro"]
            for c in ("tp", "fp", "fn"):
                flat[f"{pre}{c}_{mode}"] = micro[c]
            for m in ("precision", "recall", "f1"):
                flat[f"{pre}{m}_{mode}_micro"] = micro[m]
                flat[f"{pre}{m}_{mode}_macro"] = macro[m]
        c = agg["counts"]
        ignored = agg.get("pred_ignored", 0)
        flat[f"{pre}pred_total"] = c["num_pred"] + ignored
        flat[f"{pre}pred_eval"] = c["num_pred"]
        flat[f"{pre}pred_ignored"] = ignored
        flat[f"{pre}gt_total"] = c["num_gt"]
        sem = agg["semantic"]
        for k in ("matched_sem_ok", "matched_sem_bad", "sem_acc_on_matched"):
            flat[f"{pre}{k}"] = sem[k]
    json.dumps(flat)  # always serialisable
    return flat
