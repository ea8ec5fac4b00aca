"""Markdown for `compare` reports and CSV / JSON / COCO exports of a run."""
from __future__ import annotations

import csv
import io
import json
from typing import Any

from .registry import Registry

EXPORT_FORMATS = ("csv", "json", "coco")


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def compare_markdown(rep: dict[str, Any], all_metrics: bool = False) -> str:
    """The report as markdown: the headline metrics (`coordexp.runs.stats.HEADLINE`), or every one."""
    from .stats import HEADLINE

    runs = {r["id"]: r for r in rep["runs"]}
    out = [f"# Compare: reference run {rep['reference']} ({_md_cell(runs[rep['reference']]['name'])})", "",
           f"Dataset `{_md_cell(rep['dataset_path'])}` (sha256 {str(rep['dataset_sha256'])[:12]}…), "
           f"{rep['num_images']} images; paired bootstrap {rep['options']['bootstrap']} resamples, seed "
           f"{rep['options']['seed']}; an image is right when {rep['right_image_rule']}.", ""]
    for c in rep["comparisons"]:
        out += [f"## Run {c['b']} ({_md_cell(runs[c['b']]['name'])}) vs run {c['a']}", "",
                "| metric | A | B | B - A | 95 % CI | verdict |", "| --- | ---: | ---: | ---: | --- | --- |"]
        shown = c["metrics"] if all_metrics else sorted(
            (m for m in c["metrics"] if m["metric"] in HEADLINE), key=lambda m: HEADLINE.index(m["metric"]))
        for m in shown:
            ci = "-" if m["ci95"] is None else f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
            out.append(f"| {m['metric']} | {_f(m['a'])} | {_f(m['b'])} | {m['delta']:+.4f} | {ci} | {m['verdict']} |")
        if not all_metrics and len(shown) < len(c["metrics"]):
            out.append(f"({len(c['metrics']) - len(shown)} more metrics: --all)")
        fl, ob = c["image_flips"], c["object_flips"]
        out += ["", "| flips | both right / found | only A | only B | both wrong / missed | exact McNemar p |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
                f"| images ({rep['num_images']}) | {fl['both_right']} | {fl['only_a']} | {fl['only_b']} | "
                f"{fl['both_wrong']} | {fl['mcnemar_p']:.4g} |",
                f"| GT objects | {ob['both_found']} | {ob['only_a']} | {ob['only_b']} | {ob['both_missed']} | "
                f"{ob['mcnemar_p']:.4g} |", ""]
        cl = c["classes"]
        key = cl["ranked_by"]
        for title, rows in (("improved", cl["top_improved"]), ("degraded", cl["top_degraded"])):
            if rows:
                out += [f"Top {title} classes ({key}): " + ", ".join(f"{_md_cell(r['class'])} {r[key]:+.3f}" for r in rows), ""]
        for title, rows in (("improved", c["images"]["top_improved"]), ("degraded", c["images"]["top_degraded"])):
            if rows:
                out += [f"Top {title} images (F1 A -> B): " + ", ".join(
                    f"#{r['image']} {r['f1_a']:.2f}->{r['f1_b']:.2f}" for r in rows), ""]
    return "\n".join(out)


def export_run(reg: Registry, run_id: int, fmt: str) -> str:
    """A run as text: csv (one row per image), json (the run + its images), coco (detections)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    run = reg.get_run(run_id)
    ims = reg.all_images(run_id)
    if fmt == "json":
        return json.dumps({"run": run, "images": ims}, ensure_ascii=False, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["idx", "path", "width", "height", "num_gt", "num_pred", "tp", "fp", "fn", "precision", "recall",
                    "f1", "error", "latency_ms"])
        for im in ims:
            w.writerow([im["idx"], im["path"], im["width"], im["height"], len(im["gt"]), len(im["pred"]), im["tp"],
                        im["fp"], im["fn"], im["precision"], im["recall"], im["f1"], im["error"] or "",
                        "" if im["latency_ms"] is None else im["latency_ms"]])
        return buf.getvalue()
    return json.dumps(coco_detections(ims), ensure_ascii=False)


def coco_detections(ims: list[dict[str, Any]]) -> dict[str, Any]:
    """COCO-style {images, categories, annotations (GT), detections}: xywh boxes in pixels; categories are
    the GT descs first seen, then predicted descs not in the GT."""
    cats: dict[str, int] = {}
    for im in ims:
        for o in im["gt"]:
            cats.setdefault(o["desc"], len(cats) + 1)
    for im in ims:
        for o in im["pred"]:
            cats.setdefault(o["desc"], len(cats) + 1)
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    images = [{"id": im["idx"], "file_name": im["path"], "width": im["width"], "height": im["height"]} for im in ims]
    anns, dets = [], []
    for im in ims:
        for o in im["gt"]:
            b = xywh(o["bbox"])
            anns.append({"id": len(anns) + 1, "image_id": im["idx"], "category_id": cats[o["desc"]], "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0})
        for o in im["pred"]:
            dets.append({"image_id": im["idx"], "category_id": cats[o["desc"]], "bbox": xywh(o["bbox"]),
                         "score": 1.0 if o.get("score") is None else o["score"]})
    return {"images": images, "categories": [{"id": i, "name": n} for n, i in cats.items()],
            "annotations": anns, "detections": dets}
