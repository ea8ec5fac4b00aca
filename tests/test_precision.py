"""Reduced-precision exports (issue 27): `build_engine --weights int8` quantizes the decoder with ONNX
Runtime's MatMulNBits quantizer, is validated by accuracy parity on labelled data (not token parity),
records it in the manifest, and serves through real Triton."""
from __future__ import annotations

import json
import os

import pytest

from conftest import DEMO_MAX_NEW, REPO_ROOT

DEMO_CKPT = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")
DEMO_GT = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")


@pytest.fixture(scope="module")
def int8_repo(tmp_path_factory):
    from coordexp.export.build_engine import main as build_engine

    repo = str(tmp_path_factory.mktemp("int8") / "repo")
    assert build_engine(["--ckpt", DEMO_CKPT, "--repo", repo, "--max-new-tokens", str(DEMO_MAX_NEW),
                         "--weights", "int8", "--validate-data", DEMO_GT, "--threads", "2"]) == 0
    return repo


def test_an_int8_export_is_validated_by_accuracy_parity_and_says_so(int8_repo):
    import onnx

    with open(os.path.join(int8_repo, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["onnx"]["weights"] == "int8" and manifest["onnx"]["quantization"]["bits"] == 8
    v = manifest["validation"]
    assert v["kind"] == "accuracy" and v["records"] == 50 and v["verdict"] in ("equivalent", "inconclusive")
    assert [m["name"] for m in v["metrics"]] == ["f1ish@0.50_f1_full_micro", "bbox_AP50", "bbox_AP"]
    for m in v["metrics"]:
        assert m["ci95"][0] <= m["delta"] <= m["ci95"][1] and m["ci95"][0] >= -0.1  # close, not broken
    graph = onnx.load(os.path.join(int8_repo, "llm", "1", "onnx", "decoder.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulNBits" in ops  # the weights really are 8-bit blocks now
    vision = onnx.load(os.path.join(int8_repo, "llm", "1", "onnx", "vision.onnx"), load_external_data=False)
    assert "MatMulNBits" not in {n.op_type for n in vision.graph.node}


@pytest.mark.triton
def test_the_int8_export_serves_through_triton_as_it_runs_in_process(int8_repo, tmp_path):
    """Served (in-flight batches of 4) == the same int8 graphs in process, answer for answer."""
    from coordexp.dataset import copy_records
    from coordexp.engines import load_engine
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.generation import GenerationParams
    from coordexp.runner import run_dataset
    from coordexp.serving.server import start_server

    data = str(tmp_path / "data.jsonl")
    copy_records(DEMO_GT, data, 8)
    params = GenerationParams(max_new_tokens=DEMO_MAX_NEW)
    (tmp_path / "local").mkdir()
    (tmp_path / "served").mkdir()
    local = str(tmp_path / "local" / "predictions.jsonl")
    run_dataset(data, local, load_engine("onnx", int8_repo), params, progress=False)
    srv = start_server(int8_repo)
    try:
        served = str(tmp_path / "served" / "predictions.jsonl")
        with TritonEngine.connect([srv.grpc_url], ClientOptions()) as engine:
            run_dataset(data, served, engine, params, concurrency=4, progress=False)
    finally:
        srv.stop()
    a = [json.loads(x) for x in open(local)]
    b = [json.loads(x) for x in open(served)]
    assert len(a) == len(b) == 8
    assert [x["raw_output"] for x in a] == [x["raw_output"] for x in b]
    assert all(x["preds"] for x in b)


@pytest.mark.parametrize("argv, message", [
    (["--weights", "int8"], "give --validate-data"),
    (["--weights", "int4", "--validate-data", "/nonexistent.jsonl"], "no such file"),
    (["--backend", "torch", "--weights", "int8"], "--weights"),
])
def test_reduced_weights_flags_are_checked(tmp_path, capsys, argv, message):
    from coordexp.export.build_engine import main as build_engine

    assert build_engine(["--ckpt", DEMO_CKPT, "--repo", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
