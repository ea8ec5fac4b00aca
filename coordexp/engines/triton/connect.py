"""Connecting to one Triton server over gRPC: the one construction site of the client library
(`new_client`: channel options, message limits, reconnect backoff), URL normalisation, pre-flight
checks of the CoordExp ensemble, tritonclient error decoding. `ServerPool` builds on it."""
from __future__ import annotations

import sys
from typing import Any, Sequence

from coordexp import wire
from coordexp.engines.triton.interface import ModelInterface, fetch_manifest


class PreflightError(RuntimeError):
    """Nothing was run: the server/model cannot serve this client (exit 2)."""


def _first_answer(exc: BaseException, methods: Sequence[str]) -> str:
    """The first non-empty answer of the named no-argument methods of an error ("" if none)."""
    for name in methods:
        fn = getattr(exc, name, None)
        if callable(fn):
            try:
                v = fn()
            except Exception:
                continue
            if v:
                return str(v)
    return ""


def error_status(exc: BaseException) -> str:
    """"StatusCode.X" of a tritonclient error, or of a raw grpc.aio error (the stream API raises those)."""
    return _first_answer(exc, ("status", "code"))


def error_message(exc: BaseException) -> str:
    return _first_answer(exc, ("message", "details")) or str(exc) or type(exc).__name__


def channel_args() -> list[tuple[str, Any]]:
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        # Reconnect quickly to a server that comes back (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]


def new_client(url: str):
    from tritonclient.grpc.aio import InferenceServerClient

    return InferenceServerClient(url, channel_args=channel_args())


DEFAULT_GRPC_PORT = 8001  # Triton's own default


def normalise_url(url: str) -> str:
    """HOST:PORT as gRPC wants it: a scheme is dropped, a missing port is Triton's gRPC default (gRPC
    itself would try 443)."""
    for prefix in ("grpc://", "http://", "https://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
    url = url.rstrip("/")
    host_part = url.rsplit("]", 1)[-1] if url.startswith("[") else url
    if ":" not in host_part:
        url = f"{url}:{DEFAULT_GRPC_PORT}"
    return url


async def preflight(url: str, model: str, timeout: float = 10.0):
    """Connect to `url` and check that `model` is ready and speaks our interface.

    Returns (client, ModelInterface, manifest or None); raises PreflightError with one clear
    sentence otherwise (the client is closed then)."""
    client = new_client(url)
    try:
        try:
            live = await client.is_server_live(client_timeout=timeout)
        except Exception as e:
            raise PreflightError(f"cannot reach a Triton gRPC server at {url}: {error_message(e)} (the client "
                                 f"speaks gRPC: give Triton's gRPC port, {DEFAULT_GRPC_PORT} unless changed; 8000 is "
                                 "its HTTP port)") from None
        if not live:
            raise PreflightError(f"the Triton server at {url} is not live")
        ready = False
        try:
            ready = await client.is_model_ready(model, client_timeout=timeout)
        except Exception:
            pass
        if not ready and model == wire.ENSEMBLE:  # the default name: one CoordExp ensemble there is picked
            only = await _only_ensemble(client, timeout)
            if only is not None:
                print(f"note: {url} has no model {model!r}; using its one CoordExp ensemble {only!r} "
                      f"(pass --model {only} to say so)", file=sys.stderr)
                model, ready = only, True
        if not ready:
            raise PreflightError(await _not_ready_reason(client, url, model, timeout))
        try:
            meta = await client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            config = (await client.get_model_config(model, as_json=True, client_timeout=timeout)).get("config", {})
        except Exception as e:
            raise PreflightError(f"{url}: cannot read the metadata of model {model!r}: {error_message(e)}") from None
        iface = ModelInterface.from_metadata(meta, config)
        bad = iface.problems()
        if bad:
            raise PreflightError(f"{url}: model {model!r} does not have the CoordExp ensemble interface: "
                                 + "; ".join(bad))
        manifest = await fetch_manifest(client, model, config)
        return client, iface, manifest
    except BaseException:
        await client.close()
        raise


async def _only_ensemble(client, timeout: float) -> str | None:
    """The name of the one READY unary CoordExp ensemble of a server (None: none, or several)."""
    try:
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout)
    except Exception:
        return None
    found = []
    for m in index.get("models", []):
        if m.get("state") != "READY" or m.get("name", "").endswith(wire.STREAM_SUFFIX):
            continue
        try:
            config = (await client.get_model_config(m["name"], as_json=True, client_timeout=timeout)).get("config", {})
        except Exception:
            continue
        if config.get("platform") == "ensemble" and "manifest_json" in (config.get("parameters") or {}):
            found.append(m["name"])
    return found[0] if len(set(found)) == 1 else None


async def _not_ready_reason(client, url: str, model: str, timeout: float) -> str:
    try:
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout)
    except Exception:
        index = {}
    rows = [m for m in index.get("models", []) if m.get("name") == model]
    if not rows:
        names = sorted({m.get("name", "") for m in index.get("models", [])})
        held = ", ".join(names) if names else "none"
        return f"{url}: the server has no model named {model!r} (models there: {held})"
    r = rows[-1]
    reason = f": {r['reason']}" if r.get("reason") else ""
    return f"{url}: model {model!r} is not ready (state {r.get('state', 'UNKNOWN')}{reason})"


async def model_stats(url: str, model: str) -> dict[str, int]:
    """{inference_count, execution_count} of a served model (execution < inference: batched)."""
    client = new_client(url)
    try:
        st = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
    finally:
        await client.close()
    return {"inference_count": int(st.get("inference_count", 0)), "execution_count": int(st.get("execution_count", 0))}
