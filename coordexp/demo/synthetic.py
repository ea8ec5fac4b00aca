"""Synthetic shapes detection data: filled rectangles, circles and triangles on light backgrounds.

Deterministic for a seed. Every record is written in the CoordExp input format
(`images`, `width`, `height`, `objects` with `desc` and `bbox_2d` / `poly` in 0..999 grid ints,
objects ordered by their top-left anchor), so the sets run through the same tools as user data.

- `sample(rng, size=128, config=ShapesConfig()) -> (PIL.Image, objects)`: one fresh image in memory
  (used by `coordexp.demo.train`, which draws new samples every step).
- `generate_dataset(out_dir, n, seed, split="train", sizes=(128,), poly_fraction=0.0) -> jsonl path`.
- `coordexp-client make-data OUT --n 32 --seed 0 [--split val] [--sizes 128 96x80] ...`.

Shapes are drawn from exact pixel masks (pixel centres at integer coordinates), and each box is the
extent of the shape's own mask in pixels, converted with `coordexp.grid.from_pixels`. Triangles written
as `poly` list their 3 vertices, which are pixels of the mask, so the polygon's box equals the mask's.
Where objects may overlap (`overlap=True`) the box is the whole shape's (amodal) box, also where a
later shape covers part of it.
"""
from __future__ import annotations

import argparse
import json
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from coordexp.eval.matching import box_iou
from coordexp.grid import from_pixels
from coordexp.prompt import sort_key

# Saturated colours, far from the light backgrounds (and from each other).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 120, 0),
}
SHAPES = ("rectangle", "circle", "triangle")
LABELS = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # 18 names, e.g. "red circle"

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class ShapesConfig:
    """What one image may hold. The defaults are the demo-training recipe's
    (1-3 non-overlapping shapes of 16-56 px on a 128 px image, noisy background half the time)."""

    min_objects: int = 1
    max_objects: int = 3
    min_frac: float = 16 / 128  # shape extent as a fraction of min(width, height)
    max_frac: float = 56 / 128
    overlap: bool = False  # allow shapes to overlap (later ones drawn on top)
    max_overlap_iou: float = 0.15  # when overlap=True: at most this IoU between any two boxes
    gap: int = 2  # when overlap=False: at least this many free pixels between boxes
    noise_prob: float = 0.5  # probability of a noisy background
    noise_std: float = 8.0
    poly_fraction: float = 0.0  # probability that a record writes its triangles as `poly`
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 0 < self.min_frac <= self.max_frac <= 1:
            raise ValueError("need 0 < min_frac <= max_frac <= 1")
        if not 0.0 <= self.poly_fraction <= 1.0:
            raise ValueError("poly_fraction must lie in [0, 1]")
        for c in self.colors:
            if c not in COLORS:
                raise ValueError(f"unknown colour {c!r}; known: {', '.join(COLORS)}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")


