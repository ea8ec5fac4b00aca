"""`--compat coordexp`: CoordExp's own evaluator conventions (scripts/evaluate_detection.py and
src/eval/detection.py of Pein2017/CoordExp @ cd05f3b), so its users get the numbers its tools give.

Applied to the pairs before scoring; `--compat ours` (default) changes nothing:

1. GT and preds are rounded to integer pixels and clamped to [0, W - 1] x [0, H - 1]
   (upstream's `denorm_and_clamp`; its artifacts are integer pixels already);
2. a GT object whose box (min/max of its points) has no area is dropped; a pred bbox_2d with
   x2 <= x1 or y2 <= y1 as written (so reversed boxes too) or a polygon without box area is dropped;
3. images without GT are left out of every metric (upstream then shifts every later image onto
   another image's predictions when such an image is not last: a bug we do not reproduce);
4. descs are stripped; the COCO area of every GT object is its box area, iscrowd 0;
5. F1-ish scope `annotated`: a pred whose desc is neither equal (normalised) to a GT desc of its
   image nor within cosine `semantic_thr` of one is ignored (neither TP nor FP), and counted.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from .io import EvalObject, ImagePair
from .semantic import SemanticScorer, normalize_desc

COMPAT_CHOICES = ("ours", "coordexp")

__all__ = ["COMPAT_CHOICES", "apply_coordexp", "annotated_scope", "compat_info"]


def _round_clamp(points: Sequence[float], width: int, height: int) -> list[float]:
    out: list[float] = []
    for i, v in enumerate(points):
        hi = (width if i % 2 == 0 else height) - 1
        out.append(float(max(0, min(hi, int(round(float(v)))))))
    return out


def _no_area(o: EvalObject, as_written: bool) -> bool:
    if as_written and o.type == "bbox_2d":
        x1, y1, x2, y2 = o.points
    else:
        xs, ys = o.points[0::2], o.points[1::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return x2 - x1 <= 0 or y2 - y1 <= 0


def _convert(objs: list[EvalObject], pair: ImagePair, is_gt: bool) -> tuple[list[EvalObject], int]:
    kept: list[EvalObject] = []
    dropped = 0
    for o in objs:
        o = replace(o, points=_round_clamp(o.points, pair.width, pair.height), desc=o.desc.strip())
        if _no_area(o, as_written=not is_gt):
            dropped += 1
            continue
        if is_gt:
            b = o.bbox
            o.area, o.iscrowd = (b[2] - b[0]) * (b[3] - b[1]), 0
        kept.append(o)
    return kept, dropped


def apply_coordexp(pairs: Sequence[ImagePair]) -> tuple[list[ImagePair], dict[str, int]]:
    """Steps 1-4 on copies of the pairs; returns the pairs left and what was changed."""
    out: list[ImagePair] = []
    info = {"images_without_gt_left_out": 0, "gt_degenerate_dropped": 0, "pred_degenerate_dropped": 0}
    for p in pairs:
        if not p.gts:
            info["images_without_gt_left_out"] += 1
            continue
        gts, g_drop = _convert(p.gts, p, is_gt=True)
        preds, p_drop = _convert(p.preds, p, is_gt=False)
        info["gt_degenerate_dropped"] += g_drop
        info["pred_degenerate_dropped"] += p_drop
        out.append(replace(p, gts=gts, preds=preds))
    return out, info


def annotated_scope(pairs: Sequence[ImagePair], scorer: SemanticScorer) -> tuple[list[ImagePair], int]:
    """Step 5: the pairs with only the preds in their image's GT label space; and how many were ignored."""
    need = {normalize_desc(o.desc) for p in pairs for o in p.preds + p.gts}
    if scorer.enabled:
        scorer.prefetch(sorted(d for d in need if d))
    out: list[ImagePair] = []
    ignored = 0
    for p in pairs:
        gt_descs = sorted({d for d in (normalize_desc(o.desc) for o in p.gts) if d})
        keep = [o for o in p.preds if _in_label_space(normalize_desc(o.desc), gt_descs, scorer)]
        ignored += len(p.preds) - len(keep)
        out.append(replace(p, preds=keep))
    return out, ignored


def _in_label_space(desc: str, gt_descs: list[str], scorer: SemanticScorer) -> bool:
    if not desc or not gt_descs:
        return False
    if desc in gt_descs:
        return True
    sims = [scorer.cosine(desc, g) for g in gt_descs] if scorer.enabled else []
    sims = [s for s in sims if s is not None]
    return bool(sims) and max(sims) >= scorer.threshold


def compat_info(mode: str, changes: dict[str, Any] | None, ignored: int) -> dict[str, Any]:
    """The `compat` block of metrics.json."""
    d: dict[str, Any] = {"mode": mode}
    if mode == "coordexp":
        d.update(changes or {})
        d["f1ish_pred_scope"] = "annotated"
        d["f1ish_pred_ignored"] = int(ignored)
    else:
        d["f1ish_pred_scope"] = "all"
    return d
