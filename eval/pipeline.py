"""`evaluate()`: prediction artifact + GT -> metrics.json and the other artifacts."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, Sequence

from coordexp.checkpoint import sha256_file

from .coco import STAT_NAMES, CocoResult, build_coco_dets, build_coco_gt, run_cocoeval
from .io import ImagePair
from .matching import DESC_MATCH_CHOICES, MatchResult, aggregate, check_desc_match, iou_matrix, match_image
from .semantic import DEFAULT_THRESHOLD, SemanticScorer
from .report import thr_key, write_artifacts

EVAL_SCHEMA_VERSION = "coordexp.eval.v1"
METRIC_CHOICES = ("coco", "f1ish", "both", "lvis")
DEFAULT_IOU_THRS = (0.3, 0.5)
PRIMARY_IOU_THR = 0.5


def primary_threshold(iou_thrs: Sequence[float]) -> float:
    thrs = [float(t) for t in iou_thrs]
    for t in thrs:
        if abs(t - PRIMARY_IOU_THR) < 1e-12:
            return t
    return thrs[0]


def parse_thresholds(text: str | Sequence[float]) -> list[float]:
    if isinstance(text, str):
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    else:
        vals = [float(v) for v in text]
    if not vals or any(not (0.0 < v <= 1.0) for v in vals):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {text!r}")
    return list(dict.fromkeys(vals))


def run_f1ish(pairs: Sequence[ImagePair], iou_thrs: Sequence[float],
              scorer: SemanticScorer | None, desc_match: str | None = None) -> dict[float, list[MatchResult]]:
    """Match every image at every threshold (IoU matrices computed once per image), then judge
    the descs with one batched embedding pass over the unique descs that need it. The ONE
    matching path of eval, vis and the run registry. `desc_match`: the rule `semantic_ok`
    follows ("exact" / "semantic"; None: semantic when `scorer` has embeddings); both rules'
    verdicts are kept on every pair (`desc_ok_exact`, `desc_ok_semantic`)."""
    results: dict[float, list[MatchResult]] = {t: [] for t in iou_thrs}
    for p in pairs:
        ious = iou_matrix(p.preds, p.gts, p.width, p.height)
        for t in iou_thrs:
            results[t].append(match_image(p.preds, p.gts, t, width=p.width, height=p.height,
                                          semantic=False, ious=ious))
    scorer = scorer or SemanticScorer.string_only()
    if scorer.enabled:
        from .semantic import normalize_desc

        need = {s for rs in results.values() for r in rs for m in r.pairs
                if normalize_desc(m.pred_desc) != normalize_desc(m.gt_desc) for s in (m.pred_desc, m.gt_desc)}
        scorer.prefetch(need)
    for rs in results.values():
        for r in rs:
            r.apply_semantic(scorer, desc_match)
    return results


def _counts(gt, pairs, pred_descs: Counter, line_counts: dict[str, int]) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "images": len(pairs),
        "gt_lines_invalid": len(gt.invalid),
        "images_with_gt": sum(1 for p in pairs if p.gts),
        "gt_objects": sum(len(p.gts) for p in pairs),
        "gt_crowd": sum(1 for p in pairs for o in p.gts if o.iscrowd),
        "gt_polygons": sum(1 for p in pairs for o in p.gts if o.type == "poly"),
        "pred_objects": sum(pred_descs.values()),
        "pred_polygons": sum(1 for p in pairs for o in p.preds if o.type == "poly"),
        "categories": len(gt.categories),
        "pred_lines": 0, "pred_lines_missing": 0, "pred_lines_with_error": 0, "pred_lines_unreadable": 0,
        "reparsed_lines": 0, "preds_invalid": 0, "size_mismatch_lines": 0,
    }
    counts.update(line_counts)
    return counts


def _category_mapping(scorer: SemanticScorer, pred_descs: Counter, categories: list[str], counts: dict[str, Any]
                      ) -> tuple[dict[str, str | None], dict[str, Any]]:
    """COCO categories are the GT descs: each predicted desc -> a category (or dropped); adds the
    mapping counts to `counts`. Returns (desc -> category, the report's `category_mapping`)."""
    mapping = scorer.map_to_categories(sorted(pred_descs), categories)
    category_of = {d: m["category"] for d, m in mapping.items()}
    mapped = [{"desc": d, "category": m["category"], "how": m["how"], "cosine": m["cosine"], "count": pred_descs[d]}
              for d, m in mapping.items() if m["how"] in ("normalized", "embedding")]
    dropped = [{"desc": d, "nearest": m["nearest"], "cosine": m["cosine"], "count": pred_descs[d]}
               for d, m in mapping.items() if m["how"] == "dropped"]
    mapped.sort(key=lambda r: (-r["count"], r["desc"]))
    dropped.sort(key=lambda r: (-r["count"], r["desc"]))
    counts["coco_preds"] = sum(pred_descs[d] for d, c in category_of.items() if c is not None)
    counts["coco_preds_mapped"] = sum(r["count"] for r in mapped)
    counts["coco_preds_dropped"] = sum(r["count"] for r in dropped)
    return category_of, {"mapped": mapped, "dropped": dropped}


def _coco(pairs, categories: list[str], category_of: dict[str, str | None], with_segm: bool, backend: str):
    """(COCO GT, bbox detections, {iou type: CocoResult}); segm too when the GT has polygons."""
    coco_gt = build_coco_gt(pairs, categories)
    coco_dets = build_coco_dets(pairs, category_of, categories, "bbox")
    res: dict[str, CocoResult] = {}
    for it in ["bbox"] + (["segm"] if with_segm else []):
        dets = coco_dets if it == "bbox" else build_coco_dets(pairs, category_of, categories, "segm")
        res[it] = run_cocoeval(coco_gt, dets, it, backend=backend)
    return coco_gt, coco_dets, res


def _load(pred_path: str, gt_path: str | None, reparse: bool, gt_coord_mode: str | None, compat: str,
          bbox_format: str | None = None):
    """(gt, line info, pairs, categories, compat changes): the pairs after `--compat coordexp`."""
    from .compat import apply_coordexp
    from .upstream import load_inputs

    gt, line_info = load_inputs(pred_path, gt_path, reparse=reparse, gt_coord_mode=gt_coord_mode,
                                bbox_format=bbox_format)
    pairs, categories, changes = gt.images, list(gt.categories), None
    if compat == "coordexp":  # categories: the stripped GT descs left, first seen
        pairs, changes = apply_coordexp(pairs)
        categories = list(dict.fromkeys(o.desc for p in pairs for o in p.gts))
    return gt, line_info, pairs, categories, changes


def _rule_block(rs: list[MatchResult], rule: str) -> dict[str, Any]:
    """`full_exact` / `full_semantic`: the full micro/macro scores and desc counts under one rule."""
    a = aggregate(rs, rule)
    return {"micro": a["full"]["micro"], "macro": a["full"]["macro"], **a["semantic"]}


def _f1ish(result: dict, pairs, iou_thrs, primary: float, scorer: SemanticScorer, compat: str, desc_match: str):
    """F1-ish into `result`; (the pairs matched, results per threshold, preds ignored by the scope).
    `full` follows `desc_match`; `full_exact` and `full_semantic` (None without embeddings) are
    both always there, so a report can show the two figures side by side."""
    from .compat import annotated_scope

    f1_pairs, ignored = annotated_scope(pairs, scorer) if compat == "coordexp" else (pairs, 0)
    f1_results = run_f1ish(f1_pairs, iou_thrs, scorer, desc_match)
    result["f1ish"] = {}
    for th, rs in f1_results.items():
        result["f1ish"][thr_key(th)] = {
            **aggregate(rs), "pred_ignored": ignored, "desc_match": desc_match,
            "full_exact": _rule_block(rs, "exact"),
            "full_semantic": _rule_block(rs, "semantic") if scorer.enabled else None,
        }
    result["f1ish_primary"] = thr_key(primary)
    return f1_pairs, f1_results, ignored


def _partial(gt, counts: dict[str, Any], allow: bool) -> dict[str, Any] | None:
    """The `partial` block when some GT images have no prediction line (an interrupted or cut run):
    their GT objects all count as misses, so AP and recall drop for a reason that is not the model."""
    missing = int(counts.get("pred_lines_missing", 0))
    if not missing:
        return None
    n = len(gt.images)
    return {"predicted_images": n - missing, "gt_images": n, "missing_images": missing,
            "scored_as": "misses: every GT object of a missing image is a false negative", "allowed": bool(allow)}


def partial_warning(partial: dict[str, Any]) -> str:
    return (f"WARNING: partial run: {partial['missing_images']} of {partial['gt_images']} GT images have no "
            f"prediction line (only {partial['predicted_images']} predicted); the scores count every GT object "
            f"of those images as a miss. Finish the run (infer --resume) or pass --allow-partial to silence this.")


def evaluate(pred_path: str, gt_path: str | None, out_dir: str | None, metrics: str = "both", *,
             iou_thrs: Sequence[float] = DEFAULT_IOU_THRS, reparse: bool = False, semantic: bool = True,
             semantic_thr: float = DEFAULT_THRESHOLD, embedder=None, coco_backend: str = "faster-coco-eval",
             gt_coord_mode: str | None = None, plots: bool = True, verbose: bool = False,
             compat: str = "ours", desc_match: str | None = None, allow_partial: bool = False,
             bbox_format: str | None = None, complete_only: bool = False,
             details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a prediction artifact against GT; write the artifacts into `out_dir` (None: none).

    - `gt_path=None`: `pred_path` is a gt_vs_pred.jsonl (ours or CoordExp's) with the GT inside.
    - `metrics`: "coco", "f1ish", "both" or "lvis" (federated, eval/lvis.py).
    - `desc_match`: how a matched pair's desc counts as right in `full` (F1-ish) and how pred descs
      map onto COCO categories: "exact" (normalised strings; the default) or "semantic" (also an
      embedding cosine >= `semantic_thr`; the default of `compat="coordexp"`, upstream's rule).
      Both F1 figures are reported (`full_exact`, `full_semantic`) whichever counts.
    - `semantic=False`: no embedding model at all (no `full_semantic`; "semantic" refused).
    - `allow_partial`: GT images without a prediction line are still recorded (`partial`) and
      scored as misses, but no warning goes to stderr.
    - `embedder`: a `list[str] -> (n, d) array` used instead of all-MiniLM-L6-v2 (tests).
    - `compat="coordexp"`: CoordExp's evaluator conventions (eval/compat.py); default ours.
    - `bbox_format`: how the model wrote bbox_2d, for prediction lines that do not say (ours do;
      a line that says otherwise is an error).
    - `complete_only`: leave out the images whose answer the token limit cut (finish_reason
      "length"); by default they count, and how many there were is reported (`truncated`).
    - `details`: a dict filled with what the numbers came from, for per-image statistics
      (`pairs`, `f1_pairs`, `f1_results` per threshold, `coco_gt`, `coco_dets`).
    Returns the metrics dict (the content of metrics.json).
    """
    from .compat import COMPAT_CHOICES, compat_info

    if metrics not in METRIC_CHOICES:
        raise ValueError(f"metrics must be one of {METRIC_CHOICES}, got {metrics!r}")
    if compat not in COMPAT_CHOICES:
        raise ValueError(f"compat must be one of {COMPAT_CHOICES}, got {compat!r}")
    check_desc_match(desc_match)
    if desc_match == "semantic" and not semantic:
        raise ValueError("desc_match 'semantic' needs the embedding model: drop --no-semantic (semantic=False)")
    # upstream's rule in its mode; without the model both rules are the string rule anyway
    desc_match = desc_match or ("semantic" if compat == "coordexp" and semantic else "exact")
    iou_thrs = parse_thresholds(iou_thrs)
    primary = primary_threshold(iou_thrs)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    from .upstream import flat_metrics

    gt, line_info, pairs, categories, changes = _load(pred_path, gt_path, reparse, gt_coord_mode, compat, bbox_format)
    truncated = {"answers": sum(p.truncated for p in pairs), "left_out": bool(complete_only)}
    if complete_only:
        pairs = [p for p in pairs if not p.truncated]
    elif truncated["answers"]:
        print(f"warning: {truncated['answers']} of {len(pairs)} answers were cut at the token limit (finish_reason "
              "length): their missing objects count as misses; raise the run's --max-new-tokens, or evaluate the "
              "complete answers only with --complete-only", file=sys.stderr)
    timings["load_s"] = time.perf_counter() - t0
    scorer = SemanticScorer(embedder=embedder, threshold=semantic_thr, enabled=semantic)
    pred_descs = Counter(o.desc for p in pairs for o in p.preds)
    counts = _counts(gt, pairs, pred_descs, line_info["counts"])
    t = time.perf_counter()
    # COCO categories follow the same rule as F1-ish: exact maps by normalised strings only
    map_scorer = scorer if desc_match == "semantic" else SemanticScorer.string_only()
    category_of, mapping_report = _category_mapping(map_scorer, pred_descs, categories, counts)
    timings["category_mapping_s"] = time.perf_counter() - t

    result: dict[str, Any] = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "inputs": {"pred": os.path.abspath(pred_path), "gt": os.path.abspath(gt_path or pred_path),
                   "gt_format": gt.source_format, "metrics": metrics, "reparse": bool(reparse),
                   "iou_thrs": [float(x) for x in iou_thrs], "primary_iou_thr": primary, "compat": compat,
                   "desc_match": desc_match, "bbox_format": bbox_format,
                   "bbox_formats": line_info.get("bbox_formats", {}), "pred_sha256": sha256_file(pred_path),
                   "complete_only": bool(complete_only)},
        "truncated": truncated,
        "desc_match": desc_match,
        "counts": counts,
        "errors": line_info["errors"],
        "errors_listed": line_info.get("errors_listed", {}),  # every code of the lines' `errors` lists
        "categories": categories,
        "category_mapping": mapping_report,
    }
    partial = _partial(gt, line_info["counts"], allow_partial)
    if partial is not None:
        result["partial"] = partial
        if not allow_partial:
            print(partial_warning(partial), file=sys.stderr)
    if gt.invalid:
        result["gt_invalid_lines"] = [gt.invalid[k] for k in sorted(gt.invalid)][:50]
    coco_gt = coco_dets = None
    coco_res: dict[str, CocoResult] = {}
    if metrics in ("coco", "both"):
        t = time.perf_counter()
        coco_gt, coco_dets, coco_res = _coco(pairs, categories, category_of, bool(counts["gt_polygons"]),
                                             coco_backend)
        result["coco"] = {it: r.to_dict() for it, r in coco_res.items()}
        timings["coco_s"] = time.perf_counter() - t
    if metrics == "lvis":  # federated LVIS on LVISEval (eval/lvis.py)
        from .lvis import evaluate_lvis

        t = time.perf_counter()
        result["lvis"], _, _ = evaluate_lvis(pairs, scorer)
        timings["lvis_s"] = time.perf_counter() - t
    f1_results: dict[float, list[MatchResult]] = {}
    f1_pairs, ignored = pairs, 0
    if metrics in ("f1ish", "both"):
        t = time.perf_counter()
        f1_pairs, f1_results, ignored = _f1ish(result, pairs, iou_thrs, primary, scorer, compat, desc_match)
        timings["f1ish_s"] = time.perf_counter() - t
    result["compat"] = compat_info(compat, changes, ignored)
    result["coordexp"] = flat_metrics(result)  # upstream's flat key names, same numbers
    result["semantic"] = scorer.info()
    if scorer.fallback_reason and semantic:
        result["semantic"]["note"] = ("embedding model unavailable: semantic matching and category mapping "
                                      "fell back to exact/normalised string matching")
    timings["total_s"] = time.perf_counter() - t0
    result["timings"] = timings
    if details is not None:
        details.update(pairs=pairs, f1_pairs=f1_pairs, f1_results=f1_results, coco_gt=coco_gt, coco_dets=coco_dets)
    if out_dir is not None:
        write_artifacts(out_dir, result, f1_pairs, categories, category_of, coco_gt, coco_dets, coco_res,
                        f1_results, primary, plots=plots)
    return result


__all__ = ["evaluate", "run_f1ish", "partial_warning", "DESC_MATCH_CHOICES", "thr_key", "parse_thresholds", "primary_threshold", "STAT_NAMES",
           "EVAL_SCHEMA_VERSION"]
