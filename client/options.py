"""Argument groups shared by the subcommands (decoding, prompt, model source)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from coordexp.generation import GenerationParams
from coordexp.prompt import PromptSpec, add_prompt_options, prompt_from_options


DEFAULT_MAX_NEW_TOKENS = 256


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS} locally; a server's export default remotely")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="default: 1.0 locally; a server's export default remotely")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (benchmarks)")
    g.add_argument("--guided", action="store_true", help="constrain decoding to valid CoordJSON")


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    max_new = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    penalty = args.repetition_penalty if args.repetition_penalty is not None else 1.0
    return GenerationParams(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=penalty, seed=args.seed,
                            ignore_eos=args.ignore_eos, guided=args.guided)


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    add_prompt_options(p.add_argument_group("prompt"))  # the flags the exporter takes too


def prompt_from_args(args: argparse.Namespace, base: PromptSpec | None = None) -> PromptSpec:
    return prompt_from_options(vars(args), base)


def prompt_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """The prompt options given on the command line (a served model's prompt is fixed at export)."""
    return {"coord_format": getattr(args, "coord_format", None), "field_order": getattr(args, "field_order", None),
            "object_order": getattr(args, "object_order", None), "system_prompt": getattr(args, "system_prompt", None),
            "bbox_format": getattr(args, "bbox_format", None), "layout": getattr(args, "layout", None)}


def add_openai_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("an OpenAI-compatible server (ours, coordexp-server --openai-port, or a peer's)")
    g.add_argument("--openai-url", default=None, metavar="URL",
                   help="its base URL, e.g. http://127.0.0.1:9000/v1 (with or without /v1)")
    g.add_argument("--openai-model", default=None, help="the model name to send (default: the server's first)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="Bearer key of the server (default: $OPENAI_API_KEY)")


def openai_prompt(args: argparse.Namespace) -> tuple[PromptSpec | None, Any]:
    """(the whole prompt to send, or None; the prompt parts to send) for --openai-url. Our server answers
    with its exported prompt (--prompt / --message-layout set single parts of it); another server needs the
    whole prompt: --run-config (a training record), --builtin-prompt, or --system-prompt (+ the other
    prompt flags). ValueError (TrainingRecordError) for a bad record."""
    from coordexp.generation import RequestPrompt
    from coordexp.training_record import checkpoint_prompt

    flags = vars(args)
    path = getattr(args, "run_config", None)
    if path or getattr(args, "builtin_prompt", False):
        folder = os.path.dirname(os.path.abspath(path)) if path else "."
        return checkpoint_prompt(folder, flags, run_config=path, builtin=not path).prompt, RequestPrompt()
    if getattr(args, "system_prompt", None):
        return prompt_from_options(flags), RequestPrompt()
    return None, RequestPrompt(getattr(args, "user_text", None), None, getattr(args, "layout", None))


def openai_engine(args: argparse.Namespace, **kwargs):
    """The OpenAIEngine of --openai-url (the prompt: `openai_prompt`)."""
    from coordexp.engines.openai_client import OpenAIEngine, OpenAIServerError

    try:
        full, parts = openai_prompt(args)
    except ValueError as e:
        raise OpenAIServerError(str(e)) from None
    return OpenAIEngine.connect(args.openai_url, args.openai_model, args.api_key, timeout=args.timeout,
                                prompt=full, parts=parts, max_in_flight=getattr(args, "concurrency", None), **kwargs)


def add_local_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("local model (instead of a server)")
    g.add_argument("--local", metavar="CKPT", help="a checkpoint folder (torch) or an exported model repository/onnx folder")
    g.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the local engine")
    add_prompt_source_args(g)


def add_prompt_source_args(g: Any) -> None:
    """Where the prompt comes from when nothing served says it: a local checkpoint, another OpenAI server."""
    g.add_argument("--run-config", default=None, metavar="PATH",
                   help="a training run's resolved_config.json: its prompt (for --local: default the one beside "
                        "the checkpoint or in its parent folder; for --openai-url: sent in full)")
    g.add_argument("--builtin-prompt", action="store_true",
                   help="this project's built-in prompt (a local checkpoint without a training record; an OpenAI "
                        "server that is not ours)")


def local_engine(args: argparse.Namespace, **kwargs):
    """The in-process engine of --local/--engine, with the prompt its checkpoint was trained with (the
    prompt flags on top): `coordexp.engines.load_engine`."""
    from coordexp.engines import load_engine

    return load_engine(args.engine, args.local, prompt_flags=vars(args), run_config=getattr(args, "run_config", None),
                       builtin_prompt=bool(getattr(args, "builtin_prompt", False)), device=args.device,
                       threads=args.threads, **kwargs)
