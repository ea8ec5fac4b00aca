"""Fast image path: RGB PIL images -> `pixel_values` + `image_grid_thw`, identical to transformers'
`Qwen2VLImageProcessorPil` (the image processor of Qwen3-VL and Qwen2.5-VL checkpoints).

What the HF processor does per image, and how this module gets the same numbers faster:

1. resize to `target_size` (multiples of `patch * merge`, within min/max pixels) with PIL's
   `Image.resize` on the uint8 image (bicubic for Qwen-VL) - the same PIL call, on the PIL image
   directly instead of a numpy -> PIL round trip; skipped when the size is already right (PIL
   returns a copy then);
2. rescale (uint8 -> float64 * factor -> float32) and normalise ((x - mean) / std in float32):
   the result depends only on the channel and the uint8 value, so it is a 3 x 256 float32 table
   computed with exactly those numpy operations once, and one gather per channel applies it -
   bit-identical values, no float64 image, no per-pixel Python;
3. patchify: per channel plane (PIL `split`) and per band of merge groups, the table gather
   fills a cache-sized float32 band that one reshape + transpose view copies into the output
   (once per temporal frame: a still image is `temporal_patch` identical frames).

`decode_image` is the one bytes -> RGB image loader, with an opt-in JPEG draft mode (decode at
1/2, 1/4 or 1/8 scale when the target is that much smaller; faster, but the pixels then differ
from a full decode + resize, so it is off unless asked for).

Only configurations this module reproduces exactly get a plan (`ImagePlan.from_processor`);
anything else returns None and the caller keeps using the HF processor. numpy and PIL are
imported inside the functions.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# the class whose algorithm this module reproduces (subclasses may change it: they fall back)
SUPPORTED_PROCESSORS = frozenset({
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
})
MAX_ASPECT_RATIO = 200  # the Qwen-VL processors refuse images more elongated than this
PIL_BICUBIC, PIL_BILINEAR = 3, 2
DRAFT_MARGIN = 2  # draft decodes to at least this many times the target size, bicubic does the rest


def target_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) an image is resized to: each side the nearest multiple of `factor`; when
    that breaks the pixel budget, both sides scaled by one factor (floored when shrinking, ceiled
    when growing) so the aspect ratio stays as close as the multiples allow. Same numbers as the
    HF `smart_resize` (Python's round-half-even included)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image is {width}x{height}: both sides must be positive")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image is {width}x{height}: aspect ratio {ratio:.1f} is above {MAX_ASPECT_RATIO}, "
                         "which the Qwen-VL image processors refuse")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def _per_channel(value: Any) -> list[float] | None:
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    try:
        values = [float(v) for v in value]
    except TypeError:
        return None
    return values if len(values) == 3 else None


@dataclass(frozen=True)
class ImagePlan:
    """One image processor's settings, and the value table that replaces rescale + normalise."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    do_resize: bool
    min_pixels: int
    max_pixels: int
    resample: int
    lut: Any = field(repr=False)  # float32 [3, 256]: the processed value of each uint8 per channel

    @classmethod
    def from_processor(cls, ip: Any) -> "ImagePlan | None":
        """The plan for a HF image processor, or None when it is not one this module reproduces
        exactly (another class or a subclass, non-RGB mean/std, missing size keys): then use
        the processor itself."""
        import numpy as np

        kind = type(ip)
        if f"{kind.__module__}.{kind.__qualname__}" not in SUPPORTED_PROCESSORS:
            return None
        try:
            patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
            do_resize = bool(ip.do_resize)
            min_pixels = int(ip.size["shortest_edge"]) if do_resize else 0
            max_pixels = int(ip.size["longest_edge"]) if do_resize else 0
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        if min(patch, merge, temporal) < 1 or (do_resize and not (min_pixels and max_pixels)):
            return None
        resample = PIL_BILINEAR if ip.resample is None else int(ip.resample)  # HF's default when unset

        # The table, by the HF processor's own operations on each of the 256 values: rescale in
        # float64 then float32, normalise in float32 with a float32 mean/std.
        values = np.arange(256, dtype=np.uint8)
        if ip.do_rescale:
            x = (values.astype(np.float64) * ip.rescale_factor).astype(np.float32)
        else:
            x = values.astype(np.float32)
        columns = [x] * 3
        if ip.do_normalize:
            mean, std = _per_channel(ip.image_mean), _per_channel(ip.image_std)
            if mean is None or std is None:
                return None
            mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
            columns = [(x - mean32[c]) / std32[c] for c in range(3)]
        lut = np.ascontiguousarray(np.stack(columns).astype(np.float32, copy=False))
        lut.setflags(write=False)
        return cls(patch, merge, temporal, do_resize, min_pixels, max_pixels, resample, lut)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is processed at."""
        if not self.do_resize:
            return width, height
        h, w = target_size(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def resized(self, image):
        """The RGB PIL image at its processing size (the same PIL resize the HF processor runs)."""
        size = self.size_for(*image.size)
        return image if size == image.size else image.resize(size, resample=self.resample)

    def patches(self, image) -> tuple[Any, tuple[int, int, int]]:
        """One RGB PIL image -> (float32 [t*h*w, 3*temporal*patch*patch], (1, h, w))."""
        import numpy as np

        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        image = self.resized(image)
        width, height = image.size
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if height % self.factor or width % self.factor:
            raise ValueError(f"image is {width}x{height}: not a multiple of {self.factor} (do_resize is off)")
        gh, gw = height // p, width // p
        # Output order per patch: merge group (row, col), position in the group, then C, T, rows, cols.
        out = np.empty((gh // m, gw // m, m, m, 3, t, p, p), dtype=np.float32)
        rows = m * p  # one band of merge groups at a time: the float32 band stays in cache
        band = np.empty((rows, width), dtype=np.float32)
        for c, plane in enumerate(np.asarray(b) for b in image.split()):  # split: contiguous channel planes
            for r in range(gh // m):
                np.take(self.lut[c], plane[r * rows:(r + 1) * rows], out=band, mode="clip")  # uint8: never clipped
                cut = band.reshape(m, p, gw // m, m, p).transpose(2, 0, 3, 1, 4)  # (gw/m, m, m, p, p)
                for k in range(t):  # a still image is `t` identical frames
                    out[r, :, :, :, c, k] = cut
        return out.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[Any]) -> tuple[Any, Any]:
        """RGB PIL images -> (pixel_values float32 [sum t*h*w, D], image_grid_thw int64 [n, 3])."""
        import numpy as np

        if not images:
            raise ValueError("no images to process")
        parts, grids = [], []
        for image in images:
            values, grid = self.patches(image)
            parts.append(values)
            grids.append(grid)
        pixel_values = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return pixel_values, np.asarray(grids, dtype=np.int64).reshape(-1, 3)


def decode_image(data: bytes, size_for: Callable[[int, int], tuple[int, int]] | None = None, *,
                 draft: bool = False, resample: int = PIL_BICUBIC, draft_margin: int = DRAFT_MARGIN):
    """Encoded image bytes -> RGB PIL image (as `Image.open(...).convert("RGB")`).

    `draft=True` (JPEG only, needs `size_for`: (width, height) -> the processing size): decode
    at the smallest of 1/2, 1/4, 1/8 scale that still leaves `draft_margin` times the target
    size, then resize to the exact processing size, so the patch grid (and the number of image
    tokens) is the one a full decode gets. The pixels are NOT the full decode's."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if draft and size_for is not None and image.format == "JPEG":
        width, height = image.size
        target = size_for(width, height)
        want = (max(1, target[0] * draft_margin), max(1, target[1] * draft_margin))
        if want[0] <= width // 2 and want[1] <= height // 2:
            drafted = image.draft("RGB", want)
            image = _rgb(image)
            if drafted is not None and image.size != target:
                _, box = drafted  # the drafted image covers (0, 0, width / scale, height / scale)
                image = image.resize(target, resample=resample, box=box)
            return image
    return _rgb(image)


def _rgb(image):
    """Decoded RGB (an RGB image is used as decoded: `convert` would only copy it)."""
    if image.mode == "RGB":
        image.load()
        return image
    return image.convert("RGB")
