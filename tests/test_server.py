"""The real Triton server: start on free loopback ports, serve, stop cleanly, report load failures."""
import os
import textwrap

import numpy as np
import pytest

from coordexp.serving.server import TritonError, TritonServer, find_triton

pytestmark = pytest.mark.triton

CONFIG = textwrap.dedent("""
    name: "{name}"
    backend: "python"
    max_batch_size: 0
    input [ {{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }} ]
    output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }} ]
    instance_group [ {{ kind: KIND_CPU count: 1 }} ]
""")

DOUBLE = textwrap.dedent("""
    import ssl  # stdlib extension modules must match the stub's libpython (LD_LIBRARY_PATH)

    import triton_python_backend_utils as pb_utils
    from coordexp.grid import GRID_MAX  # the stub must see this project's environment

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 2 + GRID_MAX * 0)]))
            return out
""")


def _model(repo, name, code):
    os.makedirs(repo / name / "1")
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(code)


def test_serves_a_python_model_and_stops_cleanly(tmp_path):
    import tritonclient.grpc as grpcclient

    _model(tmp_path, "double", DOUBLE)
    server = TritonServer(str(tmp_path))
    assert server.grpc_port != server.http_port
    with server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = grpcclient.InferInput("X", [3], "FP32")
        x.set_data_from_numpy(np.array([1, 2, 3], np.float32))
        y = client.infer("double", [x]).as_numpy("Y")
        np.testing.assert_array_equal(y, [2, 4, 6])
        client.close()
        pid = server.proc.pid
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):  # the whole process group is gone, stubs included
        os.killpg(pid, 0)


def test_model_that_fails_to_load_gives_tritons_message(tmp_path):
    _model(tmp_path, "broken", "import module_that_does_not_exist_42\n")
    with pytest.raises(TritonError) as e:
        TritonServer(str(tmp_path), ready_timeout=60).start()
    assert "module_that_does_not_exist_42" in str(e.value)
    assert "broken" in str(e.value)


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(TritonError, match="model repository not found"):
        TritonServer(str(tmp_path / "nope"))


def test_prefers_tritonserver_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    found = find_triton()
    assert found.source == "PATH" and found.binary == str(fake) and found.backend_dir is None
    assert find_triton(prefer_path=False).source == "nvidia-pytriton"
