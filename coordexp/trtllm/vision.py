"""The `vision_encoder` step on a TensorRT engine (`--trtllm-vision tensorrt`): `TrtVisionEncoderModel`.

The engine is our vision.onnx built by trtexec (vision_encoder/1/model.plan); its host-side inputs
(rotary positions, interpolation, window order, attention biases) are the family's
(`coordexp.families.FamilySpec.vision_feeds`, as for ONNX Runtime), the grouping of images is
ONNX Runtime's (`coordexp.engines.onnx_engine.encode_image_groups`), the batching and splitting
per request the ONNX step's (`coordexp.serving.vision_encoder.VisionEncoder`). Only the session
differs. `tensorrt` and `torch` are imported when an engine is opened.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from coordexp.serving.common import error_response, int_param, model_args, request_view, resolve, response
from coordexp.trtllm.plan import VISION_PLAN
from coordexp.wire import IMAGE_GRID_THW, PIXEL_VALUES


class TensorRTSession:
    """A TensorRT engine behind the two calls made on an onnxruntime vision session:
    `get_outputs()` and `run(output_names, feeds)` (numpy in, numpy out)."""

    def __init__(self, plan_path: str, device: int = 0):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        with open(plan_path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: not a TensorRT engine of this TensorRT version (rebuild it with trtexec "
                               "in this container)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64,
                       trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}

    def get_outputs(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self.output_names]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(
                self.device, self.dtypes[self.engine.get_tensor_dtype(name)])
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        result = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            result[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [result[n].float().cpu().numpy() for n in outputs]


class TensorRTVision:
    """What `VisionEncoder` needs of its parts (`meta`, `encode_images`), on any vision session: the
    TensorRT engine in the container, an onnxruntime session or a stand-in in tests. No ONNX graph
    is opened."""

    def __init__(self, meta: dict[str, Any], session: Any, max_patches: int | None = None):
        from coordexp.families import family_spec

        self.meta = meta
        self.spec = family_spec(str(meta.get("family", "qwen3_vl")), where="the vision engine's onnx_meta.json")
        self.session = session
        self.np_dtype = np.float32
        self.max_vision_patches = int(max_patches or 1024)

    @classmethod
    def from_files(cls, plan_path: str, meta_path: str, device: int = 0,
                   max_patches: int | None = None) -> "TensorRTVision":
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
        return cls(meta, TensorRTSession(plan_path, device), max_patches)

    def vision_feeds(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray):
        return self.spec.vision_feeds(self.meta, pixel_values, image_grid_thw, self.np_dtype)

    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from coordexp.engines.onnx_engine import encode_image_groups

        return encode_image_groups(self.session, self.vision_feeds, pixel_values, image_grid_thw,
                                   self.max_vision_patches)


class TrtVisionEncoderModel:
    """Triton Python-backend model `vision_encoder` running the TensorRT engine built by trtexec
    (vision_encoder/1/model.plan) with the ONNX step's batching and splitting (VisionEncoder)."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        from coordexp.serving.vision_encoder import VisionEncoder

        self.pb = pb_utils
        _, params, root, _ = model_args(args)
        folder = os.path.join(root, "vision_encoder", "1")
        device = int(args.get("model_instance_device_id") or 0)
        parts = TensorRTVision.from_files(
            resolve(root, params.get("plan") or VISION_PLAN),
            resolve(root, params.get("onnx_meta") or os.path.join(folder, "onnx_meta.json")),
            device, int_param(params, "max_patches", 0) or None)
        self.encoder = VisionEncoder(parts, int_param(params, "merge_size", 0) or None)

    def execute(self, requests: list[Any]) -> list[Any]:
        views = [request_view(self.pb, r, (PIXEL_VALUES, IMAGE_GRID_THW)) for r in requests]
        return [error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res)
                for res in self.encoder.run(views)]
