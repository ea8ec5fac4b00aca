"""The shared prompt prefix's KV computed once (`coordexp.engines.prefix_cache`, issue 18 part 3).

On the real exported tiny checkpoints (the session's Qwen3-VL export and a Qwen2.5-VL one): the
cached prefill gives the plain prefill's logits and KV at every real position and the same greedy
tokens, for one row, batches of mixed sizes, prompt variants (each its own entry), rows with
different prefixes or none in one batch; and a served repository with the cache on answers like
the in-process engine, unary and streamed, guided and unguided.
"""
from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import numpy as np
import pytest

from coordexp.generation import GenerationParams
from coordexp.prompt import PromptSpec

pytestmark = pytest.mark.slow  # every test here runs the exported tiny checkpoints

LONG = GenerationParams(max_new_tokens=16, ignore_eos=True)  # every row decodes 16 steps on the cached KV


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64 + 16 * (i % 3), 64 + 32 * (i % 2), 3), dtype=np.uint8))
            for i in range(n)]


@pytest.fixture(scope="module")
def onnx_dir(exported):
    from coordexp.engines.onnx_engine import find_onnx_dir

    return str(find_onnx_dir(exported[1]))


@pytest.fixture(scope="module")
def proc(onnx_dir):
    from coordexp.processor import CoordExpProcessor

    return CoordExpProcessor.from_pretrained(onnx_dir)


@pytest.fixture(scope="module")
def plain(onnx_dir):
    from coordexp.engines.onnx_engine import OnnxParts

    return OnnxParts(onnx_dir, threads=1)


@pytest.fixture()
def cached(onnx_dir):
    """A fresh model load with the prefix cache on (its cache starts empty)."""
    from coordexp.engines.onnx_engine import OnnxParts

    return OnnxParts(onnx_dir, threads=1, prefix_cache=True)


