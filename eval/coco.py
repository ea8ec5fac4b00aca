"""COCO AP/AR on real COCO tooling.

The evaluator is faster-coco-eval's `COCOeval_faster` (C++ evaluate/accumulate); it gives the
same 12 numbers as pycocotools' `COCOeval` (checked on the COCO val2014 fixture: equal to
1.1e-16) several times faster (see eval/README.md for the measurement). `backend="pycocotools"`
runs the reference implementation instead (for cross-checks and the benchmark).

GT and predictions are written as COCO dicts: image ids are the input order (or the original ids
when the GT is a COCO json), categories 1..K in first-seen order of the GT descs, boxes
`[x, y, w, h]` from pixel `[x1, y1, x2, y2]`; a polygon's box is its bounding box. GT `area` is
the carried one (COCO-derived data) or box area / polygon mask area; `iscrowd` is carried.
For `segm`, polygons are rasterised at the image size and a box is its rectangle.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
BACKENDS = ("faster-coco-eval", "pycocotools")


def _xywh(b: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = b
    return [x1, y1, x2 - x1, y2 - y1]


def _rect(b: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = b
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def _poly_areas(objs: Sequence, width: int, height: int) -> list[float]:
    from .matching import to_rles, _mask_api

    if not objs:
        return []
    return [float(a) for a in _mask_api().area(to_rles(objs, width, height))]


def build_coco_gt(pairs: Sequence, categories: Sequence[str]) -> dict[str, Any]:
    """COCO instances dict of the GT (segmentation: polygon, or the box's rectangle)."""
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images, anns = [], []
    for p in pairs:
        images.append({"id": p.coco_id, "width": p.width, "height": p.height,
                       "file_name": p.images[0] if p.images else str(p.image_id), "image_index": p.image_id})
        polys = [o for o in p.gts if o.type == "poly" and o.area is None]
        poly_area = dict(zip((id(o) for o in polys), _poly_areas(polys, p.width, p.height)))
        for o in p.gts:
            b = o.bbox
            if o.area is not None:
                area = o.area
            elif o.type == "poly":
                area = poly_area[id(o)]
            else:
                area = (b[2] - b[0]) * (b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": p.coco_id, "category_id": cat_id[o.desc],
                         "bbox": _xywh(b), "area": area, "iscrowd": int(o.iscrowd),
                         "segmentation": [list(o.points) if o.type == "poly" else _rect(b)],
                         "gt_index": o.index})
    return {"info": {"description": "CoordExp eval GT"}, "images": images, "annotations": anns,
            "categories": [{"id": cat_id[c], "name": c} for c in categories]}


def build_coco_dets(pairs: Sequence, category_of: dict[str, str | None], categories: Sequence[str],
                    iou_type: str = "bbox") -> list[dict[str, Any]]:
    """COCO results list. `category_of` maps a pred desc to a category name (None: dropped).

    bbox: `bbox` (+ `segmentation` polygon for polygon preds, for reference);
    segm: `segmentation` as RLE (what COCO's loadRes takes), boxes as rectangles.
    """
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    dets: list[dict[str, Any]] = []
    for p in pairs:
        keep = [o for o in p.preds if category_of.get(o.desc) is not None]
        if iou_type == "segm":
            from .matching import to_rles

            rles = to_rles(keep, p.width, p.height)
            for o, r in zip(keep, rles):
                dets.append({"image_id": p.coco_id, "category_id": cat_id[category_of[o.desc]],
                             "segmentation": r, "score": o.score})
        else:
            for o in keep:
                d = {"image_id": p.coco_id, "category_id": cat_id[category_of[o.desc]],
                     "bbox": _xywh(o.bbox), "score": o.score}
                if o.type == "poly":
                    d["segmentation"] = [list(o.points)]
                dets.append(d)
    return dets


@dataclass
class CocoResult:
    iou_type: str
    backend: str
    stats: dict[str, float]
    precision: np.ndarray  # COCOeval eval['precision'] [T, R, K, A, M]
    recall: np.ndarray  # [T, K, A, M]
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: list[int]
    per_class: dict[int, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"iou_type": self.iou_type, "evaluator": self.backend, **self.stats}


def _mean_valid(a: np.ndarray) -> float | None:
    v = a[a > -1]
    return float(v.mean()) if v.size else None


def _evaluator(backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, (lambda g, d, t: COCOeval(g, d, t))
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, (lambda g, d, t: COCOeval_faster(g, d, t, print_function=lambda *a, **k: None))


def run_cocoeval(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str = "bbox",
                 backend: str = "faster-coco-eval") -> CocoResult:
    """Evaluate in memory (inputs are copied: COCO's loadRes writes into its input dicts)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO backend {backend!r}; expected one of {BACKENDS}")
    COCO, make_eval = _evaluator(backend)
    gt = dict(gt, annotations=[dict(a) for a in gt["annotations"]])  # segm eval rewrites segmentations
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):  # pycocotools prints progress and the table
        if backend == "pycocotools":
            cgt = COCO()
            cgt.dataset = gt
            cgt.createIndex()
        else:
            cgt = COCO(gt)
        if dets or backend != "pycocotools":
            cdt = cgt.loadRes([dict(d) for d in dets])
        else:  # pycocotools' loadRes cannot take an empty list
            cdt = COCO()
            cdt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": []}
            cdt.createIndex()
        E = make_eval(cgt, cdt, iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    stats = {n: float(v) for n, v in zip(STAT_NAMES, list(E.stats)[:12])}
    precision = np.asarray(E.eval["precision"])
    recall = np.asarray(E.eval["recall"])
    cat_ids = [int(c) for c in E.params.catIds]
    res = CocoResult(iou_type=iou_type, backend=backend, stats=stats, precision=precision, recall=recall,
                     iou_thrs=np.asarray(E.params.iouThrs), rec_thrs=np.asarray(E.params.recThrs), cat_ids=cat_ids)
    t50 = int(np.argmin(np.abs(res.iou_thrs - 0.5)))
    for k, cid in enumerate(cat_ids):
        res.per_class[cid] = {
            "AP": _mean_valid(precision[:, :, k, 0, -1]),
            "AP50": _mean_valid(precision[t50, :, k, 0, -1]),
            "AR100": _mean_valid(recall[:, k, 0, -1]),
        }
    return res
