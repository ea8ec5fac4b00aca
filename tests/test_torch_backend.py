"""`--backend torch` through the real Triton server on CPU: the served answers equal the PyTorch
reference (HF generate, fp32) token for token, guided and unguided, unary and streamed."""
from __future__ import annotations

import io
import json
import os

import pytest

from coordexp import wire
from coordexp.generation import GenerationParams

from conftest import served_answers

MAX_NEW = 12
SIZES = ((64, 48), (40, 72), (96, 96))


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    from coordexp.export.validate import probe_images

    return [_png(im) for im in probe_images(SIZES, seed=3)]


@pytest.fixture(scope="module")
def torch_repo(tiny_ckpt, tmp_path_factory) -> str:
    from coordexp.export.build_engine import main

    repo = str(tmp_path_factory.mktemp("torch") / "repo")
    rc = main(["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu", "--dtype", "fp32", "--repo", repo,
               "--max-batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--validation-steps", "6"])
    assert rc == 0
    return repo


@pytest.fixture(scope="module")
def torch_server(torch_repo):
    from coordexp.serving.server import start_server

    # the torch stubs take seconds each to tear torch down on 2 shared cores: Triton's 10 s exit
    # timeout is too short for five of them ending at once (the ONNX repository's stubs make it)
    srv = start_server(torch_repo, extra_args=["--exit-timeout-secs=90"])
    try:
        yield srv
    finally:
        rc = srv.stop(timeout=100)
    assert rc == 0, f"tritonserver exited with {rc}; see {srv.log_path}"


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from coordexp.engines.torch_engine import TorchEngine

    return TorchEngine(tiny_ckpt, threads=1)


def _reference_ids(reference, images, params) -> list[list[int]]:
    from PIL import Image

    return [reference.generate_ids([Image.open(io.BytesIO(b)).convert("RGB")], params)[0][0] for b in images]


def test_torch_repository_layout_and_validation(torch_repo):
    manifest = json.load(open(os.path.join(torch_repo, "manifest.json")))
    assert manifest["backend"] == "torch" and manifest["torch"]["device"] == "cpu"
    assert manifest["torch"]["dtype"] == "fp32" and manifest["layout"]["hf_dir"] == "llm/1/hf"
    v = manifest["validation"]
    assert v["mismatches"] == [] and v["tokens_compared"] > 0 and v["reference"].startswith("torch")
    assert (v["batching"], v["prefix_cache"]) == ("inflight", True)  # validated as it is served
    assert os.path.isfile(os.path.join(torch_repo, "llm", "1", "hf", "model.safetensors"))
    assert not os.path.exists(os.path.join(torch_repo, "llm", "1", "onnx"))
    for model, cls in (("llm", "TorchLlmModel"), ("llm_stream", "TorchLlmModel"),
                       ("vision_encoder", "TorchVisionModel")):
        shim = open(os.path.join(torch_repo, model, "1", "model.py")).read()
        assert f"from coordexp.serving.torch_steps import {cls} as TritonPythonModel" in shim
    # the same ensemble contract as the ONNX repository
    from coordexp.export.model_configs import check_wiring, load_configs

    configs = load_configs(torch_repo)
    assert {wire.ENSEMBLE, wire.stream_ensemble_name(wire.ENSEMBLE)} <= set(configs)
    assert not check_wiring(configs) and not check_wiring(configs, wire.stream_ensemble_name(wire.ENSEMBLE))
    assert configs[wire.LLM].parameters["cache"].string_value == "dynamic"


