"""Build a servable engine from a CoordExp checkpoint: export, validate, write the Triton repository.

    python export/build_engine.py --ckpt CKPT [--repo model_repository/NAME] [--name NAME]
        [--backend onnx|torch|trtllm] [--max-batch-size 8] [--max-new-tokens 2048] [--repetition-penalty 1.0]
        [--dry-run]
        prompt:      [--run-config resolved_config.json] [--builtin-prompt] [--expect-prompt-hash HASH|FILE]
                     [--coord-format tokens|numeric] [--field-order desc_first|geometry_first]
                     [--object-order sorted|as_given|random] [--bbox-format xyxy|cxcywh|cxcy_logw_logh]
                     [--message-layout image_first|text_first] [--prompt USER_TEXT] [--system-prompt TEXT]
        onnx, torch: [--force]
        onnx only:   [--opset N] [--skip-validation] [--validation-steps 16] [--llm-batching inflight|static]
                     [--prefix-cache|--no-prefix-cache] [--jump-forward|--no-jump-forward]
        torch only:  [--device cuda|cpu] [--dtype fp32|bf16|fp16] [--kv-cache dynamic|static] [--compile]
                     [--skip-validation] [--validation-steps 16]   (see export/torch_export.py)
        trtllm only: [--dtype bf16|fp16|fp8] [--max-input-len N] [--kv-cache-fraction 0.8] [--tp-size 1]
                     [--trtllm-vision trtllm|tensorrt] [--vision-max-patches N]   (see coordexp/trtllm/)
    python -m coordexp.export.build_engine ...        (the same)

Ultralytics-export style: one table of formats (`FORMATS`: name, `--backend` value, artifact,
device, the flags it accepts) and one small function per format (`export_onnx_format`,
`export_trtllm_format`), each taking the typed `BuildOptions` argv is parsed into and returning a
dict with what it made. A flag given for a format it does not apply to is an error (exit 2). The
ONNX path exports the three graphs (`coordexp.export.onnx_export`), validates them against the
torch checkpoint (`coordexp.export.validate`: greedy tokens must be identical) and hands the folder
to `coordexp.export.repository.write_repository`, which lays out the Triton repository.

The served prompt is the one the checkpoint was trained with: its training run's record
(`resolved_config.json` beside the weights or in the run folder above them, or `--run-config`), read by
`coordexp.training_record.checkpoint_prompt`: the recorded system and user texts verbatim, image part
first, the recorded controls (coord format, field order, ordering, bbox format) and image budget. The
prompt flags (the client's, `coordexp.prompt.PROMPT_OPTIONS`) override single values and are named in
the log and the manifest. A checkpoint without a record and without prompt flags is refused (exit 2)
unless `--builtin-prompt`. The manifest records the texts, the controls, where they came from and
CoordExp's `prompt_template_hash` (`--expect-prompt-hash` checks it). Validation encodes its probes
with the served prompt. A repository that is already current
(`coordexp.export.repository.repository_current`: same checkpoint digest, options, prompt, library
versions) is not exported again, and one that a running coordexp-server serves is not replaced;
`--force` does both anyway. Every build (or skip) ends by printing the command that serves it.

Exit status: 0 done (or already current), 1 export or validation failed, 2 bad arguments / checkpoint /
unsupported model / a repository that a running server serves.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _files(root: str | os.PathLike) -> list[tuple[str, int]]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


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


# ------------------------------------------------------------------------------------------ formats
def export_onnx_format(opts: BuildOptions) -> dict[str, Any]:
    """Export to ONNX (into `opts.onnx_dir` or a temporary folder beside the repository) and
    validate unless skipped. Returns {onnx_dir, meta, validation, temporary, seconds}."""
    from coordexp.export.onnx_export import export_onnx

    t0 = time.perf_counter()
    temporary = not opts.onnx_dir
    if temporary:
        parent = os.path.dirname(os.path.abspath(opts.repo)) or "."
        os.makedirs(parent, exist_ok=True)
        onnx_dir = tempfile.mkdtemp(prefix=f".{opts.name}.onnx-", dir=parent)
        os.chmod(onnx_dir, 0o755)  # it may be moved into the repository as is; servers run as other users
    else:
        onnx_dir = os.path.abspath(opts.onnx_dir)
    try:
        try:
            meta = export_onnx(opts.ckpt, onnx_dir, opset=opts.onnx.opset, log=_log)
        except NotImplementedError as e:
            raise BuildError(str(e), 2) from e
        except (FileNotFoundError, OSError, ValueError) as e:
            raise BuildError(f"cannot export {opts.ckpt}: {e}", 2) from e
        except Exception as e:  # noqa: BLE001 - exporter failures are reported, not dumped
            raise BuildError(f"ONNX export failed: {type(e).__name__}: {e}", 1) from e
        from coordexp.export.onnx_quantize import quantize_export

        if opts.onnx.weights != "fp32":
            _log(f"quantizing the decoder's weights to {opts.onnx.weights} (ONNX Runtime MatMulNBits)")
        quantization = quantize_export(onnx_dir, opts.onnx.weights, log=_log)
        validation = None if opts.onnx.skip_validation else _validate(opts, onnx_dir)
    except BaseException:
        if temporary:
            shutil.rmtree(onnx_dir, ignore_errors=True)
        raise
    return {"onnx_dir": onnx_dir, "meta": meta, "validation": validation, "temporary": temporary,
            "quantization": quantization, "seconds": round(time.perf_counter() - t0, 2)}


def _validate(opts: BuildOptions, onnx_dir: str) -> dict[str, Any]:
    """fp32: token parity on probes; reduced weights: accuracy parity on --validate-data."""
    from coordexp.export.validate import ExportValidationError, validate_accuracy, validate_export

    if opts.onnx.weights != "fp32":
        _log(f"validating by accuracy parity against the torch checkpoint on {opts.onnx.validate_data} "
             f"({opts.onnx.weights} weights are not bit-identical, so tokens are not compared)")
        try:
            report = validate_accuracy(onnx_dir, opts.ckpt, opts.onnx.validate_data, prompt=opts.prompt,
                                       max_new_tokens=opts.max_new_tokens, threads=opts.threads, log=_log)
        except ExportValidationError as e:
            raise BuildError(f"validation failed: {e}", 1) from e
        if report["verdict"] != "equivalent":
            _log(f"warning: accuracy parity is {report['verdict']}: {report['why']}")
        return report
    _log("validating against the torch checkpoint")
    try:
        return validate_export(onnx_dir, opts.ckpt, steps=opts.onnx.validation_steps, threads=opts.threads,
                               prompt=opts.prompt, log=_log)
    except ExportValidationError as e:
        raise BuildError(f"validation failed: {e}", 1) from e


def export_trtllm_format(opts: BuildOptions) -> dict[str, Any]:
    """TensorRT-LLM repository (LLM API, PyTorch backend): `coordexp.export.trtllm_export.export_trtllm`.
    With --dry-run it needs no TensorRT-LLM; without, it raises NotImplementedError (exit 2) when
    tensorrt_llm is not importable."""
    from coordexp.export.trtllm_export import export_trtllm

    return export_trtllm(opts.ckpt, opts.name, opts.repo, opts.trtllm, onnx_dir=opts.onnx_dir, dry_run=opts.dry_run,
                         prompt=opts.prompt, decoding=decoding_defaults(opts), prompt_source=prompt_source(opts))


def serving_options(opts: BuildOptions) -> Any:
    """The repository's ServingOptions: streaming, and (onnx) the decoding flags given."""
    from coordexp.export.repository import ServingOptions

    given = {}
    if opts.onnx is not None:
        given = {k: getattr(opts.onnx, k) for k in ("llm_batching", "prefix_cache", "jump_forward")
                 if getattr(opts.onnx, k) is not None}
    return ServingOptions(streaming=opts.streaming, **given)


