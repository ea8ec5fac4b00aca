"""The ONNX `llm` step's tensors -> what TensorRT-LLM's LLM API takes (numpy only, tested here).

The Qwen-VL input processors of the LLM API take an image and a prompt text, so per row:

- the prompt is `input_ids` decoded with its special tokens, the run of `<|image_pad|>` collapsed
  back to the one placeholder the chat template writes (the HF processor inside TensorRT-LLM
  expands it again to the same count): `PromptRebuilder.prompt`, `collapse_image_pads`;
- vision "trtllm": the image is rebuilt from `pixel_values` - the exact inverse of the Qwen-VL
  image processor's rescale, normalise and patchify - at its resized size, so TensorRT-LLM's own
  processor leaves its size alone and produces the same patches: `image_from_pixel_values`;
- vision "tensorrt": external embeddings; such a processor guesses the patch grid from the token
  count (`near_square_grid`);
- decoding parameters -> `SamplingParams` keyword arguments (`sampling_kwargs`, `accepted_kwargs`),
  generated ids cut at the first stop id (`strip_stop`).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from coordexp.generation import GenerationParams
from coordexp.serving.common import RequestError
from coordexp.wire import IMAGE_GRID_THW, PIXEL_VALUES


def image_from_pixel_values(pixel_values: np.ndarray, grid: Sequence[int], patch_size: int, merge_size: int,
                            temporal_patch_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                            rescale_factor: float = 1 / 255) -> np.ndarray:
    """One image's flat patches [t*h*w, C*tps*p*p] -> the resized image, uint8 HWC.

    Inverts the Qwen-VL image processor: patchify (rows ordered (h/m, w/m, m, m), columns
    (C, tps, p, p)), normalize (mean/std) and rescale. Exact for images the processor resized in
    8 bits (the PIL path), up to the float32 rounding the final `round` absorbs."""
    t, h, w = (int(v) for v in grid)
    if t != 1:
        raise RequestError(f"{IMAGE_GRID_THW}={[t, h, w]}: only single images (t=1) are supported")
    if h % merge_size or w % merge_size:
        raise RequestError(f"{IMAGE_GRID_THW}={[t, h, w]} is not a multiple of the merge size {merge_size}")
    pv = np.asarray(pixel_values, dtype=np.float32)
    n = h * w
    channels = pv.shape[1] // (temporal_patch_size * patch_size * patch_size) if pv.ndim == 2 else 0
    if pv.ndim != 2 or pv.shape[0] < n or channels * temporal_patch_size * patch_size ** 2 != pv.shape[1]:
        raise RequestError(f"{PIXEL_VALUES} {list(pv.shape)} does not fit grid {[t, h, w]} with patch {patch_size}")
    m = merge_size
    x = pv[:n].reshape(h // m, w // m, m, m, channels, temporal_patch_size, patch_size, patch_size)[:, :, :, :, :, 0]
    # (gh, gw, mh, mw, C, ph, pw) -> (C, gh, mh, ph, gw, mw, pw) -> (C, H, W)
    x = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch_size, w * patch_size)
    mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
    x = (x * std + mean) / float(rescale_factor)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def collapse_image_pads(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Each run of image placeholder ids -> one placeholder (the prompt before expansion)."""
    out: list[int] = []
    for tok in ids:
        tok = int(tok)
        if tok == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(tok)
    return out


def near_square_grid(num_tokens: int, merge_size: int) -> list[int]:
    """The grid a Qwen-VL input processor that receives only an embedding assumes for it:
    h = the largest divisor of the token count not above its square root."""
    h = int(math.isqrt(num_tokens))
    while h > 1 and num_tokens % h:
        h -= 1
    return [1, h * merge_size, (num_tokens // h) * merge_size]


def strip_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to (not including) the first stop id: the ONNX llm step's output."""
    stops = set(int(s) for s in stop_ids)
    out = []
    for t in ids:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


def sampling_kwargs(params: GenerationParams, stop_ids: Sequence[int], pad_id: int) -> dict[str, Any]:
    """GenerationParams -> keyword arguments of tensorrt_llm.SamplingParams."""
    kw: dict[str, Any] = {
        "max_tokens": int(params.max_new_tokens),
        "end_id": int(stop_ids[0]),
        "pad_id": int(pad_id),
        "stop_token_ids": [int(s) for s in stop_ids],
        "ignore_eos": bool(params.ignore_eos),
        "repetition_penalty": float(params.repetition_penalty),
        "detokenize": False,  # postprocess decodes; ids are the contract
    }
    if params.greedy:
        kw.update(top_k=1, top_p=1.0)
    else:
        kw.update(temperature=float(params.temperature), top_p=float(params.top_p), seed=int(params.seed))
    return kw


def accepted_kwargs(cls: Any, kw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`kw` restricted to what `cls` accepts (dataclass fields or signature), and the names dropped."""
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
    else:
        sig = inspect.signature(cls)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return dict(kw), []
        names = set(sig.parameters)
    return {k: v for k, v in kw.items() if k in names}, sorted(k for k in kw if k not in names)


class PromptRebuilder:
    """input_ids / pixel_values rows -> what the LLM API's Qwen-VL input processor takes.

    Needs only a tokenizer and the image processor's numbers (`from_dir` reads them with
    `AutoTokenizer` and preprocessor_config.json): the llm process runs TensorRT-LLM's own
    transformers (4.57.3 for TensorRT-LLM 1.2.1; it reads the repository's transformers-4 copies), not the one coordexp.processor needs."""

    def __init__(self, tokenizer: Any, image_token_id: int, patch_size: int, merge_size: int,
                 temporal_patch_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                 rescale_factor: float = 1 / 255):
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.rescale_factor = float(rescale_factor)

    @classmethod
    def from_dir(cls, folder: str, tokenizer: Any = None) -> "PromptRebuilder":
        from coordexp.tokens import IMAGE_PAD

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        with open(os.path.join(folder, "preprocessor_config.json"), "r", encoding="utf-8") as f:
            ip = json.load(f)
        vocab = tokenizer.get_vocab()
        if IMAGE_PAD not in vocab:
            raise ValueError(f"the tokenizer in {folder} has no {IMAGE_PAD} token")
        return cls(tokenizer, vocab[IMAGE_PAD], ip.get("patch_size", 14), ip.get("merge_size", 2),
                   ip.get("temporal_patch_size", 2), ip.get("image_mean", [0.5] * 3), ip.get("image_std", [0.5] * 3),
                   ip.get("rescale_factor", 1 / 255))

    def prompt(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(collapse_image_pads(ids, self.image_token_id), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def image(self, pixel_values: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        return image_from_pixel_values(pixel_values, grid, self.patch_size, self.merge_size, self.temporal_patch_size,
                                       self.image_mean, self.image_std, self.rescale_factor)
