"""Read the prediction artifact and the ground truth into per-image pairs in pixel coordinates.

Ground truth, in one of three shapes:

1. The contract's input JSONL (`*.norm.jsonl` integers or `*.coord.jsonl` `"<|coord_k|>"`
   strings, 0..999 grid). Validated through `coordexp.schema.InputRecord`.
2. The same JSONL with a record-level `"coord_mode"` naming another coordinate mode: `"pixel"`
   (float pixel coordinates of the original image, taken verbatim) or `"qwen3_rel1000"`.
   Objects may carry `"area"` and `"iscrowd"` (top level or inside the object's `"metadata"`);
   they are handed to COCOeval unchanged, which is how a COCO dataset goes through our format
   without losing a digit of its AP (see tests/test_eval_coco_fixture.py).
3. A COCO instances JSON (`*.json` whose top level has `"annotations"`): one image per entry of
   `images` in list order (that position is the `image_id` predictions refer to), boxes from
   `bbox` with `area`/`iscrowd` kept, categories from `categories` (names, list order). The
   original COCO image ids are kept in coco_gt.json, so COCOeval sees the file as published.

Pixel conversion: grid modes go through `coordexp.grid.to_pixels` (norm1000: k / 999 * (W - 1),
clamped). `coord_mode: "pixel"` values are already pixels and are used verbatim (no clamping to
W - 1: COCO-convention boxes legitimately end at x = W); with a `model_size` ([w, h] of the image
the model saw) they are rescaled by `to_pixels`.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from coordexp.grid import BBOX_FORMATS, COORD_MODES, bbox_of, check_bbox_format, decode_bbox, to_pixels
from coordexp.schema import (
    GEOMETRY_TYPES,
    ContractError,
    ErrorCode,
    InputRecord,
    PredObject,
    check_arity,
    coord_value,
    read_jsonl,
)


@dataclass
class EvalObject:
    """One GT object or prediction in pixel coordinates of the original image."""

    desc: str
    type: str  # "bbox_2d" | "poly"
    points: list[float]  # flat pixel coordinates: [x1, y1, x2, y2] or a polygon
    score: float = 1.0
    index: int = 0  # position in the source line's `objects` / `preds`
    area: float | None = None  # GT only: carried COCO area (None: computed)
    iscrowd: int = 0  # GT only

    @property
    def bbox(self) -> list[float]:
        """[x1, y1, x2, y2]."""
        return list(self.points) if self.type == "bbox_2d" else bbox_of(self.points)

    @property
    def is_poly(self) -> bool:
        return self.type == "poly"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"desc": self.desc, "type": self.type, "points": list(self.points),
                             "score": self.score, "index": self.index}
        if self.area is not None:
            d["area"] = self.area
        if self.iscrowd:
            d["iscrowd"] = self.iscrowd
        return d


@dataclass
class ImagePair:
    """GT and predictions of one image (one input line and its prediction line)."""

    image_id: int  # 0-based input order
    images: list[str]
    width: int
    height: int
    gts: list[EvalObject] = field(default_factory=list)
    preds: list[EvalObject] = field(default_factory=list)
    error: str | None = None  # the prediction line's error code
    error_message: str | None = None
    missing: bool = False  # no prediction line for this image
    reparsed: bool = False
    preds_invalid: int = 0  # predictions without a usable geometry (skipped)
    coco_image_id: int | None = None  # id in coco_gt.json (original id for COCO-json GT)
    pred_coord_mode: str | None = None
    size_mismatch: bool = False  # prediction line's width/height disagree with the GT's
    metadata: dict = field(default_factory=dict)  # the GT record's `metadata` (LVIS federated lists)
    raw_output: str | None = None  # the model text, kept for error lines only (the gallery shows it)
    truncated: bool = False  # the answer was cut by the token limit (finish_reason "length")

    @property
    def coco_id(self) -> int:
        return self.image_id if self.coco_image_id is None else self.coco_image_id


@dataclass
class GroundTruth:
    images: list[ImagePair]  # preds still empty
    categories: list[str]  # exact GT desc strings, first-seen order (COCO json: categories list)
    source_format: str  # "jsonl" | "coco"
    invalid: dict[int, str] = field(default_factory=dict)  # image_id -> why the GT line was skipped
    root: str = "."  # where the GT's relative image paths start (its file's folder)


def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ContractError(ErrorCode.INVALID_COORD, f"{where}: {v!r} is not a finite number")
    return v


def points_to_pixels(points: list[float], width: int, height: int, mode: str,
                     model_size: tuple[int, int] | None = None) -> list[float]:
    """Model/dataset coordinates in `mode` -> pixel coordinates of the original image."""
    if mode not in COORD_MODES:
        raise ContractError(ErrorCode.INVALID_COORD, f"unknown coord_mode {mode!r}; expected one of {COORD_MODES}")
    if mode == "pixel" and model_size is None:
        return [float(v) for v in points]
    return to_pixels(points, width, height, mode, model_size)


def _obj_extra(d: dict, key: str) -> Any:
    if key in d:
        return d[key]
    md = d.get("metadata")
    return md.get(key) if isinstance(md, dict) else None


def _model_size(d: dict) -> tuple[int, int] | None:
    ms = d.get("model_size")
    if isinstance(ms, (list, tuple)) and len(ms) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in ms):
        return int(ms[0]), int(ms[1])
    return None


def _looks_like_coco_json(path: str) -> bool:
    if not path.lower().endswith(".json"):
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{")


def load_gt(gt_path: str, coord_mode: str | None = None) -> GroundTruth:
    """Read GT (input JSONL or COCO json). `coord_mode` overrides the records' own."""
    if _looks_like_coco_json(gt_path):
        try:
            with open(gt_path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError:
            data = None  # e.g. JSONL saved as .json: read it line by line below
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            gt = _load_coco_gt(data)
            gt.root = os.path.dirname(os.path.abspath(gt_path))
            return gt
    images: list[ImagePair] = []
    invalid: dict[int, str] = {}
    cats: dict[str, None] = {}
    for line_no, d in read_jsonl(gt_path):
        image_id = line_no - 1  # the runner writes one prediction line per input line, bad ones too
        try:
            if isinstance(d, Exception):
                raise d
            rec = InputRecord.from_dict(d, line_no)  # validates images/size/objects
            mode = coord_mode or d.get("coord_mode") or "norm1000"
            msize = _model_size(d)
            objs: list[EvalObject] = []
            for i, (o, raw) in enumerate(zip(rec.objects, d.get("objects") or [])):
                area = _obj_extra(raw, "area")
                iscrowd = _obj_extra(raw, "iscrowd")
                px = points_to_pixels(o.points, rec.width, rec.height, mode, msize)
                objs.append(EvalObject(desc=o.desc, type=o.type, points=px, index=i,
                                       area=None if area is None else float(area),
                                       iscrowd=int(bool(iscrowd))))
        except (ContractError, ValueError, TypeError) as e:
            invalid[image_id] = f"GT line {line_no}: {e}"
            continue
        for o in objs:
            cats.setdefault(o.desc, None)
        md = d.get("metadata")
        images.append(ImagePair(image_id=image_id, images=list(rec.images), width=rec.width,
                                height=rec.height, gts=objs, metadata=md if isinstance(md, dict) else {}))
    return GroundTruth(images=images, categories=list(cats), source_format="jsonl", invalid=invalid,
                       root=os.path.dirname(os.path.abspath(gt_path)))


def _load_coco_gt(data: dict) -> GroundTruth:
    cat_name = {c["id"]: c["name"] for c in data.get("categories", [])}
    categories = list(dict.fromkeys(c["name"] for c in data.get("categories", [])))
    by_img: dict[Any, list[dict]] = {}
    for a in data["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    images: list[ImagePair] = []
    for idx, im in enumerate(data["images"]):
        objs = []
        for i, a in enumerate(by_img.get(im["id"], [])):
            x, y, w, h = (_num(v, f"annotation {a.get('id')} bbox") for v in a["bbox"])
            name = cat_name.get(a["category_id"])
            if name is None:
                raise ContractError(ErrorCode.INVALID_INPUT, f"annotation {a.get('id')}: unknown category_id")
            objs.append(EvalObject(desc=name, type="bbox_2d", points=[x, y, x + w, y + h], index=i,
                                   area=float(a["area"]) if "area" in a else None,
                                   iscrowd=int(bool(a.get("iscrowd", 0)))))
        images.append(ImagePair(image_id=idx, images=[im.get("file_name", str(im["id"]))],
                                width=int(im["width"]), height=int(im["height"]), gts=objs,
                                coco_image_id=int(im["id"])))
    return GroundTruth(images=images, categories=categories, source_format="coco")


def _pred_objects(raw_preds: list, rec: dict, pair: ImagePair, mode: str,
                  decode_format: str = "xyxy") -> tuple[list[EvalObject], int]:
    """`decode_format`: the boxes' points are still the slots of this bbox format (a line written
    without `bbox_format`, read with `--bbox-format`): decode them first."""
    msize = _model_size(rec)
    out: list[EvalObject] = []
    invalid = 0
    for i, p in enumerate(raw_preds):
        if isinstance(p, PredObject):
            p = p.to_dict()
        try:
            if not isinstance(p, dict) or p.get("type") not in GEOMETRY_TYPES:
                raise ContractError(ErrorCode.INVALID_GEOMETRY, "bad pred")
            pts = p.get("points") or []
            if not all(type(v) in (int, float) and math.isfinite(v) for v in pts):  # fast path: numbers
                pts = [coord_value(v, "pred") for v in pts]
            check_arity(p["type"], pts, "pred")
            if p["type"] == "bbox_2d" and decode_format != "xyxy":
                pts = decode_bbox(pts, decode_format)
            desc = p.get("desc")
            if not isinstance(desc, str):
                raise ContractError(ErrorCode.INVALID_INPUT, "desc")
            px = points_to_pixels(pts, pair.width, pair.height, mode, msize)
            score = p.get("score", 1.0)
            score = 1.0 if score is None else float(score)
        except (ContractError, TypeError, ValueError):
            invalid += 1
            continue
        out.append(EvalObject(desc=desc, type=p["type"], points=px, score=score, index=i))
    return out, invalid


def _reparse(raw_output: str, coord_mode: str, bbox_format: str = "xyxy") -> tuple[list, str | None, str | None]:
    try:
        from coordexp.parser import parse_model_output
    except ImportError as e:  # pragma: no cover - depends on the checkout
        raise RuntimeError(f"--reparse needs coordexp.parser, which cannot be imported: {e}") from e
    res = parse_model_output(raw_output or "", coord_mode=coord_mode, bbox_format=bbox_format)
    err = getattr(res, "error", None)
    return list(res.preds or []), (str(err) if err is not None else None), getattr(res, "error_message", None)


PRED_WITHOUT_PREDS = ("has upstream's `pred` list but no `preds`: it is a gt_vs_pred.jsonl (GT inside); "
                      "evaluate it alone: --pred FILE without --gt")


def _line_bbox_format(d: dict, given: str | None, where: str) -> tuple[str, bool]:
    """(the line's bbox format, whether its box points are still undecoded slots). A line written by
    us says its format (`bbox_format`; points already decoded); `given` (--bbox-format) names it for
    lines that do not, and must agree with the ones that do."""
    line = d.get("bbox_format")
    if line is not None:
        if line not in BBOX_FORMATS:
            raise ValueError(f"{where}: bbox_format {line!r}; expected one of {', '.join(BBOX_FORMATS)}")
        if given is not None and given != line:
            raise ValueError(f"{where}: the line says bbox_format {line!r}, --bbox-format says {given!r}")
        return line, False
    fmt = given or "xyxy"
    return fmt, fmt != "xyxy"


def same_images(a: list[str], a_root: str, b: list[str], b_root: str) -> bool:
    """Whether two records name the same image files: by spelling, or by the files their paths reach
    (each relative to its own root), never by spelling alone (an absolute and a relative path agree)."""
    if a == b:
        return True
    if len(a) != len(b):
        return False

    def where(p: str, root: str) -> str:
        return os.path.realpath(p if os.path.isabs(p) else os.path.join(root, p))

    return all(where(x, a_root) == where(y, b_root) for x, y in zip(a, b))


def _pred_image_root(pred_path: str) -> str:
    """Where a prediction file's relative image paths start: the dataset its run read (summary.json
    `data`), else the file's own folder."""
    folder = os.path.dirname(os.path.abspath(pred_path))
    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            data = json.load(f).get("data")
        if isinstance(data, str) and data:
            return os.path.dirname(os.path.abspath(data))
    except (OSError, ValueError, AttributeError):
        pass
    return folder


def attach_predictions(gt: GroundTruth, pred_path: str, reparse: bool = False,
                       bbox_format: str | None = None) -> dict[str, Any]:
    """Fill `pair.preds` from the prediction artifact; returns line-level counts.

    Lines are matched by `image_id` (0-based input order) and their `images` must agree with
    the GT line's (ValueError otherwise). A GT image without a prediction line is evaluated
    with no predictions and counted as missing. `bbox_format`: how the model wrote bbox_2d, for
    lines that do not say (`_line_bbox_format`).
    """
    bbox_format = check_bbox_format(bbox_format) if bbox_format is not None else None
    formats: Counter = Counter()
    pred_root, gt_root = _pred_image_root(pred_path), gt.root
    by_id = {p.image_id: p for p in gt.images}
    seen: set[int] = set()
    errors: Counter = Counter()
    listed: Counter = Counter()
    counts = Counter(truncated_lines=0)
    for line_no, d in read_jsonl(pred_path):
        counts["pred_lines"] += 1
        if isinstance(d, Exception) or not isinstance(d, dict):
            counts["pred_lines_unreadable"] += 1
            errors["unreadable_line"] += 1
            continue
        if "preds" not in d and "pred" in d:  # never score upstream's list as "no predictions"
            raise ValueError(f"{pred_path} line {line_no}: {PRED_WITHOUT_PREDS}")
        iid = d.get("image_id")
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise ValueError(f"{pred_path} line {line_no}: image_id must be an integer, got {iid!r}")
        pair = by_id.get(iid)
        if pair is None and iid in gt.invalid:
            counts["pred_lines_for_invalid_gt"] += 1
            continue
        if pair is None:
            raise ValueError(f"{pred_path} line {line_no}: image_id {iid} has no GT line "
                             f"(GT has {len(gt.images)} images)")
        if iid in seen:
            raise ValueError(f"{pred_path} line {line_no}: duplicate image_id {iid}")
        seen.add(iid)
        imgs = d.get("images")
        if isinstance(imgs, str):
            imgs = [imgs]
        if imgs and not same_images(list(imgs), pred_root, list(pair.images), gt_root):
            raise ValueError(f"{pred_path} line {line_no}: image_id {iid} images {imgs!r} disagree with the GT's "
                             f"{pair.images!r}: other files (resolved from {pred_root} and {gt_root})")
        if d.get("finish_reason") == "length":
            pair.truncated = True
            counts["truncated_lines"] += 1
        w, h = d.get("width"), d.get("height")
        if w is not None and h is not None and (w, h) != (pair.width, pair.height):
            pair.size_mismatch = True
            counts["size_mismatch_lines"] += 1
        mode = d.get("coord_mode") or "norm1000"
        pair.pred_coord_mode = mode
        fmt, undecoded = _line_bbox_format(d, bbox_format, f"{pred_path} line {line_no}")
        if fmt != "xyxy" and mode != "norm1000":
            raise ValueError(f"{pred_path} line {line_no}: bbox_format {fmt!r} is defined on the norm1000 grid, "
                             f"the line's coord_mode is {mode!r}")
        formats[fmt] += 1
        listed.update(str(e) for e in (d.get("errors") or []))  # codes of dropped objects (non-fatal)
        err = d.get("error")
        raw_preds = d.get("preds")
        if reparse or raw_preds is None:
            raw_preds, perr, pmsg = _reparse(d.get("raw_output", ""), mode, fmt)
            undecoded = False
            pair.reparsed = True
            counts["reparsed_lines"] += 1
            if perr is not None and err is None:
                err, pair.error_message = perr, pmsg
        else:
            pair.error_message = d.get("error_message")
        if err is not None:
            pair.error = str(err)
            errors[str(err)] += 1
            counts["pred_lines_with_error"] += 1
            raw = d.get("raw_output")
            pair.raw_output = raw if isinstance(raw, str) else None
        pair.preds, pair.preds_invalid = _pred_objects(list(raw_preds or []), d, pair, mode,
                                                       fmt if undecoded else "xyxy")
        counts["preds_invalid"] += pair.preds_invalid
    for p in gt.images:
        if p.image_id not in seen:
            p.missing = True
            counts["pred_lines_missing"] += 1
    return {"counts": dict(counts), "errors": dict(errors), "errors_listed": dict(listed),
            "bbox_formats": dict(formats)}


def load_pairs(pred_path: str, gt_path: str, reparse: bool = False,
               gt_coord_mode: str | None = None, bbox_format: str | None = None) -> list[ImagePair]:
    """Per image: GT objects and predictions, both in pixel coordinates (input order)."""
    gt = load_gt(gt_path, coord_mode=gt_coord_mode)
    attach_predictions(gt, pred_path, reparse=reparse, bbox_format=bbox_format)
    return gt.images


def check_paths(*paths: str) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(p)
