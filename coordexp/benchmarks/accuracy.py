"""The engines `parity --accuracy` compares, each run through the one dataset loop.

An engine is named by a spec:

    PATH.jsonl                          a prediction artifact already written (ours, or CoordExp's)
    torch:CKPT[,dtype=bf16][,device=cuda]   the PyTorch reference (HF generate) at that dtype / device
    onnx:REPO_OR_FOLDER[,threads=N]     ONNX Runtime in process
    triton:HOST:PORT[,model=NAME]       a served ensemble over gRPC
    openai:URL[,model=NAME]             an OpenAI-compatible server (ours, or a peer serving the checkpoint)

Every spec also takes `name=LABEL` and `max_new_tokens=N`. Engines run greedy on the same records
(`coordexp.runner.run_dataset`), each into its own folder; the prediction files are what
`coordexp.runs.equivalence` scores.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("pred", "torch", "onnx", "triton", "openai")
OPTIONS = {"torch": {"dtype", "device", "threads"}, "onnx": {"threads"}, "triton": {"model"}, "openai": {"model"},
           "pred": set()}
COMMON = {"name", "max_new_tokens"}


class SpecError(ValueError):
    """An engine spec that cannot be used (the message names it and why)."""


@dataclass(frozen=True)
class EngineSpec:
    kind: str
    target: str  # the file, checkpoint, repository or URL
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if "name" in self.options:
            return self.options["name"]
        if self.kind == "pred":
            return os.path.basename(os.path.dirname(os.path.abspath(self.target))) or self.target
        extra = "".join(f",{k}={v}" for k, v in sorted(self.options.items()) if k != "threads")
        return f"{self.kind}:{os.path.basename(self.target.rstrip('/')) or self.target}{extra}"

    @classmethod
    def parse(cls, text: str) -> "EngineSpec":
        text = text.strip()
        m = re.match(r"^(torch|onnx|triton|openai):(.+)$", text)
        if not m:
            if text.endswith(".jsonl") and "," not in text:
                if not os.path.isfile(text):
                    raise SpecError(f"{text!r}: no such prediction file")
                return cls("pred", text)
            raise SpecError(f"{text!r}: expected a prediction .jsonl or one of {', '.join(k + ':' for k in KINDS[1:])}"
                            " (e.g. onnx:model_repository/demo)")
        kind, rest = m.group(1), m.group(2)
        target, *opts = rest.split(",")
        options = {}
        for o in opts:
            if "=" not in o:
                raise SpecError(f"{text!r}: option {o!r} is not KEY=VALUE")
            k, v = o.split("=", 1)
            if k not in OPTIONS[kind] | COMMON:
                raise SpecError(f"{text!r}: {kind} takes {', '.join(sorted(OPTIONS[kind] | COMMON))}, not {k!r}")
            options[k] = v
        if "max_new_tokens" in options and not options["max_new_tokens"].isdigit():
            raise SpecError(f"{text!r}: max_new_tokens must be a positive integer")
        if kind in ("torch", "onnx") and not os.path.exists(target):
            raise SpecError(f"{text!r}: {target} not found")
        return cls(kind, target, options)


def _engine(spec: EngineSpec) -> Any:
    if spec.kind in ("torch", "onnx"):
        from coordexp.engines import load_engine

        kwargs: dict[str, Any] = {}
        if "threads" in spec.options:
            kwargs["threads"] = int(spec.options["threads"])
        if spec.kind == "torch":
            kwargs["device"] = spec.options.get("device", "cpu")
            kwargs["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
                spec.options.get("dtype", "fp32"), spec.options.get("dtype", "fp32"))
        return load_engine(spec.kind, spec.target, **kwargs)
    if spec.kind == "triton":
        from coordexp.engines.triton import ClientOptions, TritonEngine

        return TritonEngine.connect([spec.target], ClientOptions(model=spec.options.get("model", "coordexp")))
    from coordexp.engines.openai_client import OpenAIEngine

    return OpenAIEngine.connect(spec.target, spec.options.get("model"))


def run_spec(spec: EngineSpec, data: str, out_dir: str, max_new_tokens: int | None = None,
             concurrency: int = 8, log: Callable[[str], None] = lambda s: None) -> str:
    """The engine's predictions for `data` in `out_dir`/predictions.jsonl (greedy; the spec's, else the
    given, else the engine's own token budget). A prediction file spec is returned as it is."""
    if spec.kind == "pred":
        return spec.target
    from coordexp.generation import GenerationParams
    from coordexp.runner import run_dataset

    os.makedirs(out_dir, exist_ok=True)
    pred = os.path.join(out_dir, "predictions.jsonl")
    budget = int(spec.options.get("max_new_tokens") or max_new_tokens or 0) or None
    engine = _engine(spec)
    try:
        params = GenerationParams(max_new_tokens=budget) if budget else GenerationParams()
        served = engine.concurrent
        if hasattr(engine, "fit_params"):  # a server's own limit and defaults
            params = engine.fit_params(params, budget is not None, False)
            problems = engine.problems(params)
            if problems:
                raise SpecError(f"{spec.name}: " + "; ".join(problems))
        summary = run_dataset(data, pred, engine, params, concurrency=concurrency if served else 1,
                              progress=False, force=True)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    d = summary.to_dict()
    log(f"  {spec.name}: {d['records_written']} answers in {d['seconds']:.1f} s ({d['images_per_s']:.2f} images/s)")
    return pred
