"""The OpenAI-compatible API of coordexp-server, with real processes on loopback: the official `openai`
SDK (sync, async, streamed) and a plain HTTP client sending CoordExp's own request shape get the same
answers as `coordexp-client infer` over gRPC (the demo checkpoint, greedy), true token counts, every
bad request its status and an error in OpenAI's shape, and the server keeps serving after each."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import DEMO_MAX_NEW, REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.triton]

openai = pytest.importorskip("openai", reason="the openai SDK is a test dependency (make setup installs it)")

DEMO_VAL = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")
ALIAS = "/ckpts/stage1/checkpoint-4000"  # CoordExp configs send the checkpoint path as `model`
N_IMAGES = 4


def _images(n=N_IMAGES) -> list[bytes]:
    root = os.path.dirname(DEMO_VAL)
    with open(DEMO_VAL) as f:
        recs = [json.loads(line) for line in f][:n]
    return [open(os.path.join(root, r["images"][0]), "rb").read() for r in recs]


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def api(demo_server):
    """The API (uvicorn, in this process) in front of the session's demo Triton server."""
    from coordexp.serving.openai_api.app import ApiOptions
    from coordexp.serving.openai_api.messages import ImageLimits
    from coordexp.serving.openai_api.runner import ApiServer
    from coordexp.serving.server import free_port

    repo, srv = demo_server
    opts = ApiOptions(grpc_url=srv.grpc_url, aliases=(ALIAS,),
                      processor_dir=os.path.join(repo, "preprocess", "1", "processor"), max_request_bytes=3 << 20,
                      image=ImageLimits(max_bytes=2 << 20, max_pixels=4_000_000))
    server = ApiServer(opts, "127.0.0.1", free_port()).start()
    try:
        yield server, srv
    finally:
        server.stop()


@pytest.fixture(scope="module")
def grpc_answers(api):
    """`coordexp-client infer`'s engine over gRPC on the same images: the reference answers."""
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.generation import GenerationParams

    _, srv = api
    with TritonEngine.connect([srv.grpc_url], ClientOptions(timeout=300.0)) as engine:
        return engine.generate_batch(_images(), GenerationParams(max_new_tokens=DEMO_MAX_NEW)), engine.prompt


def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _image_only(data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(data)}}]}]


# ============================================================================ answers
def test_the_sdk_gets_the_grpc_answers_sync_async_and_streamed(api, grpc_answers):
    server, _ = api
    ref, _prompt = grpc_answers
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    for data, want in zip(_images(), ref):
        r = client.chat.completions.create(model="coordexp", messages=_image_only(data), temperature=0,
                                           max_tokens=DEMO_MAX_NEW)
        assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
        # true counts from the model: the generated ids, the prompt the preprocess step rendered
        assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == want.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        ext = r.model_extra["coordexp"]
        assert ext["error"] is None and len(ext["preds"]) > 0 and all("pixel_points" in p for p in ext["preds"])

    async def all_async():
        c = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
        rs = await asyncio.gather(*(c.chat.completions.create(model=ALIAS, messages=_image_only(d), temperature=0)
                                    for d in _images()))
        await c.close()
        return [x.choices[0].message.content for x in rs]

    assert asyncio.run(all_async()) == [g.text for g in ref]
    for data, want in zip(_images(2), ref):
        parts, usage, finish = [], None, None
        for ch in client.chat.completions.create(model="coordexp", messages=_image_only(data), temperature=0,
                                                 stream=True, stream_options={"include_usage": True}):
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
            if ch.usage is not None:
                usage = ch.usage
        assert "".join(parts) == want.text and finish == "stop"
        assert len([p for p in parts if p]) > 3  # streamed in pieces, not one blob
        assert usage.completion_tokens == len(want.token_ids) and usage.prompt_tokens == want.prompt_tokens


