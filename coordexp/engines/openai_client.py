"""Any OpenAI-compatible vision-language server as an engine: ours (`coordexp-server`'s API) or a
peer's (a vLLM server serving the same checkpoint), so the dataset loop, `bench` and `parity` run
against either with the same prediction artifact.

`OpenAIPool` has the `generate(image_bytes, params, prompt, stream=...)` of the Triton client's
`ServerPool` (so the benchmark driver takes either); `OpenAIEngine` is the `generate_batch` engine
the runner drives. Requests are shaped as CoordExp's own pipeline sends them: a system message and a
user message with the text and the image as a base64 data URL, `skip_special_tokens: false` and
`spaces_between_special_tokens: false` (the coordinate tokens are the answer).

Which prompt travels: against our own server, none unless asked (the server serves its exported
prompt, as over gRPC); against another server (no `coordexp` extension in /v1/models) the prompt the
caller gives (a training record, or the prompt flags), always in full, with its image/text layout.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any, Sequence

from coordexp.engines.triton.engine import PoolOnLoop
from coordexp.generation import GenerationParams, GenerationResult, RequestPrompt
from coordexp.prompt import PromptSpec


class OpenAIServerError(RuntimeError):
    """The server cannot be used (pre-flight): one sentence for the user."""


def image_data_url(data: bytes) -> str:
    """A data URL of the encoded image (its own format when PNG/JPEG/WebP, else re-encoded as PNG)."""
    from PIL import Image

    fmt = None
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - the server says what is wrong with it
        pass
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(fmt or "")
    if mime is None:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_messages(image: bytes, prompt: PromptSpec | None, parts: RequestPrompt) -> list[dict[str, Any]]:
    """The messages of one request: `prompt` (sent in full), or only `parts` over the server's own."""
    spec = parts.apply(prompt) if prompt is not None else None
    system = spec.system() if spec is not None else parts.system_text
    user_text = spec.user_text if spec is not None else parts.user_text
    layout = (spec.layout if spec is not None else parts.layout) or "image_first"
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}]
    if user_text:
        text = {"type": "text", "text": user_text}
        content = [*content, text] if layout == "image_first" else [text, *content]
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": content}]


def request_body(model: str, messages: list[dict[str, Any]], params: GenerationParams, stream: bool,
                 ours: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": params.temperature,
                            "top_p": params.top_p, "max_tokens": params.max_new_tokens, "stream": stream,
                            "skip_special_tokens": False, "spaces_between_special_tokens": False,
                            "repetition_penalty": params.repetition_penalty, "seed": params.seed}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if params.ignore_eos:
        body["ignore_eos"] = True
    if params.guided and ours:
        body["guided"] = True
    return body


