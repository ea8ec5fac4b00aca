"""Scratch: write tests/data/eval_compat/gt_vs_pred_scored.jsonl (upstream's scored-artifact format)."""
import json
def b(desc, pts, score=None):
    o = {"type": "bbox_2d", "points": pts, "desc": desc}
    return o if score is None else {**o, "score": score}
def poly(desc, pts, score=None):
    o = {"type": "poly", "points": pts, "desc": desc}
    return o if score is None else {**o, "score": score}
C = {"mode": "coord", "coord_mode": "pixel", "pred_score_source": "confidence_postop", "pred_score_version": 1}
rows = [
    # A: non-integer pixels on both sides (rounded upstream), a box past H - 1 (clamped), a reversed and a
    # zero-area-once-rounded pred (dropped), an out-of-label-space pred (ignored by F1 'annotated', dropped by COCO),
    # a near-synonym mapped by embedding, and a stray-whitespace desc.
    {"image": "images/a.jpg", "width": 100, "height": 80, **C,
     "gt": [b("cat", [10.4, 10.6, 50.5, 49.5]), b("dog", [60.2, 40.7, 90.5, 79.9]), b("cat", [70, 2, 98, 30])],
     "pred": [b("cat", [11.3, 9.8, 50.2, 49.4], 0.9), b("puppy", [59.6, 41.2, 89.7, 80.0], 0.7),
              b("cat", [50, 50, 10, 10], 0.5), b("dog", [30, 30, 30.2, 60], 0.4),
              b("airplane", [12, 12, 48, 47], 0.3), b(" kitten ", [69.5, 3.2, 97.8, 31.4], 0.65),
              b("cat", [0, 0, 20, 20], 0.2)],
     "errors": []},
    # B: no GT, in the middle: left out (upstream then misaligns every later image -- reference below)
    {"image": "images/b.jpg", "width": 64, "height": 64, **C, "gt": [],
     "pred": [b("cat", [1, 1, 30, 30], 0.8)], "errors": []},
    # C: polygon GT (COCO area = its box area upstream), polygon + box preds
    {"image": "images/c.jpg", "width": 120, "height": 90, **C,
     "gt": [poly("person", [10, 10, 100, 12, 90, 80, 15, 70]), b("dog", [2, 60, 40, 88])],
     "pred": [poly("person", [12, 11, 98, 13, 88, 78, 16, 72], 0.85), b("dog", [3, 58, 41, 89], 0.55),
              b("person", [60, 5, 110, 40], 0.35)],
     "errors": []},
    # D: a GT box that has no width once rounded (dropped), a pred on the kept one
    {"image": "images/d.jpg", "width": 50, "height": 50, **C,
     "gt": [b("cat", [0, 0, 25.5, 25.5]), b("dog", [10, 10, 10.3, 40])],
     "pred": [b("cat", [0, 0, 25, 25], 0.6), b("dog", [9, 9, 12, 41], 0.45)], "errors": []},
    # E: GT, no preds
    {"image": "images/e.jpg", "width": 60, "height": 60, **C, "gt": [b("dog", [5, 5, 45, 45])],
     "pred": [], "errors": ["empty_pred"]},
]
out = "/work/main/tests/data/eval_compat/gt_vs_pred_scored.jsonl"
open(out, "w").write("".join(json.dumps(r) + "\n" for r in rows))
# upstream's reference input: the same without B (so its misalignment bug cannot fire)
open("/tmp/up14run/fixture_without_b.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows if r["gt"]))
