"""Engines: the torch reference and ONNX Runtime in-process (Triton is reached through the client)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from coordexp.prompt import PromptSpec


def _repository_manifest(path: str) -> dict[str, Any] | None:
    """The manifest of the Triton repository `path` is, or whose ONNX folder (llm/1/onnx) it is."""
    from coordexp.layout import MANIFEST, ONNX_SUBDIR

    path = os.path.abspath(path)
    depth = len(ONNX_SUBDIR.split("/"))
    for cand in (path, os.path.normpath(os.path.join(path, *[".."] * depth))):
        mpath = os.path.join(cand, MANIFEST)
        if os.path.isfile(mpath):
            try:
                with open(mpath, "r", encoding="utf-8") as f:
                    m = json.load(f)
            except (OSError, ValueError):
                return None
            return m if isinstance(m, dict) and isinstance(m.get("prompt"), dict) else None
    return None


def local_prompt(kind: str, path: str, flags: Mapping[str, Any] | None = None, run_config: str | None = None,
                 builtin: bool = False) -> tuple[PromptSpec, int | None]:
    """(prompt, image budget) a local engine runs `path` with, as a served repository would: an exported
    repository's own (its manifest; prompt flags on top), else the checkpoint's training record
    (`coordexp.training_record.checkpoint_prompt`: TrainingRecordError when there is none and no flags)."""
    import dataclasses

    from coordexp.training_record import _given, checkpoint_prompt

    manifest = _repository_manifest(path) if kind == "onnx" else None
    if manifest is not None and run_config is None and not builtin:
        prompt = PromptSpec.from_dict(manifest["prompt"])
        given = _given(flags or {})
        budget = (manifest.get("prompt_source") or {}).get("image_max_pixels")
        return (dataclasses.replace(prompt, **given) if given else prompt), budget
    choice = checkpoint_prompt(path, flags, run_config=run_config, builtin=builtin)
    return choice.prompt, choice.max_pixels


def load_engine(kind: str, path: str, prompt: PromptSpec | None = None, *, prompt_flags: Mapping[str, Any] | None = None,
                run_config: str | None = None, builtin_prompt: bool = False, **kwargs: Any):
    """`kind` "torch": `path` is an HF checkpoint; "onnx": an ONNX export folder or a repository.
    Without `prompt`, the engine runs the prompt `local_prompt` finds (the checkpoint's training record,
    or the repository's), with `prompt_flags` (argparse dests of coordexp.prompt.PROMPT_OPTIONS) on top."""
    budget = None
    if kind == "torch":  # a missing folder is said as such, before any prompt is looked for
        from coordexp.checkpoint import checkpoint_error

        err = checkpoint_error(path)
        if err:
            raise FileNotFoundError(err)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"not found: {path}")
    if prompt is None:
        prompt, budget = local_prompt(kind, path, prompt_flags, run_config, builtin_prompt)
    if kind == "torch":
        from coordexp.engines.torch_engine import TorchEngine

        return TorchEngine(path, prompt=prompt, image_max_pixels=budget, **kwargs)
    if kind == "onnx":
        from coordexp.engines.onnx_engine import OnnxEngine

        kwargs.pop("device", None)
        kwargs.pop("dtype", None)
        return OnnxEngine(path, prompt=prompt, image_max_pixels=budget, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; expected torch or onnx")
