"""`ServerPool`: requests over several Triton servers (gRPC, `tritonclient.grpc.aio`), spread
least-outstanding first; one server's connection and pre-flight are in `connect`.

A server that goes away (UNAVAILABLE) is taken out, its requests are retried elsewhere, and a
background probe puts it back when its model answers ready again. DEADLINE_EXCEEDED is retried with
exponential backoff. When no server is left the pool waits up to `wait_for_server` seconds and then
raises `AllServersDown`.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from coordexp import wire
from coordexp.engines.triton.interface import (ModelInterface, first_value, generation_from_result,
                                               manifest_summary, requested_outputs, build_inputs)
from coordexp.engines.triton.connect import PreflightError, error_message, error_status, new_client, preflight
from coordexp.generation import EngineUnavailable, GenerationParams, GenerationResult, RequestPrompt

# gRPC status codes as tritonclient reports them (InferenceServerException.status()).
ST_UNAVAILABLE = "StatusCode.UNAVAILABLE"
ST_DEADLINE = "StatusCode.DEADLINE_EXCEEDED"
RETRY_SAME = {ST_DEADLINE, "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.CANCELLED"}
# A server shutting down unloads its models first and answers NOT_FOUND ("Request for unknown
# model: ... has no available versions") while still accepting connections: the model checked at
# pre-flight went away, so that server is taken out like an unreachable one.
GONE_STATUSES = {ST_UNAVAILABLE, "StatusCode.NOT_FOUND"}


class AllServersDown(EngineUnavailable):
    """No server answered within --wait-for-server seconds (exit 3)."""



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
        if not s.healthy or s.retired:
            continue
        key = (s.outstanding, s.requests)
        if best is None or key < best[0]:
            best = (key, i)
    return None if best is None else best[1]


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
    from_dns: bool = False  # found by resolving a dns:/// URL (coordexp.engines.triton.discovery)
    retired: bool = False  # its name no longer resolves to it: no new requests

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded, "failed": self.failed,
                "retried": self.retried, "went_away": self.went_away, "came_back": self.came_back,
                "healthy": self.healthy, "retired": self.retired}


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
        self._discovery: asyncio.Task | None = None

    @classmethod
    async def connect(cls, urls: Sequence[str], model: str, preflight_timeout: float = 10.0,
                      resolver: Any = None, resolve_interval: float = 30.0,
                      **kwargs: Any) -> tuple["ServerPool", dict[str, Any] | None]:
        """Pre-flight every URL (PreflightError on the first problem); returns (pool, manifest).
        A `dns:///NAME:PORT` URL stands for every address behind the name, resolved again every
        `resolve_interval` s (`resolver`: coordexp.engines.triton.discovery)."""
        from coordexp.engines.triton import discovery

        try:
            addresses, targets = discovery.expand(urls, resolver)
        except ValueError as e:
            raise PreflightError(str(e)) from None
        if not addresses:
            raise PreflightError(f"{', '.join(urls)}: resolved to no address")
        dns_found = set(addresses) - set(urls)
        states: list[ServerState] = []
        iface = manifest = None
        try:
            for url in addresses:
                client, i, m = await preflight(url, model, preflight_timeout)
                states.append(ServerState(url=url, client=client, from_dns=url in dns_found))
                model = i.name or model  # the ensemble picked when the default name was not there
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
        pool = cls(model, iface, states, **kwargs)
        if targets:
            pool._discovery = asyncio.get_running_loop().create_task(
                discovery.watch(pool, targets, resolver, resolve_interval, preflight_timeout))
        return pool, manifest

    def changed(self) -> None:
        """A server became usable again: wake requests waiting for one."""
        self._changed.set()

    def add_server(self, state: ServerState) -> None:
        self.servers.append(state)
        self.changed()

    async def admit(self, url: str, preflight_timeout: float = 10.0) -> bool:
        """A newly resolved address joins after its pre-flight (same model interface); False: not yet."""
        try:
            client, iface, _m = await preflight(url, self.model, preflight_timeout)
        except Exception:  # noqa: BLE001 - not ready yet (PreflightError or a transport error): next round
            return False
        if set(iface.inputs) != set(self.iface.inputs):
            await client.close()
            return False
        self.add_server(ServerState(url=url, client=client, from_dns=True))
        return True

    def retire(self, url: str) -> None:
        """No new requests to `url` (its name no longer resolves to it); the ones in flight go on."""
        for s in self.servers:
            if s.url == url:
                s.retired = True

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
        while any(not s.healthy and not s.retired for s in self.servers):
            for s in self.servers:
                if s.healthy or s.retired:
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
                n = first_value(res.as_numpy(wire.SEQUENCE_LENGTH)) if wire.SEQUENCE_LENGTH in self.iface.outputs else None
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
                       user_text: RequestPrompt | str | None = None, stream: bool = False,
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
        if self._discovery is not None:
            self._discovery.cancel()
            try:
                await self._discovery
            except (asyncio.CancelledError, Exception):
                pass
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
