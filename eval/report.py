"""Artifacts of an evaluation: JSON/CSV files, plots (matplotlib, Agg canvas) and the summary."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import numpy as np

from .coco import STAT_NAMES, CocoResult
from .matching import MatchResult, prf

WORST_CLASSES = 5


def _dump_json(path: str, obj: Any, indent: int | None = 1) -> None:
    # json.dumps (not json.dump) so that indent=None uses the C encoder
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=indent))
        f.write("\n")


def _dump_json_rows(path: str, rows: list) -> None:
    """A JSON list with one compact element per line (fast to write, easy to grep)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]\n")


def _matches_line(p, r: MatchResult) -> dict[str, Any]:
    """One matches.jsonl line; indices are into the prediction line's `preds` and the GT line's
    `objects` (they equal positions in ImagePair.preds/gts unless invalid preds were skipped)."""
    pi = [o.index for o in p.preds]
    gi = [o.index for o in p.gts]
    d: dict[str, Any] = {"image_id": p.image_id, "images": p.images, "iou_thr": r.iou_thr, **r.counts()}
    d["matches"] = [dict(m.to_dict(), pred_index=pi[m.pred_index], gt_index=gi[m.gt_index]) for m in r.pairs]
    d["unmatched_pred_indices"] = [pi[i] for i in r.unmatched_preds]
    d["unmatched_gt_indices"] = [gi[j] for j in r.unmatched_gts]
    if p.error:
        d["error"] = p.error
    return d


def thr_key(thr: float) -> str:
    """0.5 -> "0.50" (the key in metrics.json and the `matches@0.30.jsonl` file names)."""
    return f"{float(thr):.2f}"


def per_class_f1(pairs, results: list[MatchResult], categories, category_of) -> dict[str, dict[str, int]]:
    """Per category at one threshold, full mode. A class is credited only with its own
    predictions: tp = right matches whose pred maps to the GT's category (so tp <= pred_count);
    fn = GT of the category not counted as tp; fp = preds mapped to the category that are not
    such a tp. A pair judged right across classes (semantic matching: "yellow rectangle" on a
    "yellow circle") is an FN of the GT's class and an FP of the pred's, so with `desc_match
    semantic` the per-class sums can be below the headline tp."""
    out = {c: {"tp": 0, "fp": 0, "fn": 0} for c in categories}
    for p, r in zip(pairs, results):
        ok_pred, ok_gt = set(), set()
        for m in r.pairs:
            g = p.gts[m.gt_index].desc
            if m.semantic_ok and category_of.get(p.preds[m.pred_index].desc) == g:
                ok_pred.add(m.pred_index)
                ok_gt.add(m.gt_index)
                out[g]["tp"] += 1
        for j, g in enumerate(p.gts):
            if j not in ok_gt:
                out[g.desc]["fn"] += 1
        for i, o in enumerate(p.preds):
            c = category_of.get(o.desc)
            if c is not None and i not in ok_pred:
                out[c]["fp"] += 1
    return out


def write_artifacts(out_dir: str, metrics: dict[str, Any], pairs: Sequence, categories: Sequence[str],
                    category_of: dict[str, str | None], coco_gt, coco_dets, coco_res: dict[str, CocoResult],
                    f1_results: dict[float, list[MatchResult]], primary: float, plots: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    files = ["metrics.json", "per_image.json", "per_class.csv"]

    # per_image.json
    per_image = []
    for k, p in enumerate(pairs):
        row: dict[str, Any] = {"image_id": p.image_id, "images": p.images, "width": p.width, "height": p.height,
                               "num_gt": len(p.gts), "num_pred": len(p.preds), "error": p.error}
        if p.coco_image_id is not None:
            row["coco_image_id"] = p.coco_image_id
        for flag in ("missing", "reparsed", "size_mismatch"):
            if getattr(p, flag):
                row[flag] = True
        if p.preds_invalid:
            row["preds_invalid"] = p.preds_invalid
        if f1_results:
            row["f1ish"] = {}
            for th, rs in f1_results.items():
                r = rs[k]
                row["f1ish"][thr_key(th)] = {**r.counts(), **r.scores()}
        per_image.append(row)
    _dump_json_rows(os.path.join(out_dir, "per_image.json"), per_image)

    # matches.jsonl (+ matches@<thr>.jsonl)
    for th, rs in f1_results.items():
        name = "matches.jsonl" if th == primary else f"matches@{thr_key(th)}.jsonl"
        files.append(name)
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            for p, r in zip(pairs, rs):
                f.write(json.dumps(_matches_line(p, r), ensure_ascii=False) + "\n")

    # COCO files
    if coco_gt is not None:
        _dump_json(os.path.join(out_dir, "coco_gt.json"), coco_gt, indent=None)
        _dump_json(os.path.join(out_dir, "coco_preds.json"), coco_dets, indent=None)
        files += ["coco_gt.json", "coco_preds.json"]

    # per_class.csv
    per_class = _per_class_rows(pairs, categories, category_of, coco_res, f1_results.get(primary))
    with open(os.path.join(out_dir, "per_class.csv"), "w", newline="", encoding="utf-8") as f:
        cols = list(per_class[0].keys()) if per_class else ["category_id", "category"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in per_class:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})

    # plots
    if plots and "bbox" in coco_res:
        try:
            files += plot_pr_curve(os.path.join(out_dir, "pr_curve.png"), coco_res["bbox"], categories,
                                   {r["category"]: (r["gt_count"], r["pred_count"]) for r in per_class})
            counts = {r["category"]: (r["gt_count"], r["pred_count"]) for r in per_class}
            files += plot_per_class_ap(os.path.join(out_dir, "per_class_ap.png"), coco_res["bbox"], categories,
                                       counts)
        except Exception as e:  # a plotting problem must not lose the metrics
            metrics.setdefault("warnings", []).append(f"plots not written: {type(e).__name__}: {e}")
    metrics["artifacts"] = sorted(files)
    _dump_json(os.path.join(out_dir, "metrics.json"), metrics)


