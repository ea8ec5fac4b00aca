"""F1-ish matching pinned on hand-made cases (no embedding model needed)."""
from __future__ import annotations

import numpy as np
import pytest

from coordexp.eval import (
    EvalObject,
    SemanticScorer,
    aggregate,
    box_iou,
    iou_matrix,
    match_image,
    normalize_desc,
)
from coordexp.eval.matching import greedy_match, prf


def B(desc, x1, y1, x2, y2, i=0):
    return EvalObject(desc=desc, type="bbox_2d", points=[x1, y1, x2, y2], index=i)


def P(desc, pts, i=0):
    return EvalObject(desc=desc, type="poly", points=list(pts), index=i)


def fake_embedder(vectors: dict[str, list[float]]):
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.array([vectors[t] for t in texts], dtype=float)

    embed.calls = calls
    return embed


# -- IoU -------------------------------------------------------------------------------------
def test_box_iou_values_and_degenerate():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    m = box_iou(a, b)
    assert m.shape == (2, 3)
    assert m[0, 0] == 1.0
    assert m[0, 1] == pytest.approx(50 / 150)
    assert m[0, 2] == 0.0
    assert (m[1] == 0).all()  # empty box: no division by zero
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_polygon_iou_is_mask_iou_not_box_iou():
    # A right triangle and the box around it: their boxes coincide (box IoU 1.0), their masks do not.
    tri = P("a", [0, 0, 40, 0, 0, 40])
    box = B("a", 0, 0, 40, 40)
    m = iou_matrix([box], [tri], width=64, height=64)
    assert 0.4 < m[0, 0] < 0.6
    # Same polygon on both sides: 1.0; box vs box stays the exact box IoU even when the image has polygons.
    m2 = iou_matrix([P("a", tri.points), B("b", 0, 0, 10, 10)], [tri, B("b", 5, 0, 15, 10)], width=64, height=64)
    assert m2[0, 0] == pytest.approx(1.0)
    assert m2[1, 1] == pytest.approx(50 / 150, abs=0)  # box vs box: continuous IoU, not rasterised


def test_polygon_mask_iou_decides_the_match():
    tri = P("a", [0, 0, 40, 0, 0, 40])
    box = B("a", 0, 0, 40, 40)
    assert match_image([box], [tri], 0.3, width=64, height=64).tp_loc == 1
    assert match_image([box], [tri], 0.7, width=64, height=64).tp_loc == 0  # box IoU would say 1.0


# -- greedy + ties ---------------------------------------------------------------------------
def test_tie_equal_iou_to_two_gts_goes_to_lower_gt_index():
    pred = B("a", 5, 0, 15, 10)
    g0, g1 = B("a", 0, 0, 10, 10), B("a", 10, 0, 20, 10)
    r = match_image([pred], [g0, g1], 0.3)
    assert [(m.pred_index, m.gt_index) for m in r.pairs] == [(0, 0)]
    assert r.unmatched_gts == [1]
    r = match_image([pred], [g1, g0], 0.3)  # order decides, not geometry
    assert [(m.pred_index, m.gt_index) for m in r.pairs] == [(0, 0)]


def test_tie_equal_iou_two_preds_lower_pred_index_wins():
    g = B("a", 0, 0, 10, 10)
    r = match_image([B("a", 0, 0, 10, 10), B("a", 0, 0, 10, 10)], [g], 0.5)
    assert [(m.pred_index, m.gt_index) for m in r.pairs] == [(0, 0)]
    assert r.unmatched_preds == [1]
    assert (r.tp_loc, r.fp_loc, r.fn_loc) == (1, 1, 0)


def test_tie_full_grid_pairs_in_index_order():
    box = (0, 0, 10, 10)
    r = match_image([B("a", *box), B("a", *box)], [B("a", *box), B("a", *box)], 0.5)
    assert [(m.pred_index, m.gt_index) for m in r.pairs] == [(0, 0), (1, 1)]


