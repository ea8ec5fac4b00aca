"""The Triton Python models of `--backend torch`: the ONNX Runtime steps (`coordexp.serving.llm`,
`coordexp.serving.vision_encoder`) with `TorchParts` loaded in their place.

    vision_encoder: VisionEncoder(TorchParts(vision_only=True))     (TorchVisionModel)
    llm, llm_stream: the in-flight scheduler over TorchRows(TorchParts) (config `batching` =
                     "inflight"), or LlmBatcher(TorchParts) as the `Generator` of static
                     batches (run_unary / DecoupledRun), as for ONNX Runtime

Both read the checkpoint copy `hf_dir` and the `TorchOptions` (device, dtype, cache, compile,
buckets) from their config parameters. Nothing here decodes: see coordexp.serving.torch_parts.
"""
from __future__ import annotations

from typing import Any

from coordexp.layout import HF_SUBDIR
from coordexp.serving.common import int_param, resolve
from coordexp.serving.llm import LlmBatcher, defaults_from_params, guided_hook_factory
from coordexp.serving.llm import TritonPythonModel as OnnxLlmModel
from coordexp.serving.torch_parts import TorchOptions, TorchParts, TorchRows
from coordexp.serving.vision_encoder import TritonPythonModel as OnnxVisionModel
from coordexp.serving.vision_encoder import VisionEncoder


def torch_batcher(parts: TorchParts, params: dict[str, str], max_batch_size: int | None) -> LlmBatcher:
    """The llm `Generator` over TorchParts, with the repository's decoding defaults and limit."""
    defaults = defaults_from_params(params)
    return LlmBatcher(parts, defaults, int_param(params, "max_new_tokens", defaults.max_new_tokens),
                      pad_token_id=int_param(params, "pad_token_id", parts.pad_token_id),
                      merge_size=parts.merge, max_batch_size=max_batch_size,
                      guided_hook=guided_hook_factory(parts, params.get("prompt_json")))


class TorchLlmModel(OnnxLlmModel):
    """Triton Python-backend model `llm` / `llm_stream` of a torch repository: the llm step of
    `coordexp.serving.llm` (static batches or the in-flight scheduler) over `TorchParts`."""

    def load(self, config: dict[str, Any], params: dict[str, str], root: str) -> tuple[TorchParts, LlmBatcher]:
        parts = TorchParts(resolve(root, params.get("hf_dir") or HF_SUBDIR), TorchOptions.from_params(params),
                           jump_forward=params.get("jump_forward") == "true",
                           prefix_cache=params.get("prefix_cache") == "true")  # read by TorchRows (in flight) only
        return parts, torch_batcher(parts, params, int(config.get("max_batch_size") or 0) or None)

    def decode_rows(self, parts: TorchParts) -> TorchRows:
        return TorchRows(parts, self.batcher.pad_token_id)


class TorchVisionModel(OnnxVisionModel):
    """Triton Python-backend model `vision_encoder` of a torch repository: the vision step over
    `TorchParts` (the vision tower only)."""

    def load(self, params: dict[str, str], root: str) -> VisionEncoder:
        parts = TorchParts(resolve(root, params.get("hf_dir") or HF_SUBDIR), TorchOptions.from_params(params),
                           vision_only=True)
        return VisionEncoder(parts, parts.merge)
