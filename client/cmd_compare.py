"""`coordexp-client compare RUN_A RUN_B [RUN_C ...]`: deltas vs the first run with paired bootstrap
intervals, verdicts, per-image and per-object flips (exact McNemar), per-class deltas."""
from __future__ import annotations

import argparse
import json
import sys

from coordexp.client.cmd_runs import add_registry_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare registered test runs on the same GT (is the delta noise?)",
                       description="Every metric of B (C, ...) minus A with a paired bootstrap 95%% interval over "
                                   "images and a verdict; per-image flips (an image is right when its F1@0.5, full, "
                                   ">= --right-f1) and per-object flips with the exact McNemar test; per-class deltas.")
    p.add_argument("run_ids", type=int, nargs="+", metavar="RUN", help="registered run ids; the first is the reference")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (same seed, same intervals)")
    p.add_argument("--right-f1", type=float, default=1.0,
                   help="an image is right when its F1@0.5 (full) reaches this (default 1.0: all found, nothing extra)")
    p.add_argument("--topk", type=int, default=10, help="top improved / degraded classes and images to list")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of markdown")
    p.add_argument("--all", dest="all_metrics", action="store_true",
                   help="every metric in the table (default: the headline ones: F1, P, R @0.5 full, image accuracy, "
                        "AP, AP50)")
    p.add_argument("--md", metavar="FILE", help="also write the markdown report to FILE")
    add_registry_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordexp.runs.compare import CompareError, CompareOptions, compare_runs
    from coordexp.runs.registry import Registry
    from coordexp.runs.report import compare_markdown

    if args.bootstrap < 100:
        print("error: --bootstrap must be >= 100", file=sys.stderr)
        return 2
    opts = CompareOptions(bootstrap=args.bootstrap, seed=args.seed, right_f1=args.right_f1, topk=args.topk)
    try:
        with Registry(args.registry) as reg:
            rep = compare_runs(reg, args.run_ids, opts)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = compare_markdown(rep, all_metrics=args.all_metrics)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(md + "\n")
    print(json.dumps(rep, indent=1, ensure_ascii=False) if args.json else md)
    return 0
