"""Tiny checkpoint builder (coordexp.fixtures.tiny) and the input pipeline (coordexp.processor)."""
from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from coordexp.processor import CoordExpProcessor  # noqa: E402
from coordexp.prompt import PromptSpec  # noqa: E402
from coordexp.fixtures.tiny import (  # noqa: E402
    QWEN3_VL_CHAT_TEMPLATE_SHA256,
    build_tiny_checkpoint,
    file_hashes,
    main,
    make_config,
)
from coordexp.tokens import QWEN_SPECIAL_TOKENS, coord_token  # noqa: E402

SPECS = [PromptSpec(),
         PromptSpec(coord_format="numeric", field_order="geometry_first", user_text="Find the red circle.")]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matrices: one thread is much faster than several on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3_vl", family="qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def ckpt25(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", family="qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def model(ckpt):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(ckpt)).eval()


@pytest.fixture(scope="session")
def proc(ckpt):
    return CoordExpProcessor.from_pretrained(ckpt)


def _images():
    """Deterministic images of several sizes and PIL modes (resized and not, RGBA, L, P)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))  # resized to 96 x 128
    yy, xx = np.mgrid[0:200, 0:60]
    grad = np.stack([xx * 4, yy, (xx + yy) % 256, np.full_like(xx, 180)], -1).astype(np.uint8)
    rgba = Image.fromarray(grad, "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L")
    pal = Image.fromarray(rng.integers(0, 256, (70, 300, 3), dtype=np.uint8)).convert("P")
    return [noise, rgba, gray, pal]


def _hf_processor(ckpt, family):
    """transformers' own Qwen3VLProcessor / Qwen2_5_VLProcessor, built without a video processor.

    AutoProcessor needs torchvision for the video processor; here only the class check of that
    argument is relaxed, so chat template, image processor, placeholder expansion, tokenization and
    mm_token_type_ids all run transformers' code."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen3VLProcessor

    base = Qwen3VLProcessor if family == "qwen3_vl" else Qwen2_5_VLProcessor

    class ImageOnlyProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(ckpt), backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(str(ckpt)),
        video_processor=None,
        chat_template=(ckpt / "chat_template.jinja").read_text(encoding="utf-8"),
    )


def _assert_same_inputs(ours, theirs, pixel_atol=0.0):
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert key in theirs, key
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert ours["pixel_values"].dtype == theirs["pixel_values"].dtype == torch.float32
    if pixel_atol == 0.0:
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    else:
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=pixel_atol, rtol=0)


# ------------------------------------------------------------------------------ checkpoint


