"""Scale-out behaviour with real servers on loopback (issue 28): SIGTERM drains (requests in flight
finish, later ones are refused and retried on another replica, nothing lost), no Python-backend stub
outlives its tritonserver, and `dns:///NAME:PORT` spreads requests over every address behind a name,
following replicas that come and go."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from coordexp.generation import GenerationParams

from conftest import REPO_ROOT, SAMPLE_DIR, SERVED_MAX_NEW

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _png(color=(10, 200, 30), size=96) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _stubs_of(repo: str) -> list[int]:
    """Live Python-backend stubs serving models of `repo` (their command line names its model.py files)."""
    from conftest import live_processes

    return live_processes(lambda cmd: cmd[0].endswith(b"triton_python_backend_stub")
                          and any(a.startswith(repo.encode()) for a in cmd[1:]))


def _wait_gone(repo: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = _stubs_of(repo)
        if not left:
            return []
        time.sleep(0.2)
    return _stubs_of(repo)


@pytest.fixture()
def repo_copy(exported, tmp_path):
    """The shared tiny repository copied (the stub count is per repository path)."""
    dst = tmp_path / "repo"
    shutil.copytree(exported[1], dst)
    return str(dst)


# ============================================================================ drain
def test_a_drain_finishes_the_requests_in_flight_and_refuses_new_ones(repo_copy):
    from coordexp.engines.triton.pool import ServerPool
    from coordexp.serving.server import start_server

    srv = start_server(repo_copy)
    try:
        async def run():
            pool, _ = await ServerPool.connect([srv.grpc_url], "coordexp", retries=0, wait_for_server=1.0)
            params = GenerationParams(max_new_tokens=SERVED_MAX_NEW, ignore_eos=True)
            try:
                first = [asyncio.ensure_future(pool.generate(_png(), params)) for _ in range(16)]
                await asyncio.sleep(0.05)
                drained = await asyncio.get_running_loop().run_in_executor(None, srv.drain, 30.0)
                later, _ = await pool.generate(_png(), params)
                return [await f for f in first], drained, later
            finally:
                await pool.close()

        first, drained, later = asyncio.run(run())
        assert drained["drained"] and set(drained["ensembles"]) == {"coordexp", "coordexp_stream"}, drained
        assert [g.error for g, _ in first] == [None] * 16  # in flight at the drain: finished
        assert all(len(g.token_ids) == SERVED_MAX_NEW for g, _ in first)
        assert later.error and "NOT_FOUND" in later.error  # refused: a client retries another replica
    finally:
        assert srv.stop() == 0


def test_sigterm_mid_run_loses_no_line_the_client_retries_on_the_other_replica(server, repo_copy, tmp_path):
    lines = open(os.path.join(SAMPLE_DIR, "sample.jsonl")).read().splitlines()
    data = tmp_path / "many.jsonl"
    data.write_text("\n".join(lines * (600 // len(lines) + 1)) + "\n")
    shutil.copytree(os.path.join(SAMPLE_DIR, "images"), tmp_path / "images")
    a = subprocess.Popen([sys.executable, "-m", "coordexp.serving.server", "--repo", repo_copy, "--grpc-port", "0",
                          "--http-port", "0", "--no-openai", "--drain-timeout", "30"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    try:
        line = ""
        while not line.startswith("ready:"):
            line = a.stderr.readline()
            assert line, "coordexp-server exited before it was ready"
        url_a = line.split()[2]
        out = tmp_path / "run" / "predictions.jsonl"
        client = subprocess.Popen([sys.executable, "-m", "coordexp.client.cli", "infer", "--url", url_a, "--url",
                                   server.grpc_url, "--data", str(data), "--out", str(out), "--concurrency", "8",
                                   "--no-progress", "--no-register", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        while not out.exists() or len(out.read_text().splitlines()) < 60:  # the run is under way on both
            assert client.poll() is None, client.stderr.read()
            time.sleep(0.1)
        t0 = time.monotonic()
        a.send_signal(signal.SIGTERM)
        rc_a = a.wait(60)
        stopped_in = time.monotonic() - t0
        err_a = a.stderr.read()
        out_c, err_c = client.communicate(timeout=600)
    finally:
        if a.poll() is None:
            a.kill()
    assert rc_a == 0 and stopped_in < 40, err_a
    assert "drained coordexp" in err_a
    assert client.returncode == 0, err_c
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(data.read_text().splitlines())
    assert not [r for r in rows if r.get("error") == "generation_failed"]  # nothing lost
    summary = json.loads(out_c.strip().splitlines()[-1])
    assert summary["records_written"] == len(rows) and summary["errors"].get("generation_failed") is None
    assert _wait_gone(repo_copy, 10) == []


# ============================================================================ no orphans
def _armed(pid: int) -> bool:
    """The stub has started its watchdog (coordexp.serving.common.die_with_parent)."""
    from conftest import live_processes
    from coordexp.serving.common import WATCHDOG_NAME

    return bool(live_processes(lambda cmd: WATCHDOG_NAME.encode() in cmd and cmd[-2] == str(pid).encode()))


@pytest.mark.parametrize("when", ["serving", "loading"])
def test_no_stub_outlives_a_killed_tritonserver(repo_copy, when):
    """SIGKILL of tritonserver itself (the OOM killer's way): its Python-backend stubs follow it. A stub
    whose model was still loading follows too; one that had not reached its model's `initialize` (none
    of our code runs there) is reaped by the process-group kill of whoever started the server."""
    from coordexp.serving.server import TritonServer

    srv = TritonServer(repo_copy)
    if when == "serving":
        srv.start()
    else:  # killed while its models load
        cmd = srv.command()
        from coordexp.serving.server import _prepare_backend_dir

        cmd.insert(2, f"--backend-directory={_prepare_backend_dir(srv.install, srv._workdir)}")
        log = open(os.path.join(os.path.dirname(repo_copy), "tritonserver.log"), "wb")
        srv.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=srv._env(), start_new_session=True)
        # some stubs are inside their model's initialize, watchdog armed (2 shared cores: allow for load)
        deadline = time.monotonic() + 120
        while not any(_armed(p) for p in _stubs_of(repo_copy)) and time.monotonic() < deadline \
                and srv.proc.poll() is None:
            time.sleep(0.05)
    try:
        armed = {p for p in _stubs_of(repo_copy) if _armed(p)}
        if not armed and srv.proc.poll() is not None:  # say why: the server's own words
            with open(os.path.join(os.path.dirname(repo_copy), "tritonserver.log"), "rb") as f:
                pytest.fail(f"tritonserver exited ({srv.proc.returncode}) before any stub armed: "
                            f"{f.read()[-2000:].decode(errors='replace')}")
        assert armed, f"no stub reached its model's initialize; stubs {_stubs_of(repo_copy)}"
        os.kill(srv.proc.pid, signal.SIGKILL)  # the server only: the stubs are re-parented
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while armed & set(_stubs_of(repo_copy)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not armed & set(_stubs_of(repo_copy))  # they die by themselves within seconds
        if when == "serving":
            assert _stubs_of(repo_copy) == []  # every stub was armed
    finally:
        srv.stop()  # the group kill: nothing is left whatever state a stub was in
    assert _wait_gone(repo_copy, 5) == []


# ============================================================================ dns:///
def test_dns_url_spreads_over_every_replica_follows_them_and_loses_nothing(server, repo_copy, sample_data, tmp_path):
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.runner import run_dataset
    from coordexp.serving.server import start_server

    b = start_server(repo_copy)
    answers = {"replicas": [server.grpc_url]}  # the name resolves to one replica first

    def resolver(name, port):
        assert (name, port) == ("coordexp-server-headless.coordexp", 8001)
        return list(answers["replicas"])

    opts = ClientOptions(timeout=60.0, retries=5, wait_for_server=30.0, resolver=resolver, resolve_interval=0.3)
    try:
        with TritonEngine.connect(["dns:///coordexp-server-headless.coordexp:8001"], opts) as engine:
            assert [s.url for s in engine.pool.servers] == [server.grpc_url]
            answers["replicas"] = [server.grpc_url, b.grpc_url]  # a new pod
            deadline = time.monotonic() + 20
            while len(engine.pool.servers) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert {s.url for s in engine.pool.servers} == {server.grpc_url, b.grpc_url}
            lines = open(sample_data).read().splitlines()
            data = tmp_path / "d.jsonl"
            data.write_text("\n".join(lines * 10) + "\n")
            shutil.copytree(os.path.join(SAMPLE_DIR, "images"), tmp_path / "images")
            params = GenerationParams(max_new_tokens=8)
            out = tmp_path / "a" / "predictions.jsonl"
            run_dataset(str(data), str(out), engine, params, concurrency=8, progress=False)
            stats = engine.pool.stats()
            assert stats[server.grpc_url]["succeeded"] > 0 and stats[b.grpc_url]["succeeded"] > 0  # both got work
            # one replica killed mid-run: its requests are retried on the other, no line lost
            out2 = tmp_path / "b" / "predictions.jsonl"
            import threading

            threading.Timer(1.0, b.kill).start()
            run_dataset(str(data), str(out2), engine, params, concurrency=8, progress=False)
            rows = [json.loads(x) for x in out2.read_text().splitlines()]
            assert len(rows) == len(lines) * 10 and not [r for r in rows if r.get("error") == "generation_failed"]
            answers["replicas"] = [server.grpc_url]  # the pod is gone from the name: it retires
            deadline = time.monotonic() + 10
            while not engine.pool.stats()[b.grpc_url]["retired"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert engine.pool.stats()[b.grpc_url]["retired"]
    finally:
        b.stop()