def decoding_defaults(opts: BuildOptions) -> Any:
    """What a request that sends no decoding parameters gets: the served limit, the repetition penalty."""
    from coordexp.generation import GenerationParams

    return GenerationParams(max_new_tokens=opts.max_new_tokens, repetition_penalty=opts.repetition_penalty)


def prompt_source(opts: BuildOptions) -> dict[str, Any] | None:
    """The manifest's `prompt_source`: where the prompt came from, its hash, the image budget."""
    return opts.prompt_choice.to_manifest() if opts.prompt_choice is not None else None


def write_repo(opts: BuildOptions, result: dict[str, Any]) -> dict[str, Any]:
    """Hand the ONNX export to the repository writer (a temporary ONNX folder is moved, not copied)."""
    from coordexp.export.repository import RepositoryServed, write_repository

    try:
        repo = write_repository(opts.repo, opts.name, result["onnx_dir"], opts.ckpt, max_batch_size=opts.max_batch_size,
                                max_new_tokens=opts.max_new_tokens, prompt=opts.prompt, backend=opts.backend,
                                validation=result.get("validation"), options=serving_options(opts),
                                replace_served=opts.force, decoding=decoding_defaults(opts),
                                prompt_source=prompt_source(opts), move_onnx=bool(result["temporary"]))
    except RepositoryServed as e:  # a server started on it during the export
        raise BuildError(str(e), 2) from e
    finally:
        if result["temporary"]:
            shutil.rmtree(result["onnx_dir"], ignore_errors=True)
    return {"repo": repo}


