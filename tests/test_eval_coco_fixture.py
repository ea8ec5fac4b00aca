"""COCO correctness: the val2014 100-image fixture taken through our own formats must reproduce
the reference COCOeval numbers (pycocotools, iouType bbox) to 1e-9.

Conversion (done here, into tmp_path):
- GT -> input JSONL, one record per image in ascending COCO image id (the order COCOeval walks
  images, which decides ties between equal scores), `coord_mode: "pixel"`, objects with the COCO
  name as `desc`, `bbox_2d` = [x, y, x + w, y + h] in pixels, and the COCO `area` and `iscrowd`.
- detections -> prediction artifact, `coord_mode: "pixel"`, scores kept, in results-file order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coordexp.eval import evaluate
from coordexp.eval.coco import STAT_NAMES

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "coco_val2014_100"
if not FIXTURE.is_dir():  # the shared folder sits next to the checkout; also honour an override
    FIXTURE = Path(os.environ.get("COORDEXP_SHARED", "/work/shared")) / "fixtures" / "coco_val2014_100"
GT_FILE = FIXTURE / "instances_val2014_100.json"
DT_FILE = FIXTURE / "instances_val2014_fakebbox100_results.json"

pytestmark = pytest.mark.skipif(
    not (GT_FILE.is_file() and DT_FILE.is_file()),
    reason=f"COCO fixture not found at {FIXTURE} (../shared/fixtures/coco_val2014_100 is not checked out here)",
)

REFERENCE = [0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
             0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
             0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982]


def _xyxy(b):
    x, y, w, h = b
    return [x, y, x + w, y + h]


@pytest.fixture(scope="module")
def coco():
    with open(GT_FILE) as f:
        gt = json.load(f)
    with open(DT_FILE) as f:
        dt = json.load(f)
    return gt, dt


def _write_pred_artifact(path: Path, images: list[dict], dt: list[dict], names: dict) -> None:
    by_img: dict = {}
    for d in dt:
        by_img.setdefault(d["image_id"], []).append(d)
    with open(path, "w") as f:
        for i, im in enumerate(images):
            preds = [{"type": "bbox_2d", "points": _xyxy(d["bbox"]), "desc": names[d["category_id"]],
                      "score": d["score"]} for d in by_img.get(im["id"], [])]
            f.write(json.dumps({"image_id": i, "images": [im["file_name"]], "width": im["width"],
                                "height": im["height"], "coord_mode": "pixel", "raw_output": "",
                                "preds": preds}) + "\n")


@pytest.fixture(scope="module")
def converted(coco, tmp_path_factory):
    gt, dt = coco
    tmp = tmp_path_factory.mktemp("coco_fixture")
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = sorted(gt["images"], key=lambda im: im["id"])
    anns: dict = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    with open(tmp / "gt.jsonl", "w") as f:
        for im in images:
            objs = [{"desc": names[a["category_id"]], "bbox_2d": _xyxy(a["bbox"]), "area": a["area"],
                     "iscrowd": a["iscrowd"]} for a in anns.get(im["id"], [])]
            f.write(json.dumps({"images": [im["file_name"]], "width": im["width"], "height": im["height"],
                                "coord_mode": "pixel", "objects": objs,
                                "metadata": {"coco_image_id": im["id"]}}) + "\n")
    _write_pred_artifact(tmp / "predictions.jsonl", images, dt, names)
    return tmp


def _assert_reference(m):
    got = [m["coco"]["bbox"][n] for n in STAT_NAMES]
    for name, g, r in zip(STAT_NAMES, got, REFERENCE):
        assert abs(g - r) <= 1e-9, f"{name}: {g!r} != {r!r}"


def test_fixture_through_our_jsonl_formats_reproduces_reference(converted, coco):
    out = converted / "out"
    m = evaluate(str(converted / "predictions.jsonl"), str(converted / "gt.jsonl"), str(out),
                 metrics="both", semantic=False)
    _assert_reference(m)
    gt, dt = coco
    assert m["counts"]["images"] == 100 and m["counts"]["gt_objects"] == 839 and m["counts"]["gt_crowd"] == 9
    assert m["counts"]["pred_objects"] == len(dt) == 734
    # 6 detected categories have no GT object in these 100 images: not GT categories, so dropped
    # (COCOeval ignores categories without GT, which is why the numbers still agree)
    dropped = {d["desc"] for d in m["category_mapping"]["dropped"]}
    assert dropped == {"fire hydrant", "parking meter", "surfboard", "donut", "mouse", "toaster"}
    assert m["counts"]["coco_preds"] + m["counts"]["coco_preds_dropped"] == 734
    for name in ("metrics.json", "per_image.json", "per_class.csv", "coco_gt.json", "coco_preds.json",
                 "matches.jsonl", "matches@0.30.jsonl", "pr_curve.png", "per_class_ap.png"):
        assert (out / name).is_file(), name
    coco_gt = json.loads((out / "coco_gt.json").read_text())
    assert len(coco_gt["annotations"]) == 839
    assert sum(a["iscrowd"] for a in coco_gt["annotations"]) == 9
    # categories: the exact GT descs, numbered in first-seen order
    first_seen = list(dict.fromkeys(o["desc"] for line in (converted / "gt.jsonl").read_text().splitlines()
                                    for o in json.loads(line)["objects"]))
    assert [c["name"] for c in coco_gt["categories"]] == first_seen
    assert [c["id"] for c in coco_gt["categories"]] == list(range(1, len(first_seen) + 1))


def test_fixture_with_pycocotools_backend_agrees(converted):
    m = evaluate(str(converted / "predictions.jsonl"), str(converted / "gt.jsonl"), None,
                 metrics="coco", semantic=False, coco_backend="pycocotools")
    _assert_reference(m)


def test_fixture_with_coco_json_gt_directly(coco, tmp_path):
    gt, dt = coco
    names = {c["id"]: c["name"] for c in gt["categories"]}
    # image_id = position in the COCO file's `images` list (its input order), not sorted
    _write_pred_artifact(tmp_path / "predictions.jsonl", gt["images"], dt, names)
    m = evaluate(str(tmp_path / "predictions.jsonl"), str(GT_FILE), str(tmp_path / "out"), metrics="coco",
                 semantic=False, plots=False)
    _assert_reference(m)
    assert m["inputs"]["gt_format"] == "coco"
    assert m["counts"]["categories"] == 80 and m["category_mapping"]["dropped"] == []
    coco_gt = json.loads((tmp_path / "out" / "coco_gt.json").read_text())
    assert sorted(im["id"] for im in coco_gt["images"]) == sorted(im["id"] for im in gt["images"])
