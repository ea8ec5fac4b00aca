"""In-flight batching of the decoupled llm_stream (`coordexp.serving.inflight`).

The scheduler tests drive the real ONNX export of the tiny checkpoint (session fixture `exported`)
and compare every answer with `OnnxParts.generate` on that row alone (the in-process engine at
batch 1); the last test serves a repository written with `llm_batching="inflight"` on the real
Triton server and compares concurrent streamed answers with the in-process engine.
"""
from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
import pytest

from coordexp.generation import GenerationParams
from coordexp import wire

from conftest import SERVED_MAX_NEW as MAX_NEW

SIZES = [(64, 64), (96, 64), (64, 96), (128, 64), (100, 100), (128, 128)]


def png(w: int, h: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    return [png(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def onnx(exported):
    from coordexp.engines.onnx_engine import OnnxEngine

    return OnnxEngine(exported[1], threads=1)


def _items(onnx, images, params_list):
    from PIL import Image

    from coordexp.serving.llm import LlmItem

    out = []
    for data, params in zip(images, params_list):
        enc = onnx.processor.encode([Image.open(io.BytesIO(data)).convert("RGB")], onnx.prompt, return_tensors="np")
        emb, deep = onnx.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        out.append(LlmItem(enc["input_ids"][0].astype(np.int64), enc["image_grid_thw"][0].astype(np.int64), emb,
                           deep, params))
    return out


def _alone(onnx, hook_factory, item):
    """The row decoded on its own by OnnxParts.generate (batch 1, what the in-process engine does)."""
    hook = hook_factory(item.params, 1) if item.params.guided else None
    ids = item.ids[None]
    return onnx.parts.generate(ids, np.ones_like(ids), item.grid[None], item.embeds, item.deepstack, item.params,
                               logits_hook=hook)[0]


class Collect:
    """Every response of every request, by request key; `done` when `expect` requests ended."""

    def __init__(self, expect: int):
        self.expect = expect
        self.sent: dict[str, list] = {}
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.order: list[str] = []  # request keys in the order their final response came

    def sender(self, key, on=None):
        def send(res, final):
            with self.lock:
                self.sent.setdefault(key, []).append((res, final))
                if final:
                    self.order.append(key)
                    if len(self.order) == self.expect:
                        self.done.set()
            if on is not None:
                on(res, final)
        return send

    def ids(self, key):
        res, final = self.sent[key][-1]
        assert final and not isinstance(res, BaseException), (key, res)
        n = res[wire.SEQUENCE_LENGTH][:, 0]
        return [list(map(int, row[:k])) for row, k in zip(res[wire.OUTPUT_IDS], n)]


def _scheduler(onnx, max_batch_size=4, guided=True):
    from coordexp.engines.onnx_engine import OnnxRows
    from coordexp.serving.inflight import InflightScheduler
    from coordexp.serving.llm import guided_hook_factory

    hooks = guided_hook_factory(onnx.parts, None) if guided else None
    parts = onnx.parts
    return InflightScheduler(OnnxRows(parts, parts.pad_token_id), parts.stop_ids, parts.pad_token_id,
                             max_batch_size=max_batch_size, guided_hook=hooks), hooks


@pytest.mark.slow
def test_rows_joining_mid_decode_equal_each_row_decoded_alone(onnx, images):
    """Request 0 decodes alone; after its 3rd token five rows with their own params join (more than
    the free slots: the rest queue), short rows leave while long ones go on; every answer equals
    the row decoded alone, streamed responses are prefixes, one per step, the last one final."""
    p = GenerationParams(max_new_tokens=MAX_NEW)
    params = [replace(p, ignore_eos=True), replace(p, guided=True), replace(p, max_new_tokens=3, ignore_eos=True), p,
              replace(p, repetition_penalty=1.3), replace(p, temperature=0.8, seed=7)]
    items = _items(onnx, images, params)
    sched, hooks = _scheduler(onnx, max_batch_size=4)
    try:
        ref = [_alone(onnx, hooks, it) for it in items]
        box = Collect(len(items))

        def first_progress(res, final):
            if not final and int(res[wire.SEQUENCE_LENGTH][0, 0]) == 3:  # request 0 is mid-decode
                for k in range(1, len(items)):
                    sched.submit([items[k]], box.sender(k), stream=k != 3)

        sched.submit([items[0]], box.sender(0, first_progress), stream=True)
        assert box.done.wait(120), box.order
        for k in range(len(items)):
            assert box.ids(k) == [ref[k]], f"row {k} ({params[k]})"
        assert sched.stats["max_running"] == 4 and sched.stats["prefills"] >= 2  # joined, capped at 4
        # the 3-token row left long before request 0 (24 tokens, started first) ended
        assert box.order.index(2) < box.order.index(0)
        for k in (0, 1, 2, 4, 5):  # streamed: one response per step, cumulative, one final at the end
            responses = box.sent[k]
            assert [f for _, f in responses] == [False] * (len(responses) - 1) + [True]
            lengths = [int(r[wire.SEQUENCE_LENGTH][0, 0]) for r, _ in responses]
            assert lengths[:len(ref[k])] == list(range(1, len(ref[k]) + 1)) and len(responses) <= len(ref[k]) + 1
        assert len(box.sent[3]) == 1  # not streamed: the final response only
        assert len(sched.rows) == 0 and not sched.running  # every row left, every cache freed
    finally:
        sched.close()


@pytest.mark.slow
def test_jump_forward_rows_equal_step_by_step_with_fewer_decoder_calls(onnx, images):
    """Guided rows with jump-forward on (OnnxParts.jump_forward) beside an unguided one: the same
    greedy answers as each row decoded alone step by step, in fewer decoder calls."""
    p = GenerationParams(max_new_tokens=MAX_NEW)
    items = _items(onnx, images[:4], [replace(p, guided=True)] * 3 + [p])
    parts = onnx.parts
    sched, hooks = _scheduler(onnx, max_batch_size=4)
    try:
        ref = [_alone(onnx, hooks, it) for it in items]  # jump-forward off
        calls = {}
        for jump in (False, True):
            parts.jump_forward = jump
            box = Collect(len(items))
            c0 = parts.decoder_calls
            sched.submit([items[0]], box.sender(0), stream=True)
            for k in range(1, len(items)):
                sched.submit([items[k]], box.sender(k), stream=True)
            assert box.done.wait(120), box.order
            calls[jump] = parts.decoder_calls - c0
            for k in range(len(items)):
                assert box.ids(k) == [ref[k]], f"jump_forward={jump}: row {k}"
                lengths = [int(r[wire.SEQUENCE_LENGTH][0, 0]) for r, _ in box.sent[k]]
                assert lengths == sorted(lengths) and lengths[-1] == len(ref[k])  # jumped ids stream as they come
    finally:
        parts.jump_forward = False
        sched.close()
    assert calls[True] < calls[False], calls


@pytest.mark.slow
def test_errors_stay_with_their_request_and_close_fails_what_is_left(onnx, images):
    from coordexp.serving.common import RequestError
    from coordexp.serving.llm import LlmItem

    p = GenerationParams(max_new_tokens=6, ignore_eos=True)
    good = _items(onnx, images[:2], [p, p])
    bad = LlmItem(good[0].ids, good[0].grid, good[0].embeds[:-1], good[0].deepstack[:, :-1], p)  # one embedding short
    sched, hooks = _scheduler(onnx, guided=False)
    try:
        box = Collect(4)
        # queued together, admitted in one prefill: the bad row must fail alone
        with sched.cond:
            sched.submit([good[0]], box.sender("a"), stream=False)
            sched.submit([bad], box.sender("bad"), stream=True)
            sched.submit([good[1], good[0]], box.sender("two rows"), stream=True)
        sched.submit([replace(good[1], params=replace(p, guided=True))], box.sender("guided"), stream=False)
        assert box.done.wait(120), box.order
        assert box.sent["guided"] == [(box.sent["guided"][0][0], True)]
        assert isinstance(box.sent["guided"][0][0], RequestError)  # no guided hook in this scheduler
        res, final = box.sent["bad"][-1]
        assert final and isinstance(res, ValueError) and "image embeddings" in str(res)
        ref = [_alone(onnx, hooks, it) for it in good]
        assert box.ids("a") == [ref[0]] and box.ids("two rows") == [ref[1], ref[0]]
        # a long request, then close(): it ends with a clear error, nothing hangs
        long = replace(good[0], params=GenerationParams(max_new_tokens=MAX_NEW, ignore_eos=True))
        late = Collect(1)
        started = threading.Event()
        sched.submit([long], late.sender("long", lambda res, final: started.set()), stream=True)
        assert started.wait(60)
    finally:
        sched.close()
    res, final = late.sent["long"][-1]
    assert final and (isinstance(res, RequestError) and "unloaded" in str(res)
                      or late.ids("long") == [_alone(onnx, hooks, long)])  # (or it was fast enough to finish)
    after = Collect(1)
    sched.submit([good[0]], after.sender("after"), stream=False)
    assert isinstance(after.sent["after"][0][0], RequestError) and "shutting down" in str(after.sent["after"][0][0])


@pytest.mark.slow
@pytest.mark.triton
def test_served_inflight_streams_equal_in_process_concurrently(exported, onnx, images, tmp_path):
    """A repository with llm_batching="inflight" on the real Triton server: concurrent streamed
    requests (guided and unguided, mixed lengths) give the in-process engine's answers, token for
    token; so does the unary ensemble with its llm in-flight too."""
    import asyncio
    import os

    from PIL import Image

    from coordexp.engines.triton.pool import ServerPool
    from coordexp.export.repository import ServingOptions, write_repository
    from coordexp.serving.server import start_server

    repo = write_repository(str(tmp_path / "inflight_repo"), wire.ENSEMBLE, os.path.join(exported[1], "llm", "1", "onnx"),
                            exported[0], max_batch_size=4, max_new_tokens=MAX_NEW,
                            options=ServingOptions(llm_batching="inflight"))
    from coordexp.benchmarks.decoding import set_llm_batching

    set_llm_batching(repo, "inflight", ("llm",))  # the unary llm too (one response through its sender)
    p = GenerationParams(max_new_tokens=MAX_NEW)
    cases = [(images[k], params) for k in range(len(images))
             for params in (p, replace(p, guided=True))][:10]
    want = [onnx.generate_batch([Image.open(io.BytesIO(b)).convert("RGB")], params)[0].token_ids
            for b, params in cases]
    srv = start_server(repo)
    try:
        async def go():
            stream, _ = await ServerPool.connect([srv.grpc_url], wire.stream_ensemble_name(wire.ENSEMBLE),
                                                 timeout=120.0)
            unary, _ = await ServerPool.connect([srv.grpc_url], wire.ENSEMBLE, timeout=120.0)
            try:
                async def one(b, params):
                    partials = []
                    gen, _ = await stream.generate(b, params, on_partial=partials.append)
                    return gen, partials
                streamed = [one(b, params) for b, params in cases]
                plain = [unary.generate(b, params) for b, params in cases[:4]]
                out = await asyncio.wait_for(asyncio.gather(*streamed, *plain), 240)
                return out[:len(cases)], [gen for gen, _ in out[len(cases):]]
            finally:
                await stream.close()
                await unary.close()

        got, got_unary = asyncio.run(go())
    finally:
        assert srv.stop() == 0, f"tritonserver exited badly; see {srv.log_path}"
    for k, ((gen, partials), ids) in enumerate(zip(got, want)):
        assert gen.error is None, (k, gen.error)
        assert gen.token_ids == ids, f"case {k} (guided={cases[k][1].guided})"
        for part in partials:
            assert ids[:len(part.token_ids)] == part.token_ids
    for k, gen in enumerate(got_unary):  # the unary ensemble, its llm in-flight as well
        assert gen.error is None and gen.token_ids == want[k], f"unary case {k}"
    assert any(len(ids) > 3 for ids in want) and len({len(ids) for ids in want}) > 1  # mixed lengths, not trivial
