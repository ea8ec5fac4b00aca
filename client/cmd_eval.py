"""`coordexp-client eval`: COCO + F1-ish metrics from the prediction artifact (a thin adapter over
`coordexp.eval.pipeline.evaluate`)."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="COCO AP/AR + F1-ish matching of a prediction artifact against the GT",
        description="Evaluate predictions.jsonl against the input JSONL (or a COCO json). Reads the "
                    "prediction artifact only; writes metrics.json, per_image.json, per_class.csv, "
                    "coco_gt.json, coco_preds.json, matches*.jsonl and plots into --out.",
    )
    p.add_argument("--pred", required=True,
                   help="predictions.jsonl (the prediction artifact), or a gt_vs_pred[_scored].jsonl alone")
    p.add_argument("--gt", default=None,
                   help="GT: the input JSONL (norm/coord/pixel) or a COCO instances json; not needed when --pred "
                        "is a gt_vs_pred.jsonl / gt_vs_pred_scored.jsonl (ours or CoordExp's: GT inside)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--metrics", choices=["coco", "f1ish", "both", "lvis"], default="both",
                   help="lvis: federated LVIS AP on LVISEval (records need metadata.lvis; 300 dets per image)")
    p.add_argument("--reparse", action="store_true",
                   help="re-parse every line's raw_output with the shared parser (default: only lines without preds)")
    p.add_argument("--bbox-format", choices=["xyxy", "cxcywh", "cxcy_logw_logh"], default=None,
                   help="how the model wrote bbox_2d, for prediction lines that do not say (ours carry bbox_format, "
                        "their points already decoded; a line that says otherwise is an error)")
    p.add_argument("--complete-only", action="store_true",
                   help="leave out images whose answer the token limit cut (finish_reason length); by default they "
                        "count, with a warning saying how many")
    p.add_argument("--iou-thrs", default="0.3,0.5", help="F1-ish IoU thresholds, comma separated (0.5 is primary)")
    p.add_argument("--desc-match", choices=["exact", "semantic"], default=None,
                   help="how a matched desc counts as right in the headline 'full' F1 and how pred descs map to "
                        "COCO categories: exact (normalised labels; default) or semantic (also MiniLM cosine >= "
                        "--semantic-thr; the default with --compat coordexp, upstream's rule). Both F1 figures are "
                        "reported either way (full_exact, full_semantic)")
    p.add_argument("--no-semantic", action="store_true",
                   help="no embedding model at all: compare descs as exact/normalised strings only "
                        "(no semantic F1 figure)")
    p.add_argument("--allow-partial", action="store_true",
                   help="silence the warning for GT images without a prediction line (a partial run); they "
                        "are still scored as misses and recorded in metrics.json `partial`")
    p.add_argument("--semantic-thr", type=float, default=0.6, help="embedding cosine threshold (default 0.6)")
    p.add_argument("--gt-coord-mode", choices=["norm1000", "qwen3_rel1000", "pixel"], default=None,
                   help="coordinate mode of the GT JSONL (default: each record's coord_mode, else norm1000)")
    p.add_argument("--coco-backend", choices=["faster-coco-eval", "pycocotools"], default="faster-coco-eval",
                   help="COCO evaluator (same numbers; faster-coco-eval is several times faster)")
    p.add_argument("--compat", choices=["ours", "coordexp"], default="ours",
                   help="conventions: ours (default: exact pixels, every pred counts) or coordexp (CoordExp's own "
                        "evaluator: integer pixels, degenerate boxes dropped, images without GT left out, "
                        "F1-ish scope 'annotated'; see eval/README.md)")
    p.add_argument("--no-plots", action="store_true", help="skip pr_curve.png and per_class_ap.png")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    from coordexp.client.cmd_runs import add_register_args

    add_register_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from coordexp.schema import ContractError

    from coordexp.eval.pipeline import evaluate, parse_thresholds
    from coordexp.eval.report import format_summary

    try:
        thrs = parse_thresholds(args.iou_thrs)
        m = evaluate(args.pred, args.gt, args.out, metrics=args.metrics, iou_thrs=thrs, reparse=args.reparse,
                     semantic=not args.no_semantic, semantic_thr=args.semantic_thr,
                     coco_backend=args.coco_backend, gt_coord_mode=args.gt_coord_mode, plots=not args.no_plots,
                     compat=args.compat, desc_match=args.desc_match, allow_partial=args.allow_partial,
                     bbox_format=args.bbox_format, complete_only=args.complete_only)
    except (OSError, ValueError, ContractError, RuntimeError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_summary(m))
        print(f"artifacts in {args.out}")
    if not args.no_register:  # the registry records the scored run (a test run)
        from coordexp.client.cmd_runs import register_options
        from coordexp.runs.register import register_run

        register_run(args.pred, register_options(args), gt_path=args.gt, eval_dir=args.out, quiet=args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coordexp-eval")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