def encode_rows(proc, parts, rows, strip=()):
    """One left padded batch from (image, PromptSpec) rows, each encoded with its own prompt (the
    processor takes one prompt per call); rows in `strip` lose their text before the image."""
    encs = []
    for k, (img, spec) in enumerate(rows):
        e = proc.encode([img], spec, return_tensors="np")
        ids = e["input_ids"][0][e["attention_mask"][0].astype(bool)]
        if k in strip:
            ids = ids[list(ids).index(parts.meta["vision_start_token_id"]):]
        encs.append((ids, e))
    t = max(len(ids) for ids, _ in encs)
    input_ids = np.full((len(rows), t), parts.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for b, (ids, _) in enumerate(encs):
        input_ids[b, t - len(ids):] = ids
        mask[b, t - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "pixel_values": np.concatenate([e["pixel_values"] for _, e in encs]),
            "image_grid_thw": np.concatenate([e["image_grid_thw"] for _, e in encs])}


def run(parts, enc, params=LONG):
    """(prefill logits, presents, mask, greedy rows) of one batch."""
    embeds, deep = parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
    args = (enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"], embeds, deep)
    logits, presents, mask, _ = parts.prefill(*args)
    return logits, presents, mask, parts.generate(*args, params)


def assert_same(plain, cached, enc, params=LONG):
    """Cached = plain: logits, the KV at every real prompt position, greedy tokens."""
    l0, p0, m0, r0 = run(plain, enc, params)
    l1, p1, m1, r1 = run(cached, enc, params)
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-4)
    assert (m1.sum(1) == m0.sum(1)).all()  # the same number of cached positions per row, pads 0
    for b in range(len(m0)):
        for k0, k1 in zip(p0, p1):
            np.testing.assert_allclose(k1[b][:, m1[b] == 1], k0[b][:, m0[b] == 1], rtol=0, atol=1e-4)
    assert r1 == r0
    return r0


def test_prefix_computed_once_and_tokens_identical(plain, cached, proc):
    from coordexp.engines.prefix_cache import cache_of, prefix_lengths

    imgs = _images(4)
    spec = PromptSpec()
    one = encode_rows(proc, plain, [(imgs[0], spec)])
    p = prefix_lengths(cached, one["input_ids"], one["attention_mask"])[0]
    ids = one["input_ids"][0].tolist()
    assert p == ids.index(cached.meta["vision_start_token_id"]) > 50  # system prompt + chat header
    calls = cached.decoder_calls
    rows = assert_same(plain, cached, one)
    assert cached.decoder_calls - calls == 1 + 1 + 1 + (LONG.max_new_tokens - 1)  # miss, 2 prefills, decode
    assert any(rows[0])
    # a batch of mixed sizes sharing the prefix: no new entry, every row's prefix reused
    batch = encode_rows(proc, plain, [(im, spec) for im in imgs])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really left padded
    assert_same(plain, cached, batch)
    st = cache_of(cached).stats()
    assert (st["entries"], st["misses"]) == (1, 1) and st["hits"] == st["rows"] - 1 == 2 + 2 * len(imgs) - 1
    assert st["positions_saved"] == (st["rows"] - 1) * p and st["prefix_positions_computed"] == p
    # unguided without ignore_eos (rows stop at their own lengths) and a repetition penalty
    assert_same(plain, cached, batch, GenerationParams(max_new_tokens=12, repetition_penalty=1.3))


def test_prompt_variants_get_their_own_entries(plain, cached, proc, onnx_dir):
    from coordexp.engines.onnx_engine import OnnxParts
    from coordexp.engines.prefix_cache import cache_of

    imgs = _images(2, seed=3)
    for spec in (PromptSpec(), PromptSpec(user_text="Find every red circle."),  # user text follows the image
                 PromptSpec(system_text="Find the shapes."), PromptSpec(coord_format="numeric")):
        assert_same(plain, cached, encode_rows(proc, plain, [(im, spec) for im in imgs]))
    cache = cache_of(cached)
    assert len(cache) == 3 and cache.misses == 3  # default (= custom user text), custom system, numeric
    keys = cache.keys()
    assert len({k for k in keys}) == 3 and all(len(k) > 5 for k in keys)
    # bounded: with room for 2, the least recently used prefix goes and is recomputed when it returns
    small = OnnxParts(onnx_dir, threads=1, prefix_cache=True)
    lru = cache_of(small, max_entries=2)
    specs = [PromptSpec(), PromptSpec(system_text="Find the shapes."), PromptSpec(coord_format="numeric")]
    for spec in specs + specs[:1]:
        assert_same(plain, small, encode_rows(proc, plain, [(imgs[0], spec)]), replace(LONG, max_new_tokens=4))
    assert len(lru) == 2 and lru.misses == 4 and lru.hits == 4  # each hit once: prefill, then generate


def test_rows_with_different_prefixes_or_none_in_one_batch(plain, cached, proc):
    from coordexp.engines.prefix_cache import cache_of

    imgs = _images(4, seed=5)
    specs = [PromptSpec(), PromptSpec(system_text="Find the shapes."), PromptSpec(), PromptSpec(coord_format="numeric")]
    rows = list(zip(imgs, specs))
    mixed = assert_same(plain, cached, encode_rows(proc, plain, rows))
    # the same rows one by one give the same tokens (batch composition does not matter)
    assert [assert_same(plain, cached, encode_rows(proc, plain, [r]))[0] for r in rows] == mixed
    # a row with no text before the image (an empty past, all masked) beside rows with prefixes
    assert_same(plain, cached, encode_rows(proc, plain, rows, strip={1}))
    # no row has a prefix: the plain prefill, nothing cached
    before = cache_of(cached).stats()
    assert_same(plain, cached, encode_rows(proc, plain, rows[:2], strip={0, 1}))
    after = cache_of(cached).stats()
    assert after["rows"] == before["rows"] and after["misses"] == before["misses"] == 3


def test_torch_rows_take_their_prefixes_from_the_cache(exported, proc):
    """The torch backend in flight (`TorchRows`, the served llm step's rows) with the cache: rows with
    different prefixes, or none, admitted together, decode the tokens `TorchParts.generate` gives
    from the whole prompts (its static batch has no cache)."""
    from coordexp.decoding.loop import decode_batch
    from coordexp.engines.prefix_cache import cache_of
    from coordexp.serving.torch_parts import TorchOptions, TorchParts, TorchRows

    parts = TorchParts(exported[0], TorchOptions(device="cpu", dtype="fp32"), prefix_cache=True)
    imgs = _images(4, seed=5)
    specs = [PromptSpec(), PromptSpec(system_text="Find the shapes."), PromptSpec(), PromptSpec(coord_format="numeric")]
    for strip in ((), {1}):  # then row 1 without text before the image: an all-masked past
        enc = encode_rows(proc, parts, list(zip(imgs, specs)), strip=strip)
        embeds, deep = parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        args = (enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"], embeds, deep)
        expected = parts.generate(*args, LONG)
        assert decode_batch(TorchRows(parts, parts.pad_token_id), parts.stop_ids, *args, LONG) == expected
        assert all(len(r) == LONG.max_new_tokens for r in expected)
    st = cache_of(parts).stats()  # three prefixes computed once; row 2 and the second batch's rows reuse them
    assert (st["rows"], st["misses"], st["hits"], st["entries"]) == (8, 3, 4, 3)


def test_guided_decoding_in_process_with_the_cache(onnx_dir):
    from coordexp.engines.onnx_engine import OnnxEngine, OnnxParts
    from coordexp.engines.prefix_cache import cache_of

    ref = OnnxEngine(onnx_dir, threads=1)
    eng = OnnxEngine(onnx_dir, threads=1)
    eng.parts = OnnxParts(onnx_dir, threads=1, prefix_cache=True)
    imgs = _images(3, seed=7)
    params = GenerationParams(max_new_tokens=24, guided=True)
    for batch in (imgs, imgs[:1]):
        got, want = eng.generate_batch(batch, params), ref.generate_batch(batch, params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.extra for r in got] == [r.extra for r in want]
    assert cache_of(eng.parts).hits >= 3


@pytest.fixture(scope="module")
def qwen25_onnx(tmp_path_factory):
    from coordexp.fixtures.tiny import build_tiny_checkpoint
    from coordexp.export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("q25prefix")
    build_tiny_checkpoint(str(base / "ckpt"), family="qwen2_5_vl", seed=0)
    meta = export_onnx(str(base / "ckpt"), str(base / "onnx"))
    assert meta["num_deepstack"] == 0
    return str(base / "onnx")


def test_qwen25_without_deepstack(qwen25_onnx):
    from coordexp.engines.onnx_engine import OnnxParts
    from coordexp.engines.prefix_cache import cache_of
    from coordexp.processor import CoordExpProcessor

    p25 = CoordExpProcessor.from_pretrained(qwen25_onnx)
    plain25 = OnnxParts(qwen25_onnx, threads=1)
    cached25 = OnnxParts(qwen25_onnx, threads=1, prefix_cache=True)
    assert cached25.num_deepstack == 0
    imgs = _images(3, seed=9)
    rows = [(imgs[0], PromptSpec()), (imgs[1], PromptSpec()), (imgs[2], PromptSpec(system_text="Find the shapes."))]
    assert_same(plain25, cached25, encode_rows(p25, plain25, rows))
    assert_same(plain25, cached25, encode_rows(p25, plain25, rows[:1]))
    assert cache_of(cached25).stats()["positions_saved"] > 0


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.triton
def test_served_repository_with_the_cache_answers_like_in_process(exported, onnx_dir, tmp_path):
    """One server for a repository written with ServingOptions(prefix_cache=True): unary (the static
    llm batcher) and streamed (llm_stream, its in-flight scheduler: requests join a running batch),
    guided and unguided, token for token like the in-process engine without the cache."""
    from conftest import SERVED_MAX_NEW, served_answers
    from coordexp import wire
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.engines.triton.pool import ServerPool
    from coordexp.export.repository import ServingOptions, write_repository
    from coordexp.serving.server import start_server

    options = ServingOptions(prefix_cache=True, llm_batching="inflight")
    repo = write_repository(str(tmp_path / "repo"), wire.ENSEMBLE, onnx_dir, exported[0], max_batch_size=8,
                            max_new_tokens=SERVED_MAX_NEW, options=options)
    for step in (wire.LLM, wire.LLM_STREAM):
        config = (tmp_path / "repo" / step / "config.pbtxt").read_text()
        assert '"true"' in config.split('"prefix_cache"', 1)[1][:80], step
    imgs = _images(4, seed=11)
    pngs = [_png(im) for im in imgs]
    local = OnnxEngine(onnx_dir, threads=1)
    cases = {"unguided": GenerationParams(max_new_tokens=SERVED_MAX_NEW),
             "guided": GenerationParams(max_new_tokens=SERVED_MAX_NEW, guided=True)}
    want = {k: [r.token_ids for r in local.generate_batch(imgs, p)] for k, p in cases.items()}
    assert any(want["unguided"])

    async def streamed(url, params):
        pool, _ = await ServerPool.connect([url], wire.stream_ensemble_name(wire.ENSEMBLE), timeout=120.0)
        try:
            out = await asyncio.wait_for(asyncio.gather(*[pool.generate(b, params) for b in pngs]), 240)
            return [gen for gen, _ in out]
        finally:
            await pool.close()

    srv = start_server(repo)
    try:
        for name, params in cases.items():
            unary = served_answers(srv.grpc_url, pngs, params, concurrency=4)
            assert not [r.error for r in unary if r.error], unary
            assert [r.token_ids for r in unary] == want[name], name
            stream = asyncio.run(streamed(srv.grpc_url, params))
            assert not [r.error for r in stream if r.error], stream
            assert [r.token_ids for r in stream] == want[name], name
    finally:
        rc = srv.stop()
    assert rc == 0, f"tritonserver exited with {rc}; see {srv.log_path}"
