"""F1-ish matching: per image, location first, then semantics.

Per image and IoU threshold `thr`:
1. candidate pairs (pred i, gt j) with IoU >= thr; IoU of two boxes is the continuous box IoU,
   and when either side is a polygon it is the mask IoU (both rasterised at the image size with
   the COCO mask tools; a box becomes its rectangle polygon);
2. greedy 1:1 assignment by IoU descending, ties by lower pred index, then lower gt index;
3. each matched pair's desc is judged by two rules, both recorded: `exact` (the normalised descs
   are equal) and `semantic` (equal, or the embedding cosine >= the semantic threshold, see
   `semantic.SemanticScorer`). `desc_match` names the rule that counts (`semantic_ok`): eval's
   default is `exact`, because a cosine of 0.75 between "red triangle" and "red circle" is not a
   right answer; `semantic` is opt-in (and upstream CoordExp's rule in `--compat coordexp`).

Counts: loc-only tp = matched pairs, fp = preds - tp, fn = gts - tp; full: tp = semantically
right pairs, and a semantically wrong pair counts as one FP and one FN. Per image precision is
1.0 when nothing was predicted and recall 1.0 when nothing was there; F1 is 0 when P + R = 0.
Micro = from global sums; macro = mean of the per-image values.

`rank_match` is COCO AP's assignment instead (predictions in rank order, each takes its best
free GT), for callers that need the pairs behind an AP number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .semantic import SemanticScorer, normalize_desc


def _mask_api():
    try:
        from faster_coco_eval.core import mask
    except ImportError:  # pragma: no cover
        from pycocotools import mask  # type: ignore[no-redef]
    return mask


DESC_MATCH_CHOICES = ("exact", "semantic")


def check_desc_match(desc_match: str | None) -> None:
    if desc_match is not None and desc_match not in DESC_MATCH_CHOICES:
        raise ValueError(f"desc_match must be one of {DESC_MATCH_CHOICES}, got {desc_match!r}")


def desc_equal(a: str, b: str) -> bool:
    """The exact rule: normalised descs equal (see `semantic.normalize_desc`)."""
    return normalize_desc(a) == normalize_desc(b)


def boxes_array(objs: Sequence) -> np.ndarray:
    """(n, 4) float64 [x1, y1, x2, y2] of EvalObjects (polygons: their bounding box)."""
    if not objs:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray([o.bbox for o in objs], dtype=np.float64).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) xyxy boxes -> (n, m); 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def polygon_of(obj) -> list[float]:
    """Flat polygon of an EvalObject (a box becomes its rectangle)."""
    if obj.type == "poly":
        return [float(v) for v in obj.points]
    x1, y1, x2, y2 = obj.points
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def to_rles(objs: Sequence, width: int, height: int) -> list:
    if not objs:
        return []
    return _mask_api().frPyObjects([polygon_of(o) for o in objs], int(height), int(width))


def mask_iou(preds: Sequence, gts: Sequence, width: int, height: int) -> np.ndarray:
    """Pairwise mask IoU (len(preds), len(gts)) at the image size."""
    if not preds or not gts:
        return np.zeros((len(preds), len(gts)), dtype=np.float64)
    m = _mask_api()
    ious = m.iou(to_rles(preds, width, height), to_rles(gts, width, height), [0] * len(gts))
    return np.asarray(ious, dtype=np.float64).reshape(len(preds), len(gts))


def _image_size(preds: Sequence, gts: Sequence) -> tuple[int, int]:
    pts = [v for o in list(preds) + list(gts) for v in o.points]
    xs, ys = pts[0::2] or [0.0], pts[1::2] or [0.0]
    return int(np.ceil(max(xs))) + 1, int(np.ceil(max(ys))) + 1


def iou_matrix(preds: Sequence, gts: Sequence, width: int | None = None, height: int | None = None) -> np.ndarray:
    """(len(preds), len(gts)) IoU: box IoU, mask IoU where either side is a polygon."""
    ious = box_iou(boxes_array(preds), boxes_array(gts))
    if ious.size == 0:
        return ious
    pp = np.fromiter((o.type == "poly" for o in preds), dtype=bool, count=len(preds))
    gp = np.fromiter((o.type == "poly" for o in gts), dtype=bool, count=len(gts))
    if pp.any() or gp.any():
        if width is None or height is None:
            width, height = _image_size(preds, gts)
        use = pp[:, None] | gp[None, :]
        rows = np.nonzero(use.any(axis=1))[0]
        cols = np.nonzero(use.any(axis=0))[0]
        sub = mask_iou([preds[i] for i in rows], [gts[j] for j in cols], width, height)
        block = ious[np.ix_(rows, cols)]
        ious[np.ix_(rows, cols)] = np.where(use[np.ix_(rows, cols)], sub, block)
    return ious


def greedy_match(ious: np.ndarray, iou_thr: float) -> list[tuple[int, int, float]]:
    """Greedy 1:1 on an IoU matrix: IoU desc, then pred index asc, then gt index asc."""
    if ious.size == 0:
        return []
    pi, gi = np.nonzero(ious >= iou_thr)
    if pi.size == 0:
        return []
    v = ious[pi, gi]
    order = np.lexsort((gi, pi, -v))
    used_p = np.zeros(ious.shape[0], dtype=bool)
    used_g = np.zeros(ious.shape[1], dtype=bool)
    out = []
    for k in order.tolist():
        i, j = int(pi[k]), int(gi[k])
        if used_p[i] or used_g[j]:
            continue
        used_p[i] = used_g[j] = True
        out.append((i, j, float(v[k])))
    return out


def rank_match(ious: np.ndarray, iou_thr: float) -> list[tuple[int, int, float]]:
    """COCOeval's assignment (`evaluateImg`, one category, no crowd or ignored GT): predictions in
    rank order (the rows, best first), each takes the still-free GT of highest IoU >= `iou_thr`,
    a later GT winning a tie. These are the pairs COCO AP counts as true positives.
    Returns (pred, gt, iou) in row order."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.size == 0:
        return []
    thr = min(float(iou_thr), 1 - 1e-10)  # as COCOeval: IoU 1.0 matches at threshold 1.0
    used_g = np.zeros(ious.shape[1], dtype=bool)
    out = []
    for i, row in enumerate(ious.tolist()):
        best, m = thr, -1
        for j, v in enumerate(row):
            if not used_g[j] and v >= best:
                best, m = v, j
        if m >= 0:
            used_g[m] = True
            out.append((i, m, float(best)))
    return out


