"""`export/build_engine.py`'s arguments, resolved: the typed options every format takes (`BuildOptions`,
`OnnxOptions`), the formats table's row type (`ExportFormat`), the argument parser, and argv ->
BuildOptions with every value checked (`BuildError`, exit 2, names the flag and the problem). The
build itself (one small function per format) is `coordexp.export.build_engine`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from coordexp.generation import SERVED_MAX_NEW_TOKENS
from coordexp.prompt import PROMPT_OPTIONS, PromptSpec, add_prompt_options

RESERVED_NAMES = ("preprocess", "vision_encoder", "llm", "postprocess")
DEFAULT_VALIDATION_STEPS = 16
DEFAULT_MAX_NEW_TOKENS = SERVED_MAX_NEW_TOKENS  # the served token limit (coordexp.generation says why)


class BuildError(Exception):
    """A failure with a message meant for the user, and the exit status to use."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def sanitize_name(text: str) -> str:
    """A Triton-safe model name from a folder name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    if not name:
        name = "coordexp"
    if name in RESERVED_NAMES:
        name = f"{name}_model"
    return name


def _log(msg: str) -> None:
    print(f"[build_engine] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class OnnxOptions:
    """What only the ONNX format takes."""

    opset: int
    skip_validation: bool = False
    validation_steps: int = DEFAULT_VALIDATION_STEPS
    # decoding speed-ups of the llm steps; None: ServingOptions' defaults
    llm_batching: str | None = None
    prefix_cache: bool | None = None
    jump_forward: bool | None = None
    weights: str = "fp32"  # fp32 | int8 | int4 (the decoder's MatMul weights; export/onnx_quantize.py)
    validate_data: str | None = None  # labelled JSONL: accuracy parity (how a non-fp32 export is validated)


@dataclass(frozen=True)
class BuildOptions:
    """argv, resolved: what every format takes, plus the chosen format's own options
    (`onnx`: OnnxOptions, `trtllm`: coordexp.trtllm.plan.TrtllmOptions; the other is None)."""

    ckpt: str  # absolute
    repo: str
    name: str
    backend: str
    family: str
    max_batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    repetition_penalty: float = 1.0  # the served default (a request may send its own)
    onnx_dir: str | None = None
    streaming: bool = True
    threads: int | None = None
    dry_run: bool = False
    as_json: bool = False
    prompt: PromptSpec = PromptSpec()  # the prompt the repository serves
    prompt_choice: Any = None  # coordexp.training_record.PromptChoice: where `prompt` came from
    force: bool = False  # export even when current, replace even when served
    onnx: OnnxOptions | None = None
    trtllm: Any = None  # coordexp.trtllm.plan.TrtllmOptions
    torch: Any = None  # coordexp.export.torch_export.TorchExportOptions


@dataclass(frozen=True)
class ExportFormat:
    """One row of the formats table (Ultralytics' `export_formats()`)."""

    name: str
    backend: str  # the --backend value
    artifact: str
    device: str
    flags: tuple[str, ...]  # every flag it accepts besides --backend
    build: Callable[[BuildOptions, float], tuple[Any, list[str]]]


# --------------------------------------------------------------------------------------------- CLI
def build_parser(backends: Sequence[str], description: str) -> argparse.ArgumentParser:
    """Format-specific flags default to None, so a given one is told from an absent one; their
    defaults are applied in `resolve_options`. `backends`: the formats table's --backend values."""
    p = argparse.ArgumentParser(prog="build_engine", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint folder (Qwen3-VL CoordExp fine-tune)")
    p.add_argument("--repo", default=None,
                   help="repository folder to write (default model_repository/<checkpoint folder name>)")
    p.add_argument("--name", default="coordexp",
                   help="served (ensemble) model name; the client's --model default is 'coordexp'")
    p.add_argument("--backend", choices=list(backends), default="onnx")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", "--max-output-len", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   dest="max_new_tokens", help="the served token limit, and the default of a request that sends "
                   f"none (default {DEFAULT_MAX_NEW_TOKENS}: about 20 tokens per box, CoordExp runs up to 60 objects)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="served default repetition penalty of a request that sends none (CoordExp's inference "
                        "configs use 1.05-1.1; default 1.0)")
    p.add_argument("--onnx-dir", default=None, help="also keep the ONNX export in this folder")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="no streaming ensemble (<name>_stream, decoupled llm_stream): saves the second decoder "
                        "session's memory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch / ONNX Runtime")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan only (trtllm: "
                   "also write the whole repository and print every command, without TensorRT-LLM)")
    p.add_argument("--force", action="store_true", default=None,
                   help="export even when the repository is current, and replace it even while a coordexp-server "
                        "serves it (that server keeps the old model until restarted)")
    pg = p.add_argument_group(
        "prompt the repository serves (default: the training run's record, resolved_config.json beside the "
        "checkpoint or in its parent folder; these flags override single values)")
    pg.add_argument("--run-config", default=None, metavar="PATH",
                    help="the training run's resolved_config.json (or its folder), when it is not beside the "
                         "checkpoint or in its parent")
    pg.add_argument("--builtin-prompt", action="store_true", default=None,
                    help="serve this project's built-in prompt (only for checkpoints trained on it: tiny ones)")
    pg.add_argument("--expect-prompt-hash", default=None, metavar="HASH|FILE",
                    help="refuse unless the served prompt has this CoordExp prompt_template_hash (a hex string, or "
                         "a CoordExp inference run's resolved_config.json / summary.json)")
    add_prompt_options(pg)
    o = p.add_argument_group("ONNX (--backend onnx)")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    o.add_argument("--skip-validation", action="store_true", default=None,
                   help="do not compare with the torch checkpoint")
    o.add_argument("--validation-steps", type=int, default=None,
                   help=f"greedy steps compared during validation (default {DEFAULT_VALIDATION_STEPS})")
    o.add_argument("--weights", choices=("fp32", "int8", "int4"), default=None,
                   help="the decoder's MatMul weights: fp32 (default; validated token for token) or int8 / int4 "
                        "(ONNX Runtime's weight-only MatMulNBits; validated by accuracy parity on --validate-data)")
    o.add_argument("--validate-data", default=None, metavar="JSONL",
                   help="labelled records for accuracy parity (required with --weights int8|int4)")
    from coordexp.export.repository import ServingOptions

    d = ServingOptions()
    o.add_argument("--llm-batching", choices=("inflight", "static"), default=None,
                   help="the llm steps' scheduler: inflight (iteration-level) or static batches (default "
                        f"{d.llm_batching}; onnx and torch, where torch's static KV cache / --compile run static "
                        "batches only: rows cannot join fixed shapes)")
    o.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the shared prompt prefix's KV once per loaded model (default "
                        f"{'on' if d.prefix_cache else 'off'}; onnx, and torch in flight: its static batches run "
                        "fixed shapes from position 0)")
    o.add_argument("--jump-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="guided decoding appends grammar-forced tokens without a sampling step (default "
                        f"{'on' if d.jump_forward else 'off'}; onnx and torch, not with --compile: its step is "
                        "compiled for one new position)")
    pt = p.add_argument_group("PyTorch (--backend torch)")
    pt.add_argument("--device", default=None, help="cuda (default) or cpu")
    pt.add_argument("--kv-cache", choices=("dynamic", "static"), default=None,
                    help="KV cache of the decode loop (default dynamic; static: preallocated, batch padded to buckets)")
    pt.add_argument("--compile", action="store_true", default=None,
                    help="torch.compile the decode step (implies --kv-cache static; batch padded to buckets so graphs are reused)")
    t = p.add_argument_group("TensorRT-LLM (--backend trtllm)")
    t.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp8"), default=None,
                   help="model dtype (default bf16). torch: fp32|bf16|fp16; trtllm: bf16|fp16|fp8 (fp8 = FP8 KV cache "
                        "+ FP8 weights of an already quantized checkpoint)")
    t.add_argument("--max-input-len", type=int, default=None,
                   help="max prompt tokens (default: prompt + largest image)")
    t.add_argument("--kv-cache-fraction", type=float, default=None,
                   help="KV cache share of free GPU memory (default 0.8)")
    t.add_argument("--tp-size", type=int, default=None, help="tensor parallel size (default 1)")
    t.add_argument("--trtllm-vision", choices=("trtllm", "tensorrt"), default=None,
                   help="who runs the vision tower: TensorRT-LLM itself (default), or a TensorRT engine built from "
                        "our ONNX")
    t.add_argument("--vision-max-patches", type=int, default=None, help="vision engine profile max (patches)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def flag_dests(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every flag (its first option string) -> its namespace attribute."""
    return {a.option_strings[0]: a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def _family(ckpt: str, fmt: ExportFormat) -> str:
    from coordexp.families import UnsupportedFamily, family_spec

    try:
        config = json.loads(Path(ckpt, "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{ckpt}/config.json is unreadable: {e}", 2) from e
    try:
        return family_spec(config.get("model_type"), where=ckpt, what=f"{fmt.name} export").name
    except UnsupportedFamily as e:
        raise BuildError(str(e), 2) from e


def _trtllm_options(args: argparse.Namespace) -> Any:
    from coordexp.trtllm.plan import TrtllmOptions

    d = TrtllmOptions()
    pick = (lambda v, default: default if v is None else v)
    return TrtllmOptions(dtype=pick(args.dtype, d.dtype), max_batch_size=args.max_batch_size,
                         max_input_len=args.max_input_len, max_new_tokens=args.max_new_tokens,
                         kv_cache_fraction=pick(args.kv_cache_fraction, d.kv_cache_fraction),
                         tp_size=pick(args.tp_size, d.tp_size), vision=pick(args.trtllm_vision, d.vision),
                         vision_max_patches=args.vision_max_patches, streaming=args.stream)


def _torch_options(args: argparse.Namespace) -> Any:
    from coordexp.export.torch_export import TorchExportOptions
    from coordexp.serving.torch_parts import TorchOptions

    if args.dtype == "fp8":
        raise BuildError("--dtype fp8 applies to --backend trtllm only (torch: fp32, bf16, fp16)", 2)
    try:
        # --compile implies the static cache (fixed shapes per batch bucket)
        parts = TorchOptions(device=args.device or "cuda", dtype=args.dtype or "bf16",
                             cache=args.kv_cache or ("static" if args.compile else "dynamic"),
                             compile=bool(args.compile))
    except ValueError as e:
        raise BuildError(str(e), 2) from e
    if parts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BuildError("--device cuda: no CUDA device is visible to torch here (use --device cpu)", 2)
    fixed = parts.cache == "static"  # fixed shapes per batch bucket: rows cannot join, no chunks under compile
    if fixed and args.llm_batching == "inflight":
        raise BuildError("--llm-batching inflight needs the dynamic KV cache: with --kv-cache static or --compile "
                         "the batch has fixed shapes that rows cannot join (use --llm-batching static)", 2)
    if parts.compile and args.jump_forward:
        raise BuildError("--jump-forward does not work with --compile: the compiled step takes one new position", 2)
    batching = args.llm_batching or ("static" if fixed else "inflight")
    if args.prefix_cache and batching != "inflight":
        raise BuildError("--prefix-cache with --backend torch needs --llm-batching inflight: a static batch runs "
                         "fixed shapes from position 0, as transformers' generate does", 2)
    return TorchExportOptions(parts=parts, skip_validation=bool(args.skip_validation),
                              validation_steps=args.validation_steps or DEFAULT_VALIDATION_STEPS,
                              llm_batching=batching,
                              jump_forward=(not parts.compile) if args.jump_forward is None else args.jump_forward,
                              prefix_cache=(batching == "inflight") if args.prefix_cache is None else args.prefix_cache)


def resolve_options(args: argparse.Namespace, fmt: ExportFormat) -> BuildOptions:
    """argv (checked by `check_flags`) -> BuildOptions; BuildError (exit 2) for a bad checkpoint or value."""
    from coordexp.checkpoint import checkpoint_error

    err = checkpoint_error(args.ckpt)
    if err:
        raise BuildError(err, 2)
    ckpt = os.path.abspath(args.ckpt)
    if args.max_batch_size < 1:
        raise BuildError(f"--max-batch-size must be >= 1, got {args.max_batch_size}", 2)
    if args.max_new_tokens < 1:
        raise BuildError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}", 2)
    if not args.repetition_penalty > 0:
        raise BuildError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}", 2)
    family = _family(ckpt, fmt)
    choice = _prompt_choice(args, ckpt)
    onnx = trtllm = torch = None
    if fmt.backend == "onnx":
        from coordexp.export.onnx_export import DEFAULT_OPSET

        onnx = OnnxOptions(opset=args.opset or DEFAULT_OPSET, skip_validation=bool(args.skip_validation),
                           validation_steps=args.validation_steps or DEFAULT_VALIDATION_STEPS,
                           llm_batching=args.llm_batching, prefix_cache=args.prefix_cache,
                           jump_forward=args.jump_forward, weights=args.weights or "fp32",
                           validate_data=args.validate_data)
        if onnx.weights != "fp32" and not (onnx.validate_data or onnx.skip_validation):
            raise BuildError(f"--weights {onnx.weights}: the answers are not bit-identical to the checkpoint's, so the "
                             "export is validated by accuracy parity: give --validate-data LABELLED.jsonl (e.g. "
                             "data/demo_val/val.jsonl for the demo), or --skip-validation", 2)
        if onnx.validate_data and not os.path.isfile(onnx.validate_data):
            raise BuildError(f"--validate-data {onnx.validate_data}: no such file", 2)
    elif fmt.backend == "torch":
        torch = _torch_options(args)
    else:
        if args.dtype == "fp32":
            raise BuildError("--dtype fp32 applies to --backend torch only (trtllm: bf16, fp16, fp8)", 2)
        trtllm = _trtllm_options(args)
    return BuildOptions(
        ckpt=ckpt, repo=args.repo or os.path.join("model_repository", sanitize_name(os.path.basename(ckpt))),
        name=sanitize_name(args.name or "coordexp"), backend=fmt.backend, family=family,
        max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens, onnx_dir=args.onnx_dir,
        streaming=args.stream, threads=args.threads, dry_run=args.dry_run, as_json=args.json,
        prompt=choice.prompt, prompt_choice=choice, repetition_penalty=args.repetition_penalty,
        force=bool(args.force), onnx=onnx, trtllm=trtllm, torch=torch)


def _prompt_choice(args: argparse.Namespace, ckpt: str) -> Any:
    """The served prompt: the training record's (`checkpoint_prompt`) with the flags on top, checked
    against --expect-prompt-hash; BuildError (exit 2) naming the file, key or flag."""
    from coordexp.training_record import TrainingRecordError, checkpoint_prompt, expected_prompt_hash

    for o in PROMPT_OPTIONS:
        value = getattr(args, o.dest, None)
        if o.choices is None and value is not None and not value.strip():
            raise BuildError(f"{o.flag} is empty: give the text, or leave the flag out", 2)
    try:
        choice = checkpoint_prompt(ckpt, vars(args), run_config=args.run_config, builtin=bool(args.builtin_prompt))
        want = expected_prompt_hash(args.expect_prompt_hash) if args.expect_prompt_hash else None
    except (TrainingRecordError, ValueError) as e:
        raise BuildError(str(e), 2) from e
    have = choice.prompt.template_hash()
    if want is not None and want != have:
        raise BuildError(f"--expect-prompt-hash: the prompt to serve (from {choice.describe()}) has "
                         f"prompt_template_hash {have}, expected {want}: not the prompt that run used", 2)
    for flag in choice.overrides:
        _log(f"note: {flag} replaces the training record's value ({choice.record.path})")
    return choice
