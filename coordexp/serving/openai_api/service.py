"""The engine client under the OpenAI API: one served ensemble (unary + streaming) reached through the
one Triton client library (`coordexp.engines.triton.pool.ServerPool`, the pool `coordexp-client`
uses), and the chat.completion objects made from its answers."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from coordexp import wire
from coordexp.generation import GenerationParams, GenerationResult
from coordexp.serving.openai_api.messages import ChatInput
from coordexp.serving.openai_api.protocol import ChatCompletionRequest, OpenAIError, bad_request


@dataclass
class ServedModel:
    """What /v1/models says of one served ensemble."""

    ensemble: str
    stream_ensemble: str | None
    names: tuple[str, ...]  # the ensemble's own name first, then the aliases
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int | None:
        v = self.manifest.get("max_new_tokens")
        return int(v) if isinstance(v, int) else None

    def card(self, name: str, created: int) -> dict[str, Any]:
        ckpt = self.manifest.get("checkpoint") or {}
        prompt = self.manifest.get("prompt") or {}
        return {"id": name, "object": "model", "created": created, "owned_by": "coordexp-serve",
                "root": self.ensemble, "parent": None, "max_model_len": None,
                "coordexp": {"ensemble": self.ensemble, "stream_ensemble": self.stream_ensemble,
                             "max_new_tokens": self.max_new_tokens,
                             "checkpoint_sha256": ckpt.get("weights_sha256"), "checkpoint": ckpt.get("path"),
                             "backend": self.manifest.get("backend"), "prompt_variant": prompt.get("variant"),
                             "prompt_template_hash": self.manifest.get("prompt_template_hash"),
                             "bbox_format": prompt.get("bbox_format", "xyxy"), "prompt": prompt or None,
                             "decoding_defaults": self.manifest.get("decoding_defaults")}}


class TextRenderer:
    """The answer's text as the request asks: the server's text (special tokens kept, nothing between
    them) unless `skip_special_tokens` / `spaces_between_special_tokens` ask otherwise; then the ids are
    decoded here the way vLLM does (the tokenizer is the repository's, loaded on first use)."""

    def __init__(self, processor_dir: str | None):
        self.processor_dir = processor_dir
        self._tok = None

    def tokenizer(self):
        if self._tok is None:
            if not self.processor_dir:
                raise OpenAIError(400, "skip_special_tokens / spaces_between_special_tokens need the repository's "
                                  "tokenizer, which this API was started without", param="skip_special_tokens")
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.processor_dir)
        return self._tok

    def text(self, gen: GenerationResult, req: ChatCompletionRequest) -> str:
        if not req.skip_special_tokens and not req.spaces_between_special_tokens:
            return gen.text
        tok = self.tokenizer()
        special = set(tok.all_special_ids) | {i for t, i in tok.get_added_vocab().items()
                                               if getattr(tok.added_tokens_decoder.get(i), "special", False)}
        added = set(tok.get_added_vocab().values())
        pieces: list[str] = []
        normal: list[int] = []
        for t in gen.token_ids:
            if req.skip_special_tokens and t in special:
                continue
            if t in added:
                if normal:
                    pieces.append(tok.decode(normal))
                    normal = []
                pieces.append(tok.convert_ids_to_tokens(t))
            else:
                normal.append(t)
        if normal:
            pieces.append(tok.decode(normal))
        return (" " if req.spaces_between_special_tokens else "").join(pieces)


