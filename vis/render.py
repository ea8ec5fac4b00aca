"""GT vs prediction overlays of a prediction artifact, and the gallery that lists them.

`visualize(pred, gt, out)` reads the artifact and the GT (nothing else: never the model), matches
each image (the eval's `matches.jsonl` when given, else eval's own matching path,
`coordexp.eval.pipeline.run_f1ish`, at `iou` with the same `desc_match` rule: exact labels by
default, as `eval`, so one run's gallery and metrics.json count the same TP/FP/FN),
renders one side-by-side PNG per image (left GT, right prediction) into `out/overlays/`, and writes
`out/index.html` (worst F1 first) and `out/index.json`.

Counts are the F1-ish "full" counts: a matched pair with the wrong desc is one FP and one FN.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .annotators import (VisObject, annotate_all, draw_text, get_font, neq_symbol, text_size)

VIS_SCHEMA_VERSION = "coordexp.vis.v1"
DEFAULT_MIN_SIZE = 384  # shorter side of a panel, small images are upscaled to it
DEFAULT_MAX_SIZE = 1280  # longer side of a panel, large images are downscaled to it
MARGIN = 8
GAP = 8
HEADER_FONT = 14
HEADER_LINE = 20
HEADER_LINES = 4
TITLE_BAR = 22
BG = (255, 255, 255)
PLACEHOLDER_BG = (200, 200, 200)
ERROR_RGB = (200, 20, 50)


@dataclass
class ImageReport:
    """One image's row in the gallery (and in index.json)."""

    image_id: int
    images: list[str]
    width: int | None
    height: int | None
    num_gt: int = 0
    num_pred: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    mismatch: int = 0  # matched boxes with the wrong desc (each also counts in fp and fn)
    precision: float = 1.0
    recall: float = 1.0
    f1: float = 1.0
    error: str | None = None  # prediction line's error code (or missing_prediction / gt_invalid)
    error_message: str | None = None
    image_error: str | None = None  # the image file could not be read (a placeholder is drawn)
    raw_output: str | None = None  # the model text of an error line (the gallery shows it)
    overlay: str | None = None  # path relative to the output folder
    pred_status: list[str] = field(default_factory=list)
    gt_status: list[str] = field(default_factory=list)
    matched: list[tuple[int, int, bool]] = field(default_factory=list)  # (pred pos, gt pos, desc ok)

    @property
    def has_error(self) -> bool:
        return bool(self.error or self.image_error)

    @property
    def is_error(self) -> bool:
        """What --only-errors keeps: an FP, an FN or an error."""
        return self.fp > 0 or self.fn > 0 or self.has_error

    def sort_key(self) -> tuple:
        return (self.f1, 0 if self.has_error else 1, -(self.fp + self.fn), self.image_id)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("pred_status", "gt_status", "matched"):
            d.pop(k)
        return d


# -- matching -------------------------------------------------------------------------------------

def load_matches(path: str) -> dict[int, dict[str, Any]]:
    """matches.jsonl of `coordexp-client eval` -> {image_id: line}."""
    out: dict[int, dict[str, Any]] = {}
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(d, dict) or not isinstance(d.get("image_id"), int):
                raise ValueError(f"{path} line {n}: not a matches line (no integer image_id)")
            out[d["image_id"]] = d
    return out


