"""Validation of one recovered object, the parser's last step (see `coordexp.parser`'s docstring,
"Validation"): a valid object -> ``PredObject``, else its contract code (or a drop label) and why.
Only `coordexp.parser` uses it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from coordexp.grid import decode_bbox, to_pixels
from coordexp.schema import GEOMETRY_TYPES, INVALID_GEOMETRY_KEYS, ErrorCode, PredObject

BARE_COORD_RE = re.compile(r"<\|coord_(\d+)\|>")
_DIGITS_RE = re.compile(r"^\s*\d+\s*$")


def _coerce_coord(v: Any, where: str, notes: list[str]) -> tuple[int | None, str | None]:
    """One coordinate -> (int, None) or (None, reason)."""
    if isinstance(v, bool):
        return None, f"{v!r} is not an integer"
    if isinstance(v, int):
        return v, None
    if isinstance(v, float):
        if v == v and v not in (float("inf"), float("-inf")) and v.is_integer():
            notes.append(f"{where}: read {v!r} as {int(v)}")
            return int(v), None
        return None, f"{v!r} is not an integer"
    if isinstance(v, str):
        m = BARE_COORD_RE.fullmatch(v.strip())
        if m:
            return int(m.group(1)), None
        if _DIGITS_RE.match(v):
            notes.append(f"{where}: read string {v!r} as {int(v)}")
            return int(v), None
        return None, f"{v!r} is not an integer"
    return None, f"{v!r} is not an integer"


# Why an object without a contract code was dropped (the label of its note; `errors` gets nothing).
NOT_AN_OBJECT, BAD_DESC, TRUNCATED = "not_an_object", "missing_desc", "truncated"


@dataclass
class Ctx:
    """What validation needs besides the object: the mode's bound and, optionally, the image size."""

    coord_mode: str
    coord_max: int | None
    width: int | None = None
    height: int | None = None
    bbox_format: str = "xyxy"


def _degenerate(gtype: str, pts: list[int], ctx: Ctx) -> str | None:
    """Why the geometry is empty at the image's integer pixel size, or None (upstream's check)."""
    if ctx.width is None or ctx.height is None:
        return None
    px = [int(round(v)) for v in to_pixels(pts, ctx.width, ctx.height, ctx.coord_mode)]
    xs, ys = px[0::2], px[1::2]
    if max(xs) - min(xs) <= 0 or max(ys) - min(ys) <= 0:
        return (f"{gtype} has zero area at {ctx.width}x{ctx.height} pixels "
                f"(x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)})")
    return None


def validate(obj: Any, where: str, ctx: Ctx, notes: list[str]) -> PredObject | tuple[ErrorCode | str, str]:
    """A valid object -> PredObject; else (its contract code, or a drop label without one; why)."""
    coord_max = ctx.coord_max
    if not isinstance(obj, dict):
        return NOT_AN_OBJECT, f"not an object ({type(obj).__name__})"
    bad = [k for k in INVALID_GEOMETRY_KEYS if k in obj]
    if bad:
        return ErrorCode.INVALID_GEOMETRY, f"geometry {bad[0]!r} is not allowed (use bbox_2d or poly)"
    geoms = [k for k in GEOMETRY_TYPES if k in obj]
    if not geoms:
        return ErrorCode.INVALID_GEOMETRY, "no bbox_2d or poly"
    if len(geoms) > 1:
        return ErrorCode.INVALID_GEOMETRY, "both bbox_2d and poly"
    gtype = geoms[0]
    raw = obj[gtype]
    if not isinstance(raw, list):
        return ErrorCode.INVALID_GEOMETRY, f"{gtype} is not a list ({type(raw).__name__})"
    local: list[str] = []
    if raw and all(isinstance(p, list) and len(p) == 2 for p in raw):
        raw = [v for p in raw for v in p]
        local.append(f"{where}: flattened [x, y] pairs of {gtype}")
    pts: list[int] = []
    for v in raw:
        k, why = _coerce_coord(v, where, local)
        if why is not None:
            return ErrorCode.INVALID_COORD, why
        if k < 0:
            return ErrorCode.INVALID_COORD, f"{k} < 0"
        if coord_max is not None and k > coord_max:
            return ErrorCode.INVALID_COORD, f"{k} > {coord_max}"
        pts.append(k)
    if gtype == "bbox_2d" and len(pts) != 4:
        return ErrorCode.INVALID_GEOMETRY, f"bbox_2d needs 4 numbers, got {len(pts)}"
    if gtype == "poly" and (len(pts) < 6 or len(pts) % 2):
        return ErrorCode.INVALID_GEOMETRY, f"poly needs an even count >= 6 of numbers, got {len(pts)}"
    slots = None
    if gtype == "bbox_2d" and ctx.bbox_format != "xyxy":
        slots, pts = pts, decode_bbox(pts, ctx.bbox_format)
    degenerate = _degenerate(gtype, pts, ctx)
    if degenerate:
        return ErrorCode.INVALID_GEOMETRY, degenerate
    if gtype == "bbox_2d" and (pts[2] < pts[0] or pts[3] < pts[1]):
        axes = " and ".join(a for a, bad in (("x2 < x1", pts[2] < pts[0]), ("y2 < y1", pts[3] < pts[1])) if bad)
        local.append(f"{where}: inverted bbox_2d {pts} ({axes}): kept as written, not swapped "
                     "(eval scores it as drawn: no area; --compat coordexp drops it, as upstream)")
    desc = obj["desc"] if "desc" in obj else obj.get("label")
    if desc is None:
        return BAD_DESC, "no desc"
    if not isinstance(desc, str):
        return BAD_DESC, f"desc is not a string ({type(desc).__name__})"
    if not desc.strip():
        return BAD_DESC, "empty desc"
    if desc != desc.strip():
        local.append(f"{where}: stripped whitespace around desc {desc!r}")
    notes.extend(local)
    return PredObject(type=gtype, points=pts, desc=desc.strip(), score=1.0, slots=slots)
