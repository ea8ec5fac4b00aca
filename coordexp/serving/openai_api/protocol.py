"""The OpenAI chat-completions wire types this API speaks (typed request, errors in OpenAI's shape).

Fields a CoordExp model cannot honour are refused by name (`OpenAIError`), never ignored silently:
`n > 1`, tools, logprobs, multi-turn conversations. vLLM's sampling extras that CoordExp's own
pipeline sends (`repetition_penalty`, `skip_special_tokens`, `spaces_between_special_tokens`) are
first-class fields. `guided` (ours) or `response_format: {"type": "json_object"}` turn on guided
CoordJSON decoding.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error for the client, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: Optional[bool] = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields are accepted and ignored (clients send many)."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    messages: list[dict[str, Any]]
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 64)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    skip_special_tokens: bool = False  # the coordinate tokens are the answer (vLLM's default is true)
    spaces_between_special_tokens: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = 1
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    functions: Optional[list[Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    guided: Optional[bool] = None  # ours: constrain decoding to valid CoordJSON
    ignore_eos: bool = False  # vLLM's extra: always generate max_tokens (benchmarks)

    def refusals(self) -> None:
        """OpenAIError (400) for what a CoordExp model cannot do."""
        if self.n not in (None, 1):
            raise bad_request(f"n={self.n}: only one choice per request is supported (n=1)", "n")
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise bad_request("tools / function calling are not supported: a CoordExp model answers in CoordJSON",
                              "tools")
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        fmt = (self.response_format or {}).get("type")
        if fmt not in (None, "text", "json_object"):
            raise bad_request(f"response_format {fmt!r}: use 'text', 'json_object' (guided CoordJSON) or "
                              "the extension field guided=true", "response_format")

    @property
    def wants_guided(self) -> bool:
        return bool(self.guided) or (self.response_format or {}).get("type") == "json_object"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Role = Literal["system", "user", "assistant", "tool", "developer"]
