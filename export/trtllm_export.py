"""The TensorRT-LLM export: plan, build steps, repository; and the steps' own command line.

    export_trtllm(ckpt, name, repo, TrtllmOptions(...), dry_run=True) -> {repo, plan, manifest, lines, dry_run}
    python -m coordexp.export.trtllm_export onnx --ckpt CKPT --out DIR      (the vision ONNX export step)
    python -m coordexp.export.trtllm_export versions                        (the pinned versions, JSON)

`build_engine --backend trtllm` calls `export_trtllm`. `dry_run=True` needs neither TensorRT-LLM
nor TensorRT: it writes the whole repository (every config.pbtxt, the LLM API's model.yaml, the
processor files, manifest.json) and returns every command the real run would execute; the real
run executes them and refuses to start (TrtllmUnavailable) without `tensorrt_llm`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordexp.families import UnsupportedFamily
from coordexp.trtllm.plan import (CHECKPOINT_SUBDIR, PINNED, TRTEXEC, TRTEXEC_FALLBACK, VISION_META, VISION_PLAN,
                                  PlanError, TrtllmOptions, TrtllmPlan, TrtllmUnavailable, make_plan)


def tensorrt_llm_version() -> str | None:
    """The importable tensorrt_llm's version, None when it is not installed (it is never imported)."""
    from importlib import metadata
    from importlib.util import find_spec

    if find_spec("tensorrt_llm") is None:
        return None
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _written_lines(plan: TrtllmPlan, dry_run: bool) -> list[str]:
    files = sorted(str(p.relative_to(plan.repo)) for p in Path(plan.repo).rglob("*") if p.is_file()) \
        if os.path.isdir(plan.repo) else []
    lines = ["", "written:"] + [f"  {f}" for f in files if "/processor/" not in f]
    nproc = sum(1 for f in files if "/processor/" in f)
    if nproc:
        lines.append(f"  preprocess/1/processor/ ({nproc} tokenizer / processor files)")
    if dry_run:
        later = [CHECKPOINT_SUBDIR + "/ (the checkpoint copy)"]
        if plan.options.vision == "tensorrt":
            later += [VISION_PLAN + " (trtexec's engine)", VISION_META + " (from the vision ONNX export)"]
        lines += ["", "written by the real run only:"] + [f"  {f}" for f in later]
    return lines


def plan_lines(plan: TrtllmPlan, dry_run: bool) -> list[str]:
    """What build_engine prints: the plan, its commands, the files written, notes and warnings."""
    o = plan.options
    kv = plan.llm_api["kv_cache_config"]
    lines = [f"{'dry run: nothing was built; ' if dry_run else ''}TensorRT-LLM repository for {plan.facts.path}",
             f"pinned     : {PINNED['trtllm_image']} (TensorRT-LLM {PINNED['tensorrt_llm']}, TensorRT "
             f"{PINNED['tensorrt']})",
             f"model      : {plan.facts.family} ({plan.facts.architecture}), dtype {o.dtype}, tp {o.tp_size}",
             f"batching   : max_batch_size {o.max_batch_size}, max_input_len {plan.max_input_len}, max_new_tokens "
             f"{o.max_new_tokens}, max_seq_len {plan.max_seq_len}, max_num_tokens {plan.max_num_tokens}",
             f"kv cache   : free_gpu_memory_fraction {o.kv_fraction_per_instance}"
             + (f" of the memory free at each LLM instance's start (llm, llm_stream: about {o.kv_cache_fraction} "
                "together, each with its own weights)" if o.streaming else "")
             + ", enable_block_reuse false (multimodal, #14125)"
             + (f", dtype {kv['dtype']}" if "dtype" in kv else ""),
             f"vision     : {o.vision}" + (f" (engine profile {plan.profile['min']}/{plan.profile['opt']}/"
                                          f"{plan.profile['max']} patches)" if o.vision == "tensorrt" else
                                          " (TensorRT-LLM runs the vision tower)"),
             f"repository : {plan.repo}", "", "commands:"]
    for i, c in enumerate(plan.commands, 1):
        lines.append(f"  # {i}. {c['step']}: {c['what']}")
        lines.append("  " + shlex.join(c["argv"]))
    lines += _written_lines(plan, dry_run)
    lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    if plan.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in plan.warnings]
    return lines


