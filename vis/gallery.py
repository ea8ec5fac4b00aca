"""`index.html`: the overlays of a run, worst F1 first, with per-image counts; a failed row (a
parse failure or another error line) shows the model's `raw_output`, HTML-escaped.

A single self-contained HTML file (inline CSS, no scripts, no network): open it from disk.
"""
from __future__ import annotations

import html
import os
from typing import Any

RAW_OUTPUT_CHARS = 2000  # of a failed row's raw_output shown (the rest is counted)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 20px; color: #222; }
h1 { font-size: 20px; margin: 0 0 6px 0; }
.meta { color: #555; font-size: 13px; margin: 2px 0; }
.meta code { background: #f3f3f3; padding: 0 3px; }
.legend { font-size: 13px; margin: 10px 0 14px 0; }
.legend span { display: inline-block; margin-right: 18px; }
.solid { display: inline-block; width: 28px; border-top: 3px solid #1f77b4; vertical-align: middle; }
.dashed { display: inline-block; width: 28px; border-top: 3px dashed #1f77b4; vertical-align: middle; }
.badge { display: inline-block; padding: 0 4px; border-radius: 2px; color: #fff; font-weight: bold; font-size: 12px; }
.b-err { background: #dc143c; } .b-neq { background: #ffb000; color: #000; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: right; vertical-align: top; }
th { background: #f5f5f5; position: sticky; top: 0; z-index: 1; }
td.name, th.name, td.err, th.err { text-align: left; }
td.img img { max-width: 640px; width: 100%; height: auto; border: 1px solid #ccc; display: block; }
td.img { width: 640px; text-align: left; }
tr.bad td.f1 { color: #c8143c; font-weight: bold; }
td.err { color: #c8143c; max-width: 260px; word-wrap: break-word; }
td.err small { color: #777; display: block; }
td.err pre.raw { color: #222; background: #f7f7f7; border: 1px solid #ddd; padding: 4px; margin: 4px 0 0 0;
  white-space: pre-wrap; word-break: break-all; max-height: 240px; overflow: auto; font-size: 11px; text-align: left; }
.num0 { color: #aaa; }
"""


def _cell(v: Any, cls: str = "") -> str:
    text = _fmt(v)
    c = f' class="{cls}"' if cls else ""
    if v == 0 and not isinstance(v, float):
        c = f' class="{(cls + " num0").strip()}"'
    return f"<td{c}>{html.escape(text)}</td>"


def write_gallery(path: str, index: dict[str, Any], title: str | None = None) -> str:
    """Write the gallery for an index.json dict (rows already sorted and filtered)."""
    c = index["counts"]
    micro = index.get("micro") or {}
    filt = index.get("filters") or {}
    inp = index.get("inputs") or {}
    title = title or "CoordExp predictions vs ground truth"
    flt = []
    if filt.get("only_errors"):
        flt.append("only images with FP, FN or an error")
    if filt.get("limit") is not None:
        flt.append(f"at most {filt['limit']} images")
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">predictions <code>{html.escape(str(inp.get("pred")))}</code> · GT '
        f'<code>{html.escape(str(inp.get("gt")))}</code></p>',
        f'<p class="meta">{c["images"]} images, {c["rendered"]} shown'
        + (f" ({html.escape('; '.join(flt))})" if flt else "")
        + f' · sorted worst F1 first · IoU ≥ {index["iou_thr"]:.2f} · matches: {html.escape(index["match_source"])}</p>',
        f'<p class="meta">all images: GT {c["num_gt"]} · pred {c["num_pred"]} · TP {c["tp"]} · FP {c["fp"]} · '
        f'FN {c["fn"]} · wrong desc {c["mismatch"]} · micro P {_fmt(micro.get("precision"))} '
        f'R {_fmt(micro.get("recall"))} F1 {_fmt(micro.get("f1"))} · macro F1 {_fmt(index.get("macro_f1"))} · '
        f'images with errors {c["images_with_errors"]}</p>',
        '<p class="legend"><span><i class="solid"></i> matched</span>'
        '<span><i class="dashed"></i> <b class="badge b-err">FP</b> / <b class="badge b-err">FN</b> unmatched</span>'
        '<span><b class="badge b-neq">≠</b> matched box, wrong desc (one FP + one FN)</span>'
        "<span>left: ground truth · right: prediction · colours by desc</span></p>",
        "<table><thead><tr><th>#</th><th class=\"img\">overlay (GT | prediction)</th><th class=\"name\">image</th>"
        "<th>GT</th><th>pred</th><th>TP</th><th>FP</th><th>FN</th><th>≠</th><th>F1</th>"
        "<th class=\"err\">error</th></tr></thead><tbody>",
    ]
    for rank, r in enumerate(index["rows"], 1):
        bad = r["fp"] or r["fn"] or r.get("error") or r.get("image_error")
        name = r["images"][0] if r.get("images") else f"GT line {r['image_id'] + 1}"
        ov = r.get("overlay")
        img = (f'<a href="{html.escape(ov)}"><img src="{html.escape(ov)}" loading="lazy" '
               f'alt="overlay of {html.escape(name)}"></a>' if ov else "")
        err_parts = []
        if r.get("error"):
            msg = r.get("error_message") or ""
            err_parts.append(f"{html.escape(r['error'])}" + (f"<small>{html.escape(msg[:300])}</small>" if msg else ""))
        if r.get("image_error"):
            err_parts.append(f"<small>{html.escape(r['image_error'])}</small>")
        if r.get("error") and r.get("raw_output") is not None:  # what the model said, to see why it failed
            raw = r["raw_output"]
            cut = f"\n… ({len(raw) - RAW_OUTPUT_CHARS} more characters)" if len(raw) > RAW_OUTPUT_CHARS else ""
            err_parts.append(f'<small>raw_output:</small><pre class="raw">'
                             f'{html.escape(raw[:RAW_OUTPUT_CHARS] + cut) if raw else "(empty)"}</pre>')
        size = f"<br><small>{r['width']}×{r['height']} · id {r['image_id']}</small>" if r.get("width") else ""
        row_cls = ' class="bad"' if bad else ""
        out.append(
            f'<tr id="img{r["image_id"]}"{row_cls}><td>{rank}</td>'
            f'<td class="img">{img}</td><td class="name">{html.escape(name)}{size}</td>'
            + _cell(r["num_gt"]) + _cell(r["num_pred"]) + _cell(r["tp"]) + _cell(r["fp"]) + _cell(r["fn"])
            + _cell(r["mismatch"]) + _cell(r["f1"], "f1")
            + f'<td class="err">{"".join(err_parts)}</td></tr>'
        )
    if not index["rows"]:
        out.append('<tr><td colspan="11" class="name">no images to show</td></tr>')
    out += ["</tbody></table>", "</body></html>", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    return path
