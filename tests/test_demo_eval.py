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
