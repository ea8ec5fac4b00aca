"""Tokenizer + image processor -> model inputs, exactly as the HF Qwen-VL processors build them.

transformers' `Qwen3VLProcessor` / `Qwen2_5_VLProcessor` (and so `AutoProcessor`) also load a video
processor, which needs torchvision; serving images does not. `CoordExpProcessor` loads only the
tokenizer and the PIL image processor (`Qwen2VLImageProcessorPil`) and mirrors what
`ProcessorMixin.__call__` of transformers 5.x does for images + text:

1. the image processor turns each image into flat patches (`pixel_values`, shape
   `(sum of t*h*w, C*temporal_patch*patch*patch)`) and `image_grid_thw` (`(n_images, 3)`), after
   `smart_resize` to multiples of `patch_size * merge_size` within `size.shortest_edge` (min_pixels)
   and `size.longest_edge` (max_pixels) when `do_resize`. `coordexp.image_prep` computes the
   same values (bit for bit) several times faster for the `Qwen2VLImageProcessorPil` settings it
   supports; any other image processor (another class, a subclass, non-RGB mean/std) is run
   itself (`image_plan` is None then);
2. the i-th `<|image_pad|>` of the rendered prompts becomes `t*h*w // merge_size**2` copies;
3. the tokenizer encodes the batch (LEFT padded here, for generation);
4. `mm_token_type_ids` marks image placeholder positions with 1 (video 2, text and padding 0);
   Qwen3-VL / Qwen2.5-VL need it in transformers >= 5 to build the 3D (M-RoPE) positions.

Heavy imports (torch, transformers, PIL) happen inside the methods.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from coordexp.image_prep import ImagePlan, decode_image
from coordexp.prompt import PromptSpec
from coordexp.tokens import ENDOFTEXT, IM_END, IMAGE_PAD, VISION_END, VISION_START

VIDEO_PAD = "<|video_pad|>"


def _read_chat_template(folder: Path) -> str | None:
    """The processor's chat template, with transformers' precedence: processor_config.json's
    `chat_template` key, else chat_template.jinja, else the legacy chat_template.json."""
    pc = folder / "processor_config.json"
    if pc.is_file():
        try:
            tpl = json.loads(pc.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError:
            tpl = None
        if isinstance(tpl, str):
            return tpl
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        tpl = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    return None


def set_image_budget(image_processor: Any, max_pixels: int) -> None:
    """Resize to at most `max_pixels` pixels (Qwen's `size.longest_edge`, which is an area, not an edge)."""
    size = dict(getattr(image_processor, "size", None) or {})
    size["longest_edge"] = int(max_pixels)
    image_processor.size = size
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = int(max_pixels)


def write_image_budget(folder: str | os.PathLike, max_pixels: int) -> None:
    """The same in a processor folder's `preprocessor_config.json` (what a served repository loads)."""
    path = Path(folder) / "preprocessor_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["size"] = {**(cfg.get("size") or {}), "longest_edge": int(max_pixels)}
    if "max_pixels" in cfg:
        cfg["max_pixels"] = int(max_pixels)
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def to_rgb(image):
    """PIL image (or HWC uint8 array) -> RGB PIL image, the way transformers' `convert_to_rgb` does
    it (transparency is composited onto white)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
            image = Image.fromarray(image)
        else:
            raise TypeError(f"expected a PIL.Image.Image (or an HWC uint8 array), got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class CoordExpProcessor:
    """Prompt rendering, input encoding and output decoding for CoordExp Qwen-VL checkpoints."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("no chat template: the checkpoint needs chat_template.jinja (or a tokenizer template)")
        ids = self._token_ids(tokenizer, [IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, IM_END, ENDOFTEXT])
        (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id,
         self.im_end_token_id, self.endoftext_token_id) = ids
        self.image_token = IMAGE_PAD
        self.merge_size = int(image_processor.merge_size)
        # the fast, bit-identical image path, or None: then `image_processor` itself runs
        self.image_plan: ImagePlan | None = ImagePlan.from_processor(image_processor)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.endoftext_token_id
        stops = [self.im_end_token_id, self.endoftext_token_id]
        eos = tokenizer.eos_token_id
        if eos is not None and eos not in stops:
            stops.append(int(eos))
        self.stop_token_ids: list[int] = stops
        # everything `decode` drops: stop tokens and padding
        self._drop_ids = frozenset(stops + [self.pad_token_id])

    @staticmethod
    def _token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
        out = []
        vocab = tokenizer.get_vocab()
        for t in tokens:
            if t not in vocab:
                raise ValueError(f"the tokenizer has no {t} token")
            out.append(int(vocab[t]))
        return out

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, ckpt: str | os.PathLike, image_max_pixels: int | None = None,
                        **kwargs: Any) -> "CoordExpProcessor":
        """Load tokenizer (`AutoTokenizer`) + PIL image processor + chat template from a folder.
        `image_max_pixels`: the image budget to resize to instead of the folder's own (a training
        run's `template.max_pixels`: `coordexp.training_record`)."""
        from transformers import AutoTokenizer

        folder = Path(ckpt)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        image_processor = cls._load_image_processor(folder, **kwargs)
        if image_max_pixels is not None:
            set_image_budget(image_processor, image_max_pixels)
        return cls(tokenizer, image_processor, chat_template=_read_chat_template(folder))

    @staticmethod
    def _load_image_processor(folder: Path, **kwargs: Any):
        from transformers import Qwen2VLImageProcessorPil

        try:
            from transformers import AutoImageProcessor

            ip = AutoImageProcessor.from_pretrained(str(folder), backend="pil", **kwargs)
            if isinstance(ip, Qwen2VLImageProcessorPil):
                return ip
        except Exception:  # noqa: BLE001 - fall back to the class itself below
            pass
        return Qwen2VLImageProcessorPil.from_pretrained(str(folder), **kwargs)

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, spec: PromptSpec | None = None) -> str:
        """The chat-templated prompt (system + user with one image placeholder + assistant header)."""
        spec = spec or PromptSpec()
        return self.tokenizer.apply_chat_template(spec.messages(), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def num_image_tokens(self, image_grid_thw: Sequence[int]) -> int:
        t, h, w = (int(v) for v in image_grid_thw)
        return (t * h * w) // (self.merge_size ** 2)

    def image_grid(self, width: int, height: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid an image of this size gets (no pixels needed)."""
        ip = self.image_processor
        if self.image_plan is not None:
            width, height = self.image_plan.size_for(width, height)
        elif ip.do_resize:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

            factor = ip.patch_size * ip.merge_size
            height, width = smart_resize(height, width, factor=factor, min_pixels=ip.size["shortest_edge"],
                                         max_pixels=ip.size["longest_edge"])
        return (1, height // ip.patch_size, width // ip.patch_size)

    def processing_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image processor resizes an image of this size to."""
        _, gh, gw = self.image_grid(width, height)
        p = int(self.image_processor.patch_size)
        return gw * p, gh * p

    def load_image(self, data: bytes, *, draft: bool = False):
        """Encoded image bytes -> RGB PIL image (`Image.open(...).convert("RGB")`).

        `draft=True`: a JPEG much larger than its processing size is decoded at 1/2, 1/4 or 1/8
        scale (PIL draft mode) and resized to that size: same patch grid, several times faster,
        but the pixel values are NOT the Hugging Face processor's (see `coordexp.image_prep`),
        so it is off by default."""
        resample = self.image_plan.resample if self.image_plan is not None else int(self.image_processor.resample or 2)
        return decode_image(data, self.processing_size, draft=draft, resample=resample)

    def pixels(self, images: Sequence[Any]) -> tuple[Any, Any]:
        """Images (any PIL mode, or HWC uint8 arrays) -> (pixel_values float32, image_grid_thw int64
        [n, 3]), through the fast path when `image_plan` is set, else the HF image processor."""
        import numpy as np

        rgb = [to_rgb(im) for im in images]
        if self.image_plan is not None:
            return self.image_plan(rgb)
        vision = self.image_processor(rgb, return_tensors=None)
        return (np.asarray(vision["pixel_values"], dtype=np.float32),
                np.asarray(vision["image_grid_thw"], dtype=np.int64).reshape(-1, 3))

    def expand_image_tokens(self, texts: Sequence[str], image_grid_thw: Iterable[Sequence[int]]) -> list[str]:
        """Replace the i-th `<|image_pad|>` (over the whole batch, in order) by its placeholder run."""
        grids = iter(list(image_grid_thw))
        out = []
        for text in texts:
            parts = text.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                try:
                    grid = next(grids)
                except StopIteration:
                    raise ValueError("more image placeholders in the prompts than images") from None
                pieces.append(self.image_token * self.num_image_tokens(grid))
                pieces.append(part)
            out.append("".join(pieces))
        if next(grids, None) is not None:
            raise ValueError("more images than image placeholders in the prompts")
        return out

    # ------------------------------------------------------------------ encoding
    def encode(self, images: Sequence[Any], spec: PromptSpec | Sequence[PromptSpec] | None = None, *,
               texts: Sequence[str] | None = None, return_tensors: str | None = "pt",
               padding_side: str = "left") -> dict[str, Any]:
        """Model inputs for a batch of (one image, one prompt) pairs.

        `spec`: one PromptSpec for the whole batch or one per image (default PromptSpec()).
        `texts`: already rendered prompts instead of `spec` (each holding its `<|image_pad|>`s).
        Returns `input_ids`, `attention_mask` (left padded), `mm_token_type_ids`, `pixel_values`,
        `image_grid_thw` as torch tensors (`return_tensors="np"`: numpy; None: lists/arrays) -
        all of them are what `model.generate(**inputs)` needs. Pixel values come from
        `coordexp.image_prep` (bit-identical, faster) when `image_plan` is set, otherwise from the
        HF image processor itself (image processors it does not reproduce; or set
        `image_plan = None` to force that path).
        """
        import numpy as np

        images = list(images)
        if not images:
            raise ValueError("encode needs at least one image")
        if texts is None:
            if spec is None or isinstance(spec, PromptSpec):
                texts = [self.prompt_text(spec)] * len(images)
            else:
                specs = list(spec)
                if len(specs) != len(images):
                    raise ValueError(f"{len(specs)} prompt specs for {len(images)} images")
                texts = [self.prompt_text(s) for s in specs]
        texts = list(texts)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(f"{n_placeholders} {self.image_token} placeholders in the prompts "
                             f"for {len(images)} images")

        pixel_values, image_grid_thw = self.pixels(images)

        expanded = self.expand_image_tokens(texts, image_grid_thw.tolist())
        enc = self.tokenizer(expanded, padding=True, padding_side=padding_side, return_attention_mask=True,
                             return_token_type_ids=False)
        input_ids = enc["input_ids"]
        attention_mask = enc["attention_mask"]
        mm_types = []
        for row in input_ids:
            arr = np.asarray(row, dtype=np.int64)
            types = np.zeros_like(arr)
            types[arr == self.image_token_id] = 1
            types[arr == self.video_token_id] = 2
            mm_types.append(types)
        # the same check transformers does: every placeholder survived tokenization as one token
        expected = int(sum(self.num_image_tokens(g) for g in image_grid_thw.tolist()))
        got = int(sum(int((t == 1).sum()) for t in mm_types))
        if got != expected:
            raise ValueError(f"{got} image tokens after tokenization, expected {expected}")

        data: dict[str, Any] = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "mm_token_type_ids": np.stack(mm_types).astype(np.int64),
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
        }
        if return_tensors == "pt":
            import torch

            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
        if return_tensors in ("np", None):
            return data
        raise ValueError(f"return_tensors={return_tensors!r}; expected 'pt', 'np' or None")

    __call__ = encode

    # ------------------------------------------------------------------ decoding
    def _ids_list(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        return [int(i) for i in ids]

    def trim(self, ids: Any) -> list[int]:
        """Generated ids up to (not including) the first stop token, leading padding removed."""
        seq = self._ids_list(ids)
        start = 0
        while start < len(seq) and seq[start] == self.pad_token_id:
            start += 1
        out = []
        for i in seq[start:]:
            if i in self._drop_ids:
                break
            out.append(i)
        return out

    def decode(self, ids: Any) -> str:
        """Text of generated ids: stops at the first `<|im_end|>` / `<|endoftext|>` / pad token,
        keeps the `<|coord_k|>` tokens (and any other special token) verbatim."""
        return self.tokenizer.decode(self.trim(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def batch_decode(self, sequences: Any) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s) for s in sequences]

    def is_stop(self, token_id: int) -> bool:
        return int(token_id) in self._drop_ids