class ChatService:
    """One served model behind the OpenAI API; `start()` on the API's event loop."""

    def __init__(self, grpc_url: str, ensemble: str = wire.ENSEMBLE, aliases: Sequence[str] = (),
                 processor_dir: str | None = None, timeout: float = 600.0, wait_for_server: float = 5.0):
        self.grpc_url, self.ensemble, self.aliases = grpc_url, ensemble, tuple(aliases)
        self.timeout, self.wait_for_server = timeout, wait_for_server
        self.renderer = TextRenderer(processor_dir)
        self.created = int(time.time())
        self.model: ServedModel | None = None
        self.unary = self.streamed = None  # ServerPools

    async def start(self) -> None:
        from coordexp.engines.triton.pool import ServerPool

        kw = dict(timeout=self.timeout, retries=1, wait_for_server=self.wait_for_server)
        self.unary, manifest = await ServerPool.connect([self.grpc_url], self.ensemble, **kw)
        stream_name = (manifest or {}).get("models", {}).get("stream_ensemble")
        if stream_name:
            self.streamed, _ = await ServerPool.connect([self.grpc_url], stream_name, **kw)
        names = tuple(dict.fromkeys((self.unary.model, *self.aliases)))
        self.model = ServedModel(self.unary.model, stream_name, names, manifest or {})

    async def close(self) -> None:
        for pool in (self.unary, self.streamed):
            if pool is not None:
                await pool.close()

    # ------------------------------------------------------------------ models
    def cards(self) -> list[dict[str, Any]]:
        return [self.model.card(n, self.created) for n in self.model.names]

    def card(self, name: str) -> dict[str, Any]:
        """GET /v1/models/{name}; an alias that is a path ("/ckpts/x") also answers without its leading
        slash (proxies often merge the "//" of /v1/models//ckpts/x)."""
        if name not in self.model.names and "/" + name in self.model.names:
            name = "/" + name
        self.resolve(name)
        return self.model.card(name, self.created)

    def resolve(self, name: str | None) -> ServedModel:
        if name is None or name in self.model.names:
            return self.model
        raise OpenAIError(404, f"model {name!r} is not served here; served: {', '.join(self.model.names)}",
                          "invalid_request_error", "model", "model_not_found")

    # ------------------------------------------------------------------ requests
    def params(self, req: ChatCompletionRequest) -> GenerationParams:
        """The request's decoding parameters over the served defaults (the export's limit and repetition
        penalty); 400 naming the served limit when more tokens are asked."""
        from coordexp.engines.triton.interface import fit_params_to_server

        limit = self.model.max_new_tokens
        asked = req.token_limit
        if asked is not None and limit is not None and asked > limit:
            raise bad_request(f"max_tokens {asked} exceeds the served model's limit of {limit} tokens (set at "
                              "export with --max-new-tokens)", "max_tokens", "max_tokens_too_large")
        try:
            params = GenerationParams(max_new_tokens=asked or 1, temperature=req.temperature or 0.0,
                                      top_p=req.top_p if req.top_p is not None else 1.0,
                                      repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed or 0,
                                      ignore_eos=req.ignore_eos, guided=req.wants_guided)
        except ValueError as e:
            raise bad_request(str(e)) from None
        return fit_params_to_server(params, self.model.manifest, explicit_max_new_tokens=asked is not None,
                                    explicit_repetition_penalty=req.repetition_penalty is not None)

    def _check(self, pool: Any, chat: ChatInput, params: GenerationParams) -> None:
        from coordexp.engines.triton.interface import request_problems

        problems = request_problems(pool.iface, None, params, chat.prompt)
        if problems:
            raise bad_request("; ".join(problems))

    async def _generate(self, pool: Any, chat: ChatInput, params: GenerationParams, on_partial=None) -> GenerationResult:
        from coordexp.engines.triton.pool import AllServersDown

        self._check(pool, chat, params)
        try:
            gen, _facts = await pool.generate(chat.image, params, chat.prompt, on_partial=on_partial)
        except AllServersDown as e:
            raise OpenAIError(503, f"the model server is not available: {e}", "server_error", None,
                              "service_unavailable") from None
        if gen.error:
            status = 400 if "INVALID_ARG" in gen.error or "[INVALID_ARGUMENT]" in gen.error else (
                503 if "UNAVAILABLE" in gen.error else 500)
            raise OpenAIError(status, gen.error, "invalid_request_error" if status == 400 else "server_error")
        return gen

    def extension(self, gen: GenerationResult, chat: ChatInput) -> dict[str, Any]:
        """Our parsed predictions of the answer (the one parser, as `infer` writes them), grid and pixels."""
        from coordexp.engines.triton.interface import served_prompt
        from coordexp.grid import to_pixels
        from coordexp.parser import parse_model_output

        prompt = served_prompt(self.model.manifest, chat.prompt)
        parsed = parse_model_output(gen.text, width=chat.width, height=chat.height, bbox_format=prompt.bbox_format)
        preds = []
        for p in parsed.preds:
            d = p.to_dict()
            d["pixel_points"] = [round(v, 2) for v in to_pixels(p.points, chat.width, chat.height)]
            preds.append(d)
        return {"preds": preds, "coord_mode": "norm1000", "bbox_format": prompt.bbox_format,
                "width": chat.width, "height": chat.height,
                "error": None if parsed.error is None else str(parsed.error),
                "error_message": parsed.error_message, "repairs": list(parsed.repairs),
                "prompt_variant": prompt.variant, **gen.extra}

    @staticmethod
    def usage(gen: GenerationResult) -> dict[str, int]:
        n = len(gen.token_ids)
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}

    async def complete(self, req: ChatCompletionRequest, chat: ChatInput) -> dict[str, Any]:
        model = self.resolve(req.model)
        gen = await self._generate(self.unary, chat, self.params(req))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or model.ensemble,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.renderer.text(gen, req)},
                             "logprobs": None, "finish_reason": gen.finish_reason}],
                "usage": self.usage(gen), "coordexp": self.extension(gen, chat)}

    async def stream(self, req: ChatCompletionRequest, chat: ChatInput) -> AsyncIterator[str]:
        """Server-sent events: chat.completion.chunk objects, then `[DONE]`. A failure before the first
        token is raised (the caller answers with an error status); one after it is sent as an error event."""
        model = self.resolve(req.model)
        if self.streamed is None:
            raise bad_request(f"model {model.ensemble!r} was exported without its streaming ensemble "
                              "(build_engine --no-stream): send stream=false", "stream")
        params = self.params(req)
        self._check(self.streamed, chat, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.model or model.ensemble}
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._generate(self.streamed, chat, params, on_partial=queue.put_nowait))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        sent = ""
        first = True

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            while True:
                partial = await queue.get()
                if partial is None:
                    break
                if first:
                    first = False
                    yield chunk({"role": "assistant", "content": ""})
                text = self.renderer.text(partial, req)
                # a prefix that may still change (an unfinished multi-byte character) waits
                if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
            gen = task.result()  # raises the request's OpenAIError
        except OpenAIError as e:
            if first:
                raise
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        finally:
            if not task.done():
                task.cancel()
        if first:
            yield chunk({"role": "assistant", "content": ""})
        text = self.renderer.text(gen, req)
        if text != sent:  # the last step's text, or a correction of a held-back tail
            yield chunk({"content": text[len(sent):] if text.startswith(sent) else text})
        yield chunk({}, gen.finish_reason, coordexp=self.extension(gen, chat))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage(gen)})}\n\n"
        yield "data: [DONE]\n\n"
