"""Synthetic shapes data: deterministic, contract-valid, boxes that match the drawn pixels."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from coordexp.grid import grid_to_pixel, to_pixels
from coordexp.prompt import sort_key
from coordexp.schema import InputRecord
from coordexp.fixtures.synthetic import LABELS, ShapesConfig, generate_dataset, sample, sample_arrays


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def _records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generate_is_deterministic(tmp_path):
    a = generate_dataset(str(tmp_path / "a"), 6, seed=3, split="val", sizes=[96, "160x120"], poly_fraction=0.5)
    b = generate_dataset(str(tmp_path / "b"), 6, seed=3, split="val", sizes=[96, "160x120"], poly_fraction=0.5)
    assert os.path.basename(a) == os.path.basename(b) == "val.jsonl"
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))
    c = generate_dataset(str(tmp_path / "c"), 6, seed=4, split="val", sizes=[96, "160x120"], poly_fraction=0.5)
    assert _records(a) != _records(c)
    # record i does not depend on n; splits differ
    d = generate_dataset(str(tmp_path / "d"), 3, seed=3, split="val", sizes=[96, "160x120"], poly_fraction=0.5)
    assert _records(d) == _records(a)[:3]
    e = generate_dataset(str(tmp_path / "e"), 3, seed=3, split="train", sizes=[96, "160x120"], poly_fraction=0.5)
    assert [r["objects"] for r in _records(e)] != [r["objects"] for r in _records(d)]


def test_in_memory_sampler_is_deterministic():
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(5):
        (im1, o1), (im2, o2) = sample(r1), sample(r2)
        assert o1 == o2 and np.array_equal(np.asarray(im1), np.asarray(im2))
        assert im1.size == (128, 128) and im1.mode == "RGB"
    (a, oa), (b, ob) = sample(11, size=(160, 120)), sample(11, size=(160, 120))  # a seed works too
    assert oa == ob and np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (160, 120)


def test_records_follow_the_contract(tmp_path):
    path = generate_dataset(str(tmp_path), 24, seed=0, split="train", sizes=[96, 128, "160x120", 224],
                            poly_fraction=0.3, config=ShapesConfig(max_objects=4, overlap=True))
    recs = _records(path)
    assert len(recs) == 24
    for i, d in enumerate(recs, start=1):
        rec = InputRecord.from_dict(d, i)
        img = Image.open(os.path.join(tmp_path, rec.images[0]))
        assert img.size == (rec.width, rec.height)
        assert 1 <= len(rec.objects) <= 4
        for o in rec.objects:
            assert o.desc in LABELS
            assert all(isinstance(v, int) and 0 <= v <= 999 for v in o.points)
        keys = [sort_key(o.points) for o in rec.objects]
        assert keys == sorted(keys), "objects must be ordered by top-left anchor"
    assert {(d["width"], d["height"]) for d in recs} == {(96, 96), (128, 128), (160, 120), (224, 224)}


@pytest.mark.parametrize("size", [96, 128, (160, 120), 224])
def test_boxes_match_drawn_pixels(size):
    """Without noise and overlap, the non-background pixels near each box span that box (±1 px)."""
    cfg = ShapesConfig(max_objects=4, noise_prob=0.0, poly_fraction=0.5)
    rng = np.random.default_rng(5)
    for _ in range(15):
        arr, objects, info = sample_arrays(rng, size, cfg)
        h, w = arr.shape[:2]
        fg = np.any(arr != np.array(info["background"], dtype=np.uint8), axis=2)
        covered = np.zeros_like(fg)
        for obj, pbox in zip(objects, info["pixel_boxes"]):
            pts = obj.get("bbox_2d") or obj["poly"]
            px = to_pixels(pts, w, h)
            box = [min(px[0::2]), min(px[1::2]), max(px[0::2]), max(px[1::2])]
            # the drawn shape, found from the image alone, inside the box grown by the gap
            x0, y0 = max(0, int(box[0]) - 2), max(0, int(box[1]) - 2)
            x1, y1 = min(w - 1, int(np.ceil(box[2])) + 2), min(h - 1, int(np.ceil(box[3])) + 2)
            ys, xs = np.nonzero(fg[y0:y1 + 1, x0:x1 + 1])
            drawn = [xs.min() + x0, ys.min() + y0, xs.max() + x0, ys.max() + y0]
            assert np.allclose(drawn, box, atol=1.0), (obj, drawn, box)
            assert drawn == pbox
            covered[drawn[1]:drawn[3] + 1, drawn[0]:drawn[2] + 1] = True
        assert not np.any(fg & ~covered), "no drawn pixel lies outside every box"


def test_poly_records_are_valid_triangles(tmp_path):
    path = generate_dataset(str(tmp_path), 20, seed=1, split="val", sizes=[128], poly_fraction=1.0,
                            config=ShapesConfig(shapes=("triangle",), noise_prob=0.0))
    n_poly = 0
    for d in _records(path):
        rec = InputRecord.from_dict(d)
        arr = np.asarray(Image.open(os.path.join(tmp_path, rec.images[0])).convert("RGB"))
        for o in rec.objects:
            assert o.type == "poly" and len(o.points) == 6 and o.desc.endswith("triangle")
            n_poly += 1
            xs, ys = o.points[0::2], o.points[1::2]
            area2 = abs((xs[1] - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (ys[1] - ys[0]))
            assert area2 > 0, "non-degenerate triangle"
            # every vertex is a drawn (non-background) pixel
            for gx, gy in zip(xs, ys):
                px, py = round(grid_to_pixel(gx, rec.width)), round(grid_to_pixel(gy, rec.height))
                assert tuple(arr[py, px]) != tuple(arr[0, 0]) or (px, py) == (0, 0)
    assert n_poly >= 20
    # poly_fraction 0 writes boxes only
    path0 = generate_dataset(str(tmp_path / "b"), 10, seed=1, split="val", poly_fraction=0.0)
    assert all("bbox_2d" in o for d in _records(path0) for o in d["objects"])


def test_cli_make_data(tmp_path):
    from coordexp.client.cli import main

    out = tmp_path / "cli"
    assert main(["make-data", str(out), "--n", "4", "--seed", "2", "--split", "val", "--sizes", "96", "128x96",
                 "--poly-fraction", "0.5"]) == 0
    recs = _records(str(out / "val.jsonl"))
    assert len(recs) == 4 and (recs[1]["width"], recs[1]["height"]) == (128, 96)
    assert recs == _records(generate_dataset(str(tmp_path / "api"), 4, seed=2, split="val",
                                             sizes=[96, "128x96"], poly_fraction=0.5))
