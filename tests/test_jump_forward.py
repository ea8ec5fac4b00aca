"""Jump-forward decoding under the CoordJSON grammar (issue 18, part 1): with guided decoding, the
tokens the mask leaves no choice about are appended without a model choice and fed to the decoder
with the chosen token as one chunk. Greedy output must not change: JF == no JF, token for token,
on the tiny random checkpoint (its answers hit the budget planner and the duplicate guard) and on
the demo checkpoint (real answers, compared with unguided decoding too), in process and served.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("xgrammar", reason="guided decoding needs xgrammar (make setup installs it)")

from conftest import REPO_ROOT, SERVED_MAX_NEW, served_answers  # noqa: E402
from coordexp.generation import GenerationParams  # noqa: E402
from coordexp.prompt import PromptSpec  # noqa: E402

DEMO_VAL = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")


def _images(n=5):
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (64 + 16 * (i % 3), 64 + 32 * (i % 2), 3), dtype=np.uint8))
            for i in range(n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _run(engine, images, params, jump: bool, batch: int):
    """(results, decoder calls) of the engine with jump-forward on/off, `batch` images per call."""
    engine.parts.jump_forward = jump
    calls = engine.parts.decoder_calls
    out = []
    for i in range(0, len(images), batch):
        out += engine.generate_batch(images[i:i + batch], params)
    return out, engine.parts.decoder_calls - calls


# ============================================================================ the guide's forced runs
def test_forced_tokens_are_the_only_tokens_the_mask_allows(tiny_ckpt):
    """`GuidedBatch.forced_tokens` returns exactly the run step-by-step masks leave no choice about,
    and stops at a choice, at the length limit, and with a stop token once the answer is complete."""
    from coordexp.guided import GuidedBatch
    from coordexp.processor import CoordExpProcessor
    from coordexp.prompt import format_coordjson

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    with open(os.path.join(tiny_ckpt, "config.json")) as f:
        cfg = json.load(f)
    vocab = int(cfg.get("text_config", cfg)["vocab_size"])
    spec = PromptSpec()
    text = format_coordjson([{"desc": "red circle", "bbox_2d": [1, 2, 3, 4]},
                             {"desc": "cat", "poly": [5, 6, 7, 8, 9, 10]}], spec)
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    # step by step: which positions of this (canonical) answer are forced
    step = GuidedBatch(proc, spec, 200, 1)
    step._setup(vocab)
    forced_at = []
    for t in ids:
        bits = step.row_mask(0)
        assert bits[t], proc.tokenizer.decode([t])
        forced_at.append(int(bits.sum()) == 1)
        step.accept(0, t)
    assert step.state[0] == step.guide.dfa.accept
    assert sum(forced_at) >= len(ids) // 2, forced_at  # the skeleton is most of a short answer
    # the same answer through forced_tokens: after each "chosen" token, the run is exactly the
    # forced positions that follow it (and a stop token at the end)
    jf = GuidedBatch(proc, spec, 200, 1)
    jf._setup(vocab)
    k = 0
    jf.accept(0, ids[0])
    while True:
        run = jf.forced_tokens(0, 1000)
        n = 0
        while k + 1 + n < len(ids) and forced_at[k + 1 + n]:
            n += 1
        assert run[:n] == ids[k + 1:k + 1 + n], (k, run)
        if k + 1 + n == len(ids):
            assert len(run) == n + 1 and run[-1] in proc.stop_token_ids and jf.done[0]
            break
        assert len(run) == n, (k, run)
        k += 1 + n
        jf.accept(0, ids[k])
    assert jf.count[0] == len(ids) and jf.forced == sum(forced_at[1:])
    # the limit caps a run
    lim = GuidedBatch(proc, spec, 200, 1)
    lim._setup(vocab)
    lim.accept(0, ids[0])
    assert lim.forced_tokens(0, 1) == ids[1:2]


# ============================================================================ in process, tiny checkpoint
@pytest.fixture(scope="module")
def tiny_onnx(exported):
    from coordexp.engines.onnx_engine import find_onnx_dir

    return str(find_onnx_dir(exported[1]))


@pytest.mark.slow
@pytest.mark.parametrize("cf,fo", [("tokens", "desc_first"), ("numeric", "geometry_first")])
def test_tiny_greedy_identical_with_and_without_jump_forward(tiny_onnx, cf, fo):
    from coordexp.engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(tiny_onnx, prompt=PromptSpec(coord_format=cf, field_order=fo), threads=1)
    imgs = _images(5)
    saved = 0
    for params in (GenerationParams(max_new_tokens=12, guided=True), GenerationParams(max_new_tokens=40, guided=True),
                   GenerationParams(max_new_tokens=30, guided=True, repetition_penalty=1.3),
                   GenerationParams(max_new_tokens=20, guided=True, ignore_eos=True)):
        for batch in (1, 5):  # one row; rows of different chunk lengths in one batch
            ref, calls_ref = _run(engine, imgs, params, False, batch)
            got, calls_jf = _run(engine, imgs, params, True, batch)
            assert [r.token_ids for r in got] == [r.token_ids for r in ref], (params, batch)
            assert [r.extra for r in got] == [r.extra for r in ref]
            assert [r.finish_reason for r in got] == [r.finish_reason for r in ref]
            assert calls_jf <= calls_ref
            saved += calls_ref - calls_jf
    assert saved > 0
    # unguided: nothing is forced, the flag changes nothing
    params = GenerationParams(max_new_tokens=12)
    assert [r.token_ids for r in _run(engine, imgs[:2], params, True, 2)[0]] == \
        [r.token_ids for r in _run(engine, imgs[:2], params, False, 2)[0]]


@pytest.mark.slow
def test_streaming_sees_every_jumped_token(tiny_onnx):
    """`on_step` gets the jumped ids as they are appended: each call's ids extend the last ones, and
    together they are the final answer; every row is reported finished exactly once."""
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.guided import guided_logits_hook

    engine = OnnxEngine(tiny_onnx, threads=1, jump_forward=True)
    imgs = _images(3)
    params = GenerationParams(max_new_tokens=40, guided=True)
    enc = engine.processor.encode(imgs, engine.prompt, return_tensors="np")
    embeds, deep = engine.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
    seen: list[list[int]] = [[] for _ in imgs]
    finished: list[int] = []
    widths = []

    def on_step(generated, done):
        for b, ids in enumerate(generated):
            assert ids[:len(seen[b])] == seen[b]
            if b not in finished:
                widths.append(len(ids) - len(seen[b]))
            seen[b] = list(ids)
        finished.extend(done)

    hook = guided_logits_hook(engine.processor, engine.prompt, params, batch=len(imgs))
    out = engine.parts.generate(enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"], embeds, deep, params,
                                logits_hook=hook, on_step=on_step)
    assert seen == out and sorted(finished) == list(range(len(imgs)))
    assert max(widths) > 1  # some steps streamed a jumped run
    assert out == [r.token_ids for r in engine.generate_batch(imgs, params)]


# ============================================================================ the demo checkpoint
@pytest.fixture(scope="module")
def demo_onnx(demo_repo) -> str:
    """The demo checkpoint's ONNX graphs, from the session's demo repository (conftest.demo_repo)."""
    from coordexp.export.repository import find_onnx_dir

    return find_onnx_dir(demo_repo)


@pytest.mark.slow
def test_demo_checkpoint_jump_forward_identical_and_fewer_decoder_calls(demo_onnx):
    """On real answers: guided greedy with jump-forward == without == unguided (the budget fits),
    with at least 2x fewer decoder calls (batch 1; the skeleton between the coordinates and the
    desc words is forced in its canonical tokenization)."""
    from coordexp.benchmarks.jump_forward import measure_jump_forward

    res = measure_jump_forward(demo_onnx, DEMO_VAL, limit=4, max_new_tokens=96, threads=2)
    assert res["identical"] and res["identical_to_unguided"], res
    assert res["guided"]["length_cut"] == 0
    assert res["decoder_calls_ratio"] >= 2.0, res
    assert 0.4 < res["forced_share"] < 1.0
    assert res["guided"]["tokens"] == res["guided_jf"]["tokens"] == res["unguided"]["tokens"]


# ============================================================================ served
@pytest.fixture(scope="module")
def jf_server(exported, tmp_path_factory):
    """The tiny export served with `ServingOptions(jump_forward=True)` (its own server)."""
    from coordexp import wire
    from coordexp.engines.onnx_engine import find_onnx_dir
    from coordexp.export.repository import ServingOptions, write_repository
    from coordexp.serving.server import start_server

    ckpt, repo = exported
    jf_repo = write_repository(str(tmp_path_factory.mktemp("jf") / "model_repository"), wire.ENSEMBLE,
                               str(find_onnx_dir(repo)), ckpt, max_batch_size=8, max_new_tokens=SERVED_MAX_NEW,
                               options=ServingOptions(jump_forward=True))
    srv = start_server(jf_repo)
    try:
        yield srv
    finally:
        rc = srv.stop()
    assert rc == 0, f"tritonserver exited with {rc}; see {srv.log_path}"


@pytest.mark.slow
@pytest.mark.triton
def test_served_jump_forward_equals_in_process(tiny_onnx, jf_server):
    """The served llm with jump_forward on answers like the in-process engine without it, unary
    and streamed, guided (flags too) and unguided."""
    from coordexp import wire
    from coordexp.engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(tiny_onnx, threads=1)
    imgs = _images(4)
    for params in (GenerationParams(max_new_tokens=SERVED_MAX_NEW, guided=True),
                   GenerationParams(max_new_tokens=10, guided=True), GenerationParams(max_new_tokens=SERVED_MAX_NEW)):
        ref = engine.generate_batch(imgs, params)
        for model in (wire.ENSEMBLE, wire.stream_ensemble_name(wire.ENSEMBLE)):
            served = served_answers(jf_server.grpc_url, [_png(im) for im in imgs], params, concurrency=2, model=model)
            assert not [r.error for r in served if r.error], served
            assert [r.token_ids for r in served] == [r.token_ids for r in ref], (model, params)
            if params.guided:
                assert [r.extra.get("guided_closed_early") for r in served] == \
                    [r.extra["guided_closed_early"] for r in ref], model


# ============================================================================ the PyTorch serving backend
@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_torch_parts_jump_forward_equals_the_reference(tiny_ckpt, cache):
    """`TorchParts.generate` (the `--backend torch` llm step) with jump-forward: the same guided
    greedy ids as without it and as the torch reference engine (HF generate), with fewer forwards."""
    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.processor import CoordExpProcessor
    from coordexp.serving.llm import LlmItem
    from coordexp.serving.torch_parts import TorchOptions, TorchParts
    from coordexp.serving.torch_steps import torch_batcher
    from coordexp.serving.vision_encoder import VisionEncoder

    imgs = _images(3)
    params = GenerationParams(max_new_tokens=30, guided=True)
    ref = [r.token_ids for r in TorchEngine(tiny_ckpt, threads=1).generate_batch(imgs, params)]
    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    enc = {k: v.numpy() for k, v in proc.encode(imgs, PromptSpec()).items() if hasattr(v, "numpy")}
    cuts = np.cumsum([int(np.prod(g)) for g in enc["image_grid_thw"]])[:-1]
    parts = TorchParts(tiny_ckpt, TorchOptions(device="cpu", dtype="fp32", cache=cache))
    encoded = VisionEncoder(parts, parts.merge).encode(list(zip(np.split(enc["pixel_values"], cuts),
                                                                enc["image_grid_thw"])))
    items = [LlmItem(enc["input_ids"][i][enc["attention_mask"][i].astype(bool)], enc["image_grid_thw"][i], e, d, params)
             for i, (e, d) in enumerate(encoded)]
    batcher = torch_batcher(parts, {"max_new_tokens": "30"}, None)
    calls = {}
    for jump in (False, True):
        parts.jump_forward = jump
        before = parts.decoder_calls
        got = [list(g) for g in batcher.generate(items)]
        assert got == ref, (cache, jump)
        calls[jump] = parts.decoder_calls - before
    assert calls[True] < calls[False], calls
