"""Argument groups shared by the subcommands (decoding, prompt, model source)."""
from __future__ import annotations

import argparse

from coordexp.generation import GenerationParams
from coordexp.prompt import PromptSpec, add_prompt_options, prompt_from_options


DEFAULT_MAX_NEW_TOKENS = 256


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS} locally; a server's export default remotely")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (benchmarks)")
    g.add_argument("--guided", action="store_true", help="constrain decoding to valid CoordJSON")


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    max_new = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    return GenerationParams(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            ignore_eos=args.ignore_eos, guided=args.guided)


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    add_prompt_options(p.add_argument_group("prompt"))  # the flags the exporter takes too


def prompt_from_args(args: argparse.Namespace, base: PromptSpec | None = None) -> PromptSpec:
    return prompt_from_options(vars(args), base)


def prompt_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """The prompt options given on the command line (a served model's prompt is fixed at export)."""
    return {"coord_format": getattr(args, "coord_format", None), "field_order": getattr(args, "field_order", None),
            "object_order": getattr(args, "object_order", None), "system_prompt": getattr(args, "system_prompt", None)}


def add_local_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("local model (instead of a server)")
    g.add_argument("--local", metavar="CKPT", help="a checkpoint folder (torch) or an exported model repository/onnx folder")
    g.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the local engine")