def _as_rng(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _as_size(size: int | Sequence[int] | str) -> Size:
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
        raise ValueError(f"size {size!r}: expected N or WxH")
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    w, h = size
    return int(w), int(h)


def _shape_mask(kind: str, box: Sequence[int], width: int, height: int, rng: np.random.Generator):
    """Mask of one shape inside the pixel box [x0, y0, x1, y1] (inclusive), and its polygon
    (triangle vertices, pixel coords) or None. The mask touches all four sides of the box."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "rectangle":
        mask = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        return mask, None
    if kind == "circle":
        # Square box of odd side 2r+1 so the disc touches the box on all sides.
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = (x1 - x0) / 2
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r + 1e-9
        return mask, None
    # triangle: apex on one horizontal side, base on the other
    apex_x = int(rng.integers(x0, x1 + 1))
    if rng.random() < 0.5:  # pointing up
        pts = [(apex_x, y0), (x1, y1), (x0, y1)]
    else:  # pointing down
        pts = [(x0, y0), (x1, y0), (apex_x, y1)]
    (ax, ay), (bx, by), (qx, qy) = pts
    # Exact integer half-plane tests, edges inclusive (vertices are mask pixels).
    d1 = (bx - ax) * (yy - ay) - (by - ay) * (xx - ax)
    d2 = (qx - bx) * (yy - by) - (qy - by) * (xx - bx)
    d3 = (ax - qx) * (yy - qy) - (ay - qy) * (xx - qx)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    mask = ~(neg & pos)
    return mask, pts


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two inclusive pixel boxes (pixel [x0, x1] covers [x0, x1 + 1) continuously): eval's box IoU."""
    return float(box_iou([a[0], a[1], a[2] + 1, a[3] + 1], [b[0], b[1], b[2] + 1, b[3] + 1])[0, 0])


def _contains(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a[2] >= b[2] and a[3] >= b[3]


def _place(rng: np.random.Generator, kind: str, width: int, height: int, cfg: ShapesConfig,
           placed: list[list[int]]) -> list[int] | None:
    side = min(width, height)
    lo = max(4, int(round(cfg.min_frac * side)))
    hi = max(lo, int(round(cfg.max_frac * side)))
    for _ in range(50):
        w = int(rng.integers(lo, hi + 1))
        h = w if kind == "circle" else int(rng.integers(lo, hi + 1))
        if kind == "circle" and w % 2 == 0:
            w = h = w - 1 if w > lo else w + 1  # odd side: the disc is symmetric on the pixel grid
        if w > width or h > height:
            continue
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        box = [x0, y0, x0 + w - 1, y0 + h - 1]
        ok = True
        for other in placed:
            if cfg.overlap:
                if _iou(box, other) > cfg.max_overlap_iou or _contains(box, other) or _contains(other, box):
                    ok = False
            else:
                g = cfg.gap
                if not (box[0] > other[2] + g or other[0] > box[2] + g or box[1] > other[3] + g or other[1] > box[3] + g):
                    ok = False
            if not ok:
                break
        if ok:
            return box
    return None


def sample_arrays(rng: Any = None, size: int | Sequence[int] | str = 128, config: ShapesConfig = ShapesConfig()):
    """One image as a HxWx3 uint8 array, its objects (grid ints, sorted) and facts about it.

    Returns (image, objects, info) where info has per-object pixel boxes and the background."""
    rng = _as_rng(rng)
    width, height = _as_size(size)
    cfg = config
    bg = np.array([int(rng.integers(200, 256)) for _ in range(3)], dtype=np.float32)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = bg
    noisy = bool(rng.random() < cfg.noise_prob)
    as_poly = bool(rng.random() < cfg.poly_fraction)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[list[int]] = []
    drawn: list[dict[str, Any]] = []
    for _ in range(n):
        kind = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        color = cfg.colors[int(rng.integers(len(cfg.colors)))]
        box = _place(rng, kind, width, height, cfg, placed)
        if box is None:
            continue
        mask, pts = _shape_mask(kind, box, width, height, rng)
        ys, xs = np.nonzero(mask)
        pix_box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        img[mask] = np.array(COLORS[color], dtype=np.float32)
        placed.append(box)
        obj: dict[str, Any] = {"desc": f"{color} {kind}"}
        if kind == "triangle" and as_poly:
            flat = [float(v) for p in pts for v in p]
            obj["poly"] = from_pixels(flat, width, height)
        else:
            obj["bbox_2d"] = from_pixels(pix_box, width, height)
        drawn.append({"obj": obj, "pixel_box": pix_box, "kind": kind, "color": color})
    if noisy:
        img += rng.normal(0.0, cfg.noise_std, size=img.shape).astype(np.float32)
    arr = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    drawn.sort(key=lambda d: sort_key(d["obj"].get("bbox_2d") or d["obj"]["poly"]))
    objects = [d["obj"] for d in drawn]
    info = {"pixel_boxes": [d["pixel_box"] for d in drawn], "background": [int(v) for v in bg],
            "noisy": noisy, "poly": as_poly}
    return arr, objects, info


def sample(rng: Any = None, size: int | Sequence[int] | str = 128,
           config: ShapesConfig = ShapesConfig()):
    """One fresh image: (PIL RGB image, objects as [{desc, bbox_2d|poly}] in 0..999 grid ints,
    sorted by top-left anchor). `rng`: a numpy Generator (advanced in place) or a seed."""
    from PIL import Image

    arr, objects, _ = sample_arrays(rng, size, config)
    return Image.fromarray(arr, "RGB"), objects


def record_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of record `index` of (seed, split): a record does not depend on `n`."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def generate_dataset(
    out_dir: str,
    n: int,
    seed: int = 0,
    split: str = "train",
    sizes: Sequence[int | Sequence[int] | str] = (128,),
    poly_fraction: float = 0.0,
    config: ShapesConfig | None = None,
    jsonl_name: str | None = None,
) -> str:
    """Write `n` images (PNG under `out_dir/images/`) and `out_dir/<split>.jsonl`; return the JSONL path.

    Record i uses `sizes[i % len(sizes)]` and its own generator from (seed, split, i), so the same
    seed and split give the same files, and different splits give different images."""
    from PIL import Image

    if n < 0:
        raise ValueError("n must be >= 0")
    cfg = config or ShapesConfig()
    if poly_fraction != cfg.poly_fraction:
        cfg = ShapesConfig(**{**asdict(cfg), "poly_fraction": poly_fraction})
    size_list = [_as_size(s) for s in sizes]
    if not size_list:
        raise ValueError("sizes must not be empty")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, jsonl_name or f"{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            w, h = size_list[i % len(size_list)]
            arr, objects, info = sample_arrays(record_rng(seed, split, i), (w, h), cfg)
            rel = f"images/{split}_{i:05d}.png"
            Image.fromarray(arr, "RGB").save(os.path.join(out_dir, rel), optimize=True)
            rec = {"images": [rel], "width": w, "height": h, "objects": objects,
                   # the records' source tag stays "coordexp.synthetic" (data format; bundled sets carry it)
                   "metadata": {"source": "coordexp.synthetic", "seed": seed, "split": split, "index": i,
                                "noisy_background": info["noisy"]}}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------- CLI: coordexp-client make-data

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-data",
        help="write a synthetic shapes dataset (CoordExp input JSONL + PNG images)",
        description="Synthetic detection data: 1-N filled rectangles/circles/triangles in 6 colours "
        "(labels like 'red circle'); boxes in the 0..999 grid; deterministic for a seed.",
    )
    p.add_argument("out", help="output folder (images/ and <split>.jsonl are written there)")
    p.add_argument("--n", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="split name: names the JSONL and the images, and seeds them")
    p.add_argument("--sizes", nargs="+", default=["128"], metavar="N|WxH",
                   help="image sizes, used in turn (default 128)")
    p.add_argument("--poly-fraction", type=float, default=0.0,
                   help="fraction of records whose triangles are written as 3-point `poly` (default 0)")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--overlap", action="store_true", help="let shapes overlap (box IoU <= 0.15)")
    p.add_argument("--noise-prob", type=float, default=0.5, help="probability of a noisy background")
    p.set_defaults(func=_cmd_make_data)


def _cmd_make_data(args) -> int:
    cfg = ShapesConfig(min_objects=args.min_objects, max_objects=args.max_objects, overlap=args.overlap,
                       noise_prob=args.noise_prob, poly_fraction=args.poly_fraction)
    path = generate_dataset(args.out, args.n, seed=args.seed, split=args.split, sizes=args.sizes,
                            poly_fraction=args.poly_fraction, config=cfg)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordexp.demo.synthetic")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["make-data", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
