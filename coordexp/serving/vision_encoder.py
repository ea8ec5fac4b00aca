"""The `vision_encoder` model: pixel patches -> image embeddings (+ deepstack features), ONNX Runtime.

Per request: pixel_values FP32 [B, P, D] (zero padded), image_grid_thw INT64 [B, 3]
  -> image_embeds FP32 [B, N, H] (zero padded to the request's largest image),
     deepstack_embeds FP32 [B, L, N, H] (L deepstack layers; L = 0 for models without deepstack)

All images of all requests of one `execute()` call (the dynamic batcher groups them) go through
ONE `OnnxParts.encode_images` call, then are split back per image.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from coordexp import wire
from coordexp.serving.common import (ONNX_SUBDIR, RequestError, TritonRequestView, config_parameters,
                                     error_response, int_param, open_quiet_sessions, pad_stack, repository_root,
                                     request_view, resolve, response)
from coordexp.wire import DEEPSTACK_EMBEDS, IMAGE_EMBEDS, IMAGE_GRID_THW, PIXEL_VALUES


def merge_size_of(meta: dict[str, Any], default: int = 2) -> int:
    for key in ("spatial_merge_size", "merge_size"):
        if meta.get(key):
            return int(meta[key])
    vision = meta.get("vision") or meta.get("vision_config") or {}
    for key in ("spatial_merge_size", "merge_size"):
        if isinstance(vision, dict) and vision.get(key):
            return int(vision[key])
    return default


class VisionEncoder:
    def __init__(self, parts: Any, merge_size: int | None = None):
        self.parts = parts
        self.merge_size = int(merge_size or merge_size_of(getattr(parts, "meta", {}) or {}))

    def tokens_of(self, grid: Sequence[int]) -> int:
        t, h, w = (int(v) for v in grid)
        return t * h * w // (self.merge_size ** 2)

    @staticmethod
    def images_of(view: TritonRequestView) -> list[tuple[np.ndarray, np.ndarray]]:
        """One request -> [(pixel_values [P_i, D] unpadded, grid [3])]."""
        pv = np.asarray(view.need(PIXEL_VALUES), dtype=np.float32)
        grid = np.asarray(view.need(IMAGE_GRID_THW), dtype=np.int64)
        if pv.ndim != 3 or grid.ndim != 2 or grid.shape[1] != 3 or pv.shape[0] != grid.shape[0]:
            raise RequestError(f"{PIXEL_VALUES} {list(pv.shape)} / {IMAGE_GRID_THW} {list(grid.shape)}: "
                               "expected [B, P, D] and [B, 3]")
        out = []
        for i in range(grid.shape[0]):
            n = int(np.prod(grid[i]))
            if n <= 0 or n > pv.shape[1]:
                raise RequestError(f"{IMAGE_GRID_THW}[{i}]={grid[i].tolist()} does not fit {pv.shape[1]} patches")
            out.append((pv[i, :n], grid[i]))
        return out

    def encode(self, images: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(pixel_values [P_i, D], grid [3])] -> [(embeds [N_i, H], deepstack [L, N_i, H])], one call."""
        pixel_values = np.concatenate([p for p, _ in images], axis=0)
        grids = np.stack([np.asarray(g, dtype=np.int64) for _, g in images])
        embeds, deepstack = self.parts.encode_images(pixel_values, grids)
        embeds = np.asarray(embeds, dtype=np.float32)
        deepstack = np.asarray(deepstack, dtype=np.float32)
        counts = [self.tokens_of(g) for g in grids]
        if sum(counts) != embeds.shape[0]:
            raise RuntimeError(f"vision encoder gave {embeds.shape[0]} image tokens, expected {sum(counts)}")
        if deepstack.ndim != 3:  # no deepstack (Qwen2.5-VL): [0, N, H]
            deepstack = np.zeros((0, embeds.shape[0], embeds.shape[1]), np.float32)
        cuts = np.cumsum(counts)[:-1]
        return list(zip(np.split(embeds, cuts, axis=0), np.split(deepstack, cuts, axis=1)))

    @staticmethod
    def outputs(encoded: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """One request's images -> its padded output tensors."""
        embeds = pad_stack([e for e, _ in encoded])
        n = embeds.shape[1]
        deep = np.stack([np.pad(d, ((0, 0), (0, n - d.shape[1]), (0, 0))) for _, d in encoded])
        return {IMAGE_EMBEDS: embeds, DEEPSTACK_EMBEDS: deep}

    def run(self, views: Sequence[TritonRequestView]) -> list[dict[str, np.ndarray] | Exception]:
        """Several requests -> their outputs (or their error), all images encoded in one call."""
        results: list[dict[str, np.ndarray] | Exception] = []
        per_request: list[list[tuple[np.ndarray, np.ndarray]] | None] = []
        for view in views:
            try:
                per_request.append(self.images_of(view))
                results.append(RuntimeError("not run"))
            except Exception as e:
                per_request.append(None)
                results.append(e)
        flat = [img for imgs in per_request if imgs for img in imgs]
        if not flat:
            return results
        try:
            encoded = self.encode(flat)
        except Exception as e:
            return [e if imgs is not None else r for imgs, r in zip(per_request, results)]
        pos = 0
        for i, imgs in enumerate(per_request):
            if imgs is None:
                continue
            results[i] = self.outputs(encoded[pos:pos + len(imgs)])
            pos += len(imgs)
        return results


class TritonPythonModel:
    """Triton Python-backend model `vision_encoder` over ONNX Runtime; `torch_steps.TorchVisionModel`
    is the same step over PyTorch (it overrides `load`)."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.encoder = self.load(config_parameters(args["model_config"]), repository_root(args))

    def load(self, params: dict[str, str], root: str) -> "VisionEncoder":
        from coordexp.engines.onnx_engine import OnnxParts

        # the vision graph opens now (a broken one fails the load, not the first request); the
        # text graphs are never opened in this process
        parts = OnnxParts(resolve(root, params.get("onnx_dir") or ONNX_SUBDIR),
                          threads=int_param(params, "intra_op_threads", 0) or None)
        open_quiet_sessions(parts, ("vision",), spin=params.get("ort_spin") == "true")
        return VisionEncoder(parts, int_param(params, "merge_size", 0) or None)

    def execute(self, requests: list[Any]) -> list[Any]:
        views = []
        for request in requests:
            views.append(request_view(self.pb, request, wire.input_names(wire.VISION_ENCODER)))
        out = []
        for res in self.encoder.run(views):
            out.append(error_response(self.pb, res) if isinstance(res, Exception) else response(self.pb, res))
        return out