def test_coordexps_own_request_shape_over_plain_http(api, grpc_answers):
    """The request CoordExp's pipeline sends (system + user [text, image], its sampling fields): the
    texts reach the chat template in the order sent (text first), as a gRPC request saying the same."""
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.generation import GenerationParams, RequestPrompt

    server, srv = api
    _, served = grpc_answers
    system, user = served.system(), served.user_text
    data = _images(1)[0]
    body = {"model": ALIAS, "temperature": 0.0, "top_p": 1.0, "max_tokens": DEMO_MAX_NEW, "stream": False,
            "skip_special_tokens": False, "spaces_between_special_tokens": False, "repetition_penalty": 1.0,
            "seed": 17, "messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": [{"type": "text", "text": user},
                                                                  {"type": "image_url", "image_url": {"url": _data_url(data)}}]}]}
    status, out = _post(server.url + "/chat/completions", body)
    assert status == 200, out
    parts = RequestPrompt(user_text=user, system_text=system, layout="text_first")
    with TritonEngine.connect([srv.grpc_url], ClientOptions(timeout=300.0), user_text=parts) as engine:
        (want,) = engine.generate_batch([data], GenerationParams(max_new_tokens=DEMO_MAX_NEW, seed=17))
    assert out["choices"][0]["message"]["content"] == want.text
    assert out["coordexp"]["prompt_variant"].endswith("+text_first")
    # without the coordinate tokens, as vLLM's default would have it: the coordinates are gone
    status, plain = _post(server.url + "/chat/completions", {**body, "skip_special_tokens": True})
    assert status == 200 and "<|coord_" not in plain["choices"][0]["message"]["content"]
    assert "<|coord_" in want.text


def test_models_lists_the_ensemble_and_its_aliases_with_limit_and_digest(api):
    server, _ = api
    status, out = _get(server.url + "/models")
    assert status == 200 and [m["id"] for m in out["data"]] == ["coordexp", ALIAS]
    ext = out["data"][0]["coordexp"]
    assert ext["max_new_tokens"] == DEMO_MAX_NEW and len(ext["checkpoint_sha256"]) == 64
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    one = client.models.retrieve(ALIAS)  # the SDK asks for /v1/models//ckpts/...
    assert one.id == ALIAS and one.root == "coordexp"
    status, one = _get(server.url + "/models" + ALIAS)  # a proxy that merged the "//"
    assert status == 200 and one["id"] == ALIAS
    status, err = _get(server.url + "/models/nope")
    assert status == 404 and "coordexp" in err["error"]["message"]


# ============================================================================ refusals
def _bomb_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels (the body is never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _with_image(url: str, **kw) -> dict:
    return {"model": "coordexp", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "find"}, {"type": "image_url", "image_url": {"url": url}}]}], **kw}


def test_every_bad_request_gets_its_status_and_the_server_keeps_serving(api):
    server, _ = api
    good = _images(1)[0]
    url = server.url + "/chat/completions"
    img = {"type": "image_url", "image_url": {"url": _data_url(good)}}
    cases = [
        ({"model": "coordexp", "messages": [{"role": "user", "content": "no image here"}]}, 400, "missing_image"),
        ({"model": "coordexp", "messages": [{"role": "user", "content": [img, img]}]}, 400, "too_many_images"),
        (_with_image("https://example.com/cat.png"), 400, "image_url_not_allowed"),
        (_with_image("data:image/png;base64,@@not base64@@"), 400, "invalid_base64"),
        (_with_image(_data_url(b"this is not an image")), 400, "image_load_failed"),
        (_with_image(_data_url(_bomb_png())), 400, "image_too_large"),
        (_with_image(_data_url(os.urandom(2_200_000))), 413, "image_too_large"),
        (_with_image(_data_url(good), model="other-model"), 404, "model_not_found"),
        (_with_image(_data_url(good), n=2), 400, None),
        (_with_image(_data_url(good), tools=[{"type": "function", "function": {"name": "f"}}]), 400, None),
        ({"model": "coordexp", "messages": [{"role": "user", "content": [img]},
                                            {"role": "assistant", "content": "{}"},
                                            {"role": "user", "content": "again"}]}, 400, None),
        (_with_image(_data_url(good), max_tokens=DEMO_MAX_NEW + 1), 400, "max_tokens_too_large"),
        (_with_image(_data_url(good), temperature=-1), 400, None),
    ]
    for body, status, code in cases:
        got, out = _post(url, body)
        assert got == status, (body.get("messages", [{}])[0], out)
        assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"]
        if code is not None:
            assert out["error"]["code"] == code, out
        if code == "max_tokens_too_large":
            assert f"limit of {DEMO_MAX_NEW} tokens" in out["error"]["message"]
    # a body over the request-size limit is refused on its Content-Length, before it is read
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", u.path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(4 << 20))
    conn.endheaders()
    conn.send(b"x" * 1024)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    got, out = _post(url, _with_image(_data_url(good), max_tokens=8))
    assert got == 200 and out["usage"]["completion_tokens"] <= 8


