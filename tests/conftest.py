"""Shared fixtures: a tiny checkpoint built once per session, datasets with every kind of bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# runs that infer / eval / pipeline register go to a registry of this test session, not the user's
os.environ.setdefault("COORDEXP_REGISTRY", os.path.join(__import__("tempfile").mkdtemp(prefix="coordexp-tests-"),
                                                        "registry.sqlite"))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
SAMPLE_DIR = os.path.join(REPO_ROOT, "data", "sample")
DEMO_CKPT = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A random tiny Qwen3-VL checkpoint, built offline with the project's own builder."""
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-qwen3vl"
    build_tiny_checkpoint(str(out), family="qwen3_vl", seed=0)
    return str(out)


SERVED_MAX_NEW = 24  # the shared served repository's token limit (and default)


@pytest.fixture(scope="session")
def exported(tiny_ckpt, tmp_path_factory) -> tuple[str, str]:
    """(ckpt, repository): the tiny checkpoint exported to ONNX + a Triton repository, once per
    session (exports take about a minute on 2 cores)."""
    from coordexp.export.onnx_export import export_onnx
    from coordexp.export.repository import write_repository
    from coordexp import wire

    base = tmp_path_factory.mktemp("served")
    export_onnx(tiny_ckpt, str(base / "onnx"))
    repo = write_repository(str(base / "model_repository"), wire.ENSEMBLE, str(base / "onnx"), tiny_ckpt,
                            max_batch_size=8, max_new_tokens=SERVED_MAX_NEW, move_onnx=True)
    return tiny_ckpt, repo


@pytest.fixture(scope="session")
def server(exported):
    """The real Triton server on free loopback ports, serving `exported`; always stopped."""
    from coordexp.serving.server import start_server

    srv = start_server(exported[1])
    try:
        yield srv
    finally:
        rc = srv.stop()
    # a clean shutdown: every model unloads in time (a streamed request the client left half-open
    # kept the streaming ensemble alive, and Triton exited 1 after its exit timeout)
    assert rc == 0, f"tritonserver exited with {rc}; see {srv.log_path}"


DEMO_MAX_NEW = 96  # the longest demo_val answer is 78 tokens: nothing is cut


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> str:
    """The demo checkpoint through the user's path (`build_engine`: ONNX export validated against
    PyTorch, the training record's prompt), once per session: tests share it and its ONNX graphs."""
    from coordexp.export.build_engine import main as build_engine

    repo = str(tmp_path_factory.mktemp("demo_repo") / "model_repository")
    assert build_engine(["--ckpt", DEMO_CKPT, "--repo", repo, "--max-new-tokens", str(DEMO_MAX_NEW),
                         "--threads", "2"]) == 0
    return repo


@pytest.fixture(scope="session")
def demo_server(demo_repo):
    """(repository, server): the demo repository on a real Triton server, once per session."""
    from coordexp.serving.server import start_server

    srv = start_server(demo_repo)
    try:
        yield demo_repo, srv
    finally:
        rc = srv.stop()
    assert rc == 0, f"tritonserver exited with {rc}; see {srv.log_path}"


@pytest.fixture(scope="session")
def sample_data() -> str:
    return os.path.join(SAMPLE_DIR, "sample.jsonl")


@pytest.fixture()
def bad_dataset(tmp_path) -> tuple[str, list[str | None]]:
    """A JSONL mixing good records with every kind of bad input; returns (path, expected error per line)."""
    from PIL import Image

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    with open(os.path.join(SAMPLE_DIR, "sample.jsonl")) as f:
        good = [json.loads(line) for line in f][:2]
    for rec in good:
        shutil.copy(os.path.join(SAMPLE_DIR, rec["images"][0]), img_dir / os.path.basename(rec["images"][0]))
        rec["images"] = ["images/" + os.path.basename(rec["images"][0])]
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (img_dir / "empty.png").write_bytes(b"")
    Image.new("RGB", (300, 200), "white").save(img_dir / "big.png")
    g0 = good[0]
    lines = [
        (json.dumps(g0), None),
        ("{not json", "invalid_input"),
        ("[1, 2, 3]", "invalid_input"),
        (json.dumps({"images": ["images/x.png"], "width": 10}), "invalid_input"),  # no height
        (json.dumps({**g0, "images": ["images/missing.png"]}), "image_load_failed"),
        (json.dumps({**g0, "images": ["images/corrupt.png"]}), "image_load_failed"),
        (json.dumps({**g0, "images": ["images/empty.png"]}), "image_load_failed"),
        (json.dumps({**g0, "width": g0["width"] + 1}), "size_mismatch"),
        (json.dumps({**g0, "images": [g0["images"][0], g0["images"][0]]}), "multi_image_not_supported"),
        (json.dumps({"images": ["images/big.png"], "width": 300, "height": 200, "objects": []}), "image_too_large"),
        ("   ", "invalid_input"),
        (json.dumps({**g0, "objects": [{"desc": "x", "line": [1, 2, 3, 4]}]}), "invalid_geometry"),
        (json.dumps(good[1]), None),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(text for text, _ in lines) + "\n")
    return str(path), [code for _, code in lines]


def served_answers(url, images, params, concurrency=4, model=None, text=None):
    """One request per image through the shipped client (`TritonEngine`), `concurrency` in flight:
    GenerationResults in input order (a failed request has `error` set)."""
    from coordexp import wire
    from coordexp.engines.triton import ClientOptions, TritonEngine

    opts = ClientOptions(model=model or wire.ENSEMBLE, timeout=300.0, retries=0, max_in_flight=concurrency)
    with TritonEngine.connect([url], opts, user_text=text) as engine:
        return engine.generate_batch(list(images), params)


def live_processes(match) -> list[int]:
    """Pids of live (not zombie) processes whose argv (a list of bytes) `match` accepts, from /proc."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cmd and cmd[0] and match(cmd):
            out.append(int(pid))
    return out
