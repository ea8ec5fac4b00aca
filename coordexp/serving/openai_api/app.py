"""The OpenAI-compatible HTTP API (FastAPI): GET /v1/models, GET /v1/models/{id},
POST /v1/chat/completions (unary and server-sent events), GET /health.

Every error has OpenAI's shape and status; a bad request never takes the server down. With an API
key every /v1 route needs `Authorization: Bearer KEY`. Bodies larger than `max_request_bytes` are
refused (413) before they are read in full.
"""
from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from coordexp.serving.openai_api.messages import ImageLimits, chat_input
from coordexp.serving.openai_api.protocol import ChatCompletionRequest, OpenAIError
from coordexp.serving.openai_api.service import ChatService


@dataclass(frozen=True)
class ApiOptions:
    grpc_url: str
    ensemble: str = "coordexp"
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    processor_dir: str | None = None
    max_request_bytes: int = 48 << 20  # a 32 MiB image is ~43 MB as base64
    image: ImageLimits = field(default_factory=lambda: ImageLimits(max_bytes=32 << 20, max_pixels=64_000_000))
    request_timeout_s: float = 600.0


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(opts: ApiOptions) -> FastAPI:
    service = ChatService(opts.grpc_url, opts.ensemble, opts.aliases, opts.processor_dir, opts.request_timeout_s)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="CoordExp Serve: OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1") and opts.api_key:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), opts.api_key.encode()):
                return _error(OpenAIError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                          "authentication_error", None, "invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_request_bytes:
            return _error(OpenAIError(413, f"the request body is {int(length) >> 20} MiB; the limit is "
                                           f"{opts.max_request_bytes >> 20} MiB", code="request_too_large"))
        return await call_next(request)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request, e: OpenAIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(OpenAIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where))

    app.state.draining = False

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": service.model.ensemble if service.model else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": service.cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return service.card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request, opts.max_request_bytes)
        try:
            req = ChatCompletionRequest.model_validate_json(body)
        except ValueError as e:
            errs = getattr(e, "errors", lambda: [])()
            first = errs[0] if errs else {}
            where = ".".join(str(p) for p in first.get("loc", ())) or None
            raise OpenAIError(400, f"{where or 'body'}: {first.get('msg', str(e))}", param=where) from None
        req.refusals()
        service.resolve(req.model)
        chat = await asyncio.to_thread(chat_input, req.messages, opts.image)  # may decode or fetch: off the loop
        if not req.stream:
            return JSONResponse(await service.complete(req, chat))
        events = service.stream(req, chat)
        first = await anext(events)  # errors before the first token get their status, not a broken stream
        return StreamingResponse(_prepend(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


async def _body(request, limit: int) -> bytes:
    """The body, read up to `limit` bytes (chunked bodies have no Content-Length to check first)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"the request body is over the limit of {limit >> 20} MiB", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _prepend(first: str, rest):
    yield first
    async for item in rest:
        yield item
