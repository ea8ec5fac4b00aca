"""The Triton Python models of `--backend torch`: the ONNX step logic over `TorchParts`.

    vision_encoder: VisionEncoder(TorchParts(vision_only=True))     (TorchVisionModel)
    llm, llm_stream: the in-flight scheduler over TorchRows(TorchParts) (config `batching` =
                     "inflight"), or LlmBatcher(TorchParts) as the `Generator` of static
                     batches (run_unary / DecoupledRun), as for ONNX Runtime

Both read the checkpoint copy `hf_dir` and the `TorchOptions` (device, dtype, cache, compile,
buckets) from their config parameters. Nothing here decodes: see coordexp.serving.torch_parts.
"""
from __future__ import annotations

from typing import Any

from coordexp import wire
from coordexp.layout import HF_SUBDIR
from coordexp.serving.common import (decoupled_sender, error_response, int_param, model_args, request_view, resolve,
                                     response)
from coordexp.serving.llm import LLM_INPUTS, DecoupledRun, LlmBatcher, defaults_from_params, guided_hook_factory, \
    run_unary
from coordexp.serving.inflight import scheduler_for, submit_requests
from coordexp.serving.torch_parts import TorchOptions, TorchParts, TorchRows
from coordexp.serving.vision_encoder import VisionEncoder



def torch_batcher(parts: TorchParts, params: dict[str, str], max_batch_size: int | None) -> LlmBatcher:
    """The llm `Generator` over TorchParts, with the repository's decoding defaults and limit."""
    defaults = defaults_from_params(params)
    return LlmBatcher(parts, defaults, int_param(params, "max_new_tokens", defaults.max_new_tokens),
                      pad_token_id=int_param(params, "pad_token_id", parts.pad_token_id),
                      merge_size=parts.merge, max_batch_size=max_batch_size,
                      guided_hook=guided_hook_factory(parts, params.get("prompt_json")))


class TorchLlmModel:
    """Triton Python-backend model `llm` / `llm_stream` of a torch repository."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config, params, root, self.decoupled = model_args(args)
        parts = TorchParts(resolve(root, params.get("hf_dir") or HF_SUBDIR), TorchOptions.from_params(params),
                           jump_forward=params.get("jump_forward") == "true",
                           prefix_cache=params.get("prefix_cache") == "true" and params.get("batching") == "inflight")
        self.batcher = torch_batcher(parts, params, int(config.get("max_batch_size") or 0) or None)
        self.scheduler = None
        if params.get("batching") == "inflight":  # the iteration-level scheduler, as for ONNX Runtime
            self.scheduler = scheduler_for(TorchRows(parts, self.batcher.pad_token_id), parts.stop_ids, self.batcher,
                                           config)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.scheduler is not None:
            submit_requests(self.pb, self.scheduler, self.batcher, requests, LLM_INPUTS)
            return None
        views = [request_view(self.pb, r, LLM_INPUTS) for r in requests]
        if self.decoupled:
            DecoupledRun(self.batcher, decoupled_sender(self.pb, requests)).run(views)
            return None
        return [error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res)
                for res in run_unary(self.batcher, views)]

    def finalize(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()


class TorchVisionModel:
    """Triton Python-backend model `vision_encoder` of a torch repository."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        _, params, root, _ = model_args(args)
        parts = TorchParts(resolve(root, params.get("hf_dir") or HF_SUBDIR), TorchOptions.from_params(params),
                           vision_only=True)
        self.encoder = VisionEncoder(parts, parts.merge)

    def execute(self, requests: list[Any]) -> list[Any]:
        views = [request_view(self.pb, r, wire.input_names(wire.VISION_ENCODER)) for r in requests]
        return [error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res)
                for res in self.encoder.run(views)]
