"""`coordexp-client vis`: GT vs prediction overlays and an HTML gallery from the prediction artifact (a thin
adapter over `coordexp.vis.render.visualize`)."""
from __future__ import annotations

import argparse
import sys

from coordexp.vis.render import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "vis",
        help="GT vs prediction overlays + an HTML gallery (worst images first)",
        description="Render side-by-side overlays (left GT, right prediction) of a prediction artifact and "
                    "write DIR/index.html, sorted worst F1 first. Reads predictions.jsonl and the GT JSONL "
                    "only; images are found relative to the GT file's folder. Matched objects are drawn "
                    "solid, unmatched ones dashed with an FP/FN badge, a matched box with the wrong desc "
                    "gets a ≠ badge.",
    )
    p.add_argument("--pred", required=True, help="predictions.jsonl (the prediction artifact)")
    p.add_argument("--gt", default=None, help="GT: the input JSONL (or a COCO instances json); not needed when "
                   "--pred is a gt_vs_pred.jsonl (ours or CoordExp's: GT inside)")
    p.add_argument("--out", required=True, help="output folder (index.html, index.json, overlays/)")
    p.add_argument("--limit", type=int, default=None, help="render at most N images (the N worst)")
    p.add_argument("--only-errors", action="store_true", help="only images with an FP, an FN or an error")
    p.add_argument("--iou", type=float, default=0.5, help="IoU threshold of a match (default 0.5)")
    p.add_argument("--matches", default=None,
                   help="matches.jsonl written by `coordexp-client eval` (default: match here at --iou)")
    p.add_argument("--desc-match", choices=["exact", "semantic"], default=None,
                   help="how a matched desc counts as right, as in eval: exact (normalised labels; default, "
                        "eval's default) or semantic (MiniLM cosine >= 0.6); ignored with --matches")
    p.add_argument("--semantic", action="store_true", help="the same as --desc-match semantic")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the GT's)")
    p.add_argument("--gt-coord-mode", choices=["norm1000", "qwen3_rel1000", "pixel"], default=None)
    p.add_argument("--bbox-format", choices=["xyxy", "cxcywh", "cxcy_logw_logh"], default=None,
                   help="how the model wrote bbox_2d, for prediction lines that do not say (as eval's)")
    p.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                   help=f"upscale panels to this shorter side (default {DEFAULT_MIN_SIZE})")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                   help=f"downscale panels to this longer side (default {DEFAULT_MAX_SIZE})")
    p.add_argument("--title", default=None, help="gallery title")
    from coordexp.client.cmd_runs import add_register_args

    add_register_args(p)  # the run's registry entry notes where its gallery is
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from coordexp.schema import ContractError

    from coordexp.vis.render import visualize

    try:
        index = visualize(args.pred, args.gt, args.out, iou=args.iou, matches_path=args.matches, limit=args.limit,
                          only_errors=args.only_errors, semantic=args.semantic, image_root=args.image_root,
                          gt_coord_mode=args.gt_coord_mode, min_size=args.min_size, max_size=args.max_size,
                          title=args.title, desc_match=args.desc_match, bbox_format=args.bbox_format)
    except (OSError, ValueError, ContractError) as e:
        print(f"vis: error: {e}", file=sys.stderr)
        return 2
    c = index["counts"]
    print(f"vis: {c['rendered']} of {c['images']} images rendered "
          f"({c['images_with_fp_or_fn']} with FP/FN, {c['images_with_errors']} with errors); "
          f"gallery: {args.out.rstrip('/')}/index.html")
    from coordexp.client.cmd_runs import register_options
    from coordexp.runs.register import record_vis

    record_vis(args.pred, args.out, register_options(args))
    return 0