def export_trtllm(ckpt: str, name: str, repo: str, options: TrtllmOptions, onnx_dir: str | None = None,
                  dry_run: bool = True, prompt: Any = None, decoding: Any = None,
                  prompt_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TensorRT-LLM repository for `ckpt`, serving `prompt` (the training record's, from
    build_engine; default the built-in one). Returns {repo, plan, manifest, lines, dry_run}.

    Raises TrtllmUnavailable (a NotImplementedError: build_engine exits 2) when not a dry run and
    tensorrt_llm is not importable, or for options / checkpoints the plan cannot take."""
    from coordexp.export.repository import ServingOptions
    from coordexp.prompt import PromptSpec
    from coordexp.export.trtllm_repository import write_trtllm_repository

    if not dry_run and tensorrt_llm_version() is None:
        raise TrtllmUnavailable(
            "TensorRT-LLM is not installed here (its PyPI entry is only a placeholder). Build inside the TensorRT-LLM "
            f"container - {PINNED['trtllm_image']}, or docker/Dockerfile.gpu which starts from it - or review "
            "everything first with --dry-run, which needs neither TensorRT-LLM nor a GPU.")
    try:
        plan = make_plan(ckpt, name, repo, options, prompt or PromptSpec(), onnx_dir)
    except (PlanError, UnsupportedFamily) as e:
        raise TrtllmUnavailable(str(e)) from e  # build_engine maps it to exit 2
    if not dry_run:
        run_commands(plan)
    manifest = write_trtllm_repository(plan, prompt or PromptSpec(), decoding=decoding,
                                       options=ServingOptions(streaming=options.streaming), dry_run=dry_run,
                                       copy_checkpoint=not dry_run, prompt_source=prompt_source)
    return {"repo": plan.repo, "dry_run": dry_run, "plan": plan.to_dict(), "manifest": manifest,
            "lines": plan_lines(plan, dry_run)}


def run_commands(plan: TrtllmPlan) -> None:
    """The real run's build steps (inside the container): vision ONNX export, trtexec."""
    for c in plan.commands:
        if c["step"] == "vision-onnx":
            export_vision_onnx(plan.facts.path, c["argv"][-1])
        elif c["step"] == "vision-engine":
            exe = shutil.which(TRTEXEC) or (TRTEXEC_FALLBACK if os.path.exists(TRTEXEC_FALLBACK) else None)
            if exe is None:
                raise TrtllmUnavailable(f"trtexec not found (PATH, {TRTEXEC_FALLBACK}); it ships with TensorRT in "
                                        f"{PINNED['trtllm_image']}")
            os.makedirs(plan.work_dir, exist_ok=True)
            subprocess.run([exe, *c["argv"][1:]], check=True)


def export_vision_onnx(ckpt: str, out: str) -> dict[str, Any]:
    from coordexp.export.onnx_export import export_onnx

    return export_onnx(ckpt, out, log=lambda s: print(f"[trtllm] {s}", file=sys.stderr, flush=True))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordexp.export.trtllm_export",
                                description="Steps of the TensorRT-LLM export "
                                            "(build_engine --backend trtllm runs them).")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("onnx", help="export the checkpoint's graphs (the vision engine is built from vision.onnx)")
    o.add_argument("--ckpt", required=True)
    o.add_argument("--out", required=True)
    sub.add_parser("versions", help="print the pinned versions as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "versions":
        print(json.dumps({**PINNED, "installed_tensorrt_llm": tensorrt_llm_version()}, indent=2))
        return 0
    export_vision_onnx(a.ckpt, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
