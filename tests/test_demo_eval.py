"""The demo training's quick AP (coordexp.demo.train_eval) is eval's COCO AP, with COCO's own assignment."""
from __future__ import annotations

import numpy as np
import pytest

from coordexp.eval.matching import box_iou, greedy_match, rank_match

pytest.importorskip("faster_coco_eval")

from coordexp.demo.train_eval import ap_at  # noqa: E402

GT = [("red circle", [0.0, 0.0, 10.0, 10.0])]


def test_rank_match_is_coco_order_not_iou_order():
    ious = np.array([[0.6, 0.0], [0.9, 0.0]])  # pred 0 comes first and takes the GT
    assert rank_match(ious, 0.5) == [(0, 0, 0.6)]
    assert greedy_match(ious, 0.5) == [(1, 0, 0.9)]


def test_rank_match_ties_go_to_the_later_gt_and_threshold_one_matches_iou_one():
    assert rank_match(np.array([[0.7, 0.7]]), 0.5) == [(0, 1, 0.7)]
    assert rank_match(np.array([[1.0]]), 1.0) == [(0, 0, 1.0)]
    assert rank_match(np.array([[0.49]]), 0.5) == []
    assert rank_match(np.zeros((0, 3)), 0.5) == []


def test_ap_counts_predictions_in_generation_order():
    loose, exact, off = [0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]
    first_loose = ap_at([GT], [[("red circle", loose), ("red circle", exact)]])
    assert first_loose["ap"] == pytest.approx(1.0)
    assert first_loose["matched"] == 1
    assert first_loose["mean_iou"] == pytest.approx(float(box_iou(loose, exact)[0, 0]))  # 100 / 120, not 1.0
    fp_first = ap_at([GT], [[("red circle", off), ("red circle", exact)]])
    assert fp_first["ap"] == pytest.approx(0.5)  # precision 1/2 at recall 1


def test_ap_is_class_aware_and_averages_gt_classes():
    gts = [[("red circle", [0.0, 0.0, 10.0, 10.0]), ("blue square", [20.0, 20.0, 30.0, 30.0])]]
    preds = [[("red circle", [0.0, 0.0, 10.0, 10.0]), ("green star", [20.0, 20.0, 30.0, 30.0])]]
    m = ap_at(gts, preds)
    assert m["per_class"] == {"blue square": 0.0, "red circle": pytest.approx(1.0)}
    assert m["ap"] == pytest.approx(0.5) and m["matched"] == 1 and m["mean_iou"] == pytest.approx(1.0)


def test_ap_without_gt_or_predictions():
    assert ap_at([[]], [[("red circle", [0.0, 0.0, 1.0, 1.0])]]) == {"ap": 0.0, "per_class": {}, "mean_iou": 0.0,
                                                                       "matched": 0}
    assert ap_at([GT], [[]])["ap"] == 0.0
    with pytest.raises(ValueError):
        ap_at([GT], [GT], thr=0.52)


def test_demo_headline_prints_the_exact_label_f1_and_names_the_semantic_one(tmp_path):
    """Issue 19: the demo printed the semantic F1 (a "red triangle" on a "red circle" counted) as
    "F1 (full)". It now prints the exact-label figure as the F1 and the semantic one beside it, named."""
    import json

    from coordexp.demo.run import headline_lines
    from coordexp.eval import evaluate

    box = [100, 100, 500, 500]
    gt, pred = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    pairs = [("red circle", "red triangle"), ("blue square", "blue square")]
    gt.write_text("".join(json.dumps({"images": [f"{i}.png"], "width": 64, "height": 64,
                                      "objects": [{"desc": g, "bbox_2d": box}]}) + "\n" for i, (g, _) in enumerate(pairs)))
    pred.write_text("".join(json.dumps({"image_id": i, "images": [f"{i}.png"], "width": 64, "height": 64,
                                        "preds": [{"type": "bbox_2d", "points": box, "desc": p}]}) + "\n"
                            for i, (_, p) in enumerate(pairs)))
    vecs = {"red circle": [1.0, 0.0, 0.0], "red triangle": [0.75, 0.6614378, 0.0], "blue square": [0.0, 0.0, 1.0]}
    m = evaluate(str(pred), str(gt), None, embedder=lambda ts: np.array([vecs[t] for t in ts]), plots=False)
    lines = headline_lines(m)
    text = "\n".join(lines)
    assert "F1 @ IoU 0.5, exact labels   0.500" in text
    assert "F1 @ IoU 0.5, semantic       1.000" in text and "wrong shape" in text
    assert any(ln.startswith("  AP50 (bbox, exact labels)") for ln in lines)
    assert "(full)" not in text
