"""Happy-path parity on the bundled demo checkpoint (a model that really detects): the PyTorch
reference, in-process ONNX Runtime, the served unary ensemble and the served streaming ensemble
give the same detections line for line, and `coordexp-client eval` gives the same metrics.

The checkpoint goes through the user's path: `export/build_engine.py` (which validates the graphs
against PyTorch), a real Triton server, `coordexp-client infer` and `eval` as subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO_CKPT, DEMO_MAX_NEW, REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.triton]

DEMO_VAL = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")
N_RECORDS = 12
MAX_NEW = DEMO_MAX_NEW  # the shared demo repository's limit (conftest.demo_repo)


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "coordexp.client.cli", *args], capture_output=True, text=True,
                       timeout=600, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> str:
    """The first N demo_val records, image paths made absolute so the file can live elsewhere."""
    root = os.path.dirname(DEMO_VAL)
    out = tmp_path_factory.mktemp("demo") / "val_subset.jsonl"
    with open(DEMO_VAL) as f:
        lines = [json.loads(line) for line in f if line.strip()][:N_RECORDS]
    for d in lines:
        d["images"] = [os.path.join(root, p) for p in d["images"]]
    out.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return str(out)


def lines_of(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_torch_onnx_served_and_streamed_give_the_same_detections_and_metrics(subset, demo_server, tmp_path):
    repo, srv = demo_server
    common = ["--data", subset, "--max-new-tokens", str(MAX_NEW)]
    runs = {
        "torch": ["--local", DEMO_CKPT, "--engine", "torch", "--batch-size", "4"],
        "onnx": ["--local", repo, "--engine", "onnx", "--batch-size", "4"],
        "served": ["--url", srv.grpc_url, "--concurrency", "4"],
        "streamed": ["--url", srv.grpc_url, "--model", "coordexp_stream", "--concurrency", "4"],
    }
    preds, metrics = {}, {}
    for name, args in runs.items():
        out = tmp_path / name
        cli("infer", *common, *args, "--out", str(out / "predictions.jsonl"))
        preds[name] = lines_of(str(out / "predictions.jsonl"))
        cli("eval", "--pred", str(out / "predictions.jsonl"), "--gt", subset, "--out", str(out / "eval"),
            "--no-semantic")
        metrics[name] = json.loads((out / "eval" / "metrics.json").read_text())

    ref = preds["torch"]
    assert len(ref) == N_RECORDS
    # the happy path: every answer is clean CoordJSON with detections in it
    assert all(r.get("error") is None and not r.get("repairs") and r["preds"] for r in ref)
    for name in ("onnx", "served", "streamed"):
        got = preds[name]
        assert [r["raw_output"] for r in got] == [r["raw_output"] for r in ref], name
        assert [r["preds"] for r in got] == [r["preds"] for r in ref], name
        assert metrics[name]["coco"] == metrics["torch"]["coco"], name
        assert metrics[name]["f1ish"] == metrics["torch"]["f1ish"], name
    # and the checkpoint detects (the bar, on this subset)
    assert metrics["torch"]["coco"]["bbox"]["AP50"] >= 0.5
