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
