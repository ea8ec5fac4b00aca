"""ONNX export of a tiny Qwen3-VL checkpoint: host glue == transformers, graphs == torch, loud validation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from coordexp.generation import GenerationParams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 1  # the test machines are small and shared


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def onnx_dir(tiny_ckpt, tmp_path_factory) -> str:
    from coordexp.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    export_onnx(tiny_ckpt, str(out))
    return str(out)


@pytest.fixture(scope="module")
def torch_engine(tiny_ckpt):
    from coordexp.engines.torch_engine import TorchEngine

    return TorchEngine(tiny_ckpt, threads=THREADS)


@pytest.fixture(scope="module")
def onnx_engine(onnx_dir):
    from coordexp.engines.onnx_engine import OnnxEngine

    return OnnxEngine(onnx_dir, threads=THREADS)


def _images(n: int, seed: int = 0):
    from coordexp.export.validate import probe_images

    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(32, 224)), int(rng.integers(32, 224))) for _ in range(n)]
    return probe_images(sizes, seed=seed)


# ------------------------------------------------------------------------------- host glue (fast)
def test_mrope_matches_transformers_on_left_padded_batch(tiny_ckpt):
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    from coordexp import mrope
    from coordexp.processor import CoordExpProcessor

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    cfg = AutoConfig.from_pretrained(tiny_ckpt)
    with torch.device("meta"):
        model = Qwen3VLModel(cfg)  # get_rope_index needs only the config
    images = _images(3, seed=3)
    enc = proc.encode(images, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch should be left padded"
    want_pos, want_delta = model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"],
                                                attention_mask=enc["attention_mask"])
    got_pos, got_delta = mrope.get_rope_index(enc["input_ids"].numpy(), enc["image_grid_thw"].numpy(),
                                              enc["attention_mask"].numpy(), spatial_merge_size=cfg.vision_config.
                                              spatial_merge_size, image_token_id=cfg.image_token_id,
                                              video_token_id=cfg.video_token_id)
    np.testing.assert_array_equal(got_pos, want_pos.numpy())
    np.testing.assert_array_equal(got_delta, want_delta.numpy())
    # without a mask (one row, nothing padded) and the next-token positions transformers continues with
    one = proc.encode(images[:1], return_tensors="pt")
    wp, wd = model.get_rope_index(one["input_ids"], one["mm_token_type_ids"], one["image_grid_thw"])
    gp, gd = mrope.get_rope_index(one["input_ids"].numpy(), one["image_grid_thw"].numpy(), None,
                                  spatial_merge_size=2, image_token_id=cfg.image_token_id)
    np.testing.assert_array_equal(gp, wp.numpy())
    nxt = mrope.next_positions(enc["attention_mask"].numpy(), got_delta, step=0)
    last = want_pos[:, :, -1].numpy()  # the last prompt token of every row (left padding: real)
    np.testing.assert_array_equal(nxt[:, :, 0], last + 1)


def test_vision_host_inputs_match_transformers():
    import torch
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights,
                                           get_vision_position_ids)

    from coordexp import mrope

    grid = np.array([[1, 4, 6], [1, 8, 2], [2, 6, 4]], dtype=np.int64)
    tg = torch.from_numpy(grid)
    idx, wts = get_vision_interpolation_indices_and_weights(tg, num_grid_per_side=16, mode="bilinear",
                                                             align_corners=True, spatial_merge_size=2)
    gi, gw = mrope.vision_interpolation(grid, 16, 2)
    np.testing.assert_array_equal(gi, idx.numpy())
    np.testing.assert_allclose(gw, wts.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(mrope.vision_position_ids(grid, 2), get_vision_position_ids(tg, 2).numpy())
    cu = get_vision_cu_seqlens(tg).numpy()
    seg = mrope.vision_segments(grid)
    assert np.array_equal(np.concatenate([[0], np.cumsum(np.bincount(seg))]), cu)
    bias = mrope.vision_attention_bias(grid)
    assert bias.shape == (len(seg), len(seg)) and bias[0, 0] == 0 and np.isneginf(bias[0, -1])


def test_qwen25_window_index_matches_transformers():
    import torch
    from transformers.vision_utils import get_vision_window_index

    from coordexp import mrope

    grid = np.array([[1, 16, 12], [1, 4, 4], [2, 10, 18]], dtype=np.int64)
    want_idx, want_cu = get_vision_window_index(torch.from_numpy(grid), spatial_merge_size=2, window_size=128,
                                                patch_size=16)
    idx, cu = mrope.vision_window_index(grid, 2, 128, 16)
    np.testing.assert_array_equal(idx, want_idx.numpy())
    np.testing.assert_array_equal(cu, want_cu.numpy())
    assert np.array_equal(np.bincount(mrope.segments_from_cu(cu)), np.diff(cu))


def test_find_onnx_dir_in_a_repository_and_clear_errors(tmp_path, tiny_ckpt):
    from coordexp.engines.onnx_engine import find_onnx_dir

    nested = tmp_path / "repo" / "llm" / "1" / "onnx"
    nested.mkdir(parents=True)
    (nested / "onnx_meta.json").write_text("{}")
    (tmp_path / "repo" / "preprocess").mkdir()
    assert find_onnx_dir(tmp_path / "repo") == nested
    assert find_onnx_dir(nested) == nested
    with pytest.raises(FileNotFoundError, match="build_engine"):
        find_onnx_dir(tiny_ckpt)  # a checkpoint, not an export
    with pytest.raises(FileNotFoundError, match="not found"):
        find_onnx_dir(tmp_path / "missing")


def test_build_engine_missing_checkpoint_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "export", "build_engine.py"), "--ckpt",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint folder not found" in proc.stderr and str(tmp_path / "nope") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_engine_refuses_other_families_and_plans_dry_run(tmp_path, tiny_ckpt, capsys):
    from coordexp.export.build_engine import main

    fake = tmp_path / "llava"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main(["--ckpt", str(fake)]) == 2
    err = capsys.readouterr().err
    assert "'llava'" in err and "Qwen3-VL" in err and "Traceback" not in err
    assert main(["--ckpt", tiny_ckpt, "--dry-run", "--json", "--repo", str(tmp_path / "r")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["name"] == "coordexp" and plan["backend"] == "onnx"  # the client's --model default
    assert not (tmp_path / "r").exists()
    assert main(["--ckpt", tiny_ckpt, "--backend", "trtllm"]) == 2
    assert "TensorRT-LLM" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--trtllm-vision", "tensorrt"], "--trtllm-vision applies to --backend trtllm only"),
    (["--dtype", "bf16"], "--dtype applies to --backend torch or trtllm only"),  # given, even at its default value
    (["--tp-size", "2", "--kv-cache-fraction", "0.5"], "--kv-cache-fraction and --tp-size apply to --backend trtllm only"),
    (["--backend", "trtllm", "--opset", "17"], "--opset applies to --backend onnx only"),
    (["--backend", "trtllm", "--skip-validation"], "--skip-validation applies to --backend onnx or torch only"),
    (["--backend", "trtllm", "--validation-steps", "4"], "--validation-steps applies to --backend onnx or torch only"),
])
def test_build_engine_refuses_flags_of_another_format(tmp_path, tiny_ckpt, capsys, argv, message):
    from coordexp.export.build_engine import main

    assert main(["--ckpt", tiny_ckpt, "--dry-run", "--repo", str(tmp_path / "r"), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""  # one line, nothing done
    assert not (tmp_path / "r").exists()


def test_formats_table_lists_every_format_build_engine_accepts():
    from coordexp.export.build_engine import FORMATS, build_parser, export_formats, flag_dests

    parser = build_parser()
    backend = next(a for a in parser._actions if a.dest == "backend")
    assert [f.backend for f in FORMATS] == list(backend.choices) == ["onnx", "torch", "trtllm"]
    assert backend.default == "onnx"
    flags = flag_dests(parser)
    everywhere = set.intersection(*(set(f.flags) for f in FORMATS))
    for f in FORMATS:
        assert f.name and f.artifact and f.device and callable(f.build)
        assert set(f.flags) <= set(flags), set(f.flags) - set(flags)  # real flags only
    assert set().union(*(set(f.flags) for f in FORMATS)) | {"--backend"} == set(flags)  # every flag has a format
    defaults = vars(parser.parse_args(["--ckpt", "x"]))
    for flag in set(flags) - everywhere - {"--backend"}:  # format-specific: None unless given
        assert defaults[flags[flag]] is None, flag
    table = export_formats()
    assert table["Argument"] == ["onnx", "torch", "trtllm"]
    assert table["Format"] == ["ONNX", "PyTorch", "TensorRT-LLM"]
    assert all(len(col) == len(FORMATS) for col in table.values())


def test_build_engine_options_keep_the_defaults(tiny_ckpt):
    from coordexp.export.build_engine import build_parser, check_flags, resolve_options
    from coordexp.export.onnx_export import DEFAULT_OPSET
    from coordexp.trtllm.plan import TrtllmOptions

    parser = build_parser()
    args = parser.parse_args(["--ckpt", tiny_ckpt])
    opts = resolve_options(args, check_flags(args, parser))
    assert opts.onnx.opset == DEFAULT_OPSET and not opts.onnx.skip_validation and opts.onnx.validation_steps == 16
    assert opts.trtllm is None and opts.family == "qwen3_vl" and opts.name == "coordexp" and opts.streaming
    args = parser.parse_args(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--no-stream", "--max-batch-size", "4"])
    opts = resolve_options(args, check_flags(args, parser))
    assert opts.onnx is None
    assert opts.trtllm == TrtllmOptions(max_batch_size=4, streaming=False)  # dtype bf16, kv 0.8, tp 1, vision trtllm
    with pytest.raises(Exception):
        opts.trtllm.dtype = "fp16"  # frozen


def test_family_spec_covers_both_families_and_refuses_others():
    from coordexp.families import FAMILIES, UnsupportedFamily, family_spec

    assert list(FAMILIES) == ["qwen3_vl", "qwen2_5_vl"]
    q3, q25 = family_spec("qwen3_vl"), family_spec("qwen2_5_vl")
    assert q3.deepstack and q3.learned_position_grid and not q3.window_attention
    assert q25.window_attention and not q25.deepstack and not q25.learned_position_grid
    assert q3.vision_input_names == ["pixel_values", "vision_pos_ids", "interp_indices", "interp_weights",
                                     "attention_bias"] and q3.vision_outputs == ("image_embeds", "deepstack")
    assert q25.vision_input_names == ["pixel_values", "vision_pos_ids", "window_bias", "full_bias"]
    assert q25.vision_outputs == ("image_embeds",)
    assert q3.architecture == "Qwen3VLForConditionalGeneration" and q25.trtllm_listed_since == "0.19"
    for bad in ("llava", None, "qwen2_vl"):
        with pytest.raises(UnsupportedFamily) as err:
            family_spec(bad, where="ckpt-x", what="ONNX export")
        assert isinstance(err.value, NotImplementedError)  # build_engine and the exporters exit 2 on it
        assert err.value.family == bad and err.value.supported == ("qwen3_vl", "qwen2_5_vl")
        msg = str(err.value)
        assert repr(bad) in msg and "Qwen3-VL" in msg and "Qwen2.5-VL" in msg and "ckpt-x" in msg


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_family_vision_feeds_are_the_graph_inputs(family):
    from coordexp import mrope
    from coordexp.families import family_spec

    spec = family_spec(family)
    meta = {"spatial_merge_size": 2, "patch_size": 16, "num_grid_per_side": 16, "window_size": 128}
    grid = spec.sample_grid(2, 16, 128)
    n = int(mrope.num_patches(grid).sum())
    pix = np.random.default_rng(0).normal(size=(n, 3 * 2 * 16 * 16)).astype(np.float32)
    feeds, order = spec.vision_feeds(meta, pix, grid)
    assert list(feeds) == spec.vision_input_names
    assert {k: v.shape for k, v in feeds.items()} == spec.vision_shapes(n, pix.shape[1])
    assert len(spec.vision_dynamic_axes()) == len(spec.vision_inputs)
    if spec.window_attention:  # permuted into window order; `order` undoes it on the merged output
        assert order is not None and sorted(order.tolist()) == list(range(n // 4))
        assert not np.array_equal(feeds["pixel_values"], pix)
    else:
        assert order is None and np.array_equal(feeds["pixel_values"], pix)


def test_check_supported_names_the_family(tiny_ckpt):
    from transformers import AutoConfig

    from coordexp.export.onnx_export import check_supported
    from coordexp.families import UnsupportedFamily

    config = AutoConfig.from_pretrained(tiny_ckpt)
    assert check_supported(config).name == "qwen3_vl"
    config.model_type = "llava"
    with pytest.raises(UnsupportedFamily, match="'llava'"):
        check_supported(config, "ckpt-y")


# ------------------------------------------------------------------------------- the graphs (slow)
@pytest.mark.slow
def test_export_folder_is_self_contained(onnx_dir, tiny_ckpt):
    from coordexp.checkpoint import checkpoint_digest
    from coordexp.processor import CoordExpProcessor

    meta = json.loads(open(os.path.join(onnx_dir, "onnx_meta.json")).read())
    for f in ("vision.onnx", "embed.onnx", "decoder.onnx"):
        assert os.path.isfile(os.path.join(onnx_dir, f))
    assert meta["family"] == "qwen3_vl" and meta["num_deepstack"] == 2 and meta["num_layers"] == 2
    assert meta["checkpoint_sha256"] == checkpoint_digest(tiny_ckpt).sha256
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(meta["versions"])
    proc = CoordExpProcessor.from_pretrained(onnx_dir)
    assert proc.image_token_id == meta["image_token_id"] and proc.stop_token_ids == meta["stop_token_ids"]


@pytest.mark.slow
def test_vision_embeds_match_torch(onnx_engine, torch_engine):
    import torch

    enc = torch_engine.processor.encode(_images(3, seed=5))
    with torch.inference_mode():
        vo = torch_engine.model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    embeds, deep = onnx_engine.parts.encode_images(enc["pixel_values"].numpy(), enc["image_grid_thw"].numpy())
    np.testing.assert_allclose(embeds, torch.cat(list(vo.pooler_output)).numpy(), rtol=0, atol=1e-4)
    want_deep = torch.stack([torch.cat(list(f)) for f in vo.deepstack_features]).numpy()
    np.testing.assert_allclose(deep, want_deep, rtol=0, atol=1e-4)
    # one image at a time (tiny group limit) gives the same features as all at once
    onnx_engine.parts.max_vision_patches = 1
    try:
        e1, d1 = onnx_engine.parts.encode_images(enc["pixel_values"].numpy(), enc["image_grid_thw"].numpy())
    finally:
        onnx_engine.parts.max_vision_patches = 1024
    np.testing.assert_allclose(e1, embeds, rtol=0, atol=1e-5)
    np.testing.assert_allclose(d1, deep, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_tokens_identical_to_torch(onnx_engine, torch_engine, batch):
    images = _images(16, seed=11)
    params = GenerationParams(max_new_tokens=24)
    mismatches, lengths = [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        want, _ = torch_engine.generate_ids(chunk, params)
        got, _ = onnx_engine.generate_ids(chunk, params)
        lengths += [len(r) for r in want]
        mismatches += [(i + j, a, b) for j, (a, b) in enumerate(zip(want, got)) if a != b]
    assert not mismatches, mismatches[:2]
    assert max(lengths) == 24  # some rows ran to the limit


@pytest.mark.slow
def test_stop_token_and_ignore_eos_like_torch(onnx_engine, torch_engine):
    images = _images(4, seed=2)
    params = GenerationParams(max_new_tokens=6, ignore_eos=True)
    want = [r.token_ids for r in torch_engine.generate_batch(images, params)]
    got = onnx_engine.generate_batch(images, params)
    assert [r.token_ids for r in got] == want
    assert all(len(r.token_ids) == 6 and r.finish_reason == "length" for r in got)
    stops = set(onnx_engine.parts.stop_ids)
    assert not any(t in stops for r in got for t in r.token_ids)


@pytest.mark.slow
def test_sampling_is_reproducible_and_batch_invariant(onnx_engine):
    images = _images(3, seed=4)
    params = GenerationParams(max_new_tokens=12, temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=7,
                              ignore_eos=True)
    a, _ = onnx_engine.generate_ids(images, params)
    b, _ = onnx_engine.generate_ids(images, params)
    assert a == b
    alone, _ = onnx_engine.generate_ids(images[1:2], params)
    assert alone[0] == a[1]  # one generator per row: independent of the batch around it
    c, _ = onnx_engine.generate_ids(images, GenerationParams(**{**params.to_dict(), "seed": 8}))
    assert c != a


@pytest.mark.slow
def test_a_per_request_prompt_goes_with_the_call_and_leaves_the_engine_as_it_was(onnx_engine):
    """`generate_batch(..., prompt=RequestPrompt(...))` runs that prompt for that call only: the same
    prompt ids as an engine built with it, and the engine's own prompt unchanged."""
    import dataclasses

    from coordexp.generation import RequestPrompt

    images = _images(1, seed=4)
    params = GenerationParams(max_new_tokens=4)
    before = onnx_engine.prompt
    asked = RequestPrompt(user_text="Find every red object.", system_text="You are terse.")
    got = onnx_engine.generate_batch(images, params, asked)[0]
    assert onnx_engine.prompt is before
    spec = dataclasses.replace(before, user_text="Find every red object.", system_text="You are terse.")
    ids = onnx_engine.processor.encode(images, spec, return_tensors="np")["input_ids"]
    assert got.prompt_tokens == ids.shape[1] != onnx_engine.processor.encode(images, before, return_tensors="np")[
        "input_ids"].shape[1]
    want = onnx_engine.parts.generate(ids, np.ones_like(ids), *_vision(onnx_engine, images, spec), params)[0]
    assert got.token_ids == want


