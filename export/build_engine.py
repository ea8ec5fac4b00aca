"""Build a servable engine from a CoordExp checkpoint: export, validate, write the Triton repository.

    python export/build_engine.py --ckpt CKPT [--repo model_repository/NAME] [--name NAME]
        [--backend onnx|trtllm] [--max-batch-size 8] [--max-new-tokens 256] [--skip-validation] [--dry-run]
        trtllm only: [--dtype bf16|fp16|fp8] [--max-input-len N] [--kv-cache-fraction 0.8] [--tp-size 1]
                     [--trtllm-vision trtllm|tensorrt] [--vision-max-patches N]   (see export/trtllm.py)
    python -m coordexp.export.build_engine ...        (the same)

One function per format (`export_onnx_format`, `export_trtllm_format`), Ultralytics-export style;
each returns a dict with what it made. The ONNX path exports the three graphs
(`coordexp.export.onnx_export`), validates them against the torch checkpoint
(`coordexp.export.validate`: greedy tokens must be identical) and hands the folder to
`coordexp.export.repository.write_repository`, which lays out the Triton repository.

Exit status: 0 done, 1 export or validation failed, 2 bad arguments / checkpoint / unsupported model.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESERVED_NAMES = ("preprocess", "vision_encoder", "llm", "postprocess")


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


# ------------------------------------------------------------------------------------------ formats
def export_onnx_format(args: argparse.Namespace) -> dict[str, Any]:
    """Export to ONNX (into `args.onnx_dir` or a temporary folder beside the repository) and
    validate unless `args.skip_validation`. Returns {onnx_dir, meta, validation, temporary, seconds}."""
    from coordexp.export.onnx_export import export_onnx

    t0 = time.perf_counter()
    temporary = not args.onnx_dir
    if temporary:
        parent = os.path.dirname(os.path.abspath(args.repo)) or "."
        os.makedirs(parent, exist_ok=True)
        onnx_dir = tempfile.mkdtemp(prefix=f".{args.name}.onnx-", dir=parent)
        os.chmod(onnx_dir, 0o755)  # it may be moved into the repository as is; servers run as other users
    else:
        onnx_dir = os.path.abspath(args.onnx_dir)
    try:
        try:
            meta = export_onnx(args.ckpt, onnx_dir, opset=args.opset, log=_log)
        except NotImplementedError as e:
            raise BuildError(str(e), 2) from e
        except (FileNotFoundError, OSError, ValueError) as e:
            raise BuildError(f"cannot export {args.ckpt}: {e}", 2) from e
        except Exception as e:  # noqa: BLE001 - exporter failures are reported, not dumped
            raise BuildError(f"ONNX export failed: {type(e).__name__}: {e}", 1) from e
        validation = None
        if not args.skip_validation:
            from coordexp.export.validate import ExportValidationError, validate_export

            _log("validating against the torch checkpoint")
            try:
                validation = validate_export(onnx_dir, args.ckpt, steps=args.validation_steps, threads=args.threads,
                                             log=_log)
            except ExportValidationError as e:
                raise BuildError(f"validation failed: {e}", 1) from e
    except BaseException:
        if temporary:
            shutil.rmtree(onnx_dir, ignore_errors=True)
        raise
    return {"onnx_dir": onnx_dir, "meta": meta, "validation": validation, "temporary": temporary,
            "seconds": round(time.perf_counter() - t0, 2)}


def export_trtllm_format(args: argparse.Namespace) -> dict[str, Any]:
    """TensorRT-LLM repository (LLM API, PyTorch backend): `coordexp.export.trtllm.export_trtllm_format`.
    With --dry-run it needs no TensorRT-LLM; without, it raises NotImplementedError (exit 2) when
    tensorrt_llm is not importable."""
    from coordexp.export.trtllm import export_trtllm_format as fn

    return fn(args)


def write_repo(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Hand the export to the repository writer; without one, keep the ONNX folder at the repo path."""
    from coordexp.prompt import PromptSpec

    try:
        from coordexp.export.repository import write_repository
    except ImportError as e:
        dst = os.path.join(os.path.abspath(args.repo), f"{args.name}_onnx")
        if result["temporary"]:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            shutil.move(result["onnx_dir"], dst)
            result["onnx_dir"] = dst
        _log(f"note: no Triton repository writer ({e}); the ONNX folder is at {result['onnx_dir']}")
        return {"repo": None, "onnx_dir": result["onnx_dir"]}
    kwargs: dict[str, Any] = dict(max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens,
                                  prompt=PromptSpec(), backend=args.backend, validation=result.get("validation"))
    if "move_onnx" in inspect.signature(write_repository).parameters:
        kwargs["move_onnx"] = bool(result["temporary"])
    if not getattr(args, "stream", True):
        from coordexp.export.repository import ServingOptions

        kwargs["options"] = ServingOptions(streaming=False)
    try:
        repo = write_repository(args.repo, args.name, result["onnx_dir"], args.ckpt, **kwargs)
    finally:
        if result["temporary"]:
            shutil.rmtree(result["onnx_dir"], ignore_errors=True)
    return {"repo": repo}


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint folder (Qwen3-VL CoordExp fine-tune)")
    p.add_argument("--repo", default=None,
                   help="repository folder to write (default model_repository/<checkpoint folder name>)")
    p.add_argument("--name", default="coordexp",
                   help="served (ensemble) model name; the client's --model default is 'coordexp'")
    p.add_argument("--backend", choices=("onnx", "trtllm"), default="onnx")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", "--max-output-len", type=int, default=256, dest="max_new_tokens")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--onnx-dir", default=None, help="also keep the ONNX export in this folder")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="no streaming ensemble (<name>_stream, decoupled llm_stream): saves the second decoder "
                        "session's memory")
    p.add_argument("--skip-validation", action="store_true", help="do not compare with the torch checkpoint")
    p.add_argument("--validation-steps", type=int, default=16, help="greedy steps compared during validation")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch / ONNX Runtime")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan only (trtllm: "
                   "also write the whole repository and print every command, without TensorRT-LLM)")
    t = p.add_argument_group("TensorRT-LLM (--backend trtllm)")
    t.add_argument("--dtype", choices=("bf16", "fp16", "fp8"), default="bf16",
                   help="LLM dtype; fp8 = FP8 KV cache (+ FP8 weights of an already quantized checkpoint)")
    t.add_argument("--max-input-len", type=int, default=None,
                   help="max prompt tokens (default: prompt + largest image)")
    t.add_argument("--kv-cache-fraction", type=float, default=0.8, help="KV cache share of free GPU memory")
    t.add_argument("--tp-size", type=int, default=1, help="tensor parallel size")
    t.add_argument("--trtllm-vision", choices=("trtllm", "tensorrt"), default="trtllm",
                   help="who runs the vision tower: TensorRT-LLM itself, or a TensorRT engine built from our ONNX")
    t.add_argument("--vision-max-patches", type=int, default=None, help="vision engine profile max (patches)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    from coordexp.engines.torch_engine import checkpoint_error
    from coordexp.export.onnx_export import DEFAULT_OPSET

    err = checkpoint_error(args.ckpt)
    if err:
        raise BuildError(err, 2)
    args.ckpt = os.path.abspath(args.ckpt)
    args.name = sanitize_name(args.name or "coordexp")
    args.repo = args.repo or os.path.join("model_repository", sanitize_name(os.path.basename(os.path.normpath(args.ckpt))))
    args.opset = args.opset or DEFAULT_OPSET
    if args.max_batch_size < 1:
        raise BuildError(f"--max-batch-size must be >= 1, got {args.max_batch_size}", 2)
    if args.max_new_tokens < 1:
        raise BuildError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}", 2)
    try:
        config = json.loads(Path(args.ckpt, "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{args.ckpt}/config.json is unreadable: {e}", 2) from e
    args.family = config.get("model_type")
    if args.backend == "onnx" and args.family not in ("qwen3_vl", "qwen2_5_vl"):
        raise BuildError(f"ONNX export supports Qwen3-VL (model_type qwen3_vl) and Qwen2.5-VL (qwen2_5_vl) "
                         f"checkpoints; {args.ckpt} is {args.family!r}", 2)
    return args


def summary_lines(args: argparse.Namespace, result: dict[str, Any], written: dict[str, Any], seconds: float) -> list[str]:
    lines = [f"checkpoint : {args.ckpt}", f"backend    : {args.backend} (opset {args.opset})",
             f"name       : {args.name}"]
    root = written.get("repo") or written.get("onnx_dir")
    lines.append(f"written    : {root}")
    files = _files(root) if root else []
    total = sum(s for _, s in files)
    lines.append(f"files      : {len(files)}, {_human(total)}")
    for f, s in files:
        if f.endswith((".onnx", ".data", ".json", ".pbtxt")):
            lines.append(f"  {f:<48} {_human(s):>10}")
    v = result.get("validation")
    if v:
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        args = resolve_args(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.backend == "trtllm":
            try:
                result = export_trtllm_format(args)
            except NotImplementedError as e:
                raise BuildError(str(e), 2) from e
            if args.json:
                print(json.dumps({k: result[k] for k in ("repo", "dry_run", "plan")}, indent=2, default=str))
            else:
                print("\n".join(result["lines"]))
            return 0
        if args.dry_run:
            plan = {"ckpt": args.ckpt, "family": args.family, "backend": args.backend, "name": args.name,
                    "repo": os.path.abspath(args.repo), "onnx_dir": args.onnx_dir, "opset": args.opset,
                    "max_batch_size": args.max_batch_size, "max_new_tokens": args.max_new_tokens,
                    "validation": not args.skip_validation}
            print(json.dumps(plan, indent=2) if args.json else "\n".join(f"{k:<15}: {v}" for k, v in plan.items()))
            return 0
        result = export_onnx_format(args)
        keep = None
        if args.onnx_dir and result["temporary"] is False:
            keep = result["onnx_dir"]
        written = write_repo(args, result)
        if keep:
            written["onnx_dir"] = keep
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"name": args.name, **written, "validation": result.get("validation"),
                          "export_seconds": (result.get("meta") or {}).get("export_seconds"),
                          "seconds": round(seconds, 2)}, indent=2, default=str))
    else:
        print("\n".join(summary_lines(args, result, written, seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