def summary_lines(opts: BuildOptions, result: dict[str, Any], written: dict[str, Any], seconds: float) -> list[str]:
    lines = [f"checkpoint : {opts.ckpt}", f"backend    : {opts.backend} (opset {opts.onnx.opset})",
             f"name       : {opts.name}", *prompt_lines(opts)]
    root = written["repo"]
    lines.append(f"written    : {root}")
    files = _files(root) if root else []
    total = sum(s for _, s in files)
    lines.append(f"files      : {len(files)}, {_human(total)}")
    for f, s in files:
        if f.endswith((".onnx", ".data", ".json", ".pbtxt")):
            lines.append(f"  {f:<48} {_human(s):>10}")
    v = result.get("validation")
    if v and v.get("kind") == "accuracy":
        lines.append(f"validation : accuracy parity on {v['records']} records of {v['data']}: {v['verdict'].upper()} "
                     f"(margin {v['margin']}), identical answers {v['token_agreement']['exact_answers']}/"
                     f"{v['records']}, {v['seconds']} s")
        for m in v["metrics"]:
            lines.append(f"  {m['name']:<26} {m['a']:.4f} -> {m['b']:.4f}  delta {m['delta']:+.4f} "
                         f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
    elif v:
        lines.append(f"validation : greedy tokens identical ({v['tokens_compared']} compared over "
                     f"{len(v['probes'])} probes), {v['seconds']} s")
        for k, d in v["max_abs_diff"].items():
            lines.append(f"  max |diff| {k:<22} {d:.3g}")
        for w in v.get("warnings") or []:
            lines.append(f"  warning: {w}")
    else:
        lines.append("validation : skipped")
    exp = (result.get("meta") or {}).get("export_seconds", {})
    if exp:
        lines.append("export     : " + ", ".join(f"{k} {v} s" for k, v in exp.items()))
    lines.append(f"seconds    : {seconds:.1f}")
    return lines


def prompt_lines(opts: BuildOptions) -> list[str]:
    p = opts.prompt
    lines = [f"prompt     : {p.variant} (from {opts.prompt_choice.describe() if opts.prompt_choice else 'the flags'})",
             f"  hash     : {p.template_hash()} (CoordExp's prompt_template_hash)",
             f"  layout   : {p.layout.replace('_', ' ')}, bbox_2d as {p.bbox_format}, coordinates as {p.coord_format}"]
    budget = opts.prompt_choice.max_pixels if opts.prompt_choice else None
    if budget:
        lines.append(f"  images   : resized to at most {budget} pixels (the training run's template.max_pixels)")
    lines.append(f"limits     : {opts.max_new_tokens} new tokens, repetition penalty {opts.repetition_penalty} "
                 "(served defaults)")
    return lines


def build_onnx(opts: BuildOptions, t0: float) -> tuple[Any, list[str]]:
    """--backend onnx: (what --json prints, the summary lines)."""
    if opts.dry_run:
        plan = {"ckpt": opts.ckpt, "family": opts.family, "backend": opts.backend, "name": opts.name,
                "repo": os.path.abspath(opts.repo), "onnx_dir": opts.onnx_dir, "opset": opts.onnx.opset,
                "max_batch_size": opts.max_batch_size, "max_new_tokens": opts.max_new_tokens,
                "prompt": opts.prompt.variant, "weights": opts.onnx.weights,
                "validation": ("skipped" if opts.onnx.skip_validation else "token parity" if opts.onnx.weights == "fp32"
                               else f"accuracy parity on {opts.onnx.validate_data}")}
        return plan, [f"{k:<15}: {v}" for k, v in plan.items()]
    result = export_onnx_format(opts)
    keep = result["onnx_dir"] if opts.onnx_dir and result["temporary"] is False else None
    written = write_repo(opts, result)
    if keep:
        written["onnx_dir"] = keep
    seconds = time.perf_counter() - t0
    summary = {"name": opts.name, **written, "validation": result.get("validation"),
               "export_seconds": (result.get("meta") or {}).get("export_seconds"), "seconds": round(seconds, 2)}
    return summary, summary_lines(opts, result, written, seconds)


def current_check(opts: BuildOptions) -> tuple[bool, str]:
    """(current, why) of the repository this build would write (`repository_current`, the one check)."""
    from coordexp.export.repository import build_record, repository_current

    want = build_record(opts.name, opts.backend, opts.max_batch_size, opts.max_new_tokens, opts.prompt,
                        serving_options(opts), decoding_defaults(opts), torch=opts.torch.parts if opts.torch else None,
                        prompt_source=prompt_source(opts))
    if opts.onnx is not None:
        want["onnx.opset"] = opts.onnx.opset
        want["onnx.weights"] = opts.onnx.weights
        if opts.onnx_dir and not os.path.isfile(os.path.join(opts.onnx_dir, "onnx_meta.json")):
            return False, f"--onnx-dir {opts.onnx_dir} holds no export"
    skip_validation = (opts.onnx or opts.torch).skip_validation
    return repository_current(os.path.abspath(opts.repo), opts.ckpt, want, validated=not skip_validation)


def served_check(opts: BuildOptions) -> list[str]:
    """Refuse (BuildError, exit 2) to replace a repository a running coordexp-server serves, unless
    --force; with it, the warnings to print."""
    from coordexp.export.repository import RepositoryServed
    from coordexp.serving.server import describe_server, live_servers

    repo = os.path.abspath(opts.repo)
    servers = live_servers(repo) if os.path.isdir(repo) else []
    if servers and not opts.force:
        raise BuildError(str(RepositoryServed(repo, servers)), 2)
    # Triton loads every model once, at start (explicit model control, nothing polled): it never reloads from disk
    return [f"coordexp-server {describe_server(m)} serves {repo}: it keeps answering with the model it loaded "
            "until you restart it (Ctrl-C it, then run the command below)" for m in servers]


def next_commands(opts: BuildOptions, repo: str) -> list[str]:
    """How to serve what was built, and to run the client against it."""
    model = "" if opts.name == "coordexp" else f" --model {opts.name}"  # the client's default
    return [f"serve it    : coordexp-server --repo {shlex.quote(repo)}",
            f"then, in a second terminal: coordexp-client infer --url 127.0.0.1:8001{model} "
            "--data YOUR.jsonl --out predictions.jsonl"]


def build_trtllm(opts: BuildOptions, t0: float) -> tuple[Any, list[str]]:
    """--backend trtllm: (what --json prints, the plan lines)."""
    try:
        result = export_trtllm_format(opts)
    except NotImplementedError as e:
        raise BuildError(str(e), 2) from e
    return {k: result[k] for k in ("repo", "dry_run", "plan")}, result["lines"]


def build_torch(opts: BuildOptions, t0: float) -> tuple[Any, list[str]]:
    """--backend torch: validate against HF generate, write the repository (export/torch_export.py)."""
    from coordexp.export.repository import RepositoryServed
    from coordexp.export.torch_export import TorchValidationError, export_torch

    t = opts.torch
    if opts.dry_run:
        plan = {"ckpt": opts.ckpt, "family": opts.family, "backend": "torch", "name": opts.name,
                "repo": os.path.abspath(opts.repo), **t.parts.to_params(), "prompt": opts.prompt.variant,
                "validation": not t.skip_validation}
        return plan, [f"{k:<15}: {v}" for k, v in plan.items()]
    try:
        result = export_torch(opts.ckpt, opts.repo, opts.name, t, opts.max_batch_size, opts.max_new_tokens,
                              streaming=opts.streaming, log=_log, prompt=opts.prompt, replace_served=opts.force,
                              decoding=decoding_defaults(opts), prompt_source=prompt_source(opts))
    except TorchValidationError as e:
        raise BuildError(f"validation failed: {e}", 1) from e
    except RepositoryServed as e:
        raise BuildError(str(e), 2) from e
    v = result["validation"]
    lines = [f"checkpoint : {opts.ckpt}", f"backend    : torch ({t.parts.device}, {t.parts.dtype}, "
             f"{t.parts.cache} cache{', compiled' if t.parts.compile else ''})", *prompt_lines(opts),
             f"written    : {result['repo']}",
             "validation : " + (f"{v['tokens_compared']} greedy tokens over {v['probes']} probes, "
                                f"{len(v['mismatches'])} differing row(s), {v['seconds']} s" if v else "skipped"),
             f"seconds    : {time.perf_counter() - t0:.1f}"]
    return {"name": opts.name, **result}, lines


@dataclass(frozen=True)
class ExportFormat:
    """One row of the formats table (Ultralytics' `export_formats()`)."""

    name: str
    backend: str  # the --backend value
    artifact: str
    device: str
    flags: tuple[str, ...]  # every flag it accepts besides --backend
    build: Callable[[BuildOptions, float], tuple[Any, list[str]]]


COMMON_FLAGS = ("--ckpt", "--repo", "--name", "--max-batch-size", "--max-new-tokens", "--repetition-penalty",
                "--onnx-dir", "--no-stream", "--threads", "--dry-run", "--json")
# every format serves the checkpoint's recorded prompt, or the one these flags choose
PROMPT_FLAGS = ("--run-config", "--builtin-prompt", "--expect-prompt-hash", *(o.flag for o in PROMPT_OPTIONS))
DECODING_FLAGS = ("--llm-batching", "--prefix-cache", "--jump-forward")  # the ONNX llm steps' speed-ups
FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("ONNX", "onnx",
                 "Triton repository: vision.onnx, embed.onnx, decoder.onnx (+ onnx_meta.json) run by ONNX Runtime "
                 "Python models, validated against the torch checkpoint",
                 "CPU (ONNX Runtime; CUDA where its CUDA provider is installed)",
                 COMMON_FLAGS + PROMPT_FLAGS + DECODING_FLAGS + ("--force", "--opset", "--skip-validation",
                                                                 "--validation-steps", "--weights",
                                                                 "--validate-data"), build_onnx),
    ExportFormat("PyTorch", "torch",
                 "Triton repository whose vision_encoder / llm steps run the checkpoint (copied to llm/1/hf) in "
                 "PyTorch, validated against HF generate",
                 "NVIDIA GPU (--device cuda, default) or CPU",
                 COMMON_FLAGS + PROMPT_FLAGS + ("--force", "--device", "--dtype", "--kv-cache", "--compile",
                                                "--skip-validation", "--validation-steps", "--llm-batching",
                                                "--jump-forward"), build_torch),
    ExportFormat("TensorRT-LLM", "trtllm",
                 "Triton repository for TensorRT-LLM's LLM API (llm/1/model.yaml, the checkpoint copy; "
                 "--trtllm-vision tensorrt: a TensorRT vision engine)",
                 "NVIDIA GPU in the TensorRT-LLM container (--dry-run: anywhere, no TensorRT-LLM)",
                 COMMON_FLAGS + PROMPT_FLAGS + ("--dtype", "--max-input-len", "--kv-cache-fraction", "--tp-size",
                                                "--trtllm-vision", "--vision-max-patches"), build_trtllm),
)


