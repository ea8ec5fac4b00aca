"""Hostile requests straight to the served ensemble (issue 17): through tritonclient's gRPC and HTTP
clients and through plain curl against the KServe v2 HTTP API (a client nobody here wrote). Each bad
request gets its own clear error; good requests batched with bad ones still succeed; after every case
the server is live and answers a good request."""
from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from coordexp import wire

from conftest import SAMPLE_DIR, SERVED_MAX_NEW

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def _png(w: int = 64, h: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w: int = 60000, h: int = 60000) -> bytes:
    """A valid PNG header claiming w x h pixels over a few bytes of data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _inputs(module, values: dict[str, tuple[np.ndarray, str]]):
    out = []
    for name, (arr, dtype) in values.items():
        t = module.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr, **({"binary_data": True} if module.__name__.endswith("http") else {}))
        out.append(t)
    return out


def _request(image: bytes, **decoding) -> dict[str, tuple[np.ndarray, str]]:
    vals = {wire.IMAGE_BYTES_INPUT: (np.array([[image]], dtype=object), "BYTES"),
            wire.MAX_TOKENS: (np.array([[4]], dtype=np.int32), "INT32")}
    for name, (v, dtype) in decoding.items():
        vals[name] = (np.asarray(v, dtype=wire.NUMPY_DTYPES[dtype]).reshape(1, -1), dtype)
    return vals


def _call(url: str, values, module_name: str = "grpc"):
    """(response or None, error message or None)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if module_name == "grpc" else httpclient
    client = module.InferenceServerClient(url)
    try:
        return client.infer(wire.ENSEMBLE, _inputs(module, values)), None
    except Exception as e:  # noqa: BLE001 - the error is what the test looks at
        return None, str(e)
    finally:
        client.close()


def _still_serving(server) -> None:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert c.is_server_live() and c.is_server_ready()
    finally:
        c.close()
    res, err = _call(server.grpc_url, _request(_png()))
    assert err is None, err
    assert res.as_numpy(wire.SEQUENCE_LENGTH).reshape(-1)[0] <= 4


SAMPLE = open(f"{SAMPLE_DIR}/images/sample_00002.png", "rb").read()
CASES = {
    "wrong dtype": ({**_request(_png()), wire.MAX_TOKENS: (np.array([[4.0]], dtype=np.float32), "FP32")},
                    "max_tokens"),
    "wrong shape": ({**_request(_png()), wire.MAX_TOKENS: (np.array([[4, 4]], dtype=np.int32), "INT32")},
                    "max_tokens"),
    "empty bytes": (_request(b""), "image file is empty"),
    "random bytes": (_request(np.random.default_rng(0).bytes(5000)), "image_load_failed"),
    "truncated png": (_request(SAMPLE[: len(SAMPLE) // 2]), "image_load_failed"),
    "decompression bomb": (_request(_bomb_png()), "image_too_large"),
    "100 MB payload": (_request(b"\x89PNG\r\n\x1a\n" + bytes(100 << 20)), "image_too_large"),
    "max_tokens 0": (_request(_png(), **{wire.MAX_TOKENS: ([0], "INT32")}), "max_tokens must be >= 1"),
    "max_tokens negative": (_request(_png(), **{wire.MAX_TOKENS: ([-5], "INT32")}), "max_tokens must be >= 1"),
    "max_tokens huge": (_request(_png(), **{wire.MAX_TOKENS: ([2**31 - 1], "INT32")}), "exceeds this repository"),
    "temperature NaN": (_request(_png(), **{wire.TEMPERATURE: ([np.nan], "FP32")}), "temperature must be a finite"),
    "temperature negative": (_request(_png(), **{wire.TEMPERATURE: ([-1.0], "FP32")}), "temperature must be >= 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_request_gets_its_own_clear_error_and_the_server_keeps_serving(server, case):
    values, expected = CASES[case]
    res, err = _call(server.grpc_url, values)
    assert res is None and expected in err, (case, err)
    _still_serving(server)


def test_a_prompt_longer_than_the_model_is_refused(server, exported):
    meta = json.load(open(f"{exported[1]}/llm/1/onnx/onnx_meta.json"))
    words = " ".join(["red circle"] * (int(meta["max_position_embeddings"]) + 10))
    values = {**_request(_png()), wire.TEXT_INPUT: (np.array([[words.encode()]], dtype=object), "BYTES")}
    res, err = _call(server.grpc_url, values)
    assert res is None and "prompt_too_long" in err, err
    _still_serving(server)


def test_good_requests_batched_with_bad_ones_still_succeed(server):
    """Sent together, the dynamic batcher groups them: the bad ones fail alone."""
    reqs = [_request(_png(40 + i)) if i % 2 == 0 else _request(b"not an image") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda v: _call(server.grpc_url, v), reqs))
    for i, (res, err) in enumerate(out):
        if i % 2 == 0:
            assert err is None and res.as_numpy(wire.TEXT_OUTPUT) is not None, err
        else:
            assert res is None and "image_load_failed" in err
    _still_serving(server)


def test_the_same_over_http_with_tritonclient_and_with_plain_curl(server):
    res, err = _call(server.http_url, _request(b""), "http")
    assert res is None and "image file is empty" in err
    res, err = _call(server.http_url, _request(_png()), "http")
    assert err is None and int(res.as_numpy(wire.SEQUENCE_LENGTH).reshape(-1)[0]) <= 4
    # KServe v2 JSON, as any HTTP client would send it: BYTES elements are base64-free strings in
    # JSON, so the image goes as the binary-tensor extension would not; a non-image string is refused.
    url = f"http://{server.http_url}/v2/models/{wire.ENSEMBLE}/infer"
    body = {"inputs": [{"name": wire.IMAGE_BYTES_INPUT, "shape": [1, 1], "datatype": "BYTES",
                        "data": [base64.b64encode(_png()).decode()]},
                       {"name": wire.MAX_TOKENS, "shape": [1, 1], "datatype": "INT32", "data": [4]}]}
    r = subprocess.run(["curl", "-s", "-X", "POST", url, "-H", "Content-Type: application/json", "-d",
                        json.dumps(body)], capture_output=True, text=True, timeout=60)
    assert "image_load_failed" in json.loads(r.stdout)["error"], r.stdout
    body["inputs"][1]["data"] = ["four"]
    r = subprocess.run(["curl", "-s", "-X", "POST", url, "-H", "Content-Type: application/json", "-d",
                        json.dumps(body)], capture_output=True, text=True, timeout=60)
    assert "error" in json.loads(r.stdout), r.stdout
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{server.http_url}/v2/health/ready"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == "200"
    _still_serving(server)
    assert SERVED_MAX_NEW >= 4
