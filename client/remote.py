"""Triton over gRPC (``tritonclient.grpc.aio``): dataset runs against one or more servers.

`run_remote(args, params)` is what ``coordexp-client infer --url ...`` calls. It keeps the
contract of the local runner (`coordexp.runner`): exactly one prediction line per input line, in
input order, written as results come (the input is read lazily, the out-of-order buffer is
capped), per-line errors, resumable, `summary.json` beside the output.

The pieces are usable on their own (``ask`` and ``bench`` use them):

- `ModelInterface.from_metadata` checks a served model against the ensemble interface below
  (names, dtypes, shapes) and knows how to shape each input (leading batch dim or not);
- `build_inputs` / `generation_from_result` turn one image + decoding parameters into request
  tensors and a response into a `GenerationResult` (raw text -> the shared parser later);
- `ServerPool` spreads requests over several servers, least-outstanding first; a server that
  goes away (UNAVAILABLE) is taken out, its requests are retried elsewhere, and a background probe
  puts it back when its model answers ready again. DEADLINE_EXCEEDED is retried with exponential
  backoff. When no server is left the pool waits up to ``--wait-for-server`` seconds and then
  raises `AllServersDown` (exit 3; the prefix written so far is valid for ``--resume``).

Exit codes: 0 done (lines may carry their own errors), 2 nothing was run (wrong URL, model unknown
or not ready, incompatible interface, bad arguments), 3 the servers went away mid-run.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from coordexp.generation import GenerationParams, GenerationResult

# The ensemble's interface (TensorRT-LLM-style names). Every required input must be declared with
# this dtype; optional ones are sent only when the model declares them.
REQUIRED_INPUTS = {
    "image_bytes_input": "BYTES",
    "max_tokens": "INT32",
    "temperature": "FP32",
    "runtime_top_p": "FP32",
    "repetition_penalty": "FP32",
    "random_seed": "UINT64",
}
OPTIONAL_INPUTS = {"text_input": "BYTES", "guided": "BOOL", "ignore_eos": "BOOL", "stream": "BOOL"}
REQUIRED_OUTPUTS = {"text_output": "BYTES"}
OPTIONAL_OUTPUTS = {"preds_json": "BYTES", "output_ids": None, "sequence_length": None, "guided_closed_early": None}

_NP_DTYPES = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
              "UINT64": np.uint64, "BOOL": np.bool_}

EXIT_PREFLIGHT = 2
EXIT_SERVERS_GONE = 3

# gRPC status codes as tritonclient reports them (InferenceServerException.status()).
ST_UNAVAILABLE = "StatusCode.UNAVAILABLE"
ST_DEADLINE = "StatusCode.DEADLINE_EXCEEDED"
RETRY_SAME = {ST_DEADLINE, "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.CANCELLED"}
# A server shutting down unloads its models first and answers NOT_FOUND ("Request for unknown
# model: ... has no available versions") while still accepting connections: the model checked at
# pre-flight went away, so that server is taken out like an unreachable one.
GONE_STATUSES = {ST_UNAVAILABLE, "StatusCode.NOT_FOUND"}


class PreflightError(RuntimeError):
    """Nothing was run: the server/model cannot serve this client (exit 2)."""


class AllServersDown(RuntimeError):
    """No server answered within --wait-for-server seconds (exit 3)."""


# ---------------------------------------------------------------------------------------------
# The served model's interface


@dataclass
class ModelInterface:
    name: str
    version: str = ""
    inputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, dims)
    outputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    max_batch_size: int = 0
    decoupled: bool = False
    platform: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], config: dict[str, Any] | None = None) -> "ModelInterface":
        """From `get_model_metadata(as_json=True)` and `get_model_config(as_json=True)["config"]`."""
        config = dict(config or {})

        def tensors(key: str) -> dict[str, tuple[str, list[int]]]:
            return {t["name"]: (t.get("datatype", ""), [int(d) for d in t.get("shape", [])])
                    for t in metadata.get(key, [])}

        versions = metadata.get("versions") or []
        policy = config.get("model_transaction_policy") or {}
        return cls(name=metadata.get("name", ""), version=str(versions[-1]) if versions else "",
                   inputs=tensors("inputs"), outputs=tensors("outputs"),
                   max_batch_size=int(config.get("max_batch_size", 0) or 0),
                   decoupled=bool(policy.get("decoupled", False)), platform=metadata.get("platform", ""),
                   config=config)

    def problems(self) -> list[str]:
        """What makes this model unusable by this client (empty: compatible)."""
        out = []
        for name, dtype in REQUIRED_INPUTS.items():
            if name not in self.inputs:
                out.append(f"input {name!r} ({dtype}) is missing")
        for name, dtype in {**REQUIRED_INPUTS, **OPTIONAL_INPUTS}.items():
            if name in self.inputs and self.inputs[name][0] != dtype:
                out.append(f"input {name!r} is {self.inputs[name][0]}, expected {dtype}")
        for name in self.inputs:
            if name in REQUIRED_INPUTS or name in OPTIONAL_INPUTS:
                if int(np.prod(self.request_shape(name))) != 1:
                    out.append(f"input {name!r} has shape {self.inputs[name][1]}; expected one element per request")
        for name, dtype in REQUIRED_OUTPUTS.items():
            if name not in self.outputs:
                out.append(f"output {name!r} ({dtype}) is missing")
            elif self.outputs[name][0] != dtype:
                out.append(f"output {name!r} is {self.outputs[name][0]}, expected {dtype}")
        return out

    def request_shape(self, name: str) -> list[int]:
        """The shape of one request's tensor: metadata dims (batch dim included when
        max_batch_size > 0) with every variable dim set to 1."""
        dims = list(self.inputs[name][1])
        if self.max_batch_size > 0 and (not dims or dims[0] != -1):
            dims = [-1] + dims  # metadata normally includes it; be tolerant
        return [1 if d < 0 else d for d in dims] or [1]

    @property
    def streams(self) -> bool:
        """Answers over the gRPC stream API: a decoupled model, or an ensemble with a decoupled step
        (CoordExp's `<name>_stream`, recognised by its `stream` input)."""
        return self.decoupled or "stream" in self.inputs

    @property
    def output_names(self) -> list[str]:
        return [n for n in (*REQUIRED_OUTPUTS, *OPTIONAL_OUTPUTS) if n in self.outputs]


def fit_params_to_server(params: GenerationParams, manifest: dict[str, Any] | None, args: Any) -> GenerationParams:
    """Without an explicit --max-new-tokens, use the served export's own default."""
    import dataclasses

    served = ((manifest or {}).get("decoding_defaults") or {}).get("max_new_tokens") or \
        manifest_summary(manifest)["max_new_tokens"]
    if getattr(args, "max_new_tokens", 0) is None and isinstance(served, int):
        return dataclasses.replace(params, max_new_tokens=served)
    return params


def request_problems(iface: ModelInterface, manifest: dict[str, Any] | None, params: GenerationParams,
                     user_text: str | None = None, args: Any = None) -> list[str]:
    """What was asked that the served model cannot do (checked before any work)."""
    out = []
    if params.guided and "guided" not in iface.inputs:
        out.append("--guided: the served model has no 'guided' input")
    if params.ignore_eos and "ignore_eos" not in iface.inputs:
        out.append("--ignore-eos: the served model has no 'ignore_eos' input")
    if user_text is not None and "text_input" not in iface.inputs:
        out.append("--prompt: the served model has no 'text_input' input")
    limit = manifest_summary(manifest)["max_new_tokens"]
    if isinstance(limit, int) and params.max_new_tokens > limit:
        out.append(f"--max-new-tokens {params.max_new_tokens} exceeds the served model's limit of {limit} "
                   f"(set at export); pass --max-new-tokens {limit} or less")
    if args is not None:
        out.extend(fixed_prompt_conflicts(args, manifest))
    return out


def request_values(params: GenerationParams, image_bytes: bytes, user_text: str | None,
                   stream: bool = False) -> dict[str, Any]:
    """Input name -> scalar value of one request (before shaping)."""
    vals: dict[str, Any] = {
        "image_bytes_input": bytes(image_bytes),
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "runtime_top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "random_seed": params.seed,
        "guided": params.guided,
        "ignore_eos": params.ignore_eos,
        "stream": stream,
    }
    if user_text is not None:
        vals["text_input"] = user_text.encode("utf-8")
    return vals


def build_arrays(iface: ModelInterface, params: GenerationParams, image_bytes: bytes,
                 user_text: str | None = None, stream: bool = False) -> dict[str, np.ndarray]:
    """The request tensors as numpy arrays, shaped for `iface` (optional inputs the model does
    not declare are left out; `guided`/`ignore_eos` only when true or declared)."""
    arrays = {}
    for name, value in request_values(params, image_bytes, user_text, stream).items():
        if name not in iface.inputs:
            continue
        dtype = iface.inputs[name][0]
        arrays[name] = np.array([value], dtype=_NP_DTYPES[dtype]).reshape(iface.request_shape(name))
    return arrays


def build_inputs(iface: ModelInterface, params: GenerationParams, image_bytes: bytes,
                 user_text: str | None = None, stream: bool = False) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, arr in build_arrays(iface, params, image_bytes, user_text, stream).items():
        t = grpcclient.InferInput(name, list(arr.shape), iface.inputs[name][0])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def requested_outputs(iface: ModelInterface) -> list:
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(n) for n in iface.output_names]