def test_checkpoint_files_and_size(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "processor_config.json", "chat_template.jinja", "README.md"):
        assert name in names, name
    total = sum(p.stat().st_size for p in ckpt.iterdir())
    assert total < 2_000_000, total
    card = (ckpt / "README.md").read_text()
    assert "seed: 0" in card and "coordexp-make-tiny OUT --seed 0 --family qwen3_vl" in card
    assert json.loads((ckpt / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"


def test_reload_with_auto_classes(ckpt, model, proc):
    from transformers import AutoTokenizer

    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size >= len(tok)
    assert cfg.text_config.vocab_size % 64 == 0
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert set(model.generation_config.eos_token_id) == set(proc.stop_token_ids)
    assert proc.stop_token_ids[:2] == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # vision geometry agrees between the model and the image processor
    ip = proc.image_processor
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil"
    assert ip.patch_size == cfg.vision_config.patch_size
    assert ip.merge_size == cfg.vision_config.spatial_merge_size
    assert ip.temporal_patch_size == cfg.vision_config.temporal_patch_size


def test_coord_tokens_are_single_special_tokens(proc):
    tok = proc.tokenizer
    ids = tok.encode("<|coord_17|>", add_special_tokens=False)
    assert len(ids) == 1
    assert tok.decode(ids) == "<|coord_17|>"
    coord_ids = tok.convert_tokens_to_ids([coord_token(k) for k in range(1000)])
    assert coord_ids == list(range(coord_ids[0], coord_ids[0] + 1000))
    # added special tokens (so `skip_special_tokens=True` would drop them: decode must not skip)
    assert all(tok.added_tokens_decoder[i].special for i in coord_ids)
    assert tok.decode(ids, skip_special_tokens=True) == ""
    special_ids = tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    assert special_ids == list(range(special_ids[0], special_ids[0] + len(QWEN_SPECIAL_TOKENS)))
    assert coord_ids[0] == special_ids[-1] + 1
    line = ('{"objects": [{"desc": "red circle", "bbox_2d": '
            '[<|coord_110|>, <|coord_310|>, <|coord_410|>, <|coord_999|>]}]}')
    ids = tok.encode(line, add_special_tokens=False)
    assert sum(i in set(coord_ids) for i in ids) == 4
    assert tok.decode(ids, skip_special_tokens=False) == line
    assert len(tok.encode(" red circle", add_special_tokens=False)) <= 3  # the label vocabulary is in the BPE


def test_same_seed_same_bytes_different_seed_differs(ckpt, tmp_path, capsys):
    assert main([str(tmp_path / "again"), "--seed", "0"]) == 0  # the CLI, same seed
    assert "wrote" in capsys.readouterr().out
    assert file_hashes(tmp_path / "again") == file_hashes(ckpt)
    other = build_tiny_checkpoint(tmp_path / "seed1", seed=1)
    a, b = file_hashes(ckpt), file_hashes(other)
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_chat_template_renders_image_placeholder(ckpt, proc):
    assert hashlib.sha256((ckpt / "chat_template.jinja").read_bytes()).hexdigest() == QWEN3_VL_CHAT_TEMPLATE_SHA256
    text = proc.prompt_text(PromptSpec())
    assert text.startswith("<|im_start|>system\n" + PromptSpec().system() + "<|im_end|>\n")
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Detect all objects in the image.<|im_end|>\n"
    assert user in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 1


# ------------------------------------------------------------------------------ processor


def test_encode_matches_hf_processor_without_torchvision(ckpt, proc):
    images = _images()
    specs = [SPECS[i % 2] for i in range(len(images))]
    ours = proc.encode(images, specs)
    hf = _hf_processor(ckpt, "qwen3_vl")
    texts = [hf.apply_chat_template(s.messages(), tokenize=False, add_generation_prompt=True) for s in specs]
    assert texts == [proc.prompt_text(s) for s in specs]
    theirs = hf(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    assert set(theirs.keys()) == set(ours.keys())  # incl. mm_token_type_ids, exactly what generate needs
    _assert_same_inputs(ours, theirs)
    # and the grid follows smart_resize: 90x130 -> 96x128 px -> 6x8 patches of 16 px
    assert ours["image_grid_thw"][0].tolist() == [1, 6, 8]
    assert [list(proc.image_grid(im.width, im.height)) for im in images] == ours["image_grid_thw"].tolist()


def test_encode_matches_autoprocessor(ckpt, proc):
    pytest.importorskip(
        "torchvision",
        reason="AutoProcessor for Qwen3-VL also loads Qwen3VLVideoProcessor, which needs torchvision (not installed "
               "here: PyPI's build is CUDA-only); test_encode_matches_hf_processor_without_torchvision covers the "
               "same transformers code path without it",
    )
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(str(ckpt))
    assert type(hf).__name__ == "Qwen3VLProcessor"
    texts = [hf.apply_chat_template(s.messages(), tokenize=False, add_generation_prompt=True) for s in SPECS]
    assert texts == [proc.prompt_text(s) for s in SPECS]
    rng = np.random.default_rng(1)
    # sizes already on the 32 px grid: no resampling, so the torchvision backend must agree closely
    aligned = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 96), (128, 128))]
    theirs = hf(images=aligned, text=texts, padding=True, padding_side="left", return_tensors="pt")
    _assert_same_inputs(proc.encode(aligned, SPECS), theirs, pixel_atol=1e-4)
    # resized images: identical token layout and grids; PIL vs torchvision bicubic differ slightly
    images = _images()[:2]
    ours = proc.encode(images, SPECS)
    theirs = hf(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().mean() < 0.05


def test_batch_is_left_padded(proc):
    images = _images()[:3]
    batch = proc.encode(images, PromptSpec())
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and max(lengths) == ids.shape[1]
    tail = proc.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    for row, im in enumerate(images):
        n_pad = ids.shape[1] - lengths[row]
        assert mask[row, :n_pad].sum() == 0 and mask[row, n_pad:].all()  # padding on the left only
        assert (ids[row, :n_pad] == proc.pad_token_id).all()
        assert ids[row, -len(tail):].tolist() == tail  # every row ends with the assistant header
        single = proc.encode([im], PromptSpec())
        assert single["input_ids"][0].tolist() == ids[row, n_pad:].tolist()
        assert single["attention_mask"].all()
        n_img = int((types[row] == 1).sum())
        t, h, w = batch["image_grid_thw"][row].tolist()
        assert n_img == t * h * w // proc.merge_size ** 2 == int((ids[row] == proc.image_token_id).sum())
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(1).sum())
    with pytest.raises(ValueError):
        proc.encode(images, [PromptSpec()])  # one spec per image, or a single spec


