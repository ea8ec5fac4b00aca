"""coordexp.image_prep: the fast image path gives the Hugging Face image processor's pixel values bit
for bit (sizes, modes, both families' settings), falls back to the HF processor for what it does
not reproduce, and the opt-in JPEG draft decoding keeps the patch grid."""
from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: E402

from coordexp.image_prep import ImagePlan, decode_image, target_size  # noqa: E402
from coordexp.processor import CoordExpProcessor, to_rgb  # noqa: E402
from coordexp.prompt import PromptSpec  # noqa: E402

from conftest import DEMO_CKPT  # noqa: E402

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _processors():
    """The settings our checkpoints ship: the demo's (patch 8), the tiny builder's for both
    families, and the released Qwen3-VL (patch 16, 0.5/0.5) / Qwen2.5-VL (patch 14, CLIP) ones
    with a budget small enough to force resizing in the tests below."""
    from coordexp.fixtures.configs import make_image_processor

    return {
        "demo": Qwen2VLImageProcessorPil.from_pretrained(DEMO_CKPT),
        "tiny_qwen3_vl": make_image_processor("qwen3_vl"),
        "tiny_qwen2_5_vl": make_image_processor("qwen2_5_vl"),
        "qwen3_vl": Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, min_pixels=64 * 64, max_pixels=320 * 320),
        "qwen2_5_vl": Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=CLIP_MEAN,
                                               image_std=CLIP_STD, min_pixels=56 * 56, max_pixels=300 * 280),
    }


PROCESSORS = _processors()


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / max(w, 1), yy * 255 / max(h, 1), (xx + yy) % 256], -1) + rng.normal(0, 25, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _images() -> dict[str, Image.Image]:
    """Odd sizes, tiny (upscaled to min_pixels), above max_pixels, exact multiples, elongated,
    and the non-RGB modes to_rgb converts (RGBA/LA composited on white, L, P, P with transparency)."""
    rng = np.random.default_rng(1)
    rgba = np.concatenate([_photo(61, 47), rng.integers(0, 256, (47, 61, 1), dtype=np.uint8)], -1)
    pal_t = Image.fromarray(_photo(90, 40)).convert("P")
    pal_t.info["transparency"] = 3
    return {
        "odd_131x77": Image.fromarray(_photo(131, 77)),
        "tiny_5x7": Image.fromarray(_photo(5, 7)),
        "one_pixel_row_300x2": Image.fromarray(_photo(300, 2)),
        "large_1001x613": Image.fromarray(_photo(1001, 613)),
        "multiple_64x128": Image.fromarray(_photo(64, 128)),
        "elongated_900x5": Image.fromarray(_photo(900, 5)),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "la": Image.fromarray(rgba[..., 2:], "LA"),
        "l": Image.fromarray(_photo(77, 55)[..., 0], "L"),
        "p": Image.fromarray(_photo(70, 300)).convert("P"),
        "p_transparency": pal_t,
    }


IMAGES = _images()


def _hf(ip, image):
    out = ip(image, return_tensors=None)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"]).reshape(-1, 3)


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_pixels_identical_to_hf_processor(name):
    ip = PROCESSORS[name]
    plan = ImagePlan.from_processor(ip)
    assert plan is not None
    for label, image in IMAGES.items():
        ref, grid = _hf(ip, image)  # the HF processor converts the mode itself
        ours, our_grid = plan([to_rgb(image)])
        assert ours.dtype == np.float32 and ours.flags.c_contiguous, label
        assert our_grid.tolist() == grid.tolist(), label
        assert ours.shape == ref.shape and np.array_equal(ours, ref), (name, label)
    # a batch: the concatenation, in order
    batch = [to_rgb(IMAGES[k]) for k in ("odd_131x77", "tiny_5x7", "rgba")]
    ref = ip(batch, return_tensors=None)
    ours, grids = plan(batch)
    assert np.array_equal(ours, np.asarray(ref["pixel_values"]))
    assert grids.tolist() == np.asarray(ref["image_grid_thw"]).tolist()


@pytest.mark.parametrize("do_rescale,do_normalize", [(False, True), (True, False), (False, False)])
def test_rescale_and_normalise_switches_match(do_rescale, do_normalize):
    ip = Qwen2VLImageProcessorPil(patch_size=14, image_mean=CLIP_MEAN, image_std=CLIP_STD, min_pixels=56 * 56,
                                  max_pixels=200 * 200, do_rescale=do_rescale, do_normalize=do_normalize,
                                  resample=2)
    plan = ImagePlan.from_processor(ip)
    assert plan is not None and plan.resample == 2
    for label in ("odd_131x77", "large_1001x613"):
        ref, _ = _hf(ip, IMAGES[label])
        assert np.array_equal(plan([to_rgb(IMAGES[label])])[0], ref), label


def test_without_resize_the_sizes_must_already_fit():
    ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, do_resize=False)
    plan = ImagePlan.from_processor(ip)
    image = Image.fromarray(_photo(48, 32))
    assert np.array_equal(plan([image])[0], _hf(ip, image)[0])
    with pytest.raises(ValueError, match="not a multiple of 16"):
        plan([Image.fromarray(_photo(50, 32))])