def _first(arr: np.ndarray | None) -> Any:
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    return flat[0] if flat.size else None


def generation_from_arrays(out: dict[str, np.ndarray | None], params: GenerationParams) -> GenerationResult:
    """Response tensors -> GenerationResult (text as the model wrote it; ids trimmed to
    sequence_length when the server gives it)."""
    raw = _first(out.get("text_output"))
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw or "")
    ids: list[int] = []
    if out.get("output_ids") is not None:
        ids = [int(v) for v in np.asarray(out["output_ids"]).reshape(-1)]
        n = _first(out.get("sequence_length"))
        if n is not None and 0 <= int(n) <= len(ids):
            ids = ids[: int(n)]
    finish = "length" if ids and len(ids) >= params.max_new_tokens else "stop"
    extra: dict[str, Any] = {}
    if params.guided:  # the same facts the in-process engines record
        closed = _first(out.get("guided_closed_early"))
        extra = {"guided": True, **({"guided_closed_early": bool(closed)} if closed is not None else {})}
    return GenerationResult(text=text, token_ids=ids, finish_reason=finish, extra=extra)


def generation_from_result(result, iface: ModelInterface, params: GenerationParams) -> GenerationResult:
    return generation_from_arrays({n: result.as_numpy(n) for n in iface.output_names}, params)


