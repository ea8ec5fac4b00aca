"""Build a servable engine from a CoordExp checkpoint: export, validate, write the Triton repository.

    python export/build_engine.py --ckpt CKPT [--repo model_repository/NAME] [--name NAME]
        [--backend onnx|torch|trtllm] [--max-batch-size 8] [--max-new-tokens 2048] [--repetition-penalty 1.0]
        [--dry-run]
        prompt:      [--run-config resolved_config.json] [--builtin-prompt] [--expect-prompt-hash HASH|FILE]
                     [--coord-format tokens|numeric] [--field-order desc_first|geometry_first]
                     [--object-order sorted|as_given|random] [--bbox-format xyxy|cxcywh|cxcy_logw_logh]
                     [--message-layout image_first|text_first] [--prompt USER_TEXT] [--system-prompt TEXT]
        onnx, torch: [--force]
        onnx, torch: [--llm-batching inflight|static] [--jump-forward|--no-jump-forward]
                     [--prefix-cache|--no-prefix-cache]   (torch: in flight only)
        onnx only:   [--opset N] [--skip-validation] [--validation-steps 16]
                     [--weights fp32|int8|int4] [--validate-data LABELLED.jsonl]
        torch only:  [--device cuda|cpu] [--dtype fp32|bf16|fp16] [--kv-cache dynamic|static] [--compile]
                     [--skip-validation] [--validation-steps 16]   (see export/torch_export.py)
        trtllm only: [--dtype bf16|fp16|fp8] [--max-input-len N] [--kv-cache-fraction 0.8] [--tp-size 1]
                     [--trtllm-vision trtllm|tensorrt] [--vision-max-patches N]   (see coordexp/trtllm/)
    python -m coordexp.export.build_engine ...        (the same)

Ultralytics-export style: one table of formats (`FORMATS`: name, `--backend` value, artifact,
device, the flags it accepts) and one small function per format (`export_onnx_format`,
`export_trtllm_format`), each taking the typed `BuildOptions` argv is parsed into
(`coordexp.export.build_options`) and returning a
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
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coordexp.export import build_options
from coordexp.export.build_options import BuildError, BuildOptions, ExportFormat, _log, flag_dests, resolve_options
from coordexp.prompt import PROMPT_OPTIONS

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
    from coordexp.serving.markers import describe_server, live_servers

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
                "repo": os.path.abspath(opts.repo), **t.parts.to_params(), "llm_batching": t.llm_batching,
                "jump_forward": t.jump_forward, "prompt": opts.prompt.variant,
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
             f"{t.parts.cache} cache{', compiled' if t.parts.compile else ''}, {t.llm_batching} batching)",
             *prompt_lines(opts),
             f"written    : {result['repo']}",
             "validation : " + (f"{v['tokens_compared']} greedy tokens over {v['probes']} probes, "
                                f"{len(v['mismatches'])} differing row(s), {v['seconds']} s" if v else "skipped"),
             f"seconds    : {time.perf_counter() - t0:.1f}"]
    return {"name": opts.name, **result}, lines


COMMON_FLAGS = ("--ckpt", "--repo", "--name", "--max-batch-size", "--max-new-tokens", "--repetition-penalty",
                "--onnx-dir", "--no-stream", "--threads", "--dry-run", "--json")
# every format serves the checkpoint's recorded prompt, or the one these flags choose
PROMPT_FLAGS = ("--run-config", "--builtin-prompt", "--expect-prompt-hash", *(o.flag for o in PROMPT_OPTIONS))
DECODING_FLAGS = ("--llm-batching", "--prefix-cache", "--jump-forward")  # the llm steps' speed-ups
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
                                                "--skip-validation", "--validation-steps", *DECODING_FLAGS),
                 build_torch),
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


def build_parser():
    """The argument parser over the formats table (`build_options.build_parser`)."""
    return build_options.build_parser([f.backend for f in FORMATS], __doc__.split("\n\n")[0])


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