def test_target_size_is_smart_resize():
    sizes = [1, 2, 3, 5, 13, 27, 28, 29, 31, 32, 33, 55, 97, 100, 127, 128, 255, 480, 613, 1080, 1920, 3024, 4032]
    for factor, lo, hi in [(16, 1024, 65536), (28, 56 * 56, 28 * 28 * 1280), (32, 64 * 64, 16777216), (16, 256, 4096)]:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        target_size(h, w, factor, lo, hi)
                    with pytest.raises(ValueError):
                        smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                else:
                    assert target_size(h, w, factor, lo, hi) == smart_resize(h, w, factor, lo, hi), (h, w, factor)


def test_unsupported_processors_fall_back_to_hf():
    class Custom(Qwen2VLImageProcessorPil):  # a subclass may change any step: not ours to reproduce
        pass

    base = dict(patch_size=8, merge_size=2, min_pixels=1024, max_pixels=65536)
    assert ImagePlan.from_processor(Custom(**base)) is None
    assert ImagePlan.from_processor(Qwen2VLImageProcessorPil(image_mean=[0.5] * 4, image_std=[0.5] * 4, **base)) is None
    assert ImagePlan.from_processor(object()) is None

    proc = CoordExpProcessor.from_pretrained(DEMO_CKPT)
    assert proc.image_plan is not None  # the demo checkpoint's processor takes the fast path
    fast = proc.encode([IMAGES["rgba"], IMAGES["odd_131x77"]], PromptSpec(), return_tensors="np")
    fallback = CoordExpProcessor(proc.tokenizer, Custom.from_pretrained(DEMO_CKPT), chat_template=proc.chat_template)
    assert fallback.image_plan is None
    slow = fallback.encode([IMAGES["rgba"], IMAGES["odd_131x77"]], PromptSpec(), return_tensors="np")
    assert fast.keys() == slow.keys()
    for key in fast:
        assert fast[key].dtype == slow[key].dtype and np.array_equal(fast[key], slow[key]), key
    assert fallback.image_grid(131, 77) == proc.image_grid(131, 77) == tuple(slow["image_grid_thw"][1])


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(w, h)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_decode_and_draft_decoding():
    proc = CoordExpProcessor.from_pretrained(DEMO_CKPT)
    data = _jpeg(1200, 900)
    full = proc.load_image(data)
    assert full.mode == "RGB" and np.array_equal(np.asarray(full), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    drafted = proc.load_image(data, draft=True)
    # decoded at reduced scale, then resized to exactly the processing size: same grid, other pixels
    assert drafted.size == proc.processing_size(1200, 900) == (288, 208)
    ref, grid = proc.pixels([full])
    ours, our_grid = proc.pixels([drafted])
    assert our_grid.tolist() == grid.tolist() and ours.shape == ref.shape
    diff = np.abs(ours - ref)
    assert 0 < diff.max() < 0.5 and diff.mean() < 0.05  # values span [-1, 1]
    # not a JPEG, or not much larger than its target: draft changes nothing
    png = io.BytesIO()
    Image.fromarray(_photo(1200, 900)).save(png, "PNG")
    assert np.array_equal(np.asarray(proc.load_image(png.getvalue(), draft=True)),
                          np.asarray(Image.open(io.BytesIO(png.getvalue())).convert("RGB")))
    small = _jpeg(300, 200)
    assert np.array_equal(np.asarray(proc.load_image(small, draft=True)), np.asarray(proc.load_image(small)))
    gray = io.BytesIO()
    Image.fromarray(_photo(1200, 900)[..., 1], "L").save(gray, "JPEG", quality=90)
    assert proc.load_image(gray.getvalue(), draft=True).mode == "RGB"


def test_served_preprocess_uses_the_fast_path_and_draft_is_opt_in():
    from coordexp import wire
    from coordexp.serving.preprocess import Preprocessor

    proc = CoordExpProcessor.from_pretrained(DEMO_CKPT)
    data = _jpeg(1200, 900)
    ip = proc.image_processor
    ref, grid = _hf(ip, Image.open(io.BytesIO(data)).convert("RGB"))
    out = Preprocessor(proc, PromptSpec()).encode([data])
    assert np.array_equal(out[wire.PIXEL_VALUES][0], ref) and out[wire.IMAGE_GRID_THW].tolist() == grid.tolist()
    drafted = Preprocessor(proc, PromptSpec(), fast_decode=True).encode([data])
    assert drafted[wire.IMAGE_GRID_THW].tolist() == grid.tolist()
    assert np.array_equal(drafted[wire.INPUT_IDS], out[wire.INPUT_IDS])
    assert not np.array_equal(drafted[wire.PIXEL_VALUES], out[wire.PIXEL_VALUES])
