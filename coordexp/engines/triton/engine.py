"""`TritonEngine`: served ensembles behind the same `generate_batch` interface as the torch and ONNX
engines, so `coordexp.runner.run_dataset` is the one dataset loop for every engine.

The async `ServerPool` runs on one background event loop owned by the engine; `generate_batch` may
be called from several threads at once (the runner keeps `concurrency` batches in flight), each
image of a batch is one request, and all of them are in flight together.
"""
from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from coordexp.engines.triton.interface import (ModelInterface, manifest_summary, request_problems, served_prompt,
                                               fit_params_to_server)
from coordexp.engines.triton.connect import normalise_url
from coordexp.engines.triton.pool import AllServersDown, ServerPool
from coordexp.generation import EngineDefaults, GenerationParams, GenerationResult, RequestPrompt
from coordexp.prompt import PromptSpec


@dataclass(frozen=True)
class ClientOptions:
    """How the client talks to its servers."""

    model: str = "coordexp"
    timeout: float = 120.0  # per request, seconds
    retries: int = 5
    wait_for_server: float = 60.0  # how long to wait for a server that went away before failing
    preflight_timeout: float | None = None  # None: min(10, timeout)
    probe_interval: float = 0.5
    backoff_base: float = 0.25
    backoff_cap: float = 8.0
    max_in_flight: int | None = None  # requests one generate_batch call keeps in flight (None: all of them)
    # dns:///NAME:PORT URLs: how names resolve (None: the system's) and how often again (seconds)
    resolver: Any = None
    resolve_interval: float = 30.0

    def pool_kwargs(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "retries": self.retries, "wait_for_server": self.wait_for_server,
                "probe_interval": self.probe_interval, "backoff_base": self.backoff_base,
                "backoff_cap": self.backoff_cap}

    @property
    def preflight_s(self) -> float:
        return self.preflight_timeout if self.preflight_timeout is not None else min(10.0, max(1.0, self.timeout))


class _LoopThread:
    """One asyncio loop in a daemon thread; coroutines are submitted from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="coordexp-triton", daemon=True)
        self._thread.start()
        self._pending: set[Any] = set()
        self._lock = threading.Lock()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._pending.add(fut)
        try:
            return fut.result(timeout)
        finally:
            with self._lock:
                self._pending.discard(fut)

    def cancel_all(self) -> int:
        """Cancel every coroutine a caller is waiting on (its `run` raises CancelledError at once): an
        interrupted run must not wait for requests in flight, which may be retrying for minutes."""
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        return len(pending)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def _encoded(image: Any) -> bytes:
    """Encoded image bytes: as given, or a PIL image saved as PNG (lossless)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class PoolOnLoop(EngineDefaults):
    """An engine whose request pool lives on a `_LoopThread` (`self.pool`, `self._loop`): closing it
    closes both; usable as a context manager."""

    pool: Any
    _loop: _LoopThread
    max_in_flight: int | None = None

    async def _each(self, images: Sequence[Any], params: GenerationParams, parts: Any,
                    fatal: tuple[type[BaseException], ...] = (BaseException,)) -> list[GenerationResult]:
        """One `pool.generate` per image, at most `max_in_flight` at once (None: all), results in
        order; an exception that is not `fatal` becomes that record's error and the run goes on."""
        gate = asyncio.Semaphore(self.max_in_flight or max(1, len(images)))

        async def one(image: Any) -> GenerationResult:
            async with gate:
                try:
                    gen, facts = await self.pool.generate(_encoded(image), params, parts)
                except fatal:
                    raise
                except Exception as e:  # e.g. a malformed response
                    return GenerationResult(text="", error=f"{type(e).__name__}: {e}")
            gen.latency_s = facts.get("latency_s")
            return gen

        return list(await asyncio.gather(*(one(im) for im in images)))

    def run(self, coro: Any) -> Any:
        """Run a coroutine (e.g. of `self.pool`) on the engine's loop and wait for it."""
        return self._loop.run(coro)

    def close(self) -> None:
        try:
            self._loop.run(self.pool.close(), timeout=30)
        finally:
            self._loop.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TritonEngine(PoolOnLoop):
    """Served CoordExp ensembles on one or more Triton servers (see `ServerPool`)."""

    name = "triton"
    takes_encoded = True  # the runner hands over the image files' bytes, not decoded images
    concurrent = True  # generate_batch may run in several threads at once

    def __init__(self, pool: ServerPool, manifest: dict[str, Any] | None, loop: _LoopThread,
                 user_text: RequestPrompt | str | None = None, max_in_flight: int | None = None):
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.manifest = manifest
        self.user_text = user_text
        self.prompt: PromptSpec = served_prompt(manifest, user_text)
        self._loop = loop

    @classmethod
    def connect(cls, urls: Sequence[str], options: ClientOptions = ClientOptions(),
                user_text: RequestPrompt | str | None = None) -> "TritonEngine":
        """Pre-flight every URL (PreflightError with one clear sentence on the first problem)."""
        loop = _LoopThread()
        try:
            pool, manifest = loop.run(ServerPool.connect([normalise_url(u) for u in urls], options.model,
                                                         preflight_timeout=options.preflight_s,
                                                         resolver=options.resolver,
                                                         resolve_interval=options.resolve_interval,
                                                         **options.pool_kwargs()))
        except BaseException:
            loop.stop()
            raise
        return cls(pool, manifest, loop, user_text, options.max_in_flight)

    @property
    def iface(self) -> ModelInterface:
        return self.pool.iface

    def fit_params(self, params: GenerationParams, explicit_max_new_tokens: bool,
                   explicit_repetition_penalty: bool = False) -> GenerationParams:
        return fit_params_to_server(params, self.manifest, explicit_max_new_tokens, explicit_repetition_penalty)

    def problems(self, params: GenerationParams, prompt_overrides: dict[str, Any] | None = None) -> list[str]:
        """What was asked that the served model cannot do (empty: fine)."""
        return request_problems(self.iface, self.manifest, params, self.user_text, prompt_overrides)

    def generate_batch(self, images: Sequence[Any], params: GenerationParams, prompt: RequestPrompt | None = None
                       ) -> list[GenerationResult]:
        """One request per image, all in flight together (`prompt`: this call's parts over the engine's
        own); a failed request is its record's error; raises AllServersDown (an `EngineUnavailable`)
        when no server is left."""
        parts = prompt.over(self.user_text) if prompt is not None else self.user_text
        return self._loop.run(self._each(images, params, parts, fatal=(AllServersDown,)))

    def describe(self) -> dict[str, Any]:
        return {"engine": "triton", "urls": [s.url for s in self.pool.servers], "model": self.pool.model,
                "model_version": self.iface.version, "manifest": self.manifest}

    def checkpoint_sha256(self) -> str | None:
        return manifest_summary(self.manifest)["hash"]

    def cancel(self) -> None:
        """Stop waiting for the requests in flight (an interrupted run): their batches fail at once."""
        self._loop.cancel_all()

    def run_facts(self) -> dict[str, Any]:
        """Facts for summary.json at the end of a run."""
        return {"retries": self.pool.total_retries, "servers": self.pool.stats()}

    def progress_facts(self) -> dict[str, Any]:
        """Facts for the progress bar."""
        up = sum(s.healthy for s in self.pool.servers)
        return {"retries": self.pool.total_retries, "up": f"{up}/{len(self.pool.servers)}"}

    def progress_name(self) -> str:
        return f"triton x{len(self.pool.servers)}"


