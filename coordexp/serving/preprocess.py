"""The `preprocess` model: image bytes (+ optional user prompt) -> token ids and pixel patches.

Per request (rows = the request's batch dimension, usually 1):
  image_bytes_input BYTES [B, 1], text_input BYTES [B, 1] (optional), system_text_input BYTES [B, 1]
  (optional), message_layout BYTES [B, 1] (optional: image_first | text_first)
  -> input_ids INT32 [B, T] (left padded), attention_mask INT32 [B, T], input_lengths INT32 [B, 1],
     pixel_values FP32 [B, P, D] (zero padded to the request's largest image), image_grid_thw INT64 [B, 3]

The image arrives as the encoded file's bytes, never as a server-side path; it is checked with
`coordexp.dataset.check_image_bytes` (header first, so decompression bombs are refused before
decoding) and a bad one fails only its own request, with the contract's error code in the message.

Pixels go through `CoordExpProcessor` (its fast path, bit-identical to the HF image processor).
`fast_decode` (config parameter `fast_decode: "true"`, default off) decodes large JPEGs at reduced
scale (PIL draft mode): faster, but the pixel values then differ from the HF processor's.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from coordexp.prompt import MESSAGE_LAYOUTS, PromptSpec
from coordexp import wire
from coordexp.serving.common import (RequestError, TritonRequestView, as_bytes, as_str, config_parameters,
                                     error_response, int_param, pad_stack, repository_root, request_view, resolve,
                                     response, rows)
from coordexp.wire import (ATTENTION_MASK, IMAGE_BYTES_INPUT, IMAGE_GRID_THW, INPUT_IDS, INPUT_LENGTHS,
                           MESSAGE_LAYOUT_INPUT, PIXEL_VALUES, SYSTEM_TEXT_INPUT, TEXT_INPUT)

MAX_IMAGE_BYTES = 32 << 20  # one encoded image per request: a 4032x3024 JPEG is ~5 MB


class Preprocessor:
    """Request rows -> model inputs, with the repository's prompt variant."""

    def __init__(self, processor: Any, prompt: PromptSpec | None = None, max_pixels: int | None = None,
                 max_image_bytes: int = MAX_IMAGE_BYTES, fast_decode: bool = False):
        from coordexp.dataset import DEFAULT_MAX_PIXELS

        self.processor = processor
        self.fast_decode = bool(fast_decode)
        self.prompt = prompt or PromptSpec()
        self.max_pixels = int(max_pixels or DEFAULT_MAX_PIXELS)
        self.max_image_bytes = int(max_image_bytes)

    @classmethod
    def from_dir(cls, processor_dir: str, prompt: PromptSpec | None = None,
                 max_pixels: int | None = None, fast_decode: bool = False) -> "Preprocessor":
        from coordexp.processor import CoordExpProcessor

        return cls(CoordExpProcessor.from_pretrained(processor_dir), prompt, max_pixels, fast_decode=fast_decode)

    def spec_for(self, text: str | None, system: str | None = None, layout: str | None = None) -> PromptSpec:
        """The prompt for one row: the repository's, with the user text, the system text and the place
        of the image replaced where given (an empty text: the repository's)."""
        changes: dict[str, str] = {}
        if text is not None and text.strip():
            changes["user_text"] = text
        if system is not None and system.strip():
            changes["system_text"] = system
        if layout is not None and layout.strip():
            if layout not in MESSAGE_LAYOUTS:
                raise RequestError(f"{MESSAGE_LAYOUT_INPUT}: {layout!r}; expected one of {', '.join(MESSAGE_LAYOUTS)}")
            changes["layout"] = layout
        return replace(self.prompt, **changes) if changes else self.prompt

    def load_image(self, data: bytes, where: str):
        from coordexp.dataset import check_image_bytes
        from coordexp.schema import ContractError

        if len(data) > self.max_image_bytes:  # refused before any decoding (a 100 MB "image" is not one)
            raise RequestError(f"image_too_large: {where}: {len(data) / 2**20:.1f} MiB, the limit is "
                               f"{self.max_image_bytes / 2**20:.0f} MiB")
        try:
            check_image_bytes(data, where, self.max_pixels)
        except ContractError as e:  # image_load_failed | image_too_large: the code leads the message
            raise RequestError(f"{e.code}: {e.message}") from None
        try:
            return self.processor.load_image(data, draft=self.fast_decode)
        except Exception as e:  # verified header, broken body
            raise RequestError(f"image_load_failed: {where}: cannot decode image ({e})") from None

    def encode(self, images: Sequence[bytes], texts: Sequence[str | None] | None = None,
               systems: Sequence[str | None] | None = None,
               layouts: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:
        """Encoded image files (+ optional user texts, system texts, layouts) -> the step's output tensors."""
        n = len(images)
        if n == 0:
            raise RequestError(f"{IMAGE_BYTES_INPUT}: empty batch")
        texts = list(texts) if texts is not None else [None] * n
        systems = list(systems) if systems is not None else [None] * n
        layouts = list(layouts) if layouts is not None else [None] * n
        specs = [self.spec_for(t, s, lay) for t, s, lay in zip(texts, systems, layouts)]
        where = (lambda i: IMAGE_BYTES_INPUT) if n == 1 else (lambda i: f"{IMAGE_BYTES_INPUT}[{i}]")
        pil = [self.load_image(data, where(i)) for i, data in enumerate(images)]
        enc = self.processor.encode(pil, specs, return_tensors="np")
        grid = np.asarray(enc["image_grid_thw"], dtype=np.int64).reshape(n, 3)
        patches = np.asarray(enc["pixel_values"], dtype=np.float32)
        counts = [int(np.prod(g)) for g in grid]
        if sum(counts) != patches.shape[0]:
            raise RuntimeError(f"{patches.shape[0]} patches for grids {grid.tolist()}")
        splits = np.split(patches, np.cumsum(counts)[:-1])
        mask = np.asarray(enc["attention_mask"], dtype=np.int32)
        return {
            INPUT_IDS: np.asarray(enc["input_ids"], dtype=np.int32),
            ATTENTION_MASK: mask,
            INPUT_LENGTHS: mask.sum(axis=1, dtype=np.int32).reshape(n, 1),
            PIXEL_VALUES: pad_stack(splits),
            IMAGE_GRID_THW: grid,
        }

    def encode_request(self, view: TritonRequestView) -> dict[str, np.ndarray]:
        raw = view.need(IMAGE_BYTES_INPUT)
        batch = int(raw.shape[0]) if raw.ndim else 1
        images = [as_bytes(v) for v in rows(raw, batch, IMAGE_BYTES_INPUT)]
        texts = {}
        for name in (TEXT_INPUT, SYSTEM_TEXT_INPUT, MESSAGE_LAYOUT_INPUT):
            try:
                texts[name] = [None if v is None else as_str(v) for v in rows(view.get(name), batch, name)]
            except UnicodeDecodeError:
                raise RequestError(f"{name}: not valid UTF-8") from None
        return self.encode(images, texts[TEXT_INPUT], texts[SYSTEM_TEXT_INPUT], texts[MESSAGE_LAYOUT_INPUT])


class TritonPythonModel:
    """Triton Python-backend model `preprocess` (the repository's model.py imports this class)."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = config_parameters(args["model_config"])
        root = repository_root(args)
        prompt = PromptSpec.from_dict(json.loads(params["prompt_json"])) if params.get("prompt_json") else None
        fast_decode = params.get("fast_decode", "").strip().lower() in ("1", "true", "yes", "on")
        self.pre = Preprocessor.from_dir(resolve(root, params["processor_dir"]), prompt,
                                         int_param(params, "max_pixels", 0) or None, fast_decode=fast_decode)

    def execute(self, requests: list[Any]) -> list[Any]:
        out = []
        for request in requests:
            try:
                view = request_view(self.pb, request, wire.input_names(wire.PREPROCESS))
                out.append(response(self.pb, self.pre.encode_request(view)))
            except Exception as e:  # one bad request must not fail the others
                out.append(error_response(self.pb, e))
        return out
