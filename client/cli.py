"""`coordexp-client`: one entry point, one module per subcommand.

Each module in COMMANDS exposes `register(subparsers)`, which adds its subparser and sets
`func(args) -> int` as the handler. Keeping commands in their own modules keeps start-up light
(heavy imports such as torch happen inside the handlers) and the wiring visible here.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    ("parse", "coordexp.client.cmd_parse"),  # model text -> parsed preds (debugging)
    ("infer", "coordexp.client.cmd_infer"),  # dataset run: local torch/onnx engine or Triton
    ("ask", "coordexp.client.cmd_ask"),  # single-shot and interactive
    ("models", "coordexp.client.cmd_models"),  # what a server holds
    ("bench", "coordexp.client.cmd_bench"),  # throughput / latency sweep
    ("parity", "coordexp.client.cmd_parity"),  # torch vs onnx vs served
    ("eval", "coordexp.client.cmd_eval"),  # COCO + F1-ish metrics from the artifact
    ("vis", "coordexp.client.cmd_vis"),  # GT vs pred overlays + gallery
    ("pipeline", "coordexp.client.cmd_pipeline"),  # infer -> eval + vis from one YAML
    ("group", "coordexp.client.cmd_group"),  # Stage-A: one record per image group of mission folders
    ("make-data", "coordexp.fixtures.synthetic"),  # synthetic shapes dataset
    ("runs", "coordexp.client.cmd_runs"),  # the run registry: list, show, import, delete, export
    ("compare", "coordexp.client.cmd_compare"),  # registered runs vs a reference, with intervals
    ("ui", "coordexp.client.cmd_ui"),  # the web viewer over the registry
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordexp-client",
        description="Run CoordExp grounding models on datasets (Triton or local), evaluate and visualise.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # command not built yet in this checkout
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from coordexp.runner import stop_on_sigterm

    try:
        with stop_on_sigterm():  # SIGTERM stops a command as Ctrl-C does: prefixes written, summaries honest
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `coordexp-client runs list | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