def test_triton_gone_is_503_and_the_api_stays_up(exported, tmp_path):
    from coordexp.serving.openai_api.app import ApiOptions
    from coordexp.serving.openai_api.runner import ApiServer
    from coordexp.serving.server import free_port, start_server

    srv = start_server(exported[1])
    server = ApiServer(ApiOptions(grpc_url=srv.grpc_url), "127.0.0.1", free_port()).start()
    try:
        body = {"model": "coordexp", "messages": _image_only(_images(1)[0]), "max_tokens": 4}
        assert _post(server.url + "/chat/completions", body)[0] == 200
        srv.kill()
        status, out = _post(server.url + "/chat/completions", body)
        assert status == 503 and out["error"]["code"] == "service_unavailable", out
        assert _get(server.url + "/models")[0] == 200  # the API itself is still there
    finally:
        server.stop()
        srv.stop()


def test_an_api_key_is_required_when_set_and_for_any_non_loopback_bind(demo_server):
    from coordexp.serving.openai_api.app import ApiOptions
    from coordexp.serving.openai_api.runner import ApiServer, ApiServerError
    from coordexp.serving.server import free_port

    _, srv = demo_server
    with pytest.raises(ApiServerError, match="--api-key"):
        ApiServer(ApiOptions(grpc_url=srv.grpc_url), "0.0.0.0", free_port())
    server = ApiServer(ApiOptions(grpc_url=srv.grpc_url, api_key="s3cret"), "127.0.0.1", free_port()).start()
    try:
        status, out = _get(server.url + "/models")
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        assert _get(server.url + "/models", {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(server.url + "/models", {"Authorization": "Bearer s3cret"})[0] == 200
        client = openai.OpenAI(base_url=server.url, api_key="s3cret")
        assert [m.id for m in client.models.list().data] == ["coordexp"]
    finally:
        server.stop()


# ============================================================================ the client side
def test_infer_over_the_openai_api_writes_the_grpc_predictions(api, tmp_path):
    server, srv = api
    subset = tmp_path / "val.jsonl"
    root = os.path.dirname(DEMO_VAL)
    with open(DEMO_VAL) as f:
        rows = [json.loads(line) for line in f][:N_IMAGES]
    for r in rows:
        r["images"] = [os.path.join(root, p) for p in r["images"]]
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = {}
    for name, flag in (("grpc", ["--url", srv.grpc_url]), ("openai", ["--openai-url", server.url])):
        out = tmp_path / name / "predictions.jsonl"
        r = subprocess.run([sys.executable, "-m", "coordexp.client.cli", "infer", "--data", str(subset), "--out",
                            str(out), "--no-register", "--no-progress", "--concurrency", "2", *flag],
                           capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["raw_output"] for d in outs["openai"]] == [d["raw_output"] for d in outs["grpc"]]
    assert [d["preds"] for d in outs["openai"]] == [d["preds"] for d in outs["grpc"]]
    assert [d["num_tokens"] for d in outs["openai"]] == [d["num_tokens"] for d in outs["grpc"]]
    summary = json.loads((tmp_path / "openai" / "summary.json").read_text())
    assert summary["engine"]["engine"] == "openai" and summary["checkpoint_sha256"]


# ============================================================================ coordexp-server's lifecycle
def _serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coordexp.serving.server", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)


def test_coordexp_server_prints_ready_with_the_api_url_and_refuses_clashes(exported):
    import socket

    from coordexp.serving.server import free_port

    repo = exported[1]
    # a non-loopback bind without a key, and a taken port: clear errors, exit 2, before Triton starts
    p = _serve("--repo", repo, "--openai-host", "0.0.0.0", "--grpc-port", "0", "--http-port", "0")
    assert p.wait(60) == 2 and "--api-key" in p.stderr.read()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        p = _serve("--repo", repo, "--openai-port", str(taken), "--grpc-port", "0", "--http-port", "0")
        assert p.wait(60) == 2 and f"port {taken} (--openai-port) already in use" in p.stderr.read()
    port = free_port()
    p = _serve("--repo", repo, "--openai-port", str(port), "--grpc-port", "0", "--http-port", "0")
    try:
        ready = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ready:
            line = p.stderr.readline()
            if not line:
                break
            if line.startswith("ready:"):
                ready = line
        assert f"openai http://127.0.0.1:{port}/v1" in ready, ready
        assert _get(f"http://127.0.0.1:{port}/v1/models")[0] == 200  # both answer once "ready" is printed
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
    assert rc == 0