def test_greedy_by_iou_descending_not_pred_order():
    g = B("a", 0, 0, 10, 10)
    p0, p1 = B("a", 0, 0, 10, 6), B("a", 0, 0, 10, 9)  # IoU 0.6 and 0.9
    r = match_image([p0, p1], [g], 0.5)
    assert [(m.pred_index, m.gt_index) for m in r.pairs] == [(1, 0)]
    assert r.pairs[0].iou == pytest.approx(0.9)
    assert r.unmatched_preds == [0]


def test_greedy_match_lexsort_on_raw_matrix():
    ious = np.array([[0.5, 0.5], [0.5, 0.7]])
    assert greedy_match(ious, 0.5) == [(1, 1, 0.7), (0, 0, 0.5)]
    assert greedy_match(ious, 0.8) == []
    assert greedy_match(np.zeros((0, 3)), 0.5) == []


def test_greedy_is_not_optimal_by_design():
    # p0 overlaps g0 best, leaving g1 unreachable for p1: greedy gives 1 match where 2 were possible.
    ious = np.array([[0.9, 0.6], [0.8, 0.0]])
    assert greedy_match(ious, 0.5) == [(0, 0, 0.9)]


# -- thresholds ------------------------------------------------------------------------------
def test_threshold_03_vs_05():
    g = B("a", 0, 0, 10, 10)
    p = B("a", 0, 0, 10, 4)  # IoU 0.4
    assert match_image([p], [g], 0.3).tp_loc == 1
    assert match_image([p], [g], 0.5).tp_loc == 0
    # exactly at the threshold counts (IoU >= thr)
    assert match_image([B("a", 0, 0, 10, 5)], [g], 0.5).tp_loc == 1