def test_generate_greedy_is_deterministic_and_batch_invariant(model, proc):
    images = _images()[:3]
    batch = proc.encode(images, PromptSpec())
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        out1 = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, n:]
        out2 = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, n:]
        assert torch.equal(out1, out2)
        for row, im in enumerate(images):  # left padding + 3D positions: same tokens as alone
            single = proc.encode([im], PromptSpec())
            alone = model.generate(**single, max_new_tokens=8, do_sample=False)[0, single["input_ids"].shape[1]:]
            assert alone.tolist() == out1[row, :len(alone)].tolist()
    texts = proc.batch_decode(out1)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_decode_keeps_coord_tokens_and_stops(proc):
    tok = proc.tokenizer
    answer = ('{"objects": [{"desc": "blue square", "bbox_2d": '
              '[<|coord_0|>, <|coord_17|>, <|coord_500|>, <|coord_999|>]}]}')
    ids = tok.encode(answer, add_special_tokens=False)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    garbage = tok.encode("<|coord_5|> more", add_special_tokens=False)
    assert proc.decode(ids + [im_end] + garbage) == answer
    assert proc.decode(ids + [eot, eot, eot]) == answer
    assert proc.decode([proc.pad_token_id, proc.pad_token_id] + ids + [im_end]) == answer  # leading padding
    assert proc.decode(torch.tensor(ids)) == answer
    assert proc.decode([im_end] + ids) == ""
    assert proc.batch_decode(torch.tensor([ids + [im_end], ids + [eot]])) == [answer, answer]


# ------------------------------------------------------------------------------ Qwen2.5-VL and sizes


def test_qwen2_5_vl_builds_reloads_and_generates(ckpt25):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(ckpt25)).eval()
    assert type(m).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert json.loads((ckpt25 / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    proc = CoordExpProcessor.from_pretrained(ckpt25)
    assert m.config.image_token_id == proc.image_token_id
    assert "<|vision_start|><|image_pad|><|vision_end|>" in proc.prompt_text(PromptSpec())
    images = _images()[:2]
    ours = proc.encode(images, SPECS)
    hf = _hf_processor(ckpt25, "qwen2_5_vl")
    texts = [hf.apply_chat_template(s.messages(), tokenize=False, add_generation_prompt=True) for s in SPECS]
    assert texts == [proc.prompt_text(s) for s in SPECS]
    _assert_same_inputs(ours, hf(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt"))
    n = ours["input_ids"].shape[1]
    with torch.no_grad():
        a = m.generate(**ours, max_new_tokens=6, do_sample=False)[:, n:]
        b = m.generate(**ours, max_new_tokens=6, do_sample=False)[:, n:]
    assert torch.equal(a, b)
    assert len(proc.batch_decode(a)) == 2


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_make_config_demo_size(family):
    from transformers import AutoModelForImageTextToText

    cfg = make_config(family, "demo")
    text, vision = cfg.get_text_config(), cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (256, 4)
    assert (vision.hidden_size, vision.depth, vision.patch_size) == (128, 3, 8)
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    cfg2 = make_config(family, "tiny", text_hidden=128, head_dim=32)
    assert cfg2.get_text_config().hidden_size == 128
    with torch.device("meta"):  # the config is consistent enough to build the model
        AutoModelForImageTextToText.from_config(cfg)
    with pytest.raises(ValueError):
        make_config(family, "tiny", no_such_key=1)
