"""The model families CoordExp exports and serves, as one table (optimum style): `FAMILIES`.

Everything that differs between Qwen3-VL and Qwen2.5-VL lives in one `FamilySpec` each: the
vision graph's inputs and outputs (and how the host computes them from `image_grid_thw`),
deepstack or not, window attention or not, the vision_config fields the graphs are built from,
the sample grid the exporter traces with, what TensorRT-LLM is known to support. The exporters
(`coordexp.export.onnx_export`, `coordexp.export.validate`), the TensorRT-LLM plan
(`coordexp.trtllm.plan`) and the host-side vision glue (`coordexp.engines.onnx_engine`,
`coordexp.trtllm.vision`) read it instead of comparing `model_type` strings.

    family_spec("qwen3_vl")       -> FamilySpec
    family_spec("llava")          -> raises UnsupportedFamily (names the family and the supported ones)

numpy only (no torch): the Triton models import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

# A vision.onnx input's trailing dimension: "N" = the patch count again (square attention
# biases), "patch_dim" = C * temporal_patch * patch^2, an int = fixed. The first is always N.
VisionInput = tuple[str, Any]
# (meta, pixel_values [N, patch_dim], image_grid_thw [I, 3], float dtype) -> (vision.onnx feeds,
# the row order undoing a permutation of the output, or None)
FeedsFn = Callable[[Mapping[str, Any], np.ndarray, np.ndarray, Any], tuple[dict[str, np.ndarray], Any]]


class UnsupportedFamily(NotImplementedError):
    """A checkpoint family (config.json `model_type`) no exporter supports."""

    def __init__(self, family: Any, where: str = "the checkpoint", what: str = "CoordExp export"):
        self.family = family
        self.supported = tuple(FAMILIES)
        super().__init__(f"{what} supports {supported_text()} checkpoints; {where} is {family!r}")


class FamilyConfigError(ValueError):
    """A checkpoint of a supported family whose config lacks a field its graphs are built from."""


@dataclass(frozen=True)
class FamilySpec:
    name: str  # config.json model_type
    title: str
    architecture: str  # the Hugging Face class (also what TensorRT-LLM's PyTorch backend loads)
    vision_inputs: tuple[VisionInput, ...]  # vision.onnx inputs, in order
    vision_outputs: tuple[str, ...]
    deepstack: bool  # vision features added to the first decoder layers (decoder input `deepstack`)
    window_attention: bool  # windowed vision blocks: inputs in window order, window_bias / full_bias
    learned_position_grid: bool  # a learned position table resampled per image (interp_indices / weights)
    vision_config_fields: tuple[str, ...]  # vision_config fields of this family the graphs are built from
    vision_wrapper: str  # the coordexp.export.onnx_wrappers module that exports the vision tower
    feeds: FeedsFn  # host-side vision.onnx inputs (export samples and runtime alike)
    sample_grid: Callable[[int, int, int], np.ndarray]  # (merge, patch, window_size) -> grids traced by the exporter
    trtllm_listed_since: str | None = None  # TensorRT-LLM release listing it among supported models (None: unverified)

    @property
    def vision_input_names(self) -> list[str]:
        return [name for name, _ in self.vision_inputs]

    def vision_dynamic_axes(self) -> list[tuple[int, ...]]:
        """Per vision input, its dynamic axes: the patch count, and the last axis of the biases."""
        return [(0, 1) if last == "N" else (0,) for _, last in self.vision_inputs]

    def vision_shapes(self, n: int, patch_dim: int) -> dict[str, tuple[int, int]]:
        """Every vision input's shape for `n` patches (the TensorRT profile shapes)."""
        return {name: (n, n if last == "N" else patch_dim if last == "patch_dim" else int(last))
                for name, last in self.vision_inputs}

    def vision_feeds(self, meta: Mapping[str, Any], pixel_values: np.ndarray, image_grid_thw: np.ndarray,
                     np_dtype: Any = np.float32) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """vision.onnx inputs for these images (all in one attention call, block-diagonal bias) and
        the row order that undoes the input permutation in the output (None when there is none).
        `meta`: onnx_meta.json (or the same keys from a config: spatial_merge_size, patch_size,
        num_grid_per_side, window_size)."""
        grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np_dtype)
        return self.feeds(meta, pixel_values, grid, np_dtype)

    def missing_config_fields(self, vision_config: Any) -> list[str]:
        return [f for f in self.vision_config_fields if getattr(vision_config, f, None) is None]


