"""`coordexp-server`'s lifecycle with a real tritonserver: no orphan whatever signal arrives when, a
child that dies with its parent, "ready" only when a model is, clear errors for a folder that is not a
repository and for a port that is taken, free metrics ports, and the client picking the one ensemble.

The repositories here hold small Python models (one loads slowly on purpose, so "while loading" is
a state the test can hit, not a race)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.triton]

MODEL = '''
import json, time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        p = json.loads(args["model_config"]).get("parameters", {})
        time.sleep(float(p.get("load_s", {}).get("string_value", "0") or 0))

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x")
                                                             .as_numpy())]) for r in requests]
'''


def _repo(root, load_s: float = 0.0) -> str:
    d = root / "m"
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text(MODEL)
    (d / "config.pbtxt").write_text(
        'name: "m"\nbackend: "python"\nmax_batch_size: 0\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }\noutput { name: "y" data_type: TYPE_FP32 dims: [ 1 ] }\n'
        f'parameters {{ key: "load_s" value {{ string_value: "{load_s}" }} }}\n'
        'instance_group { kind: KIND_CPU count: 1 }\n')
    return str(root)


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(repo: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "coordexp.serving.server", "--repo", repo, "--grpc-port", str(_free()),
           "--http-port", str(_free()), *extra]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tritons(repo: str) -> list[int]:
    """Pids of tritonserver processes serving `repo` (read from /proc)."""
    from conftest import live_processes

    return live_processes(lambda cmd: cmd[0].endswith(b"tritonserver")
                          and f"--model-repository={repo}".encode() in cmd)


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stderr_until(proc: subprocess.Popen, needle: str, timeout: float = 120) -> str:
    """Read the wrapper's stderr until a line contains `needle`."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"no {needle!r} in the server's output: {''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_while_models_load_stops_tritonserver_too(tmp_path, sig):
    repo = os.path.abspath(_repo(tmp_path, load_s=60))
    proc = _server(repo)
    try:
        _wait(lambda: _tritons(repo), 60, "tritonserver to start")  # it is loading the 60 s model now
        proc.send_signal(sig)
        rc = proc.wait(60)
        assert rc == 128 + sig, proc.stderr.read()
        _wait(lambda: not _tritons(repo), 30, "tritonserver to go away")
    finally:
        proc.kill()
        for pid in _tritons(repo):
            os.kill(pid, signal.SIGKILL)


def test_the_child_dies_with_a_killed_wrapper_and_a_served_signal_stops_cleanly(tmp_path):
    repo = os.path.abspath(_repo(tmp_path / "a"))
    proc = _server(repo)
    try:
        out = _stderr_until(proc, "ready:")
        assert "models m" in out
        proc.kill()  # SIGKILL: no handler runs; the child must follow through PR_SET_PDEATHSIG
        proc.wait(10)
        _wait(lambda: not _tritons(repo), 30, "tritonserver to die with its parent")
    finally:
        for pid in _tritons(repo):
            os.kill(pid, signal.SIGKILL)
    repo = os.path.abspath(_repo(tmp_path / "b"))
    proc = _server(repo)
    try:
        _stderr_until(proc, "ready:")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not _tritons(repo)
    finally:
        proc.kill()


def test_tritonserver_dying_by_itself_ends_the_wrapper_with_the_reason(tmp_path):
    repo = os.path.abspath(_repo(tmp_path))
    proc = _server(repo)
    try:
        _stderr_until(proc, "ready:")
        for pid in _tritons(repo):
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(30) == 1
        assert "tritonserver exited with code -9" in proc.stderr.read()
    finally:
        proc.kill()


def test_not_a_repository_and_a_taken_port_are_clear_errors_never_ready(tmp_path):
    from coordexp.serving.server import TritonServer

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "coordexp.serving.server", "--repo", str(ckpt)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "ready:" not in r.stderr
    assert "is not a Triton model repository" in r.stderr and "looks like a checkpoint" in r.stderr
    repo = _repo(tmp_path / "r")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "coordexp.serving.server", "--repo", repo, "--grpc-port",
                            str(port), "--http-port", "0"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 2 and "ready:" not in r.stderr
    assert f"port {port} (--grpc-port) already in use" in r.stderr
    # metrics: a free port of its own by default, off with 0
    a, b = TritonServer(repo), TritonServer(repo)
    assert a.metrics_port != b.metrics_port and f"--metrics-port={a.metrics_port}" in a.command()
    assert "--allow-metrics=false" in TritonServer(repo, metrics_port=0).command()


def test_the_client_picks_the_one_ensemble_when_the_default_name_is_not_there(exported, tmp_path, capsys):
    import shutil

    from coordexp import wire
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.generation import GenerationParams
    from coordexp.serving.server import start_server

    repo = tmp_path / "repo"
    shutil.copytree(exported[1], repo)
    for old in (wire.ENSEMBLE, wire.stream_ensemble_name(wire.ENSEMBLE)):
        new = old.replace(wire.ENSEMBLE, "shapes")
        os.rename(repo / old, repo / new)
        cfg = (repo / new / "config.pbtxt").read_text()
        (repo / new / "config.pbtxt").write_text(cfg.replace(f'name: "{old}"', f'name: "{new}"', 1))
    server = start_server(str(repo))
    try:
        with TritonEngine.connect([server.grpc_url], ClientOptions()) as engine:
            assert engine.pool.model == "shapes"
            from PIL import Image

            out = engine.generate_batch([Image.new("RGB", (64, 48), "white")], GenerationParams(max_new_tokens=3))
            assert not out[0].error
        assert "using its one CoordExp ensemble 'shapes'" in capsys.readouterr().err
    finally:
        server.stop()


def _markers(repo: str) -> list[str]:
    from coordexp.serving.markers import MARKER_PREFIX

    return sorted(f for f in os.listdir(repo) if f.startswith(MARKER_PREFIX))


def test_a_serving_marker_names_the_server_triton_ignores_it_and_a_dead_one_is_ignored(tmp_path):
    import json

    from coordexp.serving.markers import MARKER_PREFIX, live_servers

    repo = os.path.abspath(_repo(tmp_path))
    # a marker left by a server that was killed: Triton scans past it, and nobody counts it as serving
    stale = {"pid": 1, "tritonserver_pid": 999999, "repo": repo, "host": "127.0.0.1", "grpc_port": 1}
    with open(os.path.join(repo, f"{MARKER_PREFIX}999999.json"), "w") as f:
        json.dump(stale, f)
    assert live_servers(repo) == []
    grpc, http = _free(), _free()
    proc = subprocess.Popen([sys.executable, "-m", "coordexp.serving.server", "--repo", repo, "--grpc-port",
                             str(grpc), "--http-port", str(http)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out = _stderr_until(proc, "ready:")
        assert "models m " in out  # the dotfiles at the repository root are no model and no error
        [live] = live_servers(repo)
        assert live["pid"] == proc.pid and live["tritonserver_pid"] in _tritons(repo)
        assert (live["grpc_port"], live["http_port"], live["repo"]) == (grpc, http, repo)
        assert live["model_control_mode"] == "explicit" and live["started"]
        assert len(_markers(repo)) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert _markers(repo) == [f"{MARKER_PREFIX}999999.json"]  # its own marker is gone, not others'
    finally:
        proc.kill()
    # killed wrapper: the marker stays behind but its tritonserver is gone, so it does not count
    proc = _server(repo)
    try:
        _stderr_until(proc, "ready:")
        assert len(live_servers(repo)) == 1
        proc.kill()
        proc.wait(10)
        _wait(lambda: not _tritons(repo), 30, "tritonserver to die with its parent")
        assert len(_markers(repo)) == 2 and live_servers(repo) == []
    finally:
        for pid in _tritons(repo):
            os.kill(pid, signal.SIGKILL)


def test_a_served_repository_is_replaced_only_with_force_and_stays_marked(tmp_path, tiny_ckpt):
    from test_repository import fake_onnx_dir

    from coordexp.export.build_engine import BuildError, build_parser, check_flags, resolve_options, served_check
    from coordexp.export.repository import RepositoryServed, write_repository
    from coordexp.serving.markers import live_servers

    repo = os.path.abspath(_repo(tmp_path / "served"))
    onnx = fake_onnx_dir(tmp_path / "export")
    proc = _server(repo)
    try:
        _stderr_until(proc, "ready:")
        with pytest.raises(RepositoryServed, match=f"served by coordexp-server pid {proc.pid} "):
            write_repository(repo, "coordexp", onnx, tiny_ckpt)
        assert os.path.isdir(os.path.join(repo, "m")) and not os.path.exists(os.path.join(repo, "manifest.json"))
        parser = build_parser()

        def opts(*extra):
            args = parser.parse_args(["--ckpt", tiny_ckpt, "--repo", repo, *extra])
            return resolve_options(args, check_flags(args, parser))

        with pytest.raises(BuildError) as e:
            served_check(opts())
        assert e.value.code == 2 and "pass --force" in str(e.value)
        [warning] = served_check(opts("--force"))
        assert warning.startswith(f"coordexp-server pid {proc.pid} (tritonserver pid ")
        assert "keeps answering with the model it loaded until you restart it" in warning
        write_repository(repo, "coordexp", onnx, tiny_ckpt, replace_served=True)
        assert os.path.isfile(os.path.join(repo, "manifest.json")) and not os.path.exists(os.path.join(repo, "m"))
        [live] = live_servers(repo)  # the marker moved into the new repository: still seen as served
        assert live["pid"] == proc.pid and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert live_servers(repo) == [] and _markers(repo) == []
    finally:
        proc.kill()
        for pid in _tritons(repo):
            os.kill(pid, signal.SIGKILL)
