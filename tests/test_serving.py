"""The Triton models of a CoordExp repository.

Fast tests (no server) drive the serving logic of `coordexp.serving` with a fake `OnnxParts`.
The `slow` + `triton` tests export the tiny checkpoint to ONNX, write a repository, start the REAL
Triton server on free loopback ports (always stopped) and check the served ensemble against the
torch reference and the in-process ONNX Runtime engine, token for token.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from coordexp.generation import GenerationParams
from coordexp import wire
from coordexp.serving import common as C
from coordexp.serving.llm import LlmBatcher, params_for_row
from coordexp.serving.vision_encoder import VisionEncoder

from conftest import SERVED_MAX_NEW as MAX_NEW  # the served repository's limit (and default)
from conftest import served_answers
SIZES = [(64, 64), (96, 64), (64, 96), (128, 64), (64, 128), (100, 100), (128, 128), (160, 96), (96, 160),
         (200, 80), (80, 200), (150, 150), (224, 128), (128, 224), (256, 192), (300, 48)]


def png(w: int, h: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


# ============================================================================ fast: no server
class FakeParts:
    """Stands in for OnnxParts: image tokens are 1-d, 'generation' echoes facts about each row."""

    meta = {"spatial_merge_size": 2}

    def __init__(self):
        self.calls = []

    def encode_images(self, pixel_values, grid):
        n = int(sum(int(np.prod(g)) for g in grid)) // 4
        emb = np.arange(n, dtype=np.float32)[:, None].repeat(3, axis=1)
        return emb, np.stack([emb, -emb])

    def generate(self, input_ids, attention_mask, grid, embeds, deep, params, logits_hook=None):
        self.calls.append((input_ids.shape, params))
        assert embeds.shape[0] == deep.shape[1] == int(sum(np.prod(g) for g in grid)) // 4
        assert (attention_mask[:, -1] == 1).all()  # left padded
        return [[int(attention_mask[i].sum()), params.max_new_tokens, params.seed][: params.max_new_tokens]
                for i in range(input_ids.shape[0])]


def _llm_view(lengths, grids, **opt):
    b = len(lengths)
    t = max(lengths)
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = 7
        mask[i, t - n:] = 1
    ntok = [int(np.prod(g)) // 4 for g in grids]
    emb = np.zeros((b, max(ntok), 3), np.float32)
    deep = np.zeros((b, 2, max(ntok), 3), np.float32)
    inputs = {wire.INPUT_IDS: ids, wire.ATTENTION_MASK: mask, wire.INPUT_LENGTHS: mask.sum(1, dtype=np.int32)[:, None],
              wire.IMAGE_GRID_THW: np.asarray(grids, np.int64), wire.IMAGE_EMBEDS: emb, wire.DEEPSTACK_EMBEDS: deep}
    for name, vals in opt.items():
        inputs[name] = np.asarray(vals).reshape(b, 1)
    return C.TritonRequestView(inputs)


def test_llm_groups_requests_by_decoding_params():
    parts = FakeParts()
    batcher = LlmBatcher(parts, GenerationParams(max_new_tokens=8), max_new_tokens=16, pad_token_id=5)
    views = [
        _llm_view([5], [[1, 4, 4]]),
        _llm_view([9, 3], [[1, 4, 8], [1, 2, 2]]),  # a request with two rows
        _llm_view([4], [[1, 4, 4]], **{wire.RANDOM_SEED: np.array([3], np.uint64)}),
        _llm_view([6], [[1, 4, 4]], **{wire.REQUEST_OUTPUT_LEN: np.array([99], np.int32)}),  # over the limit
        _llm_view([2], [[1, 2, 2]], **{wire.TEMPERATURE: np.array([-1.0], np.float32)}),  # invalid
    ]
    out = batcher.run(views)
    assert [c[0][0] for c in parts.calls] == [3, 1]  # one batch for the defaults, one for seed 3
    assert parts.calls[0][0] == (3, 9)  # left padded to the longest prompt
    np.testing.assert_array_equal(out[0][wire.OUTPUT_IDS], [[5, 8, 0]])
    np.testing.assert_array_equal(out[1][wire.OUTPUT_IDS], [[9, 8, 0], [3, 8, 0]])
    np.testing.assert_array_equal(out[1][wire.SEQUENCE_LENGTH], [[3], [3]])
    np.testing.assert_array_equal(out[2][wire.OUTPUT_IDS], [[4, 8, 3]])
    assert isinstance(out[3], C.RequestError) and "exceeds this repository's limit of 16" in str(out[3])
    assert isinstance(out[4], C.RequestError) and "temperature" in str(out[4])


class SteppingParts(FakeParts):
    """Generates step by step like OnnxParts: row i writes 100+step until it has i+2 tokens, then
    'picks the stop token' at the next step (or hits max_new_tokens), reporting through on_step."""

    def generate(self, input_ids, attention_mask, grid, embeds, deep, params, logits_hook=None, on_step=None):
        self.calls.append((input_ids.shape, params))
        n = input_ids.shape[0]
        generated, open_rows = [[] for _ in range(n)], set(range(n))
        for step in range(params.max_new_tokens):
            finished = []
            for i in sorted(open_rows):
                if len(generated[i]) == i + 2:  # stop token: nothing appended
                    finished.append(i)
                    continue
                generated[i].append(100 + step)
                if len(generated[i]) == params.max_new_tokens:
                    finished.append(i)
            open_rows -= set(finished)
            if on_step is not None:
                on_step(generated, finished)
            if not open_rows:
                break
        return generated


def test_decoupled_llm_streams_per_step_and_ends_every_request_once():
    from coordexp.serving.llm import DecoupledRun

    views = [
        _llm_view([5], [[1, 4, 4]], **{wire.STREAM: [True]}),
        _llm_view([4, 6], [[1, 4, 4], [1, 2, 2]]),  # not streamed, two rows
        _llm_view([2], [[1, 2, 2]], **{wire.TEMPERATURE: np.array([-1.0], np.float32)}),  # invalid
        _llm_view([3, 3], [[1, 4, 4], [1, 4, 4]], **{wire.STREAM: [True, True], wire.RANDOM_SEED: np.array([4, 4], np.uint64)}),
        _llm_view([3], [[1, 4, 4]], **{wire.STREAM: [True], wire.REQUEST_OUTPUT_LEN: np.array([1], np.int32)}),
    ]
    unary = LlmBatcher(SteppingParts(), GenerationParams(max_new_tokens=8), max_new_tokens=16).run(views)
    sent = []
    batcher = LlmBatcher(SteppingParts(), GenerationParams(max_new_tokens=8), max_new_tokens=16)
    DecoupledRun(batcher, lambda r, res, final: sent.append((r, res, final))).run(views)
    by_req = {r: [(res, final) for q, res, final in sent if q == r] for r in range(len(views))}
    for r, responses in by_req.items():
        assert [f for _, f in responses] == [False] * (len(responses) - 1) + [True], r  # one final, last
    assert len(by_req[1]) == 1 and len(by_req[2]) == 1  # unary-style request, invalid request
    assert isinstance(by_req[2][0][0], C.RequestError) and "temperature" in str(by_req[2][0][0])
    for r in (0, 1, 3, 4):
        final = by_req[r][-1][0]
        for k in (wire.OUTPUT_IDS, wire.SEQUENCE_LENGTH):  # the streamed answer ends as the unary one
            np.testing.assert_array_equal(final[k], unary[r][k])
    # request 0 (one row, 2 tokens then the stop token): [1], [2] tokens, then the final repeat
    assert [int(res[wire.SEQUENCE_LENGTH][0, 0]) for res, _ in by_req[0]] == [1, 2, 2]
    # request 3 (two rows of another group): every step shows both rows' ids so far
    lengths = [res[wire.SEQUENCE_LENGTH][:, 0].tolist() for res, _ in by_req[3]]
    assert lengths == [[1, 1], [2, 2], [2, 3], [2, 3]]
    for res, _ in by_req[3]:  # each partial is a prefix of the final ids
        for row, n in zip(res[wire.OUTPUT_IDS], res[wire.SEQUENCE_LENGTH][:, 0]):
            assert list(row[:n]) == [100 + i for i in range(n)]
    assert [int(res[wire.SEQUENCE_LENGTH][0, 0]) for res, _ in by_req[4]] == [1]  # length limit: final at once


def test_guided_closed_early_flag_reaches_unary_and_streamed_outputs():
    from types import SimpleNamespace

    from coordexp.serving.llm import DecoupledRun

    def hook_factory(params, batch):  # stands in for GuidedLogitsHook: its state says which rows closed early
        return SimpleNamespace(state=SimpleNamespace(closed_early=[i % 2 == 0 for i in range(batch)]))

    def batcher():
        return LlmBatcher(SteppingParts(), GenerationParams(max_new_tokens=8), max_new_tokens=16,
                          guided_hook=hook_factory)

    guided = {wire.GUIDED: [True, True]}
    views = [_llm_view([4, 6], [[1, 4, 4], [1, 2, 2]], **guided),
             _llm_view([4, 6], [[1, 4, 4], [1, 2, 2]], **guided, **{wire.STREAM: [True, True]}),
             _llm_view([5], [[1, 4, 4]])]
    unary = batcher().run(views)
    np.testing.assert_array_equal(unary[0][wire.GUIDED_CLOSED_EARLY], [[True], [False]])
    np.testing.assert_array_equal(unary[2][wire.GUIDED_CLOSED_EARLY], [[False]])  # not guided
    sent = []
    DecoupledRun(batcher(), lambda r, res, final: sent.append((r, res, final))).run(views)
    finals = {r: res for r, res, final in sent if final}
    for r in range(3):
        np.testing.assert_array_equal(finals[r][wire.GUIDED_CLOSED_EARLY], unary[r][wire.GUIDED_CLOSED_EARLY])


def test_llm_params_and_guided_without_hook():
    d = GenerationParams(max_new_tokens=8)
    p = params_for_row(d, 16, np.int32(4), np.float32(0.5), np.float32(0.9), np.float32(1.1), np.uint64(2**63),
                       np.bool_(False), np.bool_(True))
    # FP32 inputs come back as the decimals the client sent (0.9, not 0.89999998)
    assert p == GenerationParams(max_new_tokens=4, temperature=0.5, top_p=0.9, repetition_penalty=1.1, seed=2**63,
                                 ignore_eos=True)
    assert params_for_row(d, 16) == d
    out = LlmBatcher(FakeParts(), d).run([_llm_view([3], [[1, 2, 2]], **{wire.GUIDED: np.array([True])})])
    assert isinstance(out[0], C.RequestError) and "guided" in str(out[0])


def test_vision_encoder_splits_and_pads_per_request():
    enc = VisionEncoder(FakeParts())
    pv = np.zeros((2, 32, 6), np.float32)
    views = [C.TritonRequestView({wire.PIXEL_VALUES: pv, wire.IMAGE_GRID_THW: np.array([[1, 4, 8], [1, 4, 4]])}),
             C.TritonRequestView({wire.PIXEL_VALUES: pv[:1, :16], wire.IMAGE_GRID_THW: np.array([[1, 4, 8]])}),
             C.TritonRequestView({wire.PIXEL_VALUES: pv[:1], wire.IMAGE_GRID_THW: np.array([[1, 8, 8]])})]
    out = enc.run(views)
    assert out[0][wire.IMAGE_EMBEDS].shape == (2, 8, 3) and out[0][wire.DEEPSTACK_EMBEDS].shape == (2, 2, 8, 3)
    np.testing.assert_array_equal(out[0][wire.IMAGE_EMBEDS][1, :, 0], [8, 9, 10, 11, 0, 0, 0, 0])  # second image
    assert isinstance(out[1], C.RequestError) and isinstance(out[2], C.RequestError)


def test_preprocess_and_postprocess_logic(tiny_ckpt):
    from coordexp.processor import CoordExpProcessor
    from coordexp.prompt import PromptSpec
    from coordexp.serving.postprocess import Postprocessor
    from coordexp.serving.preprocess import Preprocessor
    from coordexp.tokens import coord_token

    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    pre = Preprocessor(proc, PromptSpec())
    out = pre.encode([png(64, 64), png(128, 96)], [None, "Find the cat."])
    assert out[wire.INPUT_IDS].dtype == np.int32 and out[wire.INPUT_IDS].shape[0] == 2
    assert out[wire.PIXEL_VALUES].shape[:2] == (2, 48) and out[wire.IMAGE_GRID_THW].tolist() == [[1, 4, 4], [1, 6, 8]]
    ref = proc.encode([pil(png(64, 64))], PromptSpec(), return_tensors="np")
    np.testing.assert_array_equal(out[wire.INPUT_IDS][0][out[wire.ATTENTION_MASK][0] == 1], ref["input_ids"][0])
    np.testing.assert_array_equal(out[wire.PIXEL_VALUES][0, :16], ref["pixel_values"])
    assert out[wire.INPUT_LENGTHS][1, 0] > out[wire.INPUT_LENGTHS][0, 0]  # the longer user text
    with pytest.raises(Exception, match="image_load_failed"):
        pre.encode([b"\x89PNG\r\n\x1a\n" + b"garbage" * 10])

    post = Postprocessor(proc)
    text = '{"objects": [{"desc": "cat", "bbox_2d": [%s]}]}' % ", ".join(coord_token(v) for v in (1, 2, 30, 40))
    ids = proc.tokenizer(text)["input_ids"] + [proc.im_end_token_id]
    res = post.process([ids, []])
    assert C.as_str(res[wire.TEXT_OUTPUT][0, 0]) == text
    payload = json.loads(C.as_str(res[wire.PREDS_JSON][0, 0]))
    assert payload["preds"] == [{"type": "bbox_2d", "points": [1, 2, 30, 40], "desc": "cat", "score": 1.0}]
    assert payload["error"] is None and payload["repairs"] == []
    assert json.loads(C.as_str(res[wire.PREDS_JSON][1, 0]))["error"] == "empty_pred"


def test_parity_compare_reports_the_first_divergence():
    from types import SimpleNamespace

    from coordexp.benchmarks.parity import Run, compare, first_difference, format_table

    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1 and first_difference([1, 2], [1, 2, 3]) == 2
    recs = [SimpleNamespace(index=i, line_no=i + 1) for i in range(3)]
    p = {"preds": [], "error": None}
    a = Run("torch@1", [([1, 2], p), ([3, 4, 5], p), ([6], p)])
    b = Run("served@c4", [([1, 2], p), ([3, 9, 5], {"preds": [], "error": "parse_failed"}), "InferenceServerException: x"])
    res = compare(a, b, recs, token_text=lambda t: f"<{t}>")
    assert (res.records, res.ids_match, res.preds_match, res.ok) == (3, 1, 1, False)
    assert res.first_divergence == {"record": 1, "line": 2, "position": 1, "torch@1": {"id": 4, "text": "<4>"},
                                    "served@c4": {"id": 9, "text": "<9>"}}
    table = format_table([res, compare(a, a, recs)])
    assert "torch@1 vs served@c4" in table and "33.3%" in table and "token 1: torch@1=4 '<4>' vs served@c4=9 '<9>'" in table
    assert compare(a, a, recs).ok


# ============================================================================ slow: the real server
@pytest.fixture(scope="module")
def images():
    return [png(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def onnx_engine(exported):
    from coordexp.engines.onnx_engine import OnnxEngine

    return OnnxEngine(exported[1], threads=1)  # finds llm/1/onnx inside the repository


def _batched(engine, imgs, params, bs):
    out = []
    for i in range(0, len(imgs), bs):
        out += [(r.token_ids, r.text) for r in engine.generate_batch([pil(b) for b in imgs[i:i + bs]], params)]
    return out


def _preds(text):
    from coordexp.serving.postprocess import preds_payload

    return preds_payload(text)


@pytest.mark.slow
@pytest.mark.triton
def test_ensemble_answers_images_of_several_sizes(server, images):
    """Straight to Triton with tritonclient's sync client (not ours): tensors named and typed as the
    wire table says, one image per request and two images in one request (its own batch dim)."""
    import tritonclient.grpc as grpcclient

    def request(imgs, params=None):
        n = len(imgs)
        arrays = {wire.IMAGE_BYTES_INPUT: np.array([[b] for b in imgs], dtype=object)}
        for t in wire.DECODING_TENSORS:
            if params is not None:
                arrays[t.name] = np.full((n, 1), getattr(params, t.param), dtype=t.numpy_dtype)
        inputs = []
        for t in wire.ENSEMBLE_INPUTS:
            if t.name in arrays:
                x = grpcclient.InferInput(t.name, list(arrays[t.name].shape), t.wire_dtype)
                x.set_data_from_numpy(arrays[t.name])
                inputs.append(x)
        res = client.infer(wire.ENSEMBLE, inputs)
        lengths = res.as_numpy(wire.SEQUENCE_LENGTH).reshape(n)
        ids = res.as_numpy(wire.OUTPUT_IDS).reshape(n, -1)
        preds = res.as_numpy(wire.PREDS_JSON).reshape(n)
        assert res.as_numpy(wire.OUTPUT_IDS).dtype == np.int32
        return [(list(ids[i, :lengths[i]]), json.loads(preds[i])) for i in range(n)]

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for k in (0, 6, 9, 14):
            ids, preds = request([images[k]])[0]
            assert len(ids) <= MAX_NEW  # 0 when the model stops at once
            assert set(preds) == {"preds", "error", "error_message", "repairs", "bbox_format"}
        # two images in one request (the request's own batch dimension), decoding inputs sent
        rows = request([images[1], images[14]], GenerationParams(max_new_tokens=5, ignore_eos=True))
        assert [len(ids) for ids, _ in rows] == [5, 5]
        meta = client.get_model_metadata(wire.ENSEMBLE, as_json=True)
        assert {i["name"] for i in meta["inputs"]} >= {"image_bytes_input", "max_tokens", "random_seed"}
        cfg = client.get_model_config(wire.ENSEMBLE, as_json=True)["config"]
        manifest = json.loads(cfg["parameters"]["manifest_json"]["string_value"])
        assert manifest["max_new_tokens"] == MAX_NEW and manifest["backend"] == "onnx"
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.triton
def test_greedy_parity_torch_onnx_served(exported, server, images, onnx_engine):
    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.engines.triton.connect import model_stats

    params = GenerationParams(max_new_tokens=MAX_NEW)
    torch_engine = TorchEngine(exported[0], threads=1)
    ref = _batched(torch_engine, images, params, 1)
    assert sum(len(ids) > 0 for ids, _ in ref) >= len(images) // 2  # most images do generate: not a trivial match
    runs = {"torch@4": _batched(torch_engine, images, params, 4),
            "onnx@1": _batched(onnx_engine, images, params, 1),
            "onnx@4": _batched(onnx_engine, images, params, 4)}
    before = asyncio.run(model_stats(server.grpc_url, wire.LLM))
    served = served_answers(server.grpc_url, images, params, concurrency=4)
    after = asyncio.run(model_stats(server.grpc_url, wire.LLM))
    assert not [r.error for r in served if r.error]
    runs["served@c4"] = [(r.token_ids, r.text) for r in served]
    for name, rows in runs.items():
        for k, ((ids, text), (ref_ids, ref_text)) in enumerate(zip(rows, ref)):
            assert ids == ref_ids, f"{name}: image {k} {SIZES[k]} token ids differ from torch@1"
            assert text == ref_text, f"{name}: image {k}"
    for (ref_ids, ref_text), row in zip(ref, served):
        assert row.served_preds == _preds(ref_text)  # the parsed preds too
    # the dynamic batcher grouped concurrent requests: fewer executions than inferences
    n_inf = after["inference_count"] - before["inference_count"]
    n_exec = after["execution_count"] - before["execution_count"]
    assert n_inf == len(images) and n_exec < n_inf, (n_inf, n_exec)


@pytest.mark.slow
@pytest.mark.triton
def test_sampling_at_a_fixed_seed_matches_onnx(server, images, onnx_engine):

    params = GenerationParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    imgs = images[:8]
    local = _batched(onnx_engine, imgs, params, 4)
    served = served_answers(server.grpc_url, imgs, params, concurrency=4)
    assert [r.token_ids for r in served] == [ids for ids, _ in local]
    greedy = _batched(onnx_engine, imgs[:2], replace(params, temperature=0.0), 1)
    assert [ids for ids, _ in local[:2]] != [ids for ids, _ in greedy]  # it really sampled


@pytest.mark.slow
@pytest.mark.triton
def test_user_text_and_ignore_eos(exported, server, images):
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.prompt import PromptSpec

    params = GenerationParams(max_new_tokens=10, ignore_eos=True)
    engine = OnnxEngine(exported[1], prompt=PromptSpec(user_text="Find every red circle."), threads=1)
    local = _batched(engine, images[:2], params, 1)
    served = served_answers(server.grpc_url, images[:2], params, concurrency=1, text="Find every red circle.")
    assert [r.token_ids for r in served] == [ids for ids, _ in local]
    assert all(len(r.token_ids) == 10 for r in served)


@pytest.mark.slow
@pytest.mark.triton
def test_bad_requests_fail_alone_with_clear_errors(server, images):

    corrupt = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
    batch = [images[0], corrupt, b"", images[1]]
    out = served_answers(server.grpc_url, batch, GenerationParams(max_new_tokens=4), concurrency=4)
    assert not out[0].error and not out[3].error
    for k in (1, 2):
        msg = out[k].error
        assert msg
        assert "image_load_failed" in msg and "image_bytes_input" in msg, msg
    assert "empty" in out[2].error
    over = served_answers(server.grpc_url, images[:1], GenerationParams(max_new_tokens=MAX_NEW + 1))
    assert "exceeds this repository's limit" in over[0].error


@pytest.mark.slow
@pytest.mark.triton
def test_model_that_fails_to_load_gives_tritons_message(exported, tmp_path):
    from coordexp.serving.server import TritonError, start_server

    broken = tmp_path / "repo"
    shutil.copytree(exported[1], broken)
    os.remove(broken / C.ONNX_SUBDIR / "decoder.onnx")
    with pytest.raises(TritonError) as e:
        start_server(str(broken), ready_timeout=240,
                     extra_args=["--model-control-mode=explicit", f"--load-model={wire.LLM}"])
    msg = str(e.value)
    assert "decoder.onnx" in msg and "'llm'" in msg, msg


@pytest.mark.slow
@pytest.mark.triton
def test_parity_command_against_the_running_server(exported, server, capsys, tmp_path):
    from coordexp.client.cli import main

    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "sample.jsonl")
    report = tmp_path / "parity.json"
    rc = main(["parity", "--ckpt", exported[0], "--repo", exported[1], "--data", data, "--url", server.grpc_url,
               "--limit", "4", "--batch-sizes", "1,2", "--max-new-tokens", "8", "--threads", "1", "--json",
               str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "torch@1 vs served@c2" in out and "onnx@2 vs served@c2" in out and "all pairs match" in out
    pairs = json.loads(report.read_text())["pairs"]
    assert len(pairs) == 7 and all(p["ok"] and p["records"] == 4 for p in pairs)
    rc = main(["parity", "--ckpt", exported[0], "--repo", exported[1], "--data", data, "--url", server.grpc_url,
               "--limit", "3", "--batch-sizes", "2", "--max-new-tokens", "6", "--sample-seed", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "onnx@2 vs served@c2" in out and "torch" not in out.split("note:")[0], out
    assert "cannot match" in out


@pytest.mark.slow
@pytest.mark.triton
def test_streamed_answers_equal_unary_answers_token_by_token(server, images):
    import asyncio

    from coordexp.engines.triton.pool import ServerPool

    params = GenerationParams(max_new_tokens=MAX_NEW)

    async def go():
        unary, _ = await ServerPool.connect([server.grpc_url], wire.ENSEMBLE)
        stream, _ = await ServerPool.connect([server.grpc_url], wire.stream_ensemble_name(wire.ENSEMBLE))
        try:
            out = []
            for k in (0, 6, 14):
                u, _ = await unary.generate(images[k], params)
                partials: list = []
                st, facts = await stream.generate(images[k], params, on_partial=partials.append)
                out.append((u, st, facts["timing"], partials))
            bad, _ = await stream.generate(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, params)
            after, _ = await stream.generate(images[1], params)
            return stream.iface, out, bad, after
        finally:
            await unary.close()
            await stream.close()

    iface, out, bad, after = asyncio.run(go())
    assert iface.streams and "stream" in iface.inputs
    for u, st, timing, partials in out:
        assert u.error is None and st.error is None
        assert st.token_ids == u.token_ids and st.text == u.text  # same answer, streamed
        # one response per generated token, each one token longer, each a prefix of the answer
        assert [n for _, n in timing.token_times] == list(range(1, len(u.token_ids) + 1))
        assert timing.responses == len(partials) >= len(u.token_ids)
        for p in partials:
            assert u.token_ids[:len(p.token_ids)] == p.token_ids
        assert [t for t, _ in timing.token_times] == sorted(t for t, _ in timing.token_times)
    assert bad.error and "image_load_failed" in bad.error  # an error ends that request alone
    assert after.error is None and after.token_ids