def _per_class_rows(pairs, categories, category_of, coco_res, primary_results) -> list[dict[str, Any]]:
    gt_count = {c: 0 for c in categories}
    pred_count = {c: 0 for c in categories}
    for p in pairs:
        for o in p.gts:
            gt_count[o.desc] += 1
        for o in p.preds:
            c = category_of.get(o.desc)
            if c is not None:
                pred_count[c] += 1
    f1 = per_class_f1(pairs, primary_results, categories, category_of) if primary_results is not None else None
    rows = []
    for k, c in enumerate(categories):
        cid = k + 1
        row: dict[str, Any] = {"category_id": cid, "category": c, "gt_count": gt_count[c], "pred_count": pred_count[c]}
        for it, r in coco_res.items():
            pre = "" if it == "bbox" else "segm_"
            pc = r.per_class.get(cid, {})
            for key in ("AP", "AP50", "AR100"):
                v = pc.get(key)
                row[pre + key] = None if v is None else round(v, 6)
        if f1 is not None:
            s = f1[c]
            row.update(s)
            row.update({k2: round(v, 6) for k2, v in prf(s["tp"], s["fp"], s["fn"]).items()})
        rows.append(row)
    return rows


# -- plots -------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_pr_curve(path: str, res: CocoResult, categories: Sequence[str],
                  counts: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Precision-recall at IoU 0.5 (area all, maxDets 100): mean over classes + the worst ones
    (legend entries carry the class's GT / prediction counts when `counts` is given)."""
    t50 = int(np.argmin(np.abs(res.iou_thrs - 0.5)))
    pr = res.precision[t50, :, :, 0, -1]  # [R, K]
    valid = [k for k in range(pr.shape[1]) if (pr[:, k] > -1).any()]
    fig = _figure(7, 5)
    ax = fig.add_subplot(111)
    if valid:
        sub = np.where(pr[:, valid] > -1, pr[:, valid], np.nan)
        ax.plot(res.rec_thrs, np.nanmean(sub, axis=1), color="black", lw=2.5,
                label=f"all classes (AP50 {res.stats['AP50']:.3f})")
        ap50 = {k: float(np.mean(pr[:, k][pr[:, k] > -1])) for k in valid}
        worst = sorted(valid, key=lambda k: (ap50[k], k))[:WORST_CLASSES]
        for k in worst:
            name = categories[res.cat_ids[k] - 1] if res.cat_ids[k] - 1 < len(categories) else str(res.cat_ids[k])
            ax.plot(res.rec_thrs, np.clip(pr[:, k], 0, None), lw=1.2,
                    label=f"{class_label(name, counts)}: AP50 {ap50[k]:.3f}")
    else:
        ax.text(0.5, 0.5, "no GT objects", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{res.iou_type} precision-recall @ IoU 0.50 (worst {WORST_CLASSES} classes by AP50)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    return [os.path.basename(path)]


def class_label(name: str, counts: dict[str, tuple[int, int]] | None) -> str:
    """A class's axis label with its object counts: an AP over 3 GT objects is not one over 300."""
    if not counts or name not in counts:
        return name
    g, p = counts[name]
    return f"{name} (GT {g}, pred {p})"


def per_class_plot_rows(res: CocoResult, categories: Sequence[str],
                        counts: dict[str, tuple[int, int]] | None = None) -> list[tuple[str, float, float]]:
    """(label, AP, AP50) per class with an AP, in the plot's order (worst first)."""
    rows = [(class_label(categories[cid - 1] if cid - 1 < len(categories) else str(cid), counts), v["AP"], v["AP50"])
            for cid, v in res.per_class.items() if v["AP"] is not None]
    rows.sort(key=lambda r: (r[1], r[0]))
    return rows


def plot_per_class_ap(path: str, res: CocoResult, categories: Sequence[str],
                      counts: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Per-class AP / AP50 bars, each class labelled with its GT and prediction counts
    (`counts`: category -> (gt_count, pred_count), as in per_class.csv)."""
    rows = per_class_plot_rows(res, categories, counts)
    n = max(len(rows), 1)
    fig = _figure(8, min(2 + 0.22 * n, 40))
    ax = fig.add_subplot(111)
    if rows:
        y = np.arange(len(rows))
        ax.barh(y, [r[2] for r in rows], color="#9ecae1", label="AP50")
        ax.barh(y, [r[1] for r in rows], color="#3182bd", label="AP@[.50:.95]")
        ax.set_yticks(y)
        ax.set_yticklabels([r[0] for r in rows], fontsize=7)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no GT objects", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP")
    ax.set_title(f"per-class {res.iou_type} AP (mean AP {res.stats['AP']:.3f})")
    fig.tight_layout()
    fig.savefig(path)
    return [os.path.basename(path)]


# -- summary -----------------------------------------------------------------------------
def _f(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def format_summary(m: dict[str, Any]) -> str:
    lines = []
    c = m.get("counts", {})
    lines.append(f"images {c.get('images', 0)}  gt objects {c.get('gt_objects', 0)}  preds {c.get('pred_objects', 0)}"
                 f"  categories {c.get('categories', 0)}  error lines {c.get('pred_lines_with_error', 0)}"
                 f"  missing lines {c.get('pred_lines_missing', 0)}")
    tr = m.get("truncated") or {}
    if tr.get("answers"):
        lines.append(f"TRUNCATED: {tr['answers']} answers were cut at the token limit"
                     + (" and are left out (--complete-only)" if tr.get("left_out") else
                        " (counted; --complete-only leaves them out)"))
    pa = m.get("partial")
    if pa:
        lines.append(f"PARTIAL RUN: {pa['predicted_images']} of {pa['gt_images']} GT images predicted; the "
                     f"{pa['missing_images']} others count as misses (every GT object a false negative)")
    for it, s in (m.get("coco") or {}).items():
        lines.append(f"COCO {it:<5} " + "  ".join(f"{n} {s[n]:.3f}" for n in STAT_NAMES[:6]))
        lines.append(" " * 11 + "  ".join(f"{n} {s[n]:.3f}" for n in STAT_NAMES[6:]))
    lv = m.get("lvis")
    if lv:
        lines.append("LVIS  bbox  " + "  ".join(f"{n} {lv[n]:.3f}" for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
        lines.append(" " * 11 + "  ".join(f"{n} {lv[n]:.3f}" for n in ("APr", "APc", "APf", "AR@300"))
                     + f"  ({lv['detections']} dets, <= {lv['max_dets']} per image)")
    if m.get("compat", {}).get("mode") == "coordexp":
        cx = m["compat"]
        lines.append(f"compat coordexp: {cx['images_without_gt_left_out']} images without GT left out, "
                     f"{cx['gt_degenerate_dropped']} GT / {cx['pred_degenerate_dropped']} preds degenerate dropped, "
                     f"{cx['f1ish_pred_ignored']} preds outside the GT label space ignored (F1-ish)")
    if m.get("f1ish"):
        dm = m.get("desc_match") or "semantic"
        lines.append(f"F1-ish (full: descs judged by {'exact (normalised) labels' if dm == 'exact' else 'semantic matching'}"
                     f", --desc-match {dm})")
        lines.append("F1-ish       IoU   | loc P   loc R   loc F1 | full P  full R  full F1 | sem acc")
        for key, a in m["f1ish"].items():
            for avg in ("micro", "macro"):
                lo, fu = a["loc"][avg], a["full"][avg]
                star = "*" if key == m.get("f1ish_primary") else " "
                acc = a["semantic"]["sem_acc_on_matched"]
                lines.append(f"  {avg:<6}{star}   {key} | {_f(lo['precision'])}  {_f(lo['recall'])}  {_f(lo['f1'])} |"
                             f" {_f(fu['precision'])}  {_f(fu['recall'])}  {_f(fu['f1'])}  | {_f(acc)}")
        a = m["f1ish"].get(m.get("f1ish_primary")) or {}
        ex, se = a.get("full_exact"), a.get("full_semantic")
        if ex:
            lines.append(f"full F1@{m.get('f1ish_primary')} micro: exact-label {ex['micro']['f1']:.3f}"
                         + (f"  semantic {se['micro']['f1']:.3f} (cosine >= {m.get('semantic', {}).get('threshold', 0.6)})"
                            if se else "  semantic - (no embedding model)")
                         + f"  [headline: {dm}]")
    cm = m.get("category_mapping", {})
    if cm.get("mapped") or cm.get("dropped"):
        lines.append(f"descs mapped to a category: {len(cm.get('mapped', []))} ({c.get('coco_preds_mapped', 0)} preds);"
                     f" dropped: {len(cm.get('dropped', []))} ({c.get('coco_preds_dropped', 0)} preds)")
    sem = m.get("semantic", {})
    lines.append(f"semantic: {sem.get('backend')}" + (f" ({sem['fallback_reason']})" if sem.get("fallback_reason") else ""))
    if m.get("errors"):
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(m["errors"].items())))
    return "\n".join(lines)
