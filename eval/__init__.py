"""CoordExp evaluation: COCO AP/AR and F1-ish matching on the prediction artifact.

    from coordexp.eval import evaluate, load_pairs, match_image
    metrics = evaluate("predictions.jsonl", "data.jsonl", "eval_out")
    for pair in load_pairs("predictions.jsonl", "data.jsonl"):      # pixels, input order
        res = match_image(pair.preds, pair.gts, 0.5, width=pair.width, height=pair.height)
        res.pairs, res.unmatched_preds, res.unmatched_gts

See eval/README.md. Names resolve lazily, so `coordexp-client` registering the `eval` command
imports nothing heavy; COCO tools, matplotlib and the embedding model load inside the functions
that need them.
"""
from __future__ import annotations

from coordexp.lazy import lazy_exports

_EXPORTS = {
    "evaluate": "pipeline", "run_f1ish": "pipeline", "EVAL_SCHEMA_VERSION": "pipeline",
    "load_pairs": "io", "load_gt": "io", "attach_predictions": "io", "points_to_pixels": "io",
    "EvalObject": "io", "ImagePair": "io", "GroundTruth": "io",
    "match_image": "matching", "iou_matrix": "matching", "box_iou": "matching", "mask_iou": "matching",
    "greedy_match": "matching", "aggregate": "matching", "prf": "matching", "MatchPair": "matching",
    "MatchResult": "matching",
    "SemanticScorer": "semantic", "normalize_desc": "semantic",
    "format_summary": "report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