# ---------------------------------------------------------------------------------------------
# Retry policy and server selection (pure)


def backoff_delay(attempt: int, base: float = 0.25, cap: float = 8.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential, capped, with
    "equal jitter" (half fixed, half random) so retries of many requests spread out."""
    d = min(cap, base * (2 ** max(0, attempt)))
    r = (rng or random).random()
    return d / 2 + r * d / 2


def pick_server(servers: Sequence["ServerState"]) -> int | None:
    """Index of the healthy server with the fewest requests in flight (ties: fewer requests so
    far, then the order given); None when none is healthy."""
    best = None
    for i, s in enumerate(servers):
        if not s.healthy:
            continue
        key = (s.outstanding, s.requests)
        if best is None or key < best[0]:
            best = (key, i)
    return None if best is None else best[1]


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


def is_final_response(result: Any) -> bool:
    """Whether a streamed response is its request's last: Triton marks every response of a decoupled
    model with the `triton_final_response` parameter (absent: a unary-style single response)."""
    try:
        p = result.get_response().parameters.get("triton_final_response")
    except Exception:
        return True
    return True if p is None else bool(p.bool_param)


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


@dataclass
class StreamTiming:
    """When the responses of one streamed request arrived (seconds after it was sent)."""

    responses: int = 0
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (t, sequence_length) when it grew
    end_s: float | None = None

    @property
    def first_token_s(self) -> float | None:
        return self.token_times[0][0] if self.token_times else None

    @property
    def inter_token_s(self) -> float | None:
        """Mean time between generated tokens after the first (GenAI-Perf's inter_token_latency)."""
        if len(self.token_times) < 1:
            return None
        (t0, n0), (t1, n1) = self.token_times[0], self.token_times[-1]
        return (t1 - t0) / (n1 - n0) if n1 > n0 else None


# ---------------------------------------------------------------------------------------------
# Servers


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


def normalise_url(url: str) -> str:
    for prefix in ("grpc://", "http://", "https://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


async def fetch_manifest(client, model: str, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The export manifest of one of our ensembles (None for a foreign model).

    The repository writer (`coordexp.export.repository`) stores the whole manifest.json as the
    ensemble config's `manifest_json` parameter, so a client reads it without file access."""
    if config is None:
        try:
            config = (await client.get_model_config(model, as_json=True, client_timeout=10)).get("config", {})
        except Exception:
            return None
    params = config.get("parameters") or {}
    p = params.get("manifest_json")
    raw = p.get("string_value") if isinstance(p, dict) else None
    if not raw:
        return None
    try:
        m = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return m if isinstance(m, dict) else None


def manifest_summary(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The facts people ask for (checkpoint, weights hash, export date, versions, prompt variant)
    from the repository writer's manifest."""
    m = manifest or {}
    ckpt = m.get("checkpoint") if isinstance(m.get("checkpoint"), dict) else {}
    prompt = m.get("prompt") if isinstance(m.get("prompt"), dict) else {}
    return {"checkpoint": ckpt.get("path"), "hash": ckpt.get("weights_sha256"), "export_date": m.get("created"),
            "versions": m.get("versions"), "prompt_variant": prompt.get("variant"), "backend": m.get("backend"),
            "max_new_tokens": m.get("max_new_tokens")}


async def preflight(url: str, model: str, timeout: float = 10.0):
    """Connect to `url` and check that `model` is ready and speaks our interface.

    Returns (client, ModelInterface, manifest or None); raises PreflightError with one clear
    sentence otherwise (the client is closed then)."""
    client = new_client(url)
    try:
        try:
            live = await client.is_server_live(client_timeout=timeout)
        except Exception as e:
            raise PreflightError(f"cannot reach a Triton gRPC server at {url}: {error_message(e)}") from None
        if not live:
            raise PreflightError(f"the Triton server at {url} is not live")
        ready = False
        try:
            ready = await client.is_model_ready(model, client_timeout=timeout)
        except Exception:
            pass
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


@dataclass
class ServerState:
    url: str
    client: Any = None
    healthy: bool = True
    outstanding: int = 0
    requests: int = 0  # attempts sent to this server
    succeeded: int = 0
    failed: int = 0  # attempts that ended in an error (any)
    retried: int = 0  # attempts on this server that were retried (here or elsewhere)
    went_away: int = 0  # times it was taken out
    came_back: int = 0
    last_error: str = ""

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded, "failed": self.failed,
                "retried": self.retried, "went_away": self.went_away, "came_back": self.came_back,
                "healthy": self.healthy}


class ServerPool:
    """Least-outstanding load spreading over several servers, with retries and health probes."""

    def __init__(self, model: str, iface: ModelInterface, servers: list[ServerState], timeout: float = 120.0,
                 retries: int = 5, wait_for_server: float = 60.0, probe_interval: float = 0.5,
                 backoff_base: float = 0.25, backoff_cap: float = 8.0):
        self.model = model
        self.iface = iface
        self.servers = servers
        self.timeout = timeout
        self.retries = retries
        self.wait_for_server = wait_for_server
        self.probe_interval = probe_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.total_retries = 0
        self._changed = asyncio.Event()
        self._prober: asyncio.Task | None = None
        self._old_clients: list[Any] = []
        self._rng = random.Random(0)

    @classmethod
    async def connect(cls, urls: Sequence[str], model: str, preflight_timeout: float = 10.0,
                      **kwargs: Any) -> tuple["ServerPool", dict[str, Any] | None]:
        """Pre-flight every URL (PreflightError on the first problem); returns (pool, manifest)."""
        states: list[ServerState] = []
        iface = manifest = None
        try:
            for url in urls:
                client, i, m = await preflight(url, model, preflight_timeout)
                states.append(ServerState(url=url, client=client))
                if iface is None:
                    iface, manifest = i, m
                elif (set(i.inputs) != set(iface.inputs)
                      or manifest_summary(m)["hash"] != manifest_summary(manifest)["hash"]):
                    raise PreflightError(f"{url} serves a different {model!r} than {urls[0]} "
                                         "(other inputs or another export manifest hash)")
        except BaseException:
            for s in states:
                await s.client.close()
            raise
        return cls(model, iface, states, **kwargs), manifest

    def _pick(self) -> ServerState | None:
        i = pick_server(self.servers)
        return None if i is None else self.servers[i]

    async def acquire(self) -> ServerState:
        deadline = None
        while True:
            s = self._pick()
            if s is not None:
                s.outstanding += 1
                s.requests += 1
                return s
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait_for_server
                self._ensure_prober()
            if now >= deadline:
                why = "; ".join(f"{x.url}: {x.last_error}" for x in self.servers if x.last_error)
                raise AllServersDown(f"no Triton server answered for {self.wait_for_server:g}s"
                                     + (f" ({why})" if why else ""))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=deadline - now)
            except asyncio.TimeoutError:
                pass

    def release(self, s: ServerState) -> None:
        s.outstanding -= 1

    def mark_down(self, s: ServerState, why: str) -> None:
        s.last_error = why
        if s.healthy:
            s.healthy = False
            s.went_away += 1
            self._ensure_prober()

    def _ensure_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while any(not s.healthy for s in self.servers):
            for s in self.servers:
                if s.healthy:
                    continue
                client = new_client(s.url)  # a fresh channel: the old one may be in a long reconnect backoff
                ok = False
                try:
                    ok = await client.is_model_ready(self.model, client_timeout=2.0)
                except Exception as e:
                    s.last_error = error_message(e)
                if ok:
                    self._old_clients.append(s.client)
                    s.client = client
                    s.healthy = True
                    s.came_back += 1
                    self._changed.set()
                else:
                    await client.close()
            await asyncio.sleep(self.probe_interval)

    async def _stream_request(self, s: ServerState, inputs: list, outputs: list,
                              on_partial: Any = None) -> tuple[Any, StreamTiming]:
        """One request over the gRPC stream API (a decoupled model): reads its responses until the
        final one, timing each; `on_partial(GenerationResult)` sees every partial answer."""
        done = asyncio.Event()

        async def requests():
            yield {"model_name": self.model, "inputs": inputs, "outputs": outputs}
            await done.wait()  # keep the stream open until the final response is in

        timing = StreamTiming()
        last = failure = None
        t0 = time.perf_counter()
        call = s.client.stream_infer(requests(), stream_timeout=self.timeout)
        try:
            async for res, err in call:
                if err is not None:  # this request failed (the stream itself goes on)
                    failure = err
                    break
                t = time.perf_counter() - t0
                timing.responses += 1
                n = _first(res.as_numpy("sequence_length")) if "sequence_length" in self.iface.outputs else None
                n = int(n) if n is not None else timing.responses
                if n > (timing.token_times[-1][1] if timing.token_times else 0):
                    timing.token_times.append((t, n))
                last = res
                if on_partial is not None:
                    on_partial(generation_from_result(res, self.iface, GenerationParams()))
                if is_final_response(res):
                    timing.end_s = t
                    break
            # Half-close and let the server end the call: a cancelled call can leave the streaming
            # ensemble unable to unload at server shutdown (Triton then exits 1 after its timeout).
            done.set()
            try:
                await asyncio.wait_for(_drain(call), timeout=5.0)
            except (asyncio.TimeoutError, Exception):
                pass
        finally:
            done.set()
            call.cancel()  # no-op on a call that already ended
        if failure is not None:
            raise failure
        if last is None or timing.end_s is None:
            raise RuntimeError("the response stream ended before the final response")
        return last, timing

    async def generate(self, image_bytes: bytes, params: GenerationParams,
                       user_text: str | None = None, stream: bool = False,
                       on_partial: Any = None) -> tuple[GenerationResult, dict[str, Any]]:
        """One request with retries. Returns (result, facts); a server-side error for this request
        comes back as a result with `error` set. Raises AllServersDown. `stream`: over the gRPC
        stream API (decoupled models), facts then carry `timing` (a StreamTiming)."""
        stream = stream or self.iface.streams
        inputs = build_inputs(self.iface, params, image_bytes, user_text, stream=stream)
        outputs = requested_outputs(self.iface)
        attempt = 0
        while True:
            s = await self.acquire()
            t0 = time.perf_counter()
            timing = None
            try:
                if stream:
                    res, timing = await self._stream_request(s, inputs, outputs, on_partial)
                else:
                    res = await s.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                status, msg = error_status(e), error_message(e)
                s.failed += 1
                unavailable = status in GONE_STATUSES
                if unavailable:
                    self.mark_down(s, msg)
                retryable = unavailable or status in RETRY_SAME
                if not retryable or attempt >= self.retries:
                    what = f"after {attempt + 1} attempts: " if attempt else ""
                    status_s = status.replace("StatusCode.", "") if status else type(e).__name__
                    return (GenerationResult(text="", error=f"server {s.url}: {what}[{status_s}] {msg}"),
                            {"server": s.url, "attempts": attempt + 1})
                s.retried += 1
                self.total_retries += 1
                attempt += 1
                if not unavailable:  # the same server may be picked again: back off first
                    await asyncio.sleep(backoff_delay(attempt - 1, self.backoff_base, self.backoff_cap, self._rng))
                continue
            finally:
                self.release(s)
            s.succeeded += 1
            gen = generation_from_result(res, self.iface, params)
            facts = {"server": s.url, "attempts": attempt + 1, "latency_s": time.perf_counter() - t0}
            if timing is not None:
                facts["timing"] = timing
            return gen, facts

    def stats(self) -> dict[str, Any]:
        return {s.url: s.stats() for s in self.servers}

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            try:
                await self._prober
            except (asyncio.CancelledError, Exception):
                pass
        for c in [s.client for s in self.servers] + self._old_clients:
            try:
                await c.close()
            except Exception:
                pass


def served_prompt(manifest: dict[str, Any] | None, user_text: str | None = None):
    """The PromptSpec the served model uses (the manifest's `prompt`; the default without one)
    with the user text applied."""
    import dataclasses

    from coordexp.prompt import PromptSpec

    spec = PromptSpec()
    p = (manifest or {}).get("prompt")
    if isinstance(p, dict):
        try:
            spec = PromptSpec.from_dict(p)
        except (TypeError, ValueError):
            pass
    if user_text is not None:
        spec = dataclasses.replace(spec, user_text=user_text)
    return spec


def prompt_variant(manifest: dict[str, Any] | None, user_text: str | None) -> str:
    """The variant recorded on every line ("+custom" when the user text is not the default)."""
    return served_prompt(manifest, user_text).variant


def fixed_prompt_conflicts(args: Any, manifest: dict[str, Any] | None) -> list[str]:
    """Prompt options that cannot be honoured remotely (the prompt is fixed at export)."""
    spec = served_prompt(manifest, None)
    out = []
    for key in ("coord_format", "field_order", "object_order"):
        want = getattr(args, key, None)
        if want is not None and want != getattr(spec, key):
            out.append(f"--{key.replace('_', '-')} {want}: the served model was exported with {getattr(spec, key)}")
    if getattr(args, "system_prompt", None) is not None:
        out.append("--system-prompt: the served model's system prompt is fixed at export")
    return out


# ---------------------------------------------------------------------------------------------
# Dataset runs


def reorder_window(concurrency: int) -> int:
    """How far reading may run ahead of writing: at most this many records are between the
    next line to write and the next record to send (results held back behind a slow earlier
    one are capped by it)."""
    return max(64, 4 * concurrency)


def _decode_check(item) -> Any:
    """Fully decode an ok item's image (the header was verified by coordexp.dataset): a body
    that does not decode is the record's own error and never reaches the server."""
    import io

    from PIL import Image

    from coordexp.schema import ErrorCode

    if item.ok:
        try:
            with Image.open(io.BytesIO(item.image_bytes)) as im:
                im.load()
        except Exception as e:
            item.fail(ErrorCode.IMAGE_LOAD_FAILED, f"line {item.line_no}: cannot decode image ({e})")
    return item


def _next_item(it: Iterator) -> Any:
    item = next(it, None)
    return None if item is None else _decode_check(item)


async def _run_async(args: Any, params: GenerationParams) -> int:
    from coordexp.runner import PredictionWriter

    urls = [normalise_url(u) for u in args.url]
    user_text = getattr(args, "user_text", None)
    try:
        pool, manifest = await ServerPool.connect(
            urls, args.model, preflight_timeout=min(10.0, max(1.0, args.timeout)), timeout=args.timeout,
            retries=args.retries, wait_for_server=args.wait_for_server)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PREFLIGHT
    try:
        params = fit_params_to_server(params, manifest, args)
        problems = request_problems(pool.iface, manifest, params, user_text, args)
        if problems:
            print("error: " + "; ".join(problems), file=sys.stderr)
            return EXIT_PREFLIGHT
        try:
            writer = PredictionWriter(args.out, resume=args.resume)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_PREFLIGHT
        return await _run_dataset(args, params, pool, manifest, writer, user_text)
    finally:
        await pool.close()


async def _run_dataset(args, params, pool: ServerPool, manifest, writer, user_text) -> int:
    from coordexp.dataset import DEFAULT_MAX_PIXELS, count_records, iter_dataset
    from coordexp.runner import finish_summary, prediction_from_generation, progress_bar

    spec = served_prompt(manifest, user_text)
    extra_line = {"prompt_variant": prompt_variant(manifest, user_text), "engine": "triton"}
    started = time.perf_counter()
    total = count_records(args.data)
    tokens_before = writer.tokens
    bar = progress_bar(total, writer.written, desc=f"infer[triton x{len(pool.servers)}]",
                       disable=True if args.no_progress else None)
    concurrency = max(1, int(args.concurrency))
    window = reorder_window(concurrency)
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coordexp-read")
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task] = set()
    failure: AllServersDown | None = None

    def submit(rec) -> None:
        n = writer.submit(rec)
        if n:
            bar.update(n)
            bar.set_postfix(errors=sum(writer.errors.values()), retries=pool.total_retries,
                            up=f"{sum(s.healthy for s in pool.servers)}/{len(pool.servers)}", refresh=False)

    async def handle(item) -> None:
        try:
            gen, _facts = await pool.generate(item.image_bytes, params, user_text)
        except AllServersDown:
            raise
        except Exception as e:  # e.g. a malformed response: this record fails, the run goes on
            gen = GenerationResult(text="", error=f"{type(e).__name__}: {e}")
        item.image_bytes = None
        submit(prediction_from_generation(item, gen, extra_line))

    def reap(done) -> None:
        nonlocal failure
        for t in done:
            in_flight.discard(t)
            exc = t.exception()
            if isinstance(exc, AllServersDown):
                failure = failure or exc
            elif exc is not None:
                raise exc

    try:
        with writer:  # an exception leaves the valid prefix on disk (results after a gap are redone on --resume)
            it = iter_dataset(args.data, args.max_pixels or DEFAULT_MAX_PIXELS, skip=writer.written)
            next_index = writer.written
            try:
                while failure is None:
                    while in_flight and (len(in_flight) >= concurrency or next_index - writer.written >= window):
                        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                        reap(done)
                    if failure is not None:
                        break
                    item = await loop.run_in_executor(reader, _next_item, it)
                    if item is None:
                        break
                    next_index = item.index + 1
                    if item.ok:
                        in_flight.add(asyncio.create_task(handle(item)))
                    else:
                        submit(prediction_from_generation(item, None, extra_line))
                while in_flight and failure is None:
                    done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    reap(done)
            finally:
                for t in in_flight:
                    t.cancel()
                if in_flight:
                    await asyncio.gather(*in_flight, return_exceptions=True)
                reader.shutdown(wait=True)
                bar.close()
            if failure is not None:
                raise failure
    except AllServersDown:
        pass
    processed = writer.written - writer.resumed_from
    summary = finish_summary(
        writer, started, processed,
        engine={"engine": "triton", "urls": [s.url for s in pool.servers], "model": pool.model,
                "model_version": pool.iface.version, "manifest": manifest},
        params=params.to_dict(), prompt=spec.to_dict(),
        extra={"session_tokens": writer.tokens - tokens_before, "data": os.path.abspath(args.data),
               "out": os.path.abspath(args.out), "status": "incomplete" if failure else "complete",
               "records_total": total, "concurrency": concurrency, "retries": pool.total_retries,
               "servers": pool.stats()})
    summary.write(args.out)
    if failure is not None:
        print(f"error: {failure}; wrote {writer.written} of {total} lines to {args.out}; "
              f"run the same command with --resume to continue", file=sys.stderr)
        return EXIT_SERVERS_GONE
    d = summary.to_dict()
    print(json.dumps({k: d[k] for k in ("records_written", "errors", "seconds", "images_per_s", "tokens_per_s",
                                        "retries")}), file=sys.stderr)
    return 0


def run_remote(args: Any, params: GenerationParams) -> int:
    """`coordexp-client infer --url ...`: see the module docstring."""
    if args.concurrency < 1:
        print("error: --concurrency must be >= 1", file=sys.stderr)
        return EXIT_PREFLIGHT
    return asyncio.run(_run_async(args, params))
