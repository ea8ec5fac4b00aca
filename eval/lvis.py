"""`--metrics lvis`: federated LVIS AP on the `lvis` package's own `LVISEval` (the reference
implementation), from records carrying CoordExp's LVIS metadata:

    "metadata": {"dataset_policy": "lvis_federated",
                 "lvis": {"gt_objects": [{"id", "name", "frequency"}, ...],   # aligned with the GT objects
                          "positive_categories": [...], "neg_categories": [...],
                          "not_exhaustive_categories": [...]}}

Federated rules are LVISEval's: a detection counts only for categories verified for its image (a
GT category there, or a verified-negative one); a not-exhaustive category's unmatched detections
are not false positives; at most 300 detections per image (highest scores). Categories: the union
of every image's lists (id, name, frequency r/c/f). A GT object takes its aligned `gt_objects`
entry, else its desc's category by normalised name; a pred desc maps like COCO (normalised-equal
name, else nearest by embedding cosine >= the threshold, else dropped and counted).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Sequence

from .semantic import SemanticScorer, normalize_desc

LVIS_POLICY = "lvis_federated"
LVIS_MAX_DETS = 300
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
              "AR@300", "ARs@300", "ARm@300", "ARl@300")
_FREQ = {"r": "r", "rare": "r", "c": "c", "common": "c", "f": "f", "frequent": "f"}

__all__ = ["build_lvis_gt", "build_lvis_dets", "run_lvis_eval", "evaluate_lvis", "STAT_NAMES", "LVIS_MAX_DETS"]


def _policy(pair: Any) -> dict[str, Any]:
    md = pair.metadata or {}
    if str(md.get("dataset_policy") or "").strip().lower() != LVIS_POLICY or not isinstance(md.get("lvis"), dict):
        raise ValueError(f"image {pair.image_id} ({pair.images[0] if pair.images else '?'}): --metrics lvis needs "
                         f"metadata.dataset_policy 'lvis_federated' and metadata.lvis on every record")
    return md["lvis"]


def _entries(lv: dict, key: str, where: str) -> list[dict[str, Any]]:
    out = []
    for e in lv.get(key) or []:
        cid = e.get("id", e.get("category_id")) if isinstance(e, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int) or not str(e.get("name") or "").strip():
            raise ValueError(f"{where}: metadata.lvis.{key} entry {e!r} needs an integer id and a name")
        out.append({"id": cid, "name": str(e["name"]).strip(), "frequency": e.get("frequency")})
    return out


def _catalog(pairs: Sequence) -> dict[int, dict[str, Any]]:
    cats: dict[int, dict[str, Any]] = {}
    for p in pairs:
        lv = _policy(p)
        for key in ("gt_objects", "positive_categories", "neg_categories", "not_exhaustive_categories"):
            for e in _entries(lv, key, f"image {p.image_id}"):
                if e["id"] not in cats:
                    freq = _FREQ.get(str(e["frequency"] or "").strip().lower())
                    if freq is None:
                        raise ValueError(f"image {p.image_id}: category {e['id']} ({e['name']!r}) has frequency "
                                         f"{e['frequency']!r}; LVIS needs rare/common/frequent (r/c/f)")
                    cats[e["id"]] = {"id": e["id"], "name": e["name"], "frequency": freq}
    return cats


def build_lvis_gt(pairs: Sequence) -> dict[str, Any]:
    """The LVIS GT dict (images with neg/not-exhaustive ids, annotations, categories)."""
    cats = _catalog(pairs)
    by_norm = {normalize_desc(c["name"]): cid for cid, c in cats.items()}
    images, anns = [], []
    for p in pairs:
        lv = _policy(p)
        where = f"image {p.image_id}"
        aligned = [e["id"] for e in _entries(lv, "gt_objects", where)]
        images.append({"id": p.coco_id, "width": p.width, "height": p.height,
                       "file_name": p.images[0] if p.images else str(p.image_id),
                       "neg_category_ids": sorted(e["id"] for e in _entries(lv, "neg_categories", where)),
                       "not_exhaustive_category_ids": sorted(
                           e["id"] for e in _entries(lv, "not_exhaustive_categories", where))})
        for o in p.gts:
            cid = aligned[o.index] if o.index < len(aligned) else by_norm.get(normalize_desc(o.desc))
            if cid is None:
                raise ValueError(f"{where}: GT object {o.index} ({o.desc!r}) has no LVIS category "
                                 "(no aligned metadata.lvis.gt_objects entry, no category of that name)")
            x1, y1, x2, y2 = o.bbox
            area = o.area if o.area is not None else (x2 - x1) * (y2 - y1)
            anns.append({"id": len(anns) + 1, "image_id": p.coco_id, "category_id": cid,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area})
    return {"images": images, "annotations": anns, "categories": [cats[k] for k in sorted(cats)]}


def build_lvis_dets(pairs: Sequence, category_id_of: dict[str, int | None]) -> list[dict[str, Any]]:
    """Detections (bbox xywh, score) of the preds whose desc maps to a category."""
    dets = []
    for p in pairs:
        for o in p.preds:
            cid = category_id_of.get(o.desc)
            if cid is None:
                continue
            x1, y1, x2, y2 = o.bbox
            dets.append({"image_id": p.coco_id, "category_id": cid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(o.score)})
    return dets


def _import_lvis():
    """lvis 0.5.3 (its last release) still writes `np.float` in LVISEval.accumulate, removed in numpy
    1.24: its own module gets a view of numpy with that alias (= builtin float, what it always was);
    numpy itself is left untouched."""
    import types

    import numpy as np
    import lvis.eval as lvis_eval

    if not hasattr(lvis_eval.np, "float"):
        view = types.ModuleType("numpy_with_float_alias")
        view.__getattr__ = lambda name: getattr(np, name)  # type: ignore[attr-defined]
        view.float = float  # type: ignore[attr-defined]
        lvis_eval.np = view
    from lvis import LVIS, LVISEval, LVISResults

    return LVIS, LVISEval, LVISResults


def run_lvis_eval(gt: dict[str, Any], dets: list[dict[str, Any]], max_dets: int = LVIS_MAX_DETS) -> dict[str, float]:
    """LVISEval (bbox) on the dicts; the 13 numbers. No detections: every number 0.0."""
    LVIS, LVISEval, LVISResults = _import_lvis()

    if not dets:
        return {k: 0.0 for k in STAT_NAMES}
    fd, path = tempfile.mkstemp(suffix=".json")  # LVIS() reads its GT from a file only
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(gt, f)
        lvis_gt = LVIS(path)
    finally:
        os.unlink(path)
    # max_dets: LVISResults' cap per image (the top-scoring 300; -1 keeps all); LVISEval's own
    # params.max_dets stays its default 300, which names the AR@300 numbers
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, [dict(d) for d in dets], max_dets=max_dets), "bbox")
    ev.run()
    return {k: float(v) for k, v in ev.get_results().items()}


def evaluate_lvis(pairs: Sequence, scorer: SemanticScorer) -> tuple[dict[str, Any], dict[str, Any], list]:
    """(metrics.json `lvis` block, the LVIS GT dict, the detections)."""
    gt = build_lvis_gt(pairs)
    names = [c["name"] for c in gt["categories"]]
    id_of = {c["name"]: c["id"] for c in gt["categories"]}
    descs = sorted({o.desc for p in pairs for o in p.preds})
    mapping = scorer.map_to_categories(descs, names)
    category_id_of = {d: (id_of[m["category"]] if m["category"] is not None else None) for d, m in mapping.items()}
    dets = build_lvis_dets(pairs, category_id_of)
    stats = run_lvis_eval(gt, dets)
    dropped = sum(1 for p in pairs for o in p.preds if category_id_of.get(o.desc) is None)
    block = {"iou_type": "bbox", "evaluator": "lvis.LVISEval", "max_dets": LVIS_MAX_DETS, **stats,
             "detections": len(dets), "preds_dropped_unmapped": dropped, "categories": len(names)}
    return block, gt, dets
