"""Small composable annotators (in the style of supervision's): `annotate(image, objects) -> image`.

    from coordexp.vis.annotators import BoxAnnotator, PolygonAnnotator, LabelAnnotator, VisObject
    objs = [VisObject("red circle", "bbox_2d", [10, 12, 50, 60], status="tp")]
    for a in (PolygonAnnotator(), BoxAnnotator(), LabelAnnotator()):
        image = a.annotate(image, objs)

Objects are anything with `desc`, `type` ("bbox_2d" | "poly") and `points` (flat pixel coordinates
of the image being drawn on); `status` and `note` are optional:

| status | line | label badge |
| --- | --- | --- |
| `None` (no match data) | solid, class colour | — |
| `"tp"` (matched, right desc) | solid, class colour | — |
| `"mismatch"` (matched box, wrong desc) | solid, class colour | amber `≠` (+ `note`: the other side's desc) |
| `"fp"` / `"fn"` (unmatched) | dashed, class colour | red `FP` / `FN` |

Every line has a dark halo under it so it stays visible on any background, and class colours come
from a fixed palette indexed by a stable hash (CRC-32) of the desc: the same desc gets the same
colour in every image and every run. Annotators draw in place on a copy of the image (RGB).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

# Saturated, mid-luminance colours; pure red is left out of the palette (it marks FP/FN badges).
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#4363d8", "#f032e6", "#469990", "#ffe119", "#000075", "#3cb44b", "#808000", "#dcbeff",
    "#911eb4", "#42d4f4", "#9a6324", "#00c49a",
)
HALO = (0, 0, 0)
BADGE_COLORS = {"fp": (220, 20, 60), "fn": (220, 20, 60), "mismatch": (255, 176, 0)}
STATUSES = ("tp", "fp", "fn", "mismatch")


def hex_to_rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def color_for(desc: str) -> tuple[int, int, int]:
    """The class colour of a desc: stable across images, processes and runs (not Python's hash)."""
    key = " ".join(str(desc).lower().split())
    return hex_to_rgb(PALETTE[zlib.crc32(key.encode("utf-8")) % len(PALETTE)])


def luminance(rgb: Sequence[int]) -> float:
    r, g, b = rgb[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def text_color_on(rgb: Sequence[int]) -> tuple[int, int, int]:
    return (0, 0, 0) if luminance(rgb) > 150 else (255, 255, 255)


# -- fonts --------------------------------------------------------------------------------------

_FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")


@lru_cache(maxsize=32)
def get_font(size: int, bold: bool = False):
    """A TrueType font of `size` px: DejaVu Sans when installed (has ≠), else Pillow's default."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype(_FONT_FILES[1 if bold else 0], size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def draw_text(draw, xy, text: str, font, fill) -> None:
    """Text whose top-left (ascender line) is at `xy`."""
    if hasattr(font, "getmetrics"):
        draw.text(xy, text, font=font, fill=fill, anchor="la")
    else:  # bitmap fonts take no anchor
        draw.text(xy, text, font=font, fill=fill)


def neq_symbol(font) -> str:
    """"≠" where the font has it, else "!="."""
    return "≠" if "DejaVu" in str(getattr(font, "path", "")) else "!="


def text_size(font, text: str) -> tuple[int, int]:
    """(advance width, line height) of `text` drawn with anchor "la" (left, ascender)."""
    try:
        ascent, descent = font.getmetrics()
        return int(math.ceil(font.getlength(text))), ascent + descent
    except AttributeError:  # bitmap default font
        l, t, r, b = font.getbbox(text)
        return int(r - min(l, 0)), int(b - min(t, 0))


# -- objects ------------------------------------------------------------------------------------

@dataclass
class VisObject:
    desc: str
    type: str  # "bbox_2d" | "poly"
    points: list[float]  # flat pixel coordinates on the image drawn on
    status: str | None = None  # None | "tp" | "fp" | "fn" | "mismatch"
    note: str | None = None  # extra label text, e.g. "GT: blue circle"
    index: int = 0

    @property
    def bbox(self) -> list[float]:
        if self.type == "bbox_2d":
            x1, y1, x2, y2 = self.points[:4]
            return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        xs, ys = self.points[0::2], self.points[1::2]
        return [min(xs), min(ys), max(xs), max(ys)]

    def scaled(self, sx: float, sy: float | None = None) -> "VisObject":
        """Pixel coordinates of an image resized by (sx, sy): pixel centres map to pixel centres."""
        sy = sx if sy is None else sy
        pts = [(v + 0.5) * (sx if i % 2 == 0 else sy) - 0.5 for i, v in enumerate(self.points)]
        return VisObject(self.desc, self.type, pts, self.status, self.note, self.index)


def _attr(o: Any, name: str, default: Any = None) -> Any:
    return o.get(name, default) if isinstance(o, dict) else getattr(o, name, default)


def _bbox(o: Any) -> list[float]:
    pts = list(_attr(o, "points"))
    if _attr(o, "type") == "bbox_2d":
        x1, y1, x2, y2 = pts[:4]
        return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
    return [min(pts[0::2]), min(pts[1::2]), max(pts[0::2]), max(pts[1::2])]


def default_thickness(image) -> int:
    return max(2, round(min(image.size) / 128))


# -- line drawing -------------------------------------------------------------------------------

def _dashed_polyline(draw, pts: list[tuple[float, float]], fill, width: int, dash: float, gap: float) -> None:
    """Dashes along a closed polyline; the pattern continues across corners."""
    period = dash + gap
    offset = 0.0  # distance into the current period
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        seg = math.hypot(x1 - x0, y1 - y0)
        if seg == 0:
            continue
        ux, uy = (x1 - x0) / seg, (y1 - y0) / seg
        pos = 0.0
        while pos < seg:
            in_dash = offset < dash
            step = min((dash - offset) if in_dash else (period - offset), seg - pos)
            if in_dash:
                a = (x0 + ux * pos, y0 + uy * pos)
                b = (x0 + ux * (pos + step), y0 + uy * (pos + step))
                draw.line([a, b], fill=fill, width=width)
            pos += step
            offset = (offset + step) % period


def draw_outline(draw, pts: list[tuple[float, float]], color, width: int, dashed: bool = False) -> None:
    """A closed outline with a dark halo underneath; `dashed` leaves the halo showing in the gaps."""
    draw.line(pts + pts[:1], fill=HALO, width=width + 2, joint="curve")
    if dashed:
        _dashed_polyline(draw, pts, color, width, dash=max(6.0, 3.0 * width), gap=max(4.0, 2.0 * width))
    else:
        draw.line(pts + pts[:1], fill=color, width=width, joint="curve")


def _rect_points(b: Sequence[float]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = b
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


# -- annotators ---------------------------------------------------------------------------------

class _Annotator:
    def annotate(self, image, objects: Sequence[Any]):  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def _prepare(image):
        return image if image.mode == "RGB" else image.convert("RGB")


class BoxAnnotator(_Annotator):
    """Boxes (`bbox_2d` objects; with `all_objects=True` also the bounding box of polygons)."""

    def __init__(self, thickness: int | None = None, all_objects: bool = False):
        self.thickness = thickness
        self.all_objects = all_objects

    def annotate(self, image, objects: Sequence[Any]):
        from PIL import ImageDraw

        image = self._prepare(image)
        draw = ImageDraw.Draw(image)
        t = self.thickness or default_thickness(image)
        for o in objects:
            if _attr(o, "type") != "bbox_2d" and not self.all_objects:
                continue
            status = _attr(o, "status")
            draw_outline(draw, _rect_points(_bbox(o)), color_for(_attr(o, "desc", "")), t,
                         dashed=status in ("fp", "fn"))
        return image


class PolygonAnnotator(_Annotator):
    """Polygon outlines (`poly` objects), optionally with a translucent fill."""

    def __init__(self, thickness: int | None = None, fill_alpha: float = 0.18):
        self.thickness = thickness
        self.fill_alpha = fill_alpha

    def annotate(self, image, objects: Sequence[Any]):
        from PIL import Image, ImageDraw

        image = self._prepare(image)
        polys = [o for o in objects if _attr(o, "type") == "poly"]
        if not polys:
            return image
        if self.fill_alpha > 0:
            overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
            od = ImageDraw.Draw(overlay)
            a = int(round(255 * self.fill_alpha))
            for o in polys:
                pts = list(_attr(o, "points"))
                od.polygon(list(zip(pts[0::2], pts[1::2])), fill=(*color_for(_attr(o, "desc", "")), a))
            image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
        draw = ImageDraw.Draw(image)
        t = self.thickness or default_thickness(image)
        for o in polys:
            pts = list(_attr(o, "points"))
            draw_outline(draw, list(zip(pts[0::2], pts[1::2])), color_for(_attr(o, "desc", "")), t,
                         dashed=_attr(o, "status") in ("fp", "fn"))
        return image


class LabelAnnotator(_Annotator):
    """Labels with a background box, placed to avoid one another and to stay inside the image.

    Each label tries, in order: above the box's top-left corner, below its bottom-left, inside
    top-left, inside bottom-left, above/below the right corners, then further up/down in steps
    of one label height; the first slot that overlaps no placed label wins, else the one with the
    least overlap. FP/FN/mismatch labels carry a coloured badge in front of the desc.
    """

    def __init__(self, font_size: int | None = None, padding: int = 2, max_chars: int = 48):
        self.font_size = font_size
        self.padding = padding
        self.max_chars = max_chars

    def _text(self, o: Any) -> str:
        text = str(_attr(o, "desc", ""))
        note = _attr(o, "note")
        if note:
            text = f"{text} ({note})"
        return text if len(text) <= self.max_chars else text[: self.max_chars - 1] + "…"

    def annotate(self, image, objects: Sequence[Any]):
        from PIL import ImageDraw

        image = self._prepare(image)
        draw = ImageDraw.Draw(image)
        W, H = image.size
        size = self.font_size or max(11, min(18, round(min(W, H) / 28)))
        font = get_font(size)
        bfont = get_font(size, bold=True)
        pad = self.padding
        placed: list[tuple[float, float, float, float]] = []
        for o in objects:
            status = _attr(o, "status")
            badge = {"fp": "FP", "fn": "FN", "mismatch": neq_symbol(bfont)}.get(status)
            text = self._text(o)
            tw, th = text_size(font, text)
            bw = text_size(bfont, badge)[0] + 2 * pad if badge else 0
            lw, lh = bw + tw + 2 * pad, th + 2 * pad
            if lw > W:  # shorten to the image width
                while text and lw > W:
                    text = text[:-2] + "…" if len(text) > 1 else ""
                    tw = text_size(font, text)[0] if text else 0
                    lw = bw + tw + 2 * pad
            x, y = self._place(_bbox(o), lw, lh, W, H, placed)
            placed.append((x, y, x + lw, y + lh))
            color = color_for(_attr(o, "desc", ""))
            if badge:
                draw.rectangle([x, y, x + bw - 1, y + lh - 1], fill=BADGE_COLORS[status])
                draw_text(draw, (x + pad, y + pad), badge, bfont, text_color_on(BADGE_COLORS[status]))
            draw.rectangle([x + bw, y, x + lw - 1, y + lh - 1], fill=color)
            draw_text(draw, (x + bw + pad, y + pad), text, font, text_color_on(color))
        return image

    @staticmethod
    def _place(box, lw, lh, W, H, placed) -> tuple[int, int]:
        x1, y1, x2, y2 = box
        cands = [(x1, y1 - lh), (x1, y2 + 1), (x1 + 2, y1 + 2), (x1 + 2, y2 - lh - 2),
                 (x2 - lw, y1 - lh), (x2 - lw, y2 + 1)]
        for k in range(1, 4):
            cands += [(x1, y1 - lh * (k + 1)), (x1, y2 + 1 + lh * k)]

        def clamp(c):
            x = int(round(min(max(c[0], 0), max(W - lw, 0))))
            y = int(round(min(max(c[1], 0), max(H - lh, 0))))
            return x, y

        def overlap(x, y):
            tot = 0.0
            for a, b, c, d in placed:
                iw = min(x + lw, c) - max(x, a)
                ih = min(y + lh, d) - max(y, b)
                if iw > 0 and ih > 0:
                    tot += iw * ih
            return tot

        best, best_ov = None, math.inf
        for c in cands:
            x, y = clamp(c)
            ov = overlap(x, y)
            if ov == 0:
                return x, y
            if ov < best_ov:
                best, best_ov = (x, y), ov
        return best


def annotate_all(image, objects: Sequence[Any], thickness: int | None = None, font_size: int | None = None):
    """Polygons, then boxes, then labels (labels last, so they sit on top of every line)."""
    for a in (PolygonAnnotator(thickness), BoxAnnotator(thickness), LabelAnnotator(font_size)):
        image = a.annotate(image, objects)
    return image