def export_formats() -> dict[str, list[Any]]:
    """The formats table by column (Format, Argument, Artifact, Device, Arguments), as Ultralytics prints it."""
    return {"Format": [f.name for f in FORMATS], "Argument": [f.backend for f in FORMATS],
            "Artifact": [f.artifact for f in FORMATS], "Device": [f.device for f in FORMATS],
            "Arguments": [list(f.flags) for f in FORMATS]}


def format_of(backend: str) -> ExportFormat:
    return next(f for f in FORMATS if f.backend == backend)


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Format-specific flags default to None, so a given one is told from an absent one; their
    defaults are applied in `resolve_options`."""
    p = argparse.ArgumentParser(prog="build_engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint folder (Qwen3-VL CoordExp fine-tune)")
    p.add_argument("--repo", default=None,
                   help="repository folder to write (default model_repository/<checkpoint folder name>)")
    p.add_argument("--name", default="coordexp",
                   help="served (ensemble) model name; the client's --model default is 'coordexp'")
    p.add_argument("--backend", choices=[f.backend for f in FORMATS], default="onnx")
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
                        f"{'on' if d.prefix_cache else 'off'}; onnx only)")
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


def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ExportFormat:
    """The chosen format; BuildError (exit 2) naming the given flags that do not apply to it."""
    fmt = format_of(args.backend)
    wrong = [flag for flag, dest in flag_dests(parser).items()
             if flag != "--backend" and flag not in fmt.flags and getattr(args, dest) is not None]
    if wrong:
        owners = sorted({f.backend for f in FORMATS for flag in wrong if flag in f.flags})
        verb = "applies" if len(wrong) == 1 else "apply"
        raise BuildError(f"{' and '.join(wrong)} {verb} to --backend {' or '.join(owners)} only", 2)
    return fmt


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
    return TorchExportOptions(parts=parts, skip_validation=bool(args.skip_validation),
                              validation_steps=args.validation_steps or DEFAULT_VALIDATION_STEPS,
                              llm_batching=args.llm_batching or ("static" if fixed else "inflight"),
                              jump_forward=(not parts.compile) if args.jump_forward is None else args.jump_forward)


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


def build(fmt: ExportFormat, opts: BuildOptions, t0: float) -> tuple[Any, list[str]]:
    """The format's build, unless (onnx, torch) the repository is current; refused when served."""
    if opts.dry_run or fmt.backend not in ("onnx", "torch"):
        return fmt.build(opts, t0)
    current, why = current_check(opts)
    if current and not opts.force:
        repo = os.path.abspath(opts.repo)
        _log(f"{repo} is current, not exporting again (--force to export anyway)")
        summary = {"name": opts.name, "repo": repo, "skipped": True, "reason": why,
                   "next": next_commands(opts, repo), "seconds": round(time.perf_counter() - t0, 2)}
        return summary, [f"skipped    : {repo} is current: {why} (--force to export anyway)", *summary["next"]]
    warnings = served_check(opts)
    if os.path.exists(os.path.join(opts.repo, "manifest.json")):
        _log(f"exporting again: {why}" if not current else "exporting again: --force")
    for w in warnings:
        _log(f"warning: {w}")
    summary, lines = fmt.build(opts, t0)
    repo = summary.get("repo")
    if repo:
        summary["next"] = next_commands(opts, repo)
        lines = lines + [f"warning    : {w}" for w in warnings] + summary["next"]
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        fmt = check_flags(args, parser)
        opts = resolve_options(args, fmt)
        if opts.threads:
            import torch

            torch.set_num_threads(opts.threads)
        summary, lines = build(fmt, opts, t0)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    if opts.as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
