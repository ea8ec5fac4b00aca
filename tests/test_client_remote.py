"""The Triton client (coordexp.engines.triton): pure parts without a server, then dataset runs
against real Triton servers.

Two kinds of served model:
- a stand-in `coordexp` Python model with the ensemble's interface (FAKE_MODEL below) that answers
  from the image size in a few ms and fails on purpose for 77-pixel-wide images: fault injection
  (servers killed and restarted, clients killed, per-request server errors) needs many quick
  requests and failures the real model cannot be asked for;
- the real exported tiny checkpoint served by the repository writer's ensemble (fixture from the
  serving tests), for the contract against the real thing.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from coordexp import wire
from coordexp.engines.triton import interface as I
from coordexp.engines.triton import pool as P
from coordexp.engines.triton.connect import normalise_url
from coordexp.generation import GenerationParams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO_ROOT, "data", "sample", "sample.jsonl")

# ---------------------------------------------------------------------------------------------
# The ensemble's interface as Triton reports it (metadata with a batch dim: max_batch_size 8).


def ensemble_metadata(batch: bool = True, drop: str | None = None, retype: dict | None = None) -> dict:
    dims = ["-1", "1"] if batch else ["1"]
    inputs = {"image_bytes_input": "BYTES", "text_input": "BYTES", "max_tokens": "INT32", "temperature": "FP32",
              "runtime_top_p": "FP32", "repetition_penalty": "FP32", "random_seed": "UINT64", "guided": "BOOL",
              "ignore_eos": "BOOL"}
    inputs.update(retype or {})
    outputs = {"text_output": ("BYTES", dims), "preds_json": ("BYTES", dims),
               "output_ids": ("INT32", ["-1", "-1"] if batch else ["-1"]), "sequence_length": ("INT32", dims)}
    return {"name": "coordexp", "versions": ["1"], "platform": "ensemble",
            "inputs": [{"name": n, "datatype": t, "shape": dims} for n, t in inputs.items() if n != drop],
            "outputs": [{"name": n, "datatype": t, "shape": s} for n, (t, s) in outputs.items()]}


def test_interface_of_the_ensemble_is_accepted():
    iface = I.ModelInterface.from_metadata(ensemble_metadata(), {"max_batch_size": 8})
    assert iface.problems() == []
    assert iface.max_batch_size == 8 and not iface.decoupled and iface.version == "1"
    assert iface.request_shape("image_bytes_input") == [1, 1]
    flat = I.ModelInterface.from_metadata(ensemble_metadata(batch=False), {})
    assert flat.problems() == [] and flat.request_shape("max_tokens") == [1]


def test_incompatible_interfaces_are_named():
    missing = I.ModelInterface.from_metadata(ensemble_metadata(drop="image_bytes_input"), {"max_batch_size": 8})
    assert missing.problems() == ["input 'image_bytes_input' (BYTES) is missing"]
    retyped = I.ModelInterface.from_metadata(ensemble_metadata(retype={"max_tokens": "INT64"}), {"max_batch_size": 8})
    assert retyped.problems() == ["input 'max_tokens' is INT64, expected INT32"]
    meta = ensemble_metadata()
    meta["outputs"] = [o for o in meta["outputs"] if o["name"] != "text_output"]
    assert I.ModelInterface.from_metadata(meta, {"max_batch_size": 8}).problems() == [
        "output 'text_output' (BYTES) is missing"]
    other = I.ModelInterface.from_metadata(
        {"name": "double", "inputs": [{"name": "X", "datatype": "FP32", "shape": ["-1"]}], "outputs": []}, {})
    assert len(other.problems()) == sum(t.client_required for t in (*wire.ENSEMBLE_INPUTS, *wire.ENSEMBLE_OUTPUTS))


def test_input_tensors_carry_the_decoding_parameters():
    iface = I.ModelInterface.from_metadata(ensemble_metadata(), {"max_batch_size": 8})
    params = GenerationParams(max_new_tokens=17, temperature=0.5, top_p=0.9, repetition_penalty=1.1, seed=2**40,
                              ignore_eos=True)
    arrays = I.build_arrays(iface, params, b"\x89PNG...", "find the cat")
    assert {n: (a.dtype.name, a.shape) for n, a in arrays.items()} == {
        "image_bytes_input": ("object", (1, 1)), "text_input": ("object", (1, 1)), "max_tokens": ("int32", (1, 1)),
        "temperature": ("float32", (1, 1)), "runtime_top_p": ("float32", (1, 1)),
        "repetition_penalty": ("float32", (1, 1)), "random_seed": ("uint64", (1, 1)), "guided": ("bool", (1, 1)),
        "ignore_eos": ("bool", (1, 1))}
    assert arrays["image_bytes_input"][0, 0] == b"\x89PNG..." and arrays["text_input"][0, 0] == b"find the cat"
    assert arrays["max_tokens"][0, 0] == 17 and arrays["random_seed"][0, 0] == 2**40
    assert arrays["temperature"][0, 0] == np.float32(0.5) and arrays["ignore_eos"][0, 0]
    # No prompt: text_input is not sent (the server's exported prompt applies). No batch dim: [1].
    flat = I.ModelInterface.from_metadata(ensemble_metadata(batch=False, drop="guided"), {})
    arrays = I.build_arrays(flat, GenerationParams(), b"img")
    assert "text_input" not in arrays and "guided" not in arrays and arrays["max_tokens"].shape == (1,)
    inputs = I.build_inputs(iface, GenerationParams(), b"img")
    assert [(t.name(), t.datatype(), t.shape()) for t in inputs][:2] == [
        ("image_bytes_input", "BYTES", [1, 1]), ("max_tokens", "INT32", [1, 1])]


def test_request_problems_before_any_work():
    iface = I.ModelInterface.from_metadata(ensemble_metadata(drop="guided"), {"max_batch_size": 8})
    manifest = {"max_new_tokens": 64, "prompt": {"coord_format": "tokens", "field_order": "geometry_first"}}
    probs = I.request_problems(iface, manifest, GenerationParams(max_new_tokens=65, guided=True))
    assert probs == ["--guided: the served model has no 'guided' input",
                     "--max-new-tokens 65 exceeds the served model's limit of 64 (set at export); "
                     "pass --max-new-tokens 64 or less"]
    overrides = {"coord_format": "numeric", "field_order": "geometry_first", "object_order": None,
                 "system_prompt": None}
    assert I.request_problems(iface, manifest, GenerationParams(max_new_tokens=64), None, overrides) == [
        "--coord-format numeric: the served model was exported with tokens"]


def test_prompt_variant_follows_the_manifest_and_the_user_text():
    manifest = {"prompt": {"coord_format": "numeric", "field_order": "desc_first", "object_order": "sorted",
                           "user_text": "Detect all objects in the image.", "system_text": None,
                           "variant": "coordexp/numeric/desc_first/sorted/v1"}}
    assert I.prompt_variant(manifest, None) == "coordexp/numeric/desc_first/sorted/v1"
    assert I.prompt_variant(manifest, "find the cat") == "coordexp/numeric/desc_first/sorted/v1+custom"
    assert I.served_prompt(None).variant == "coordexp/tokens/desc_first/sorted/v1"


def test_response_to_generation_trims_ids_to_sequence_length():
    out = {"text_output": np.array([[b'{"objects": []}']], dtype=object),
           "output_ids": np.array([[5, 6, 7, 0, 0]], np.int32), "sequence_length": np.array([[3]], np.int32)}
    gen = I.generation_from_arrays(out, GenerationParams(max_new_tokens=3))
    assert gen.text == '{"objects": []}' and gen.token_ids == [5, 6, 7] and gen.finish_reason == "length"
    gen = I.generation_from_arrays({"text_output": np.array([b"x"], dtype=object)}, GenerationParams())
    assert gen.text == "x" and gen.token_ids == [] and gen.finish_reason == "stop"


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(1)
    for attempt, full in ((0, 0.25), (1, 0.5), (2, 1.0), (3, 2.0), (10, 8.0)):
        delays = [P.backoff_delay(attempt, 0.25, 8.0, rng) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10  # jittered, not all the same


def test_least_outstanding_selection():
    S = P.ServerState
    servers = [S("a", outstanding=2, requests=5), S("b", outstanding=1, requests=9), S("c", outstanding=1, requests=3)]
    assert P.pick_server(servers) == 2  # fewest in flight; tie -> fewer requests so far
    servers[2].healthy = False
    assert P.pick_server(servers) == 1
    servers[1].healthy = servers[0].healthy = False
    assert P.pick_server(servers) is None
    even = [S("a"), S("b")]
    order = []
    for _ in range(4):  # with nothing in flight, requests alternate
        i = P.pick_server(even)
        even[i].requests += 1
        order.append(i)
    assert order == [0, 1, 0, 1]


# ---------------------------------------------------------------------------------------------
# ServerPool with scripted clients (no server): retries, failover, all servers gone.


class FakeResult:
    def __init__(self, text):
        self.arrays = {"text_output": np.array([[text.encode()]], dtype=object),
                       "output_ids": np.array([[1, 2]], np.int32), "sequence_length": np.array([[2]], np.int32)}

    def as_numpy(self, name):
        return self.arrays.get(name)


class ScriptedClient:
    """infer() answers from a script: "ok" or a gRPC status name to fail with."""

    def __init__(self, name, script=(), ready=True):
        self.name, self.script, self.ready, self.calls = name, list(script), ready, 0

    async def infer(self, model, inputs, outputs=None, client_timeout=None):
        from tritonclient.utils import InferenceServerException

        self.calls += 1
        step = self.script.pop(0) if self.script else "ok"
        await asyncio.sleep(0.001)
        if step != "ok":
            raise InferenceServerException(f"{step} from {self.name}", status=f"StatusCode.{step}")
        return FakeResult(f'{{"objects": []}} from {self.name}')

    async def is_model_ready(self, model, client_timeout=None):
        return self.ready

    async def close(self):
        pass


def _pool(clients, **kw):
    iface = I.ModelInterface.from_metadata(ensemble_metadata(), {"max_batch_size": 8})
    states = [P.ServerState(url=c.name, client=c) for c in clients]
    kw.setdefault("backoff_base", 0.001)
    return P.ServerPool("coordexp", iface, states, **kw)


def test_deadline_exceeded_is_retried_with_backoff():
    a = ScriptedClient("a", ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"])

    async def go():
        pool = _pool([a], retries=5)
        gen, facts = await pool.generate(b"img", GenerationParams())
        return pool, gen, facts

    pool, gen, facts = asyncio.run(go())
    assert gen.error is None and gen.text.endswith("from a") and facts["attempts"] == 3
    assert pool.total_retries == 2 and pool.servers[0].healthy  # a slow server is not taken out


def test_retries_run_out_into_a_per_request_error():
    a = ScriptedClient("a", ["DEADLINE_EXCEEDED"] * 3)
    gen, facts = asyncio.run(_pool([a], retries=2).generate(b"img", GenerationParams()))
    assert gen.error.startswith("server a: after 3 attempts: [DEADLINE_EXCEEDED]") and a.calls == 3


def test_a_server_error_fails_only_that_request_without_retry():
    a = ScriptedClient("a", ["INTERNAL"])
    pool = _pool([a], retries=5)
    gen, _ = asyncio.run(pool.generate(b"img", GenerationParams()))
    assert gen.error == "server a: [INTERNAL] INTERNAL from a" and a.calls == 1 and pool.total_retries == 0


def test_a_server_that_goes_away_is_taken_out_and_put_back(monkeypatch):
    a = ScriptedClient("a", ["UNAVAILABLE"], ready=False)
    b = ScriptedClient("b")
    probes = {"a": a}
    monkeypatch.setattr(P, "new_client", lambda url: probes[url])

    async def go():
        pool = _pool([a, b], probe_interval=0.01)
        first = await pool.generate(b"img", GenerationParams())  # a fails -> retried on b
        down = pool.servers[0].healthy
        a.ready = True  # it answers again: the probe puts it back
        for _ in range(200):
            if pool.servers[0].healthy:
                break
            await asyncio.sleep(0.01)
        await pool.close()
        return pool, first, down

    pool, (gen, facts), down_after_failure = asyncio.run(go())
    assert gen.text.endswith("from b") and facts == {"server": "b", "attempts": 2, "latency_s": facts["latency_s"]}
    assert down_after_failure is False
    st = pool.stats()
    assert st["a"]["went_away"] == 1 and st["a"]["came_back"] == 1 and st["a"]["healthy"]
    assert st["b"]["succeeded"] == 1


def test_no_server_left_waits_then_gives_up(monkeypatch):
    a = ScriptedClient("a", ["UNAVAILABLE"] * 10, ready=False)
    monkeypatch.setattr(P, "new_client", lambda url: a)

    async def go():
        pool = _pool([a], wait_for_server=0.3, probe_interval=0.05)
        t0 = time.monotonic()
        try:
            await pool.generate(b"img", GenerationParams())
        finally:
            await pool.close()
        return time.monotonic() - t0

    with pytest.raises(P.AllServersDown, match="no Triton server answered for 0.3s"):
        asyncio.run(go())


# ---------------------------------------------------------------------------------------------
# Real Triton servers with the stand-in model


FAKE_MODEL = '''
import io, json, time
import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

TEXT = '{"objects": [{"desc": "w%d", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_%d|>, <|coord_%d|>]}]}'


def _get(r, name):
    t = pb_utils.get_input_tensor_by_name(r, name)
    return None if t is None else t.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        p = json.loads(args["model_config"]).get("parameters", {})
        self.delay = float(p.get("delay", {}).get("string_value", "0") or 0)

    def execute(self, requests):
        out = []
        for r in requests:
            w, h = Image.open(io.BytesIO(_get(r, "image_bytes_input"))).size
            max_tokens = int(_get(r, "max_tokens"))
            text_in = _get(r, "text_input")
            time.sleep(self.delay)
            if w == 77:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("fake failure for width 77")))
                continue
            text = TEXT % (w, w, h)
            if text_in is not None:
                text = text.replace('"w%d"' % w, json.dumps(text_in.decode()))
            n = min(max_tokens, 5)
            ids = np.zeros((1, max_tokens), np.int32)
            ids[0, :n] = np.arange(1, n + 1)
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
                pb_utils.Tensor("preds_json", np.array([[b"{}"]], dtype=np.object_)),
                pb_utils.Tensor("output_ids", ids),
                pb_utils.Tensor("sequence_length", np.array([[n]], np.int32))]))
        return out
'''

FAKE_CONFIG = '''
name: "coordexp"
backend: "python"
max_batch_size: 8
input [
  { name: "image_bytes_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "runtime_top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "repetition_penalty" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "random_seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true },
  { name: "guided" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "ignore_eos" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "preds_json" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "output_ids" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "sequence_length" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "delay" value { string_value: "%(delay)s" } }
parameters { key: "manifest_json" value { string_value: %(manifest)s } }
'''

FAKE_MANIFEST = {"name": "coordexp", "created": "2026-01-01T00:00:00+00:00", "versions": {"coordexp": "test"},
                 "checkpoint": {"path": "/fake/ckpt", "weights_sha256": "f" * 64}, "max_new_tokens": 64,
                 "prompt": {"coord_format": "tokens", "field_order": "desc_first", "object_order": "sorted",
                            "user_text": "Detect all objects in the image.", "system_text": None,
                            "variant": "coordexp/tokens/desc_first/sorted/v1"}}

OTHER_CONFIG = '''
name: "other"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''
OTHER_MODEL = '''
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
'''


def write_fake_repository(root, delay: float = 0.01) -> str:
    """A repository with the stand-in `coordexp`, an `other` model of a foreign interface and a
    `broken` model that never loads (the servers load it only when asked: explicit model control)."""
    os.makedirs(root / "coordexp" / "1")
    (root / "coordexp" / "1" / "model.py").write_text(FAKE_MODEL)
    (root / "coordexp" / "config.pbtxt").write_text(
        FAKE_CONFIG % {"delay": delay, "manifest": json.dumps(json.dumps(FAKE_MANIFEST))})
    os.makedirs(root / "other" / "1")
    (root / "other" / "1" / "model.py").write_text(OTHER_MODEL)
    (root / "other" / "config.pbtxt").write_text(OTHER_CONFIG)
    os.makedirs(root / "broken" / "1")
    (root / "broken" / "1" / "model.py").write_text("import module_that_does_not_exist_42\n")
    (root / "broken" / "config.pbtxt").write_text(OTHER_CONFIG.replace('"other"', '"broken"'))
    return str(root)


def start_server(repo: str, grpc_port: int | None = None):
    from coordexp.serving.server import TritonServer

    server = TritonServer(repo, grpc_port=grpc_port, ready_timeout=120,
                          extra_args=["--model-control-mode=explicit", "--load-model=coordexp", "--load-model=other"])
    return server.start()


@pytest.fixture(scope="module")
def fake_repo(tmp_path_factory) -> str:
    return write_fake_repository(tmp_path_factory.mktemp("fake_repo"))


@pytest.fixture(scope="module")
def fake_server(fake_repo):
    server = start_server(fake_repo)
    yield server
    server.stop()


def make_dataset(folder, n: int, fail_every: int | None = None, widths=(96, 128, 160)) -> str:
    """n records over a few images (a 77-px-wide one every `fail_every` lines: the stand-in fails it)."""
    from PIL import Image

    os.makedirs(folder / "images", exist_ok=True)
    lines = []
    for i in range(n):
        w = 77 if fail_every and i % fail_every == fail_every - 1 else widths[i % len(widths)]
        name = f"images/w{w}.png"
        if not (folder / name).exists():
            Image.new("RGB", (w, 64), (200, 10, 10)).save(folder / name)
        lines.append(json.dumps({"images": [name], "width": w, "height": 64, "objects": []}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def client_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordexp.client.cli", *args]


def run_client(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(client_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kw)


def rows_of(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def widths_of(data: str) -> list[int]:
    return [json.loads(line)["width"] for line in open(data)]




@pytest.mark.slow
@pytest.mark.triton
def test_order_and_server_errors_per_line_under_concurrency(fake_server, tmp_path):
    data = make_dataset(tmp_path, 40, fail_every=9)
    out = tmp_path / "out" / "predictions.jsonl"
    r = run_client("infer", "--data", data, "--out", str(out), "--url", fake_server.grpc_url, "--concurrency", "8",
                   "--max-new-tokens", "32", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = rows_of(out)
    widths = widths_of(data)
    assert [r["image_id"] for r in rows] == list(range(40))
    for row, w in zip(rows, widths):  # each line is its own record's answer
        if w == 77:
            assert row["error"] == "generation_failed" and "fake failure for width 77" in row["error_message"]
            assert row["error_message"].startswith(f"line {row['image_id'] + 1}: server ")
        else:
            assert "error" not in row and row["preds"][0]["desc"] == f"w{w}" and row["width"] == w
            assert row["engine"] == "triton" and row["prompt_variant"] == "coordexp/tokens/desc_first/sorted/v1"
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "complete" and s["records_written"] == 40 and s["errors"] == {"generation_failed": 4}
    assert s["servers"][fake_server.grpc_url]["requests"] == 40 and s["concurrency"] == 8
    assert s["engine"]["manifest"]["checkpoint"]["weights_sha256"] == "f" * 64
    assert s["generated_tokens"] == 36 * 5 and s["images_per_s"] > 0 and s["tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.triton
def test_every_bad_input_gets_its_own_line_and_never_reaches_the_server(fake_server, bad_dataset, tmp_path):
    path, expected = bad_dataset
    out = tmp_path / "predictions.jsonl"
    r = run_client("infer", "--data", path, "--out", str(out), "--url", fake_server.grpc_url, "--concurrency", "4",
                   "--max-new-tokens", "16", "--max-pixels", "50000", "--no-progress")
    # 11 of the 13 lines are bad inputs: every line is written, and the run says it mostly failed
    assert r.returncode == 1 and "of the lines failed" in r.stderr, r.stderr
    rows = rows_of(out)
    assert [r.get("error") for r in rows] == expected
    assert all(r["preds"] for r, e in zip(rows, expected) if e is None)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["servers"][fake_server.grpc_url]["requests"] == expected.count(None)  # only the good ones were sent


@pytest.mark.slow
@pytest.mark.triton
def test_preflight_failures_exit_2_with_one_clear_message(fake_server, tmp_path):
    from coordexp.serving.server import free_port

    data = make_dataset(tmp_path, 2)
    out = str(tmp_path / "p.jsonl")
    common = ["infer", "--data", data, "--out", out, "--no-progress", "--max-new-tokens", "16"]
    cases = [
        (["--url", f"127.0.0.1:{free_port()}"], "cannot reach a Triton gRPC server at 127.0.0.1:"),
        (["--url", fake_server.grpc_url, "--model", "nope"], "the server has no model named 'nope'"),
        (["--url", fake_server.grpc_url, "--model", "broken"], "model 'broken' is not ready"),
        (["--url", fake_server.grpc_url, "--model", "other"],
         "does not have the CoordExp ensemble interface: input 'image_bytes_input' (BYTES) is missing"),
        (["--url", fake_server.grpc_url, "--max-new-tokens", "100"], "exceeds the served model's limit of 64"),
    ]
    for extra, message in cases:
        t0 = time.monotonic()
        r = run_client(*common, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
        assert time.monotonic() - t0 < 30  # fails fast, no retry loop
        assert not os.path.exists(out)  # nothing was run


@pytest.mark.slow
@pytest.mark.triton
def test_two_servers_share_the_load_and_one_dying_is_survived(fake_server, fake_repo, tmp_path):
    data = make_dataset(tmp_path, 120)
    a, b = fake_server, start_server(fake_repo)
    try:
        out = tmp_path / "p.jsonl"
        proc = subprocess.Popen(client_cmd("infer", "--data", data, "--out", str(out), "--url", a.grpc_url,
                                           "--url", b.grpc_url, "--concurrency", "4", "--max-new-tokens", "16",
                                           "--no-progress", "--wait-for-server", "20"),
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_lines(out, 15, proc)
        b.kill()  # hard: in-flight requests on b fail with UNAVAILABLE
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        b.stop()
    rows = rows_of(out)
    assert [r["image_id"] for r in rows] == list(range(120))
    assert not [r for r in rows if r.get("error")]
    assert [r["preds"][0]["desc"] for r in rows] == [f"w{w}" for w in widths_of(data)]
    s = json.loads((tmp_path / "summary.json").read_text())
    sa, sb = s["servers"][a.grpc_url], s["servers"][b.grpc_url]
    assert sa["succeeded"] > 0 and sb["succeeded"] > 0  # both got work
    assert sa["succeeded"] + sb["succeeded"] == 120
    assert sb["went_away"] == 1 and not sb["healthy"]


def _wait_lines(path, n: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"client ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} lines in {path} after {timeout}s")


@pytest.mark.slow
@pytest.mark.triton
def test_server_restart_mid_run_is_waited_for(fake_repo, tmp_path):
    data = make_dataset(tmp_path, 80)
    server = start_server(fake_repo)
    port = server.grpc_port
    try:
        out = tmp_path / "p.jsonl"
        proc = subprocess.Popen(client_cmd("infer", "--data", data, "--out", str(out), "--url", server.grpc_url,
                                           "--concurrency", "4", "--max-new-tokens", "16", "--no-progress",
                                           "--wait-for-server", "60"),
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_lines(out, 10, proc)
        server.kill()
        time.sleep(1.0)
        assert proc.poll() is None  # waiting for a server, not failing
        server = start_server(fake_repo, grpc_port=port)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        server.stop()
    rows = rows_of(out)
    assert [r["image_id"] for r in rows] == list(range(80)) and not [r for r in rows if r.get("error")]
    s = json.loads((tmp_path / "summary.json").read_text())
    st = s["servers"][f"127.0.0.1:{port}"]
    assert st["went_away"] == 1 and st["came_back"] == 1 and s["retries"] >= 1


@pytest.mark.slow
@pytest.mark.triton
def test_all_servers_gone_exits_3_with_a_prefix_that_resume_completes(fake_repo, tmp_path):
    data = make_dataset(tmp_path, 80, fail_every=13)
    server = start_server(fake_repo)
    port = server.grpc_port
    out = tmp_path / "p.jsonl"
    try:
        proc = subprocess.Popen(client_cmd("infer", "--data", data, "--out", str(out), "--url", server.grpc_url,
                                           "--concurrency", "4", "--max-new-tokens", "16", "--no-progress",
                                           "--wait-for-server", "2"),
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_lines(out, 10, proc)
        server.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        assert "no Triton server answered for 2s" in err and "--resume" in err
        prefix = rows_of(out)
        assert 10 <= len(prefix) < 80 and [r["image_id"] for r in prefix] == list(range(len(prefix)))
        assert json.loads((tmp_path / "summary.json").read_text())["status"] == "incomplete"
        server = start_server(fake_repo, grpc_port=port)
        r = run_client("infer", "--data", data, "--out", str(out), "--url", server.grpc_url, "--resume",
                       "--max-new-tokens", "16", "--no-progress")
        assert r.returncode == 0, r.stderr
        full = tmp_path / "full" / "p.jsonl"
        r = run_client("infer", "--data", data, "--out", str(full), "--url", server.grpc_url, "--max-new-tokens",
                       "16", "--no-progress")
        assert r.returncode == 0, r.stderr
    finally:
        server.stop()
    assert out.read_text() == full.read_text()
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["resumed_from"] == len(prefix) and s["status"] == "complete"


@pytest.mark.slow
@pytest.mark.triton
def test_resume_after_the_client_is_killed(fake_server, tmp_path):
    data = make_dataset(tmp_path, 150, fail_every=11)
    full = tmp_path / "full" / "p.jsonl"
    args = ["--url", fake_server.grpc_url, "--concurrency", "8", "--max-new-tokens", "16", "--no-progress"]
    assert run_client("infer", "--data", data, "--out", str(full), *args).returncode == 0
    out = tmp_path / "run" / "p.jsonl"
    proc = subprocess.Popen(client_cmd("infer", "--data", data, "--out", str(out), *args), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_lines(out, 30, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    n_before = len(out.read_text().splitlines())
    assert n_before < 150
    r = run_client("infer", "--data", data, "--out", str(out), "--resume", *args)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == full.read_text()  # nothing lost, nothing twice
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["resumed_from"] >= n_before - 1 and s["records_written"] == 150


class SlowHeadPool:
    """Stands in for ServerPool in a dataset run: the first record is slow, the others instant."""

    def __init__(self):
        self.iface = I.ModelInterface.from_metadata(ensemble_metadata(), {"max_batch_size": 8})
        self.model, self.servers, self.total_retries = "coordexp", [P.ServerState("s")], 0
        self.started = []
        self.started_while_head_ran = None

    async def generate(self, image_bytes, params, user_text=None):
        from coordexp.generation import GenerationResult

        self.started.append(len(self.started))
        if len(self.started) == 1:
            # Hold the head until the reader stops starting requests (stable for 1 s; bounded), so
            # the count reflects the reorder cap rather than the machine's speed.
            seen, stable = 0, 0
            for _ in range(600):
                await asyncio.sleep(0.05)
                stable = stable + 1 if len(self.started) == seen else 0
                seen = len(self.started)
                if stable >= 20:
                    break
            self.started_while_head_ran = len(self.started)
        elif len(self.started) == 3:
            raise ValueError("malformed response")  # one record fails, the run goes on
        return GenerationResult(text='{"objects": []}', token_ids=[1]), {}

    def stats(self):
        return {}


def test_reading_runs_ahead_at_most_the_reorder_window(tmp_path):
    """The one dataset loop (`run_dataset`) on a `TritonEngine` whose first request is slow: reading
    stops at the reorder window, later results wait in order, a failed record fails alone."""
    from coordexp.engines.triton.engine import TritonEngine, _LoopThread
    from coordexp.runner import reorder_window, run_dataset

    data = make_dataset(tmp_path, 100)
    out = tmp_path / "p.jsonl"
    pool = SlowHeadPool()
    engine = TritonEngine(pool, None, _LoopThread())
    try:
        s = run_dataset(data, str(out), engine, GenerationParams(), concurrency=4, progress=False)
    finally:
        engine._loop.stop()
    assert s.extra["status"] == "complete"
    assert pool.started_while_head_ran == reorder_window(4) == 64  # not all 100: the buffer is capped
    rows = rows_of(out)
    assert [r["image_id"] for r in rows] == list(range(100))
    assert rows[2]["error"] == "generation_failed" and "ValueError: malformed response" in rows[2]["error_message"]
    assert sum(1 for r in rows if r.get("error")) == 1


def test_a_url_without_a_port_means_tritons_grpc_port():
    """(issue 19) gRPC alone would try 443; a scheme is dropped."""
    assert normalise_url("localhost") == "localhost:8001"
    assert normalise_url("grpc://10.0.0.5/") == "10.0.0.5:8001"
    assert normalise_url("127.0.0.1:9001") == "127.0.0.1:9001"
    assert normalise_url("[::1]") == "[::1]:8001" and normalise_url("[::1]:7") == "[::1]:7"


@pytest.mark.slow
@pytest.mark.triton
def test_a_hung_server_does_not_hang_the_client_or_the_bench(fake_repo, tmp_path):
    """(issue 17) SIGSTOP the server: `infer` times out and retries within its bounds and ends (every
    line written, with its error), `bench` reports errors instead of waiting forever."""
    data = make_dataset(tmp_path, 12)
    server = start_server(fake_repo)
    try:
        os.killpg(server.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = run_client("infer", "--data", data, "--out", str(tmp_path / "p.jsonl"), "--url", server.grpc_url,
                       "--concurrency", "4", "--max-new-tokens", "16", "--no-progress", "--timeout", "2",
                       "--retries", "1", "--wait-for-server", "3", timeout=150)
        assert r.returncode != 0, r.stderr  # pre-flight cannot even read the model: exit 2, bounded
        assert time.monotonic() - t0 < 120
        os.killpg(server.proc.pid, signal.SIGCONT)
        # hung mid-run this time: pre-flight passes, then every request times out
        proc = subprocess.Popen(client_cmd("infer", "--data", data, "--out", str(tmp_path / "q.jsonl"), "--url",
                                           server.grpc_url, "--concurrency", "4", "--max-new-tokens", "16",
                                           "--no-progress", "--timeout", "2", "--retries", "1",
                                           "--wait-for-server", "3"),
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        os.killpg(server.proc.pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=150)
        rows = rows_of(tmp_path / "q.jsonl") if (tmp_path / "q.jsonl").exists() else []
        assert proc.returncode in (0, 1, 3), err
        if proc.returncode == 3:  # every server gone: a valid prefix and the resume hint
            assert "--resume" in err
        else:
            assert len(rows) == 12 and [r["image_id"] for r in rows] == list(range(12))
        b = run_client("bench", "--url", server.grpc_url, "--synthetic", "2", "--concurrency", "1", "--requests",
                       "2", "--warmup", "0", "--timeout", "2", "--retries", "0", "--out", str(tmp_path / "b"),
                       timeout=120)
        assert b.returncode != 0 or json.loads((tmp_path / "b" / "bench.json").read_text())["levels"][0]["errors"] > 0
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()


@pytest.mark.slow
@pytest.mark.triton
def test_group_survives_a_dying_replica_and_resumes_after_all_went_away(tmp_path):
    """(issue 17) `group` with two replicas, one killed mid-run: every group accounted for; the last
    one killed mid-run: exit 3, status incomplete, and --resume completes without a group twice."""
    from coordexp.fixtures.group_tree import build_bench_tree

    build_bench_tree(str(tmp_path / "in"), groups=12)
    fake_repo = write_fake_repository(tmp_path / "slow", delay=0.1)  # ~8 s of work: killed mid-run for sure
    common = ["--input-dir", str(tmp_path / "in"), "--concurrency", "4", "--max-new-tokens", "8", "--no-progress",
              "--wait-for-server", "2", "--timeout", "5"]

    def group(out, *urls, resume=False):
        flags = [x for u in urls for x in ("--url", u)] + (["--resume"] if resume else [])
        return subprocess.Popen(client_cmd("group", "--output-dir", str(tmp_path / out), *common, *flags),
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    servers = [start_server(fake_repo), start_server(fake_repo)]
    try:
        proc = group("one", *(s.grpc_url for s in servers))
        time.sleep(2.0)
        servers[1].kill()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        s = json.loads((tmp_path / "one" / "summary.json").read_text())
        assert s["accounted"] and s["status"] == "complete", s
        proc = group("two", servers[0].grpc_url)
        time.sleep(2.0)
        servers[0].kill()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3 and "resume" in err, err
        assert json.loads((tmp_path / "two" / "summary.json").read_text())["status"] == "incomplete"
        servers.append(start_server(fake_repo))
        proc = group("two", servers[-1].grpc_url, resume=True)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        done = json.loads((tmp_path / "two" / "summary.json").read_text())
        assert done["accounted"] and done["status"] == "complete"
        lines = [json.loads(x) for f in sorted((tmp_path / "two").glob("*_stage_a*.jsonl"))
                 for x in f.read_text().splitlines()]
        ids = [(x.get("group_id"), x.get("label"), tuple(x.get("images") or [])) for x in lines]
        assert len(ids) == len(set(ids)) == 12
    finally:
        for srv in servers:
            srv.stop()
