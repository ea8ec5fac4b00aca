"""The ONE coordinate converter: model coordinates <-> image pixels.

Named modes (never guessed):
- ``norm1000``: CoordExp's 0..999 grid.  pixel -> k = round(px / (W - 1) * 999);
  k -> px = k / 999 * (W - 1), clamped to [0, W - 1].
- ``qwen3_rel1000``: upstream Qwen3-VL, relative 0..1000: px = k / 1000 * W (clamped).
- ``pixel``: absolute pixels of the image the model saw. For Qwen2.5-VL that is the
  processor-resized image, so pass ``model_size=(w, h)`` to rescale to the original.

Rounding is Python's ``round`` (half to even), the same as numpy's ``rint``.
"""
from __future__ import annotations

from typing import Sequence

COORD_MODES = ("norm1000", "qwen3_rel1000", "pixel")
GRID_MAX = 999


def _check_mode(mode: str) -> None:
    if mode not in COORD_MODES:
        raise ValueError(f"unknown coord_mode {mode!r}; expected one of {', '.join(COORD_MODES)}")


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


def pixel_to_grid(px: float, size: int) -> int:
    """One pixel coordinate along an axis of `size` pixels -> grid value 0..999."""
    if size <= 1:
        return 0
    return int(_clamp(round(px / (size - 1) * GRID_MAX), 0, GRID_MAX))


def grid_to_pixel(k: float, size: int) -> float:
    """Grid value 0..999 -> pixel coordinate, clamped to [0, size - 1]."""
    return _clamp(k / GRID_MAX * (size - 1), 0.0, float(max(size - 1, 0)))


def to_pixels(
    points: Sequence[float],
    width: int,
    height: int,
    mode: str = "norm1000",
    model_size: tuple[int, int] | None = None,
) -> list[float]:
    """Flat [x1, y1, x2, y2, ...] in `mode` -> pixel coordinates of the original image."""
    _check_mode(mode)
    out: list[float] = []
    for i, v in enumerate(points):
        size = width if i % 2 == 0 else height
        if mode == "norm1000":
            out.append(grid_to_pixel(v, size))
        elif mode == "qwen3_rel1000":
            out.append(_clamp(v / 1000.0 * size, 0.0, float(size - 1)))
        else:  # pixel
            if model_size is not None:
                msize = model_size[0] if i % 2 == 0 else model_size[1]
                v = v * size / msize
            out.append(_clamp(float(v), 0.0, float(size - 1)))
    return out


def from_pixels(
    points: Sequence[float],
    width: int,
    height: int,
    mode: str = "norm1000",
    model_size: tuple[int, int] | None = None,
) -> list[int]:
    """Pixel coordinates of the original image -> flat list of model coordinates in `mode`."""
    _check_mode(mode)
    out: list[int] = []
    for i, px in enumerate(points):
        size = width if i % 2 == 0 else height
        if mode == "norm1000":
            out.append(pixel_to_grid(px, size))
        elif mode == "qwen3_rel1000":
            out.append(int(_clamp(round(px / size * 1000), 0, 1000)))
        else:
            if model_size is not None:
                msize = model_size[0] if i % 2 == 0 else model_size[1]
                px = px * msize / size
                size = msize
            out.append(int(_clamp(round(px), 0, size - 1)))
    return out


def bbox_of(points: Sequence[float]) -> list[float]:
    """Axis-aligned box [x1, y1, x2, y2] of a flat point list (bbox or polygon)."""
    xs, ys = points[0::2], points[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


# ---------------------------------------------------------------------------- bbox formats
# How a checkpoint writes the four slots of `bbox_2d` (CoordExp's `custom.bbox_format`):
#   xyxy            [x1, y1, x2, y2] on the grid (the default)
#   cxcywh          [cx, cy, w, h], every slot linear on the grid (k / 999)
#   cxcy_logw_logh  [cx, cy, u(w), u(h)], u(s) = 1 + log_1024(s): slot k means s = 1024 ** (k / 999 - 1)
# Sizes never go below 1/1024 of the image. Polygons are always plain points.
BBOX_FORMATS = ("xyxy", "cxcywh", "cxcy_logw_logh")
SIZE_FLOOR = 1.0 / 1024.0


def check_bbox_format(fmt: str) -> str:
    """The canonical spelling of a bbox format (case and '-' forgiven); ValueError naming the allowed ones."""
    norm = str(fmt).strip().lower().replace("-", "_")
    if norm not in BBOX_FORMATS:
        raise ValueError(f"unknown bbox_format {fmt!r}; expected one of {', '.join(BBOX_FORMATS)}")
    return norm


def _unit(k: float) -> float:
    return _clamp(k / GRID_MAX, 0.0, 1.0)


def _slot(z: float) -> int:
    """A unit value -> its grid slot (half up, as the research code quantises)."""
    import math

    return int(_clamp(math.floor(GRID_MAX * _clamp(z, 0.0, 1.0) + 0.5), 0, GRID_MAX))


def encode_bbox(xyxy: Sequence[float], fmt: str) -> list[int]:
    """Grid box [x1, y1, x2, y2] -> the four slots a checkpoint trained with `fmt` writes."""
    import math

    fmt = check_bbox_format(fmt)
    x1, y1, x2, y2 = (_unit(v) for v in xyxy)
    if fmt == "xyxy":
        return [_slot(v) for v in (x1, y1, x2, y2)]
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    w, h = max(x2 - x1, SIZE_FLOOR), max(y2 - y1, SIZE_FLOOR)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if fmt == "cxcy_logw_logh":
        floor_log = math.log(SIZE_FLOOR)
        w, h = ((math.log(_clamp(s, SIZE_FLOOR, 1.0)) - floor_log) / -floor_log for s in (w, h))
    return [_slot(v) for v in (cx, cy, w, h)]


def decode_bbox_exact(slots: Sequence[float], fmt: str) -> list[float]:
    """The four slots of `fmt` -> [x1, y1, x2, y2] on the grid as floats (may fall just outside 0..999)."""
    fmt = check_bbox_format(fmt)
    if fmt == "xyxy":
        return [float(v) for v in slots]
    cx, cy = _unit(slots[0]), _unit(slots[1])
    if fmt == "cxcy_logw_logh":
        w, h = (1024.0 ** (_unit(k) - 1.0) for k in slots[2:4])
    else:
        w, h = (_clamp(k / GRID_MAX, SIZE_FLOOR, 1.0) for k in slots[2:4])
    return [(cx - w / 2) * GRID_MAX, (cy - h / 2) * GRID_MAX, (cx + w / 2) * GRID_MAX, (cy + h / 2) * GRID_MAX]


def decode_bbox(slots: Sequence[float], fmt: str) -> list[int]:
    """The four slots of `fmt` -> grid box [x1, y1, x2, y2] (ints 0..999): the exact box re-quantised to
    the grid (Python's round, then clamped), so `to_pixels` gives the research code's pixels."""
    if check_bbox_format(fmt) == "xyxy":
        return [int(v) for v in slots]
    return [int(_clamp(round(v), 0, GRID_MAX)) for v in decode_bbox_exact(slots, fmt)]
