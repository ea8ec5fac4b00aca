"""Engines: the torch reference and ONNX Runtime in-process (Triton is reached through the client)."""
from __future__ import annotations

from typing import Any

from coordexp.prompt import PromptSpec


def load_engine(kind: str, path: str, prompt: PromptSpec | None = None, **kwargs: Any):
    """`kind` "torch": `path` is an HF checkpoint; "onnx": an ONNX export folder (or the checkpoint
    it was exported from, when the export sits in a known place)."""
    if kind == "torch":
        from coordexp.engines.torch_engine import TorchEngine

        return TorchEngine(path, prompt=prompt, **kwargs)
    if kind == "onnx":
        from coordexp.engines.onnx_engine import OnnxEngine

        kwargs.pop("device", None)
        kwargs.pop("dtype", None)
        return OnnxEngine(path, prompt=prompt, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; expected torch or onnx")
