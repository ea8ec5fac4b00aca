"""`--metrics lvis` (issue 14): our artifact -> federated LVIS dicts -> LVISEval equals LVISEval run
directly on LVIS dicts written out by hand for the same data (1e-9), with the federated rules and the
300-detections cap doing visible work."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lvis")

from coordexp.eval import evaluate  # noqa: E402
from coordexp.eval.lvis import STAT_NAMES, run_lvis_eval  # noqa: E402

CATS = [{"id": 3, "name": "cat", "frequency": "f"}, {"id": 7, "name": "dog", "frequency": "c"},
        {"id": 11, "name": "teapot", "frequency": "r"}, {"id": 12, "name": "kite", "frequency": "f"}]
NAME = {c["id"]: c["name"] for c in CATS}


def _cat(cid):
    c = next(c for c in CATS if c["id"] == cid)
    return {"id": cid, "name": c["name"], "frequency": {"f": "frequent", "c": "common", "r": "rare"}[c["frequency"]]}


# per image: size, GT (category id, xyxy), negative ids, not-exhaustive ids, preds (desc, xyxy, score)
IMAGES = [
    ((100, 80), [(3, [10, 10, 50, 50]), (7, [60, 40, 90, 75])], [11], [],
     [("cat", [11, 10, 50, 49], 0.9), ("dog", [58, 42, 91, 74], 0.8), ("teapot", [0, 0, 30, 30], 0.7),  # teapot: verified negative -> FP
      ("kite", [20, 20, 60, 60], 0.95)]),  # kite: not verified for this image -> not counted at all
    ((120, 90), [(11, [5, 5, 40, 40])], [3], [11],
     [("teapot", [6, 5, 40, 41], 0.6), ("teapot", [70, 50, 110, 85], 0.85),  # not exhaustive: the extra is no FP
      ("cat", [50, 10, 90, 40], 0.5)]),  # cat verified negative here -> FP
    ((64, 64), [(12, [2, 2, 20, 30]), (3, [30, 30, 60, 60])], [7], [],
     [("kite", [3, 2, 21, 29], 0.4), ("Cat", [31, 29, 60, 61], 0.3)]),  # "Cat": normalised-equal name
]


def _rows(extra_dets: int = 0) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for k, ((w, h), gts, neg, nel, preds) in enumerate(IMAGES):
        preds = list(preds)
        if k == 0:  # high-score dog noise away from the dog: the 300 best of the image are all noise,
            for _ in range(extra_dets):  # so LVIS's cap drops the real cat and dog dets of this image
                x, y = rng.randint(0, 30), rng.randint(0, 15)
                preds.append(("dog", [x, y, x + 25, y + 25], rng.uniform(0.95, 0.99)))
        rows.append({
            "image": f"images/{k}.jpg", "width": w, "height": h, "coord_mode": "pixel",
            "gt": [{"type": "bbox_2d", "points": b, "desc": NAME[c]} for c, b in gts],
            "pred": [{"type": "bbox_2d", "points": b, "desc": d, "score": s} for d, b, s in preds],
            "pred_score_source": "test", "pred_score_version": 1,
            "metadata": {"dataset_policy": "lvis_federated", "lvis": {
                "gt_objects": [_cat(c) for c, _ in gts],
                "positive_categories": [_cat(c) for c in dict.fromkeys(c for c, _ in gts)],
                "neg_categories": [_cat(c) for c in neg], "not_exhaustive_categories": [_cat(c) for c in nel]}},
        })
    return rows


def _by_hand(rows: list[dict]) -> tuple[dict, list[dict]]:
    """The LVIS dicts written directly from IMAGES (not through our loader)."""
    images, anns, dets = [], [], []
    for k, ((w, h), gts, neg, nel, _) in enumerate(IMAGES):
        images.append({"id": k, "width": w, "height": h, "neg_category_ids": neg, "not_exhaustive_category_ids": nel})
        for c, (x1, y1, x2, y2) in gts:
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1)})
    ids = {c["name"]: c["id"] for c in CATS}
    for k, r in enumerate(rows):
        for p in r["pred"]:
            x1, y1, x2, y2 = p["points"]
            dets.append({"image_id": k, "category_id": ids[p["desc"].lower()], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": p["score"]})
    return {"images": images, "annotations": anns, "categories": CATS}, dets


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("extra", [0, 320], ids=["small", "over-300-dets"])
def test_lvis_equals_lvis_eval(tmp_path, extra):
    rows = _rows(extra)
    m = evaluate(str(_write(tmp_path / "g.jsonl", rows)), None, str(tmp_path / "out"), metrics="lvis",
                 semantic=False, plots=False)
    ref = run_lvis_eval(*_by_hand(rows))
    assert set(STAT_NAMES) <= set(m["lvis"])
    worst = max(abs(m["lvis"][k] - ref[k]) for k in STAT_NAMES)
    assert worst <= 1e-9, {k: (m["lvis"][k], ref[k]) for k in STAT_NAMES}
    assert m["coordexp"]["bbox_APr"] == m["lvis"]["APr"] and m["coordexp"]["bbox_AR300"] == m["lvis"]["AR@300"]
    assert m["lvis"]["max_dets"] == 300 and m["lvis"]["detections"] == sum(len(r["pred"]) for r in rows)
    if extra:  # the cap did work: with every det kept the numbers would differ
        uncapped = run_lvis_eval(*_by_hand(rows), max_dets=-1)
        assert any(abs(uncapped[k] - ref[k]) > 1e-6 for k in STAT_NAMES)


def test_federated_rules_do_work(tmp_path):
    """A kite det on image 0 (kite not verified there) changes nothing; the same det scored like COCO
    (every image exhaustive, every category verified) would be a false positive."""
    rows = _rows()
    without = [dict(r, pred=[p for p in r["pred"] if p["desc"] != "kite" or r["image"] != "images/0.jpg"]) for r in rows]
    a = evaluate(str(_write(tmp_path / "a.jsonl", rows)), None, None, metrics="lvis", semantic=False)["lvis"]
    b = evaluate(str(_write(tmp_path / "b.jsonl", without)), None, None, metrics="lvis", semantic=False)["lvis"]
    assert all(abs(a[k] - b[k]) <= 1e-12 for k in STAT_NAMES)
    gt, dets = _by_hand(rows)
    for im in gt["images"]:
        im["neg_category_ids"] = [c["id"] for c in CATS]
        im["not_exhaustive_category_ids"] = []
    assert run_lvis_eval(gt, dets)["AP"] < a["AP"] - 1e-3


def test_lvis_needs_the_federated_metadata(tmp_path):
    rows = _rows()
    del rows[1]["metadata"]
    with pytest.raises(ValueError, match=r"image 1 \(images/1.jpg\): --metrics lvis needs metadata.dataset_policy"):
        evaluate(str(_write(tmp_path / "g.jsonl", rows)), None, None, metrics="lvis", semantic=False)
