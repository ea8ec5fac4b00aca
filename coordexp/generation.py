"""What every engine (torch reference, ONNX Runtime in-process, Triton over gRPC) speaks:
decoding parameters, one generation's result, and the `Engine` interface `runner.run_dataset` drives."""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

from coordexp.prompt import PromptSpec


# The served token limit an export gets unless told otherwise: CoordExp's own inference runs with
# 2,048-3,084 new tokens for up to 60 objects (about 20 tokens each); a smaller limit cuts dense scenes.
SERVED_MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters, identical in meaning for every engine."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens
    guided: bool = False  # constrain decoding to valid CoordJSON (where the engine supports it)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN slips through every comparison below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str  # decoded answer, coord tokens kept, stop token removed
    token_ids: list[int] = field(default_factory=list)  # generated ids (stop token excluded)
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length"
    error: str | None = None  # engine-level failure for this record (-> generation_failed)
    extra: dict[str, Any] = field(default_factory=dict)  # written on the prediction line
    # What a served answer also carries (not written on prediction lines): the server's own parse
    # (preds_json) and the request's latency.
    served_preds: dict[str, Any] | None = None
    latency_s: float | None = None
    # generated tokens when the ids are not at hand (an OpenAI-compatible server reports only the count)
    completion_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.completion_tokens) if self.completion_tokens is not None else len(self.token_ids)


@dataclass(frozen=True)
class RequestPrompt:
    """The parts of the prompt one request sets; None keeps the engine's (the served export's) own.
    `layout`: where the image stands in the user turn ("image_first" | "text_first")."""

    user_text: str | None = None
    system_text: str | None = None
    layout: str | None = None

    @classmethod
    def of(cls, value: "RequestPrompt | str | None") -> "RequestPrompt":
        """A RequestPrompt from itself, a user text, or None (nothing set)."""
        if isinstance(value, RequestPrompt):
            return value
        return cls(user_text=value)

    @property
    def empty(self) -> bool:
        return self.user_text is None and self.system_text is None and self.layout is None

    def over(self, base: "RequestPrompt | str | None") -> "RequestPrompt":
        """These parts set on top of `base` (the engine's own per-request parts): set ones win."""
        b = RequestPrompt.of(base)
        return RequestPrompt(user_text=self.user_text if self.user_text is not None else b.user_text,
                             system_text=self.system_text if self.system_text is not None else b.system_text,
                             layout=self.layout if self.layout is not None else b.layout)

    def apply(self, spec: PromptSpec) -> PromptSpec:
        import dataclasses

        changes = {k: v for k, v in (("user_text", self.user_text), ("system_text", self.system_text),
                                     ("layout", self.layout)) if v is not None}
        return dataclasses.replace(spec, **changes) if changes else spec


class Engine(Protocol):
    """What the dataset runner, `group`, `ask`, `parity` and the viewer call, whatever runs the model.

    `prompt`: the prompt the engine serves (a served engine: its export's). A request may set its
    own parts on top (`generate_batch(..., prompt=RequestPrompt(...))`); nobody assigns `prompt`.

    The capabilities below the two methods have defaults in `EngineDefaults`, which every engine
    inherits and overrides where it can do more.
    """

    name: str
    prompt: PromptSpec
    concurrent: bool  # generate_batch may run in several threads at once
    takes_encoded: bool  # it takes the image files' bytes, not decoded PIL images

    def generate_batch(self, images: Sequence[Any], params: GenerationParams,
                       prompt: RequestPrompt | None = None) -> list[GenerationResult]:
        """Generate for a batch of images; one result per image, in order. `prompt`: this call's
        parts over the engine's prompt (None: the engine's own)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts recorded in summary.json (engine, checkpoint, versions)."""
        ...

    def checkpoint_sha256(self) -> str | None:
        """The served checkpoint's digest (`coordexp.checkpoint`), None when unknown."""
        ...

    def cancel(self) -> None:
        """Give up the requests in flight (a dataset run was interrupted)."""
        ...

    def progress_name(self) -> str:
        """The engine's name on the progress bar."""
        ...

    def progress_facts(self) -> dict[str, Any]:
        """Live facts for the progress bar (e.g. servers up)."""
        ...

    def run_facts(self) -> dict[str, Any]:
        """Facts for summary.json once the run ends (e.g. retries per server)."""
        ...


class EngineDefaults:
    """The `Engine` capabilities of an engine that has nothing more to tell: one batch at a time,
    PIL images in, no digest, nothing to cancel. Engines inherit it and override what they have."""

    name: str
    concurrent = False
    takes_encoded = False

    def checkpoint_sha256(self) -> str | None:
        return None

    def cancel(self) -> None:
        return None

    def progress_name(self) -> str:
        return self.name

    def progress_facts(self) -> dict[str, Any]:
        return {}

    def run_facts(self) -> dict[str, Any]:
        return {}


class EngineUnavailable(RuntimeError):
    """The engine cannot go on (e.g. every server went away): a dataset run stops there, keeping the
    lines written so far for a resumed run."""