# -- empty cases -----------------------------------------------------------------------------
def test_empty_image_is_perfect():
    r = match_image([], [], 0.5)
    assert r.counts()["tp_loc"] == 0 and r.pairs == []
    assert r.scores()["loc"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert r.scores()["full"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_empty_predictions_recall_zero_precision_one():
    r = match_image([], [B("a", 0, 0, 10, 10), B("b", 20, 20, 30, 30)], 0.5)
    assert (r.tp_loc, r.fp_loc, r.fn_loc) == (0, 0, 2)
    assert r.unmatched_gts == [0, 1]
    assert r.scores()["loc"] == {"precision": 1.0, "recall": 0.0, "f1": 0.0}


def test_predictions_without_gt_precision_zero_recall_one():
    r = match_image([B("a", 0, 0, 10, 10)], [], 0.5)
    assert (r.tp_loc, r.fp_loc, r.fn_loc) == (0, 1, 0)
    assert r.scores()["loc"] == {"precision": 0.0, "recall": 1.0, "f1": 0.0}


def test_prf_conventions():
    assert prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert prf(1, 1, 1) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


# -- semantics -------------------------------------------------------------------------------
def test_normalize_desc():
    assert normalize_desc("  Traffic_Light ") == "traffic light"
    assert normalize_desc("person (adult)/child") == "person adult child"
    assert normalize_desc("A\t  B") == "a b"


def test_semantic_mismatch_fp_and_fn_in_full_tp_in_loc():
    g = [B("cat", 0, 0, 10, 10)]
    r = match_image([B("dog", 0, 0, 10, 10)], g, 0.5)  # string semantics only
    assert (r.tp_loc, r.fp_loc, r.fn_loc) == (1, 0, 0)
    assert (r.tp_full, r.fp_full, r.fn_full) == (0, 1, 1)
    assert r.pairs[0].semantic_ok is False and r.pairs[0].similarity is None
    assert r.scores()["loc"]["f1"] == 1.0 and r.scores()["full"]["f1"] == 0.0


def test_normalised_strings_are_semantically_equal_without_a_model():
    r = match_image([B("Traffic_Light", 0, 0, 10, 10)], [B("traffic light", 0, 0, 10, 10)], 0.5)
    assert r.pairs[0].semantic_ok is True and r.pairs[0].similarity == 1.0
    assert r.tp_full == 1


def test_semantic_with_fake_embedder_threshold_and_cache():
    emb = fake_embedder({"kitty": [0.8, 0.6, 0], "cat": [1, 0, 0], "car": [0.5, 0, 0.866]})
    sc = SemanticScorer(embedder=emb, threshold=0.6)
    g = [B("cat", 0, 0, 10, 10), B("cat", 20, 0, 30, 10)]
    r = match_image([B("kitty", 0, 0, 10, 10), B("car", 20, 0, 30, 10)], g, 0.5, semantic=sc)
    assert r.pairs[0].similarity == pytest.approx(0.8) and r.pairs[0].semantic_ok
    assert r.pairs[1].similarity == pytest.approx(0.5, abs=1e-4) and not r.pairs[1].semantic_ok
    assert (r.tp_full, r.fp_full, r.fn_full) == (1, 1, 1)
    match_image([B("kitty", 0, 0, 10, 10)], g, 0.5, semantic=sc)
    embedded = [t for c in emb.calls for t in c]
    assert sorted(embedded) == sorted(set(embedded))  # every string embedded once (cache)


def test_category_mapping_with_fake_embedder():
    emb = fake_embedder({"kitty": [0.8, 0.6, 0], "spaceship": [0, 0, 1], "cat": [1, 0, 0], "dog": [0, 1, 0]})
    m = SemanticScorer(embedder=emb).map_to_categories(["cat", "Cat", "kitty", "spaceship"], ["cat", "dog"])
    assert m["cat"]["how"] == "exact"
    assert m["Cat"] == {"category": "cat", "how": "normalized", "cosine": None, "nearest": "cat"}
    assert m["kitty"]["category"] == "cat" and m["kitty"]["how"] == "embedding"
    assert m["kitty"]["cosine"] == pytest.approx(0.8)
    assert m["spaceship"]["category"] is None and m["spaceship"]["how"] == "dropped"
    # without embeddings: exact/normalised only
    m = SemanticScorer(enabled=False).map_to_categories(["Cat", "kitty"], ["cat", "dog"])
    assert m["Cat"]["category"] == "cat" and m["kitty"]["category"] is None


def test_scorer_falls_back_when_model_cannot_load():
    sc = SemanticScorer()

    def boom():
        raise ImportError("no torch here")

    sc._loader = boom
    sc.enabled = True
    res = sc.score_pairs([("dog", "puppy"), ("cat", "Cat")])
    assert res == [(None, False), (1.0, True)]
    info = sc.info()
    assert info["backend"] == "string" and "no torch here" in info["fallback_reason"]


# -- aggregation -----------------------------------------------------------------------------
def test_macro_vs_micro():
    # image 1: one GT found; image 2: three GT, one prediction in the wrong place
    r1 = match_image([B("a", 0, 0, 10, 10)], [B("a", 0, 0, 10, 10)], 0.5)
    r2 = match_image([B("a", 50, 50, 60, 60)], [B("a", 0, 0, 10, 10), B("a", 20, 0, 30, 10), B("a", 0, 20, 10, 30)], 0.5)
    a = aggregate([r1, r2])
    mi, ma = a["loc"]["micro"], a["loc"]["macro"]
    assert (mi["tp"], mi["fp"], mi["fn"]) == (1, 1, 3)
    assert mi["precision"] == 0.5 and mi["recall"] == 0.25 and mi["f1"] == pytest.approx(1 / 3)
    assert ma == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_aggregate_full_and_semantic_counts():
    r1 = match_image([B("dog", 0, 0, 10, 10)], [B("cat", 0, 0, 10, 10)], 0.5)
    r2 = match_image([], [], 0.5)
    a = aggregate([r1, r2])
    assert a["loc"]["micro"]["f1"] == 1.0
    assert (a["full"]["micro"]["tp"], a["full"]["micro"]["fp"], a["full"]["micro"]["fn"]) == (0, 1, 1)
    assert a["full"]["macro"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert a["semantic"] == {"matched": 1, "matched_sem_ok": 0, "matched_sem_bad": 1, "sem_acc_on_matched": 0.0}