def _vision(engine, images, spec):
    enc = engine.processor.encode(images, spec, return_tensors="np")
    return (enc["image_grid_thw"], *engine.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"]))


def test_logits_hook_can_force_tokens(onnx_engine):
    from coordexp.tokens import coord_token

    forced = onnx_engine.processor.tokenizer.convert_tokens_to_ids(coord_token(42))
    calls = []

    def hook(step, generated, logits):
        calls.append((step, [len(g) for g in generated], logits.shape))
        out = np.full_like(logits, -np.inf)
        out[:, forced] = 0.0
        return out

    images = _images(2, seed=9)
    enc = onnx_engine.processor.encode(images, onnx_engine.prompt, return_tensors="np")
    embeds, deep = onnx_engine.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
    rows = onnx_engine.parts.generate(enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"], embeds, deep,
                                      GenerationParams(max_new_tokens=5), logits_hook=hook)
    assert rows == [[forced] * 5, [forced] * 5]
    assert calls[0] == (0, [0, 0], (2, onnx_engine.parts.meta["vocab_size"]))


# --------------------------------------------------------------------------------- validation (slow)
@pytest.mark.slow
def test_validation_passes_and_reports_diffs(onnx_dir, torch_engine):
    from coordexp.export.validate import GRAPH_OUTPUTS, validate_export

    report = validate_export(onnx_dir, reference=torch_engine, sizes=((64, 64), (144, 96)), steps=8,
                             threads=THREADS)
    assert report["ok"] and report["greedy_tokens_match"] and report["checkpoint_sha256_match"]
    assert set(report["max_abs_diff"]) == set(GRAPH_OUTPUTS)
    assert report["max_abs_diff"]["decoder.logits"] < 1e-3 and report["within_atol"]
    assert [p["batch"] for p in report["probes"]] == [1, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["layer", "lm_head"])
def test_validation_names_the_graph_when_torch_weights_differ(onnx_dir, torch_engine, what):
    import torch

    from coordexp.export.validate import ExportValidationError, validate_export

    model = torch_engine.model
    w = model.model.language_model.layers[0].mlp.down_proj.weight if what == "layer" else model.lm_head.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        with pytest.raises(ExportValidationError) as err:
            validate_export(onnx_dir, reference=torch_engine, sizes=((64, 64),), batch_sizes=(1,), steps=6)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    msg = str(err.value)
    assert "decoder.onnx output 'logits' differs from torch" in msg
    if what == "layer":  # this one flips the greedy tokens; the lm_head noise only moves the logits
        assert "greedy token" in msg and not err.value.report["greedy_tokens_match"]
    assert err.value.report["max_abs_diff"]["vision.image_embeds"] < 1e-3  # the vision graph is not blamed


@pytest.mark.slow
def test_validation_fails_on_a_corrupted_graph(onnx_dir, torch_engine, tmp_path):
    import onnx
    from onnx import numpy_helper

    from coordexp.export.validate import ExportValidationError, validate_export

    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    model = onnx.load(str(bad / "vision.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    arr = numpy_helper.to_array(init).copy()
    arr += np.random.default_rng(0).normal(0, 1.0, size=arr.shape).astype(arr.dtype)
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(bad / "vision.onnx"))
    with pytest.raises(ExportValidationError, match=r"vision\.onnx output 'image_embeds' differs"):
        validate_export(str(bad), reference=torch_engine, sizes=((64, 64),), batch_sizes=(1,), steps=6)

    (bad / "decoder.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ExportValidationError, match=r"decoder\.onnx cannot be loaded"):
        validate_export(str(bad), reference=torch_engine, sizes=((64, 64),), batch_sizes=(1,), steps=6)


@pytest.mark.slow
def test_validation_refuses_an_export_of_another_checkpoint(onnx_dir, tiny_ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    from coordexp.export.validate import ExportValidationError, validate_export

    other = tmp_path / "other-ckpt"
    shutil.copytree(tiny_ckpt, other)
    tensors = load_file(str(other / "model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + np.float32(0.01)
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportValidationError, match="checkpoint mismatch"):
        validate_export(onnx_dir, str(other), sizes=((64, 64),), batch_sizes=(1,), steps=4, threads=THREADS)


# ------------------------------------------------------------------------------ end to end (slow)
@pytest.mark.slow
def test_client_infer_with_the_onnx_engine(onnx_dir, sample_data, tmp_path):
    from coordexp.client.cli import main

    out = tmp_path / "pred" / "predictions.jsonl"
    rc = main(["infer", "--local", onnx_dir, "--engine", "onnx", "--data", sample_data, "--out", str(out),
               "--batch-size", "4", "--max-new-tokens", "16", "--no-progress", "--threads", str(THREADS)])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    with open(sample_data) as f:
        assert len(lines) == sum(1 for _ in f)
    assert [r["image_id"] for r in lines] == list(range(len(lines)))
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["engine"]["engine"] == "onnx" and summary["engine"]["checkpoint_sha256"]


@pytest.mark.slow
def test_qwen25_export_matches_torch(tmp_path_factory):
    """Qwen2.5-VL: window-attention vision graph, no deepstack; greedy parity through validate_export."""
    import torch
    from safetensors.torch import load_file

    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.export.onnx_export import export_onnx
    from coordexp.export.validate import validate_export
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    ckpt = tmp_path_factory.mktemp("ckpt25") / "tiny-qwen25vl"
    build_tiny_checkpoint(str(ckpt), family="qwen2_5_vl", seed=0)
    # the merger's RMSNorm (`ln_q`) must be initialised to ones, or the vision tower outputs zeros
    # and the vision graph would be compared on nothing
    weights = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(weights["visual.merger.ln_q.weight"], torch.ones_like(weights["visual.merger.ln_q.weight"]))
    out = ckpt.parent / "onnx"
    meta = export_onnx(str(ckpt), str(out))
    assert meta["family"] == "qwen2_5_vl" and meta["num_deepstack"] == 0
    assert meta["graphs"]["vision"]["inputs"] == ["pixel_values", "vision_pos_ids", "window_bias", "full_bias"]
    # 208x176 spans several attention windows (window 128 px)
    report = validate_export(str(out), str(ckpt), sizes=((64, 64), (208, 176)), steps=12, threads=THREADS)
    assert report["ok"] and not report["warnings"] and report["max_abs_diff"]["vision.image_embeds"] < 1e-4
    engine = OnnxEngine(str(out), threads=THREADS)
    res = engine.generate_batch(_images(2, seed=1), GenerationParams(max_new_tokens=8))
    assert len(res) == 2 and all(r.prompt_tokens > 0 for r in res)