@dataclass
class MatchPair:
    pred_index: int  # position in the preds list given to match_image
    gt_index: int
    iou: float
    pred_desc: str = ""
    gt_desc: str = ""
    similarity: float | None = None  # 1.0 for normalised-equal strings, else cosine (None: no embeddings)
    semantic_ok: bool | None = None  # the desc counts as right under `desc_match`; None until applied
    desc_ok_exact: bool | None = None  # normalised descs equal
    desc_ok_semantic: bool | None = None  # equal or cosine >= threshold (None: no embeddings)

    def ok(self, rule: str | None = None) -> bool:
        """Right under `rule` ("exact" / "semantic"; None: the rule applied, `semantic_ok`)."""
        if rule == "exact" and self.desc_ok_exact is not None:
            return self.desc_ok_exact
        if rule == "semantic" and self.desc_ok_semantic is not None:
            return self.desc_ok_semantic
        return bool(self.semantic_ok)

    def to_dict(self) -> dict[str, Any]:
        return {"pred_index": self.pred_index, "gt_index": self.gt_index, "iou": self.iou,
                "pred_desc": self.pred_desc, "gt_desc": self.gt_desc,
                "similarity": self.similarity, "semantic_ok": self.semantic_ok,
                "desc_ok_exact": self.desc_ok_exact, "desc_ok_semantic": self.desc_ok_semantic}


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision 1.0 when nothing predicted, recall 1.0 when nothing there, F1 0 when P+R = 0."""
    p = tp / (tp + fp) if tp + fp > 0 else 1.0
    r = tp / (tp + fn) if tp + fn > 0 else 1.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1}


@dataclass
class MatchResult:
    iou_thr: float
    num_pred: int
    num_gt: int
    pairs: list[MatchPair] = field(default_factory=list)  # greedy acceptance order
    unmatched_preds: list[int] = field(default_factory=list)
    unmatched_gts: list[int] = field(default_factory=list)

    # -- counts -------------------------------------------------------------------------
    @property
    def tp_loc(self) -> int:
        return len(self.pairs)

    @property
    def fp_loc(self) -> int:
        return self.num_pred - self.tp_loc

    @property
    def fn_loc(self) -> int:
        return self.num_gt - self.tp_loc

    @property
    def sem_ok(self) -> int:
        return sum(1 for p in self.pairs if p.semantic_ok)

    @property
    def sem_bad(self) -> int:
        return self.tp_loc - self.sem_ok

    @property
    def tp_full(self) -> int:
        return self.sem_ok

    @property
    def fp_full(self) -> int:
        return self.fp_loc + self.sem_bad

    @property
    def fn_full(self) -> int:
        return self.fn_loc + self.sem_bad

    def counts(self, rule: str | None = None) -> dict[str, int]:
        """Counts with descs judged by `rule` ("exact" / "semantic"; None: the rule applied)."""
        tp = len(self.pairs)
        ok = sum(1 for p in self.pairs if p.ok(rule))
        bad = tp - ok
        fp, fn = self.num_pred - tp, self.num_gt - tp
        return {"num_pred": self.num_pred, "num_gt": self.num_gt, "tp_loc": tp, "fp_loc": fp, "fn_loc": fn,
                "matched_sem_ok": ok, "matched_sem_bad": bad, "tp_full": ok, "fp_full": fp + bad, "fn_full": fn + bad}

    def scores(self, rule: str | None = None) -> dict[str, dict[str, float]]:
        c = self.counts(rule)
        return {"loc": prf(c["tp_loc"], c["fp_loc"], c["fn_loc"]),
                "full": prf(c["tp_full"], c["fp_full"], c["fn_full"])}

    def apply_semantic(self, scorer: SemanticScorer | None, desc_match: str | None = None) -> "MatchResult":
        """Judge every pair's desc by both rules; `semantic_ok` takes `desc_match`'s verdict
        (None: "semantic" when `scorer` has embeddings, else "exact"). Without embeddings the
        semantic verdict stays None (unknown), and "semantic" falls back to exact strings."""
        scorer = scorer or SemanticScorer.string_only()
        check_desc_match(desc_match)
        rule = desc_match or ("semantic" if scorer.enabled else "exact")
        res = scorer.score_pairs([(p.pred_desc, p.gt_desc) for p in self.pairs])
        for p, (sim, ok) in zip(self.pairs, res):
            p.similarity = sim
            p.desc_ok_exact = desc_equal(p.pred_desc, p.gt_desc)
            p.desc_ok_semantic = bool(ok) if scorer.enabled else None
            p.semantic_ok = p.desc_ok_exact if rule == "exact" or p.desc_ok_semantic is None else p.desc_ok_semantic
        return self

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"iou_thr": self.iou_thr, **self.counts()}
        d["matches"] = [p.to_dict() for p in self.pairs]
        d["unmatched_pred_indices"] = list(self.unmatched_preds)
        d["unmatched_gt_indices"] = list(self.unmatched_gts)
        return d


def match_image(preds: Sequence, gts: Sequence, iou_thr: float = 0.5, *, width: int | None = None,
                height: int | None = None, semantic: SemanticScorer | None | bool = None,
                ious: np.ndarray | None = None, desc_match: str | None = None) -> MatchResult:
    """Match one image's predictions to its GT objects (EvalObject-like: desc, type, points).

    `semantic`: a SemanticScorer; None = normalised string equality only; False = leave the
    pairs' semantic fields unset (call `apply_semantic` later, e.g. after batching embeddings).
    `desc_match`: the rule `semantic_ok` follows ("exact" / "semantic"; None: semantic when a
    scorer with embeddings is given, else exact).
    `ious`: a precomputed `iou_matrix(preds, gts, width, height)` to reuse across thresholds.
    """
    if ious is None:
        ious = iou_matrix(preds, gts, width, height)
    accepted = greedy_match(ious, iou_thr)
    mp = set()
    mg = set()
    pairs = []
    for i, j, v in accepted:
        mp.add(i)
        mg.add(j)
        pairs.append(MatchPair(pred_index=i, gt_index=j, iou=v, pred_desc=preds[i].desc, gt_desc=gts[j].desc))
    res = MatchResult(iou_thr=float(iou_thr), num_pred=len(preds), num_gt=len(gts), pairs=pairs,
                      unmatched_preds=[i for i in range(len(preds)) if i not in mp],
                      unmatched_gts=[j for j in range(len(gts)) if j not in mg])
    if semantic is not False:
        res.apply_semantic(semantic if isinstance(semantic, SemanticScorer) else None, desc_match)
    return res


def aggregate(results: Sequence[MatchResult], rule: str | None = None) -> dict[str, Any]:
    """Micro (global sums) and macro (mean over images) P/R/F1, loc-only and full (descs judged by
    `rule`: "exact" / "semantic"; None: the rule applied to the pairs)."""
    out: dict[str, Any] = {"images": len(results)}
    tot = {k: 0 for k in ("num_pred", "num_gt", "tp_loc", "fp_loc", "fn_loc", "matched_sem_ok",
                          "matched_sem_bad", "tp_full", "fp_full", "fn_full")}
    per_image = []
    for r in results:
        c = r.counts(rule)
        for k, v in c.items():
            tot[k] += v
        per_image.append({"loc": prf(c["tp_loc"], c["fp_loc"], c["fn_loc"]),
                          "full": prf(c["tp_full"], c["fp_full"], c["fn_full"])})
    for mode in ("loc", "full"):
        micro = prf(tot[f"tp_{mode}"], tot[f"fp_{mode}"], tot[f"fn_{mode}"])
        micro.update({"tp": tot[f"tp_{mode}"], "fp": tot[f"fp_{mode}"], "fn": tot[f"fn_{mode}"]})
        if per_image:
            macro = {k: float(np.mean([s[mode][k] for s in per_image])) for k in ("precision", "recall", "f1")}
        else:
            macro = {"precision": None, "recall": None, "f1": None}
        out[mode] = {"micro": micro, "macro": macro}
    matched = tot["tp_loc"]
    out["semantic"] = {"matched": matched, "matched_sem_ok": tot["matched_sem_ok"],
                       "matched_sem_bad": tot["matched_sem_bad"],
                       "sem_acc_on_matched": (tot["matched_sem_ok"] / matched) if matched else None}
    out["counts"] = tot
    return out