# ---------------------------------------------------------------------------- host-side vision inputs
def _qwen3_feeds(meta, pixel_values, grid, np_dtype):
    """Learned position table resampled per image; one packed attention over every patch."""
    from coordexp import mrope

    merge = int(meta["spatial_merge_size"])
    idx, wts = mrope.vision_interpolation(grid, int(meta["num_grid_per_side"]), merge)
    return {
        "pixel_values": pixel_values,
        "vision_pos_ids": mrope.vision_position_ids(grid, merge),
        "interp_indices": idx,
        "interp_weights": wts.astype(np_dtype),
        "attention_bias": mrope.vision_attention_bias(grid).astype(np_dtype),
    }, None


def _qwen25_feeds(meta, pixel_values, grid, np_dtype):
    """Patches and rotary positions permuted into window order; the output is un-permuted."""
    from coordexp import mrope

    merge = int(meta["spatial_merge_size"])
    unit = merge * merge
    pos = mrope.vision_position_ids(grid, merge)
    win, cu_win = mrope.vision_window_index(grid, merge, int(meta["window_size"]), int(meta["patch_size"]))
    perm = (win[:, None] * unit + np.arange(unit)).reshape(-1)
    return {
        "pixel_values": np.ascontiguousarray(pixel_values[perm]),
        "vision_pos_ids": np.ascontiguousarray(pos[perm]),
        "window_bias": mrope.segment_bias(mrope.segments_from_cu(cu_win)).astype(np_dtype),
        "full_bias": mrope.vision_attention_bias(grid).astype(np_dtype),
    }, np.argsort(win, kind="stable")


def _qwen3_sample_grid(merge: int, patch: int, window_size: int) -> np.ndarray:
    """Two images: two attention segments, so the block-diagonal bias is exercised."""
    return np.array([[1, 4, 6], [1, 4, 4]], dtype=np.int64)


def _qwen25_sample_grid(merge: int, patch: int, window_size: int) -> np.ndarray:
    """An image spanning several attention windows, plus a small one."""
    vws = max(1, int(window_size) // merge // patch)
    return np.array([[1, merge * (vws + 1), merge * (vws + 2)], [1, 2 * merge, 2 * merge]], dtype=np.int64)


FAMILIES: dict[str, FamilySpec] = {
    "qwen3_vl": FamilySpec(
        name="qwen3_vl", title="Qwen3-VL", architecture="Qwen3VLForConditionalGeneration",
        vision_inputs=(("pixel_values", "patch_dim"), ("vision_pos_ids", 2), ("interp_indices", 4),
                       ("interp_weights", 4), ("attention_bias", "N")),
        vision_outputs=("image_embeds", "deepstack"),
        deepstack=True, window_attention=False, learned_position_grid=True,
        vision_config_fields=("deepstack_visual_indexes", "num_position_embeddings"),
        vision_wrapper="Qwen3VisionWrapper", feeds=_qwen3_feeds, sample_grid=_qwen3_sample_grid,
        trtllm_listed_since="1.2"),
    "qwen2_5_vl": FamilySpec(
        name="qwen2_5_vl", title="Qwen2.5-VL", architecture="Qwen2_5_VLForConditionalGeneration",
        vision_inputs=(("pixel_values", "patch_dim"), ("vision_pos_ids", 2), ("window_bias", "N"),
                       ("full_bias", "N")),
        vision_outputs=("image_embeds",),
        deepstack=False, window_attention=True, learned_position_grid=False,
        vision_config_fields=("window_size", "fullatt_block_indexes"),
        vision_wrapper="Qwen25VisionWrapper", feeds=_qwen25_feeds, sample_grid=_qwen25_sample_grid,
        trtllm_listed_since="0.19"),
}


def supported_text() -> str:
    """'Qwen3-VL (model_type qwen3_vl) and Qwen2.5-VL (qwen2_5_vl)'."""
    parts = [f"{s.title} ({'model_type ' if i == 0 else ''}{s.name})" for i, s in enumerate(FAMILIES.values())]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def family_spec(family: Any, where: str = "the checkpoint", what: str = "CoordExp export") -> FamilySpec:
    """The spec of `family` (a config.json model_type); UnsupportedFamily for any other."""
    spec = FAMILIES.get(family) if isinstance(family, str) else None
    if spec is None:
        raise UnsupportedFamily(family, where, what)
    return spec