class OpenAIPool:
    """Requests to one OpenAI-compatible server (aiohttp; one session on the caller's event loop)."""

    def __init__(self, base_url: str, model: str, card: dict[str, Any], session: Any, api_key: str | None,
                 timeout: float, prompt: PromptSpec | None):
        self.base_url, self.model, self.card, self.session = base_url, model, card, session
        self.api_key, self.timeout = api_key, timeout
        self.ext: dict[str, Any] = card.get("coordexp") or {}
        self.ours = bool(self.ext)
        self.prompt = prompt  # sent in full with every request (None: the server's own prompt)
        self.requests = self.failed = 0
        self.total_retries = 0

    @staticmethod
    def normalise(base_url: str) -> str:
        url = base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"  # CoordExp's pipeline takes it with or without

    @classmethod
    async def connect(cls, base_url: str, model: str | None = None, api_key: str | None = None,
                      timeout: float = 300.0, prompt: PromptSpec | None = None) -> "OpenAIPool":
        """GET /v1/models (the pre-flight CoordExp's pipeline does too); OpenAIServerError on a problem.
        Another server than ours needs `prompt`: nothing else says what the model was trained on."""
        import aiohttp

        base = cls.normalise(base_url)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                        headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        try:
            try:
                async with session.get(f"{base}/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    text = await r.text()
                    if r.status >= 400:
                        raise OpenAIServerError(f"{base}/models answered {r.status}: {text[:300]}")
                    cards = json.loads(text).get("data") or []
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                raise OpenAIServerError(f"no OpenAI-compatible server at {base} ({type(e).__name__}: {e})") from None
            names = [c.get("id") for c in cards]
            card = next((c for c in cards if c.get("id") == model), None) if model else (cards[0] if cards else None)
            if card is None:
                raise OpenAIServerError(f"{base} serves no model {model!r}; it serves {', '.join(map(str, names)) or 'none'}")
            if not card.get("coordexp") and prompt is None:
                raise OpenAIServerError(
                    f"{base} is not a CoordExp server (its /v1/models has no coordexp extension): say which prompt "
                    "the model was trained with (--run-config PATH/resolved_config.json, or --system-prompt and "
                    "--prompt)")
            return cls(base, card["id"], card, session, api_key, timeout, prompt)
        except BaseException:
            await session.close()
            raise

    def served_prompt(self) -> PromptSpec:
        """The prompt the answers come from: the one sent, or our server's exported one."""
        if self.prompt is not None:
            return self.prompt
        p = self.ext.get("prompt")
        return PromptSpec.from_dict(p) if isinstance(p, dict) else PromptSpec()

    async def generate(self, image_bytes: bytes, params: GenerationParams, prompt: RequestPrompt | str | None = None,
                       stream: bool = False, on_partial: Any = None) -> tuple[GenerationResult, dict[str, Any]]:
        """One request; (result, facts) like the Triton pool's (`timing` when streamed). Errors of the
        request (HTTP status, connection) come back as a result with `error` set."""
        import aiohttp

        parts = RequestPrompt.of(prompt)
        body = request_body(self.model, chat_messages(image_bytes, self.prompt, parts), params, stream, self.ours)
        self.requests += 1
        t0 = time.perf_counter()
        try:
            async with self.session.post(f"{self.base_url}/chat/completions", json=body) as r:
                if r.status != 200:
                    self.failed += 1
                    return GenerationResult(text="", error=f"HTTP {r.status}: {(await r.text())[:500]}"), {}
                if not stream:
                    out = await r.json()
                    return self._result(out, params), {"latency_s": time.perf_counter() - t0}
                return await self._read_stream(r, params, t0, on_partial)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self.failed += 1
            return GenerationResult(text="", error=f"{type(e).__name__}: {e}"), {}

    def _result(self, out: dict[str, Any], params: GenerationParams) -> GenerationResult:
        choice = (out.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content")
        if isinstance(content, list):  # a list of text parts, as CoordExp's pipeline also accepts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None:
            content = choice.get("text") or ""
        usage = out.get("usage") or {}
        ext = out.get("coordexp") or {}
        extra = {k: ext[k] for k in ("guided", "guided_closed_early") if k in ext}
        return GenerationResult(text=content, finish_reason=choice.get("finish_reason") or "stop",
                                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                completion_tokens=usage.get("completion_tokens"), extra=extra,
                                served_preds=ext or None)

    async def _read_stream(self, r: Any, params: GenerationParams, t0: float, on_partial: Any):
        text, finish, usage, ext = "", "stop", {}, {}
        times: list[tuple[float, int]] = []
        pieces = 0
        async for raw in r.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                return GenerationResult(text=text, error=f"stream error: {ev['error'].get('message')}"), {}
            usage = ev.get("usage") or usage
            ext = ev.get("coordexp") or ext
            for ch in ev.get("choices") or []:
                delta = (ch.get("delta") or {}).get("content")
                if delta:
                    text += delta
                    pieces += 1
                    times.append((time.perf_counter() - t0, pieces))
                    if on_partial is not None:
                        on_partial(GenerationResult(text=text))
                finish = ch.get("finish_reason") or finish
        from coordexp.engines.triton.pool import StreamTiming  # one timing record for both transports

        timing = StreamTiming(responses=pieces, token_times=times, end_s=time.perf_counter() - t0)
        n = usage.get("completion_tokens")
        if n and times:  # deltas are not tokens: scale the arrivals to the token count the server reports
            timing.token_times = [(t, max(1, round(k * n / pieces))) for t, k in times]
        gen = GenerationResult(text=text, finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                               completion_tokens=n, served_preds=ext or None,
                               extra={k: ext[k] for k in ("guided", "guided_closed_early") if k in ext})
        return gen, {"latency_s": timing.end_s, "timing": timing}

    def stats(self) -> dict[str, Any]:
        return {self.base_url: {"requests": self.requests, "failed": self.failed}}

    async def close(self) -> None:
        await self.session.close()


class OpenAIEngine(PoolOnLoop):
    """The `generate_batch` engine over an OpenAI-compatible server (one request per image, all in flight)."""

    name = "openai"
    takes_encoded = True
    concurrent = True

    def __init__(self, pool: OpenAIPool, loop: Any, parts: RequestPrompt | None = None, max_in_flight: int | None = None):
        self.pool, self._loop, self.parts = pool, loop, parts or RequestPrompt()
        self.max_in_flight = max_in_flight
        self.prompt = self.parts.apply(pool.served_prompt())

    @classmethod
    def connect(cls, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                prompt: PromptSpec | None = None, parts: RequestPrompt | str | None = None,
                max_in_flight: int | None = None) -> "OpenAIEngine":
        from coordexp.engines.triton.engine import _LoopThread

        loop = _LoopThread()
        try:
            pool = loop.run(OpenAIPool.connect(base_url, model, api_key, timeout, prompt))
        except BaseException:
            loop.stop()
            raise
        return cls(pool, loop, RequestPrompt.of(parts), max_in_flight)

    @property
    def manifest(self) -> dict[str, Any] | None:
        """What the server says of its export (our server's /v1/models extension; None for another)."""
        return self.pool.ext or None

    def fit_params(self, params: GenerationParams, explicit_max_new_tokens: bool,
                   explicit_repetition_penalty: bool = False) -> GenerationParams:
        import dataclasses

        ext = self.pool.ext
        limit = ext.get("max_new_tokens")
        defaults = ext.get("decoding_defaults") or {}
        if not explicit_max_new_tokens and isinstance(limit, int):
            params = dataclasses.replace(params, max_new_tokens=int(defaults.get("max_new_tokens") or limit))
        penalty = defaults.get("repetition_penalty")
        if not explicit_repetition_penalty and isinstance(penalty, (int, float)) and penalty != 1.0:
            params = dataclasses.replace(params, repetition_penalty=float(penalty))
        return params

    def problems(self, params: GenerationParams, prompt_overrides: dict[str, Any] | None = None) -> list[str]:
        out = []
        limit = self.pool.ext.get("max_new_tokens")
        if isinstance(limit, int) and params.max_new_tokens > limit:
            out.append(f"--max-new-tokens {params.max_new_tokens} exceeds the served model's limit of {limit}")
        if params.guided and not self.pool.ours:
            out.append("--guided: the server is not a CoordExp server (no guided CoordJSON decoding there)")
        return out

    def generate_batch(self, images: Sequence[Any], params: GenerationParams, prompt: RequestPrompt | None = None
                       ) -> list[GenerationResult]:
        parts = prompt.over(self.parts) if prompt is not None else self.parts
        return self._loop.run(self._each(images, params, parts))

    def describe(self) -> dict[str, Any]:
        return {"engine": "openai", "base_url": self.pool.base_url, "model": self.pool.model,
                "coordexp_server": self.pool.ours, "server_model": self.pool.card,
                "prompt_sent": self.pool.prompt.to_dict() if self.pool.prompt is not None else None}

    def checkpoint_sha256(self) -> str | None:
        return self.pool.ext.get("checkpoint_sha256")

    def cancel(self) -> None:
        """Stop waiting for the requests in flight (an interrupted run)."""
        self._loop.cancel_all()

    def run_facts(self) -> dict[str, Any]:
        return {"servers": self.pool.stats()}

    def progress_name(self) -> str:
        return "openai"