@pytest.mark.parametrize("argv, needle", [
    (["--backend", "onnx", "--device", "cpu"], "--device applies to --backend torch only"),
    (["--backend", "onnx", "--compile"], "--compile applies to --backend torch only"),
    (["--backend", "torch", "--dtype", "fp8"], "--dtype fp8 applies to --backend trtllm only"),
    (["--backend", "trtllm", "--dtype", "fp32", "--dry-run"], "--dtype fp32 applies to --backend torch only"),
    (["--backend", "torch", "--device", "tpu"], "device must be cuda or cpu"),
    (["--backend", "torch", "--device", "cpu", "--compile", "--kv-cache", "dynamic"],
     "compile needs the static KV cache"),
])
def test_torch_flags_of_other_formats_exit_2(tiny_ckpt, capsys, argv, needle):
    from coordexp.export.build_engine import main

    assert main(["--ckpt", tiny_ckpt, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_static_cache_with_buckets_equals_the_reference(tiny_ckpt, reference, images):
    """Static KV cache, batch of 3 padded to the bucket of 4: the same greedy tokens."""
    from PIL import Image

    from coordexp.export.torch_export import _step_outputs
    from coordexp.serving.torch_parts import TorchOptions

    params = GenerationParams(max_new_tokens=MAX_NEW)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    got = _step_outputs(tiny_ckpt, TorchOptions(device="cpu", dtype="fp32", cache="static"), [pil], params)[0]
    assert got == reference.generate_ids(pil, params)[0]


def test_inflight_validation_path_equals_the_reference(tiny_ckpt, reference, images):
    """The export's own check of an in-flight repository: the rows of a probe join one running batch."""
    from PIL import Image

    from coordexp.export.torch_export import _step_outputs
    from coordexp.serving.torch_parts import TorchOptions

    params = GenerationParams(max_new_tokens=MAX_NEW)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    got = _step_outputs(tiny_ckpt, TorchOptions(device="cpu", dtype="fp32"), [pil], params, batching="inflight")[0]
    assert got == reference.generate_ids(pil, params)[0]


def test_torch_rows_joining_mid_decode_equal_each_row_decoded_alone(tiny_ckpt):
    """TorchRows under the in-flight scheduler, with the prefix cache: rows with their own params
    (ignore_eos, guided with jump-forward, a short limit, repetition penalty, sampling) join while
    another decodes and leave when done; each answer equals `TorchParts.generate` on that row alone,
    step by step, from its whole prompt."""
    import threading
    from dataclasses import replace

    import numpy as np

    from coordexp.export.validate import probe_images
    from coordexp.processor import CoordExpProcessor
    from coordexp.serving.inflight import InflightScheduler
    from coordexp.serving.llm import LlmItem, guided_hook_factory
    from coordexp.serving.torch_parts import TorchOptions, TorchParts, TorchRows

    parts = TorchParts(tiny_ckpt, TorchOptions(device="cpu", dtype="fp32"))
    proc = CoordExpProcessor.from_pretrained(tiny_ckpt)
    hooks = guided_hook_factory(parts, None)
    p = GenerationParams(max_new_tokens=20)
    params = [replace(p, ignore_eos=True), replace(p, guided=True), replace(p, max_new_tokens=3, ignore_eos=True), p,
              replace(p, repetition_penalty=1.3), replace(p, temperature=0.8, seed=7)]
    items = []
    for im, pp in zip(probe_images(SIZES * 2, seed=5), params):
        enc = proc.encode([im], None, return_tensors="np")
        e, d = parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        items.append(LlmItem(enc["input_ids"][0].astype(np.int64), enc["image_grid_thw"][0].astype(np.int64), e, d, pp))

    def alone(it):
        ids = it.ids[None]
        return parts.generate(ids, np.ones_like(ids), it.grid[None], it.embeds, it.deepstack, it.params,
                              logits_hook=hooks(it.params, 1) if it.params.guided else None)[0]

    ref = [alone(it) for it in items]  # jump-forward off: step by step; no prefix cache (static batches)
    parts.jump_forward = parts.prefix_cache = True
    sched = InflightScheduler(TorchRows(parts, parts.pad_token_id), parts.stop_ids, parts.pad_token_id,
                              max_batch_size=4, guided_hook=hooks)
    answers, done = {}, threading.Event()

    def sender(k, then=None):
        def send(res, final):
            if final:
                answers[k] = res
                if len(answers) == len(items):
                    done.set()
            elif then is not None and int(res[wire.SEQUENCE_LENGTH][0, 0]) == 3:  # row 0 is mid-decode
                then()
        return send

    def join_the_rest():
        for k in range(1, len(items)):
            sched.submit([items[k]], sender(k), stream=False)

    try:
        sched.submit([items[0]], sender(0, join_the_rest), stream=True)
        assert done.wait(120), sorted(answers)
    finally:
        sched.close()
    for k, res in sorted(answers.items()):
        assert not isinstance(res, BaseException), (k, res)
        assert list(res[wire.OUTPUT_IDS][0][:int(res[wire.SEQUENCE_LENGTH][0, 0])]) == ref[k], (k, params[k])
    assert sched.stats["max_running"] == 4 and sched.stats["prefills"] >= 2 and len(sched.rows) == 0
    from coordexp.engines.prefix_cache import cache_of

    cached = cache_of(parts).stats()  # one prompt text: one prefix computed, every other row a hit
    assert (cached["rows"], cached["misses"], cached["hits"]) == (len(items), 1, len(items) - 1)
    assert cached["positions_saved_per_row"] > 10


@pytest.mark.triton
@pytest.mark.parametrize("guided", [False, True])
def test_served_in_flight_at_concurrency_4_equals_the_torch_reference(torch_server, torch_repo, reference, images,
                                                                       guided):
    from coordexp.export.model_configs import load_configs

    llm = load_configs(torch_repo)[wire.LLM].parameters
    assert (llm["batching"].string_value, llm["jump_forward"].string_value, llm["prefix_cache"].string_value) \
        == ("inflight", "true", "true")
    params = GenerationParams(max_new_tokens=MAX_NEW, guided=guided)
    served = served_answers(torch_server.grpc_url, images * 2, params, concurrency=4)
    assert all(r.error is None for r in served), [r.error for r in served]
    assert [r.token_ids for r in served] == _reference_ids(reference, images, params) * 2
    if guided:
        assert all("guided_closed_early" in (r.extra or {}) or r.token_ids for r in served)


@pytest.mark.triton
def test_streamed_equals_unary_and_the_reference(torch_server, reference, images):
    import asyncio

    from coordexp.engines.triton.pool import ServerPool

    params = GenerationParams(max_new_tokens=MAX_NEW)

    async def go():
        stream, _ = await ServerPool.connect([torch_server.grpc_url], wire.stream_ensemble_name(wire.ENSEMBLE))
        try:
            out = []
            for b in images[:2]:
                partials: list = []
                st, facts = await stream.generate(b, params, on_partial=partials.append)
                out.append((st, facts["timing"], partials))
            return out
        finally:
            await stream.close()

    expected = _reference_ids(reference, images[:2], params)
    for (st, timing, partials), ref in zip(asyncio.run(go()), expected):
        assert st.error is None and st.token_ids == ref
        assert [n for _, n in timing.token_times] == list(range(1, len(ref) + 1))
        assert all(ref[:len(p.token_ids)] == p.token_ids for p in partials)


@pytest.mark.triton
def test_gpu_check_script_runs_on_cpu(torch_server, tiny_ckpt, tmp_path):
    """bench/gpu/run_gpu_check.py with --device cpu --small against the running torch server (so
    it cannot rot): run A's answers are identical, run B's numbers are all there."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "gpu", "run_gpu_check.py")
    spec = importlib.util.spec_from_file_location("run_gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "check"
    url = torch_server.grpc_url
    assert mod.main(["--out", str(out), "--device", "cpu", "--dtype", "fp32", "--small", "--ckpt-a", tiny_ckpt,
                     "--url-a", url, "--url-b", url]) == 0
    report = json.load(open(out / "gpu_check.json"))
    assert report["a"]["ok"] and set(report["a"]["modes"]) == {"unary", "streamed", "guided"}
    b = report["b"]
    assert b["vision_ms_per_image"] > 0 and b["image_tokens"] > 0
    for engine in ("torch_dynamic", "torch_static", "hf_generate"):
        assert set(b[engine]) == {"batch_1", "batch_2"}
        assert all(v["ms_per_token"] > 0 and v["ttft_ms"] > 0 for v in b[engine].values())
    assert set(b["served"]) == {"concurrency_1", "concurrency_2"}
    assert all(v["errors"] == 0 and v["requests_per_s"] > 0 for v in b["served"].values())
    assert b.get("served_static") is None  # --url-b given: no second export to compare with
    assert "| served concurrency |" in (out / "gpu_check.md").read_text()
    c = report["c"]  # run C: accuracy parity; the same dtype on the same device is token-identical
    assert c["token_agreement"]["exact_answer_rate"] == 1.0 and c["verdict"] == "inconclusive"  # 3 images
    assert "run C:" in (out / "gpu_check.md").read_text()


@pytest.mark.triton
def test_gpu_check_compares_in_flight_with_static_batches(tmp_path):
    """Run B without --url-b exports the random checkpoint twice (in flight, static batches) and serves
    both: the table says what in-flight batching buys on the device (here CPU, --small)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "gpu", "run_gpu_check.py")
    spec = importlib.util.spec_from_file_location("run_gpu_check_b", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "check"
    assert mod.main(["--out", str(out), "--device", "cpu", "--dtype", "fp32", "--small", "--runs", "b"]) == 0
    b = json.load(open(out / "gpu_check.json"))["b"]
    for mode in ("served", "served_static"):
        assert set(b[mode]) == {"concurrency_1", "concurrency_2"}
        assert all(v["errors"] == 0 and v["requests_per_s"] > 0 for v in b[mode].values())
    assert set(b["served_inflight_over_static"]) == {"concurrency_1", "concurrency_2"}
    configs = {m: open(out / repo / "llm" / "config.pbtxt").read() for m, repo in (("inflight", "repo_b"),
                                                                                  ("static", "repo_b_static"))}
    assert '"inflight"' in configs["inflight"] and '"static"' in configs["static"]
    assert "in flight / static" in (out / "gpu_check.md").read_text()