def _pairs_from_matches_line(pair, line: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """(pred position, gt position, semantic_ok) from a matches.jsonl line (indices there are into
    the prediction line's `preds` and the GT line's `objects`)."""
    from coordexp.eval.matching import desc_equal

    ppos = {o.index: k for k, o in enumerate(pair.preds)}
    gpos = {o.index: k for k, o in enumerate(pair.gts)}
    out = []
    for m in line.get("matches") or []:
        pi, gi = ppos.get(m.get("pred_index")), gpos.get(m.get("gt_index"))
        if pi is None or gi is None:
            raise ValueError(f"matches line for image_id {pair.image_id}: indices {m.get('pred_index')}/"
                             f"{m.get('gt_index')} do not exist in the artifact (was it made from these files?)")
        ok = m.get("semantic_ok")
        if ok is None:
            ok = desc_equal(pair.preds[pi].desc, pair.gts[gi].desc)  # eval's exact rule
        out.append((pi, gi, bool(ok)))
    return out


def _fill_counts(rep: ImageReport, pair, matched: list[tuple[int, int, bool]]) -> None:
    from coordexp.eval import prf

    rep.matched = list(matched)
    rep.pred_status = ["fp"] * len(pair.preds)
    rep.gt_status = ["fn"] * len(pair.gts)
    for pi, gi, ok in matched:
        rep.pred_status[pi] = rep.gt_status[gi] = "tp" if ok else "mismatch"
    rep.num_pred, rep.num_gt = len(pair.preds), len(pair.gts)
    rep.mismatch = sum(1 for _, _, ok in matched if not ok)
    rep.tp = len(matched) - rep.mismatch
    rep.fp = rep.num_pred - rep.tp
    rep.fn = rep.num_gt - rep.tp
    s = prf(rep.tp, rep.fp, rep.fn)
    rep.precision, rep.recall, rep.f1 = s["precision"], s["recall"], s["f1"]


def build_reports(pairs: Sequence, iou: float, matches: dict[int, dict] | None = None,
                  semantic: bool = False, desc_match: str | None = None) -> list[ImageReport]:
    """Match every image (or take the eval's matches) and count TP/FP/FN per image. Matching is
    eval's (`run_f1ish`), descs judged by `desc_match` ("exact", the default as in eval, or
    "semantic"; `semantic=True` is the older spelling of "semantic")."""
    from coordexp.eval import SemanticScorer
    from coordexp.eval.pipeline import run_f1ish

    rule = desc_match or ("semantic" if semantic else "exact")
    todo = [p for p in pairs if (matches or {}).get(p.image_id) is None]
    scorer = SemanticScorer() if rule == "semantic" else SemanticScorer.string_only()
    computed = dict(zip((p.image_id for p in todo), run_f1ish(todo, [iou], scorer, rule)[iou])) if todo else {}
    reports = []
    for pair in pairs:
        rep = ImageReport(image_id=pair.image_id, images=list(pair.images), width=pair.width, height=pair.height,
                          error=pair.error, error_message=pair.error_message,
                          raw_output=getattr(pair, "raw_output", None))
        if pair.missing and not rep.error:
            rep.error, rep.error_message = "missing_prediction", "no prediction line for this image"
        line = (matches or {}).get(pair.image_id)
        if line is not None:
            matched = _pairs_from_matches_line(pair, line)
        else:
            matched = [(m.pred_index, m.gt_index, bool(m.semantic_ok)) for m in computed[pair.image_id].pairs]
        _fill_counts(rep, pair, matched)
        reports.append(rep)
    return reports


# -- rendering --------------------------------------------------------------------------------------

def panel_scale(width: int, height: int, min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE) -> float:
    """Scale of a panel: the shorter side up to `min_size`, the longer side at most `max_size`."""
    s = 1.0
    if min(width, height) < min_size:
        s = min_size / min(width, height)
    if max(width, height) * s > max_size:
        s = max_size / max(width, height)
    return s


def panel_size(width: int, height: int, min_size: int = DEFAULT_MIN_SIZE,
               max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    s = panel_scale(width, height, min_size, max_size)
    return max(1, round(width * s)), max(1, round(height * s))


def overlay_size(width: int, height: int, min_size: int = DEFAULT_MIN_SIZE,
                 max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """Size of a side-by-side overlay PNG for a `width` x `height` image."""
    pw, ph = panel_size(width, height, min_size, max_size)
    return 2 * MARGIN + 2 * pw + GAP, HEADER_LINES * HEADER_LINE + MARGIN + TITLE_BAR + ph + MARGIN


def image_path(images: Sequence[str], root: str) -> str | None:
    if not images:
        return None
    p = images[0]
    return p if os.path.isabs(p) else os.path.join(root, p)


def load_image(path: str | None, width: int, height: int):
    """(RGB image at width x height, problem or None); a placeholder when the file cannot be read."""
    from PIL import Image

    if path is None:
        return Image.new("RGB", (width, height), PLACEHOLDER_BG), "no image path"
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except FileNotFoundError:
        return Image.new("RGB", (width, height), PLACEHOLDER_BG), f"image not found: {path}"
    except Exception as e:  # PIL raises many types for corrupt files
        return Image.new("RGB", (width, height), PLACEHOLDER_BG), f"cannot read image {path}: {e}"
    if img.size != (width, height):  # the coordinates are in the record's pixel space
        return img.resize((width, height), Image.BICUBIC), None
    return img, None


def _fit(font, text: str, max_w: int) -> str:
    if text_size(font, text)[0] <= max_w:
        return text
    while text and text_size(font, text + "…")[0] > max_w:
        text = text[:-1]
    return text + "…"


def _wrap(font, text: str, max_w: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if text_size(font, trial)[0] <= max_w or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(font, lines[-1] + " …", max_w)
    return [_fit(font, ln, max_w) for ln in lines]


def _banner(panel, lines: list[str], color=ERROR_RGB):
    """A centred text block on a panel (the image-missing and prediction-error notes)."""
    from PIL import ImageDraw

    d = ImageDraw.Draw(panel)
    font = get_font(14, bold=True)
    W, H = panel.size
    wrapped = [w for ln in lines for w in _wrap(font, ln, W - 24, 4)]
    lh = text_size(font, "Ag")[1] + 2
    bh = lh * len(wrapped) + 12
    bw = min(W - 8, max(text_size(font, w)[0] for w in wrapped) + 16) if wrapped else 0
    x0, y0 = (W - bw) // 2, (H - bh) // 2
    d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=(255, 255, 255), outline=color, width=2)
    for k, w in enumerate(wrapped):
        draw_text(d, ((W - text_size(font, w)[0]) // 2, y0 + 6 + k * lh), w, font, color)
    return panel


def _objects(objs: Sequence, statuses: Sequence[str] | None, notes: Sequence[str | None]) -> list[VisObject]:
    return [VisObject(o.desc, o.type, list(o.points), status=statuses[k] if statuses else None, note=notes[k],
                      index=k) for k, o in enumerate(objs)]


def render_overlay(pair, rep: ImageReport | None, root: str, iou: float | None = None,
                   min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE):
    """The side-by-side PNG of one image: left GT, right prediction, a header with the counts."""
    from PIL import Image, ImageDraw

    w, h = int(pair.width), int(pair.height)
    img, problem = load_image(image_path(pair.images, root), w, h)
    if rep is not None:
        rep.image_error = problem
    s = panel_scale(w, h, min_size, max_size)
    pw, ph = panel_size(w, h, min_size or 1, max_size or 10**9)
    base = img.resize((pw, ph), Image.BICUBIC if s >= 1 else Image.LANCZOS) if (pw, ph) != img.size else img

    gstat = rep.gt_status if rep else None
    pstat = rep.pred_status if rep else None
    gnotes = [None] * len(pair.gts)
    pnotes = [None] * len(pair.preds)
    if rep is not None:  # for a wrong desc, say what the other side called it
        for pi, gi, ok in rep.matched:
            if ok:
                continue
            pnotes[pi] = f"GT: {pair.gts[gi].desc}"
            gnotes[gi] = f"pred: {pair.preds[pi].desc}"
    sx, sy = pw / w, ph / h
    gts = [o.scaled(sx, sy) for o in _objects(pair.gts, gstat, gnotes)]
    preds = [o.scaled(sx, sy) for o in _objects(pair.preds, pstat, pnotes)]
    left = annotate_all(base.copy(), gts)
    right = annotate_all(base.copy(), preds)
    if problem:
        for panel in (left, right):
            _banner(panel, [problem])
    if rep is not None and rep.error and not pair.preds and not problem:
        _banner(right, [f"error: {rep.error}"] + ([rep.error_message] if rep.error_message else []))

    W, H = overlay_size(w, h, min_size, max_size)
    canvas = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(canvas)
    bold, font = get_font(HEADER_FONT, bold=True), get_font(HEADER_FONT)
    small = get_font(HEADER_FONT - 2)
    maxw = W - 2 * MARGIN
    y = MARGIN // 2
    name = pair.images[0] if pair.images else "(no image)"
    draw_text(d, (MARGIN, y), _fit(bold, f"#{pair.image_id}  {name}  ({w}×{h})", maxw), bold, (0, 0, 0))
    y += HEADER_LINE
    if rep is not None:
        ne = neq_symbol(font)
        thr = f"   IoU ≥ {iou:.2f}" if iou is not None else ""
        counts = (f"GT {rep.num_gt}   pred {rep.num_pred}   TP {rep.tp}   FP {rep.fp}   FN {rep.fn}   "
                  f"{ne} {rep.mismatch}   F1 {rep.f1:.3f}{thr}")
        draw_text(d, (MARGIN, y), _fit(font, counts, maxw), font, (0, 0, 0))
    y += HEADER_LINE
    err = None
    if rep is not None and rep.error:
        err = f"error: {rep.error}" + (f" — {rep.error_message}" if rep.error_message else "")
    elif problem:
        err = problem
    if err:
        draw_text(d, (MARGIN, y), _fit(font, err, maxw), font, ERROR_RGB)
    y += HEADER_LINE
    legend = (f"solid: matched   dashed + FP/FN: unmatched   {neq_symbol(small)}: matched box, wrong desc"
              if rep is not None else "no match data")
    draw_text(d, (MARGIN, y), _fit(small, legend, maxw), small, (90, 90, 90))
    y = HEADER_LINES * HEADER_LINE + MARGIN // 2
    for k, (panel, title) in enumerate(((left, f"Ground truth · {len(pair.gts)}"),
                                        (right, f"Prediction · {len(pair.preds)}"))):
        x = MARGIN + k * (pw + GAP)
        d.rectangle([x, y, x + pw - 1, y + TITLE_BAR - 1], fill=(40, 40, 40))
        draw_text(d, (x + 6, y + (TITLE_BAR - text_size(bold, "Ag")[1]) // 2), _fit(bold, title, pw - 12), bold,
                  (255, 255, 255))
        canvas.paste(panel, (x, y + TITLE_BAR))
    return canvas


def placeholder_tile(lines: Sequence[str], width: int = 2 * DEFAULT_MIN_SIZE + GAP + 2 * MARGIN, height: int = 160):
    from PIL import Image

    return _banner(Image.new("RGB", (width, height), PLACEHOLDER_BG), list(lines))


def _safe_name(image_id: int, images: Sequence[str]) -> str:
    stem = os.path.splitext(os.path.basename(images[0]))[0] if images else "image"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] or "image"
    return f"{image_id:05d}_{stem}.png"


# -- the command --------------------------------------------------------------------------------------

def visualize(pred_path: str, gt_path: str | None, out_dir: str, *, iou: float = 0.5, matches_path: str | None = None,
              limit: int | None = None, only_errors: bool = False, semantic: bool = False,
              image_root: str | None = None, gt_coord_mode: str | None = None,
              min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE,
              title: str | None = None, desc_match: str | None = None,
              bbox_format: str | None = None) -> dict[str, Any]:
    """Render the overlays and the gallery; returns the content of index.json. `desc_match`:
    "exact" (default, as eval) or "semantic" (`semantic=True` means the same). `bbox_format`: as eval's."""
    from coordexp.eval.upstream import load_inputs

    from .gallery import write_gallery

    for p, what in ((pred_path, "predictions"), (gt_path, "GT")):
        if p is not None and not os.path.isfile(p):
            raise FileNotFoundError(f"{what} file not found: {p}")
    if not 0 < iou <= 1:
        raise ValueError(f"--iou must be in (0, 1], got {iou}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    root = image_root or os.path.dirname(os.path.abspath(gt_path or pred_path))
    # gt_path None: GT inside pred_path
    gt, _ = load_inputs(pred_path, gt_path, gt_coord_mode=gt_coord_mode, bbox_format=bbox_format)
    pairs = gt.images
    from coordexp.eval.matching import check_desc_match

    check_desc_match(desc_match)
    desc_match = desc_match or ("semantic" if semantic else "exact")
    matches = None
    match_source = ("computed (exact labels, as eval's default)" if desc_match == "exact"
                    else "computed (semantic matching, as eval --desc-match semantic)")
    if matches_path:
        matches = load_matches(matches_path)
        thrs = {round(float(m.get("iou_thr", iou)), 6) for m in matches.values()}
        if len(thrs) == 1:
            iou = thrs.pop()
        match_source = f"eval matches: {os.path.abspath(matches_path)}"
    reports = build_reports(pairs, iou, matches, desc_match=desc_match)
    for pair, rep in zip(pairs, reports):
        p = image_path(pair.images, root)
        if p is None or not os.path.isfile(p):
            rep.image_error = f"image not found: {p}"
    by_id = {p.image_id: p for p in pairs}
    for iid, msg in sorted(gt.invalid.items()):  # GT lines that could not be read: listed as errors
        reports.append(ImageReport(image_id=iid, images=[], width=None, height=None, error="gt_invalid",
                                   error_message=msg, f1=0.0, precision=0.0, recall=0.0))
    ordered = sorted(reports, key=ImageReport.sort_key)
    selected = [r for r in ordered if r.is_error] if only_errors else ordered
    if limit is not None:
        selected = selected[:limit]

    ov_dir = os.path.join(out_dir, "overlays")
    os.makedirs(ov_dir, exist_ok=True)
    for f in os.listdir(ov_dir):  # overlays of an earlier run into the same folder
        if f.endswith(".png"):
            os.remove(os.path.join(ov_dir, f))
    for rep in selected:
        name = _safe_name(rep.image_id, rep.images)
        pair = by_id.get(rep.image_id)
        if pair is None:
            im = placeholder_tile([f"GT line {rep.image_id + 1} is invalid", rep.error_message or ""])
        else:
            im = render_overlay(pair, rep, root, iou, min_size, max_size)
        im.save(os.path.join(ov_dir, name), optimize=False)
        rep.overlay = f"overlays/{name}"

    from coordexp.eval import prf

    tot = {k: sum(getattr(r, k) for r in reports) for k in ("num_gt", "num_pred", "tp", "fp", "fn", "mismatch")}
    micro = prf(tot["tp"], tot["fp"], tot["fn"])
    index = {
        "schema_version": VIS_SCHEMA_VERSION,
        "inputs": {"pred": os.path.abspath(pred_path), "gt": os.path.abspath(gt_path or pred_path),
                   "image_root": os.path.abspath(root), "matches": os.path.abspath(matches_path) if matches_path else None},
        "iou_thr": iou,
        "match_source": match_source,
        "desc_match": None if matches_path else desc_match,
        "filters": {"only_errors": bool(only_errors), "limit": limit},
        "counts": {"images": len(reports), "rendered": len(selected),
                   "images_with_errors": sum(1 for r in reports if r.has_error),
                   "images_with_fp_or_fn": sum(1 for r in reports if r.fp or r.fn), **tot},
        "micro": micro,
        "macro_f1": (sum(r.f1 for r in reports) / len(reports)) if reports else None,
        "rows": [r.to_dict() for r in selected],
    }
    with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
    write_gallery(os.path.join(out_dir, "index.html"), index, title=title)
    return index


def draw_predictions(image, preds: Sequence[Any], min_size: int | None = None, max_size: int | None = None):
    """A copy of `image` with predictions drawn (`coordexp-client ask --draw`).

    `preds`: dicts with `type`, `desc` and `pixel_points` (else `points`, taken as pixels) or
    objects with `desc`/`type`/`points` in pixels. The size is kept unless `min_size` /
    `max_size` ask for rescaling like the overlays (e.g. 384 / 1280).
    """
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    objs = []
    for k, p in enumerate(preds):
        get = p.get if isinstance(p, dict) else (lambda key, default=None, _p=p: getattr(_p, key, default))
        pts = get("pixel_points") or get("points") or []
        if get("type") not in ("bbox_2d", "poly") or not pts:
            continue
        objs.append(VisObject(str(get("desc", "")), get("type"), [float(v) for v in pts], index=k))
    pw, ph = panel_size(w, h, min_size or 1, max_size or 10**9)
    if (pw, ph) != (w, h):
        img = img.resize((pw, ph), Image.BICUBIC if pw > w else Image.LANCZOS)
    return annotate_all(img, [o.scaled(pw / w, ph / h) for o in objs])
