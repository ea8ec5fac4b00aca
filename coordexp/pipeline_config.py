"""The unified pipeline's config: one YAML file -> typed dataclasses, validated before any work.

One flat file: no inheritance (`defaults:`, `base:`, YAML merge keys `<<:`), no interpolation
(`${...}`), no environment lookups. Every key is known: an unknown key, a wrong type, a value out
of range, a missing file or an option that does not apply to the chosen engine fails with a
message naming the key, e.g. `infer.engine.kind: expected one of torch, onnx, triton, got
'tensorrt'`. All problems are reported at once.

Relative paths are resolved against the folder of the config file (so a config works from any
working directory); `resolved()` gives the absolute paths, the stage toggles and every default,
with secrets redacted — that is what the pipeline writes to `resolved_config.json`.

    name: sample-tiny            # run folder: <output_dir>/<name>/
    output_dir: ../runs
    data: ../data/sample/sample.jsonl
    stages: {infer: true, eval: true, vis: true}
    infer:
      engine: {kind: torch, checkpoint: ../checkpoints/tiny}
      decoding: {max_new_tokens: 128}
    eval: {iou_thrs: [0.3, 0.5]}
    vis: {only_errors: false}

See configs/README.md for every key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

PIPELINE_SCHEMA_VERSION = "coordexp.pipeline.v1"
STAGES = ("infer", "eval", "vis")
ENGINE_KINDS = ("torch", "onnx", "triton")
LOCAL_KINDS = ("torch", "onnx")
REDACTED = "***REDACTED***"

# Keys whose values are secrets (matched on the last word of the key, so `max_new_tokens` is not).
SECRET_KEY_RE = re.compile(
    r"(^|[_\-.])(token|password|passwd|secret|api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|auth|"
    r"authorization|credentials?|cookie)$", re.IGNORECASE)
_URL_USERINFO_RE = re.compile(r"(\b[a-z][a-z0-9+.\-]*://)[^/@\s]+@", re.IGNORECASE)


class ConfigError(ValueError):
    """A config that cannot be run; `errors` holds one "key: problem" line per problem."""

    def __init__(self, errors: list[str], path: str | None = None):
        self.errors = list(errors)
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + ("; ".join(self.errors) if len(self.errors) == 1 else
                                  f"{len(self.errors)} problems:\n  " + "\n  ".join(self.errors)))


def _f(default: Any = dataclasses.MISSING, *, factory: Any = None, doc: str = "", **meta: Any) -> Any:
    """A dataclass field with validation metadata: choices, min, max, gt (exclusive min), path
    ("file" | "dir" | "out"), kinds (engine kinds the key applies to)."""
    md = {"doc": doc, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


# -- the schema ---------------------------------------------------------------------------------

@dataclass
class StagesConfig:
    infer: bool = _f(True, doc="run the model over `data` and write predictions.jsonl")
    eval: bool = _f(True, doc="COCO + F1-ish metrics into eval/")
    vis: bool = _f(True, doc="GT vs prediction overlays + gallery into vis/")


@dataclass
class EngineConfig:
    kind: str = _f(choices=ENGINE_KINDS, doc="torch / onnx (in-process, local checkpoint) or triton (servers)")
    checkpoint: Optional[str] = _f(None, path="any", kinds=LOCAL_KINDS,
                                   doc="torch: HF checkpoint folder; onnx: ONNX export folder (or its checkpoint)")
    device: str = _f("cpu", kinds=("torch",), doc="torch device")
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"), kinds=("torch",))
    threads: Optional[int] = _f(None, min=1, kinds=LOCAL_KINDS, doc="CPU threads of the local engine")
    urls: list[str] = _f(factory=list, kinds=("triton",), doc="HOST:PORT of Triton gRPC endpoints")
    model: str = _f("coordexp", kinds=("triton",), doc="served model (ensemble) name")
    concurrency: int = _f(8, min=1, kinds=("triton",), doc="requests in flight")
    timeout_s: float = _f(120.0, gt=0, kinds=("triton",), doc="per-request timeout")
    retries: int = _f(5, min=0, kinds=("triton",))
    wait_for_server_s: float = _f(60.0, min=0, kinds=("triton",),
                                  doc="seconds to wait for a server that went away before failing")


@dataclass
class DecodingConfig:
    max_new_tokens: Optional[int] = _f(None, min=1, doc="null: 256 locally, the served export's default on Triton")
    temperature: float = _f(0.0, min=0, doc="0 = greedy")
    top_p: float = _f(1.0, gt=0, max=1)
    repetition_penalty: float = _f(1.0, gt=0)
    seed: int = _f(0, min=0)
    guided: bool = _f(False, doc="constrain decoding to valid CoordJSON where the engine supports it")
    ignore_eos: bool = _f(False, doc="always generate max_new_tokens (benchmarks)")


@dataclass
class PromptConfig:
    coord_format: Optional[str] = _f(None, choices=("tokens", "numeric"), doc="null: tokens")
    field_order: Optional[str] = _f(None, choices=("desc_first", "geometry_first"))
    object_order: Optional[str] = _f(None, choices=("sorted", "as_given"))
    user_text: Optional[str] = _f(None, doc="null: 'Detect all objects in the image.'")
    system_text: Optional[str] = _f(None, doc="null: the default system prompt of the format")


@dataclass
class InferConfig:
    engine: Optional[EngineConfig] = _f(None, doc="required when stages.infer is on")
    batch_size: int = _f(1, min=1, kinds=LOCAL_KINDS, doc="local engines: images per generate call")
    max_pixels: int = _f(64_000_000, min=1, doc="refuse larger images before decoding")
    resume: bool = _f(False, doc="continue an interrupted run's predictions.jsonl")
    progress: Optional[bool] = _f(None, doc="progress bar (null: when stderr is a terminal)")
    decoding: DecodingConfig = _f(factory=DecodingConfig)
    prompt: PromptConfig = _f(factory=PromptConfig)


@dataclass
class EvalConfig:
    metrics: str = _f("both", choices=("coco", "f1ish", "both"))
    iou_thrs: list[float] = _f(factory=lambda: [0.3, 0.5], gt=0, max=1, nonempty=True,
                               doc="F1-ish IoU thresholds (0.5 is primary when present)")
    semantic: bool = _f(True, doc="embedding similarity of descs (false: normalised strings only)")
    semantic_thr: float = _f(0.6, min=-1, max=1)
    coco_backend: str = _f("faster-coco-eval", choices=("faster-coco-eval", "pycocotools"))
    gt_coord_mode: Optional[str] = _f(None, choices=("norm1000", "qwen3_rel1000", "pixel"))
    reparse: bool = _f(False, doc="re-parse raw_output with the shared parser")
    plots: bool = _f(True)


@dataclass
class VisConfig:
    iou: float = _f(0.5, gt=0, max=1, doc="IoU threshold of a match")
    limit: Optional[int] = _f(None, min=0, doc="render at most N images (the N worst)")
    only_errors: bool = _f(False, doc="only images with an FP, an FN or an error")
    semantic: bool = _f(False, doc="judge descs with the embedding model (default: normalised strings)")
    min_size: int = _f(384, min=16, doc="panels' shorter side is upscaled to this")
    max_size: int = _f(1280, min=16, doc="panels' longer side is downscaled to this")
    image_root: Optional[str] = _f(None, path="dir", doc="null: the folder of `data`")


@dataclass
class PipelineConfig:
    name: str = _f(doc="run name: the run folder is <output_dir>/<name>/")
    output_dir: str = _f(path="out", doc="where run folders go")
    data: str = _f(path="file", doc="input JSONL (CoordExp format); also the GT of eval and vis")
    schema_version: str = _f(PIPELINE_SCHEMA_VERSION, choices=(PIPELINE_SCHEMA_VERSION,))
    predictions: Optional[str] = _f(None, path="file",
                                    doc="an existing predictions.jsonl; only with stages.infer off")
    stages: StagesConfig = _f(factory=StagesConfig)
    infer: InferConfig = _f(factory=InferConfig)
    eval: EvalConfig = _f(factory=EvalConfig)
    vis: VisConfig = _f(factory=VisConfig)
    metadata: dict[str, Any] = _f(factory=dict, doc="free-form notes carried into resolved_config.json "
                                                    "(secret-looking keys redacted)")

    # -- set by load_config --------------------------------------------------------------
    config_path: str = field(default="", repr=False, metadata={"internal": True})

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    @property
    def stages_on(self) -> list[str]:
        return [s for s in STAGES if getattr(self.stages, s)]

    def generation_params(self):
        from coordexp.generation import GenerationParams

        d = dataclasses.asdict(self.infer.decoding)
        if d["max_new_tokens"] is None:
            d["max_new_tokens"] = GenerationParams().max_new_tokens
        return GenerationParams(**d)

    def prompt_spec(self):
        from coordexp.prompt import PromptSpec

        d = {k: v for k, v in dataclasses.asdict(self.infer.prompt).items() if v is not None}
        return PromptSpec(**d)

    def resolved(self) -> dict[str, Any]:
        """Everything the run uses, absolute paths, defaults filled in, secrets redacted."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("config_path", "schema_version")}
        out: dict[str, Any] = {"schema_version": PIPELINE_SCHEMA_VERSION, "config_file": self.config_path,
                               "run_dir": self.run_dir, **d}
        out["stages"] = {s: bool(getattr(self.stages, s)) for s in STAGES}
        eng = self.infer.engine
        if not self.stages.infer:
            out["infer"] = None  # not run: the predictions come from `predictions`
        elif eng is not None:  # keep only the engine keys that apply to its kind
            out["infer"]["engine"] = {k: v for k, v in dataclasses.asdict(eng).items()
                                      if eng.kind in _field_meta(EngineConfig, k).get("kinds", ENGINE_KINDS)}
            if eng.kind == "triton":
                out["infer"].pop("batch_size", None)
            if eng.kind != "triton":
                out["infer"]["decoding"]["max_new_tokens"] = self.generation_params().max_new_tokens
            if eng.kind != "triton":  # Triton: the served prompt is fixed at export; the keys stay as given
                try:
                    out["infer"]["prompt"] = self.prompt_spec().to_dict()
                except ValueError:
                    pass
        for stage in ("eval", "vis"):
            if not getattr(self.stages, stage):
                out[stage] = None
        return redact(out)


# -- redaction ------------------------------------------------------------------------------------

def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY_RE.search(key))


def redact(obj: Any) -> Any:
    """A copy with the values of secret-looking keys replaced and URL passwords (`user:pw@`) hidden."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _URL_USERINFO_RE.sub(lambda m: m.group(1) + REDACTED + "@", obj)
    return obj


# -- YAML -----------------------------------------------------------------------------------------

def _yaml_load(text: str, path: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError([f"line {line}: YAML merge keys ('<<') are not supported: one flat file, "
                                   "no inheritance"], path)
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise ConfigError([f"line {line}: duplicate key {key!r}"], path)
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], path) from None


# -- validation -----------------------------------------------------------------------------------

def _field_meta(cls, name: str) -> dict[str, Any]:
    return dict(cls.__dataclass_fields__[name].metadata)


def _type_name(t: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


_INVALID = object()  # a value that failed validation (the error is recorded)


class _Validator:
    def __init__(self, base_dir: str):
        self.base_dir = base_dir
        self.errors: list[str] = []
        self.given: set[str] = set()  # dotted keys present in the file

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{key}: {msg}")

    # scalar / container checks -------------------------------------------------------
    def value(self, key: str, v: Any, tp: Any, meta: dict[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Union:  # Optional[X]
            inner = [a for a in args if a is not type(None)]
            if v is None:
                return None
            return self.value(key, v, inner[0], meta)
        if isinstance(v, str) and "${" in v:
            self.err(key, "interpolation (${...}) is not supported: write the value itself")
            return _INVALID
        if dataclasses.is_dataclass(tp):
            return self.build(tp, v, key)  # null: every default
        if v is None:
            self.err(key, f"expected {_type_name(tp) if origin is None else 'a ' + origin.__name__}, got null")
            return _INVALID
        if origin is list:
            if not isinstance(v, list):
                self.err(key, f"expected a list, got {_show(v)}")
                return _INVALID
            if meta.get("nonempty") and not v:
                self.err(key, "expected a non-empty list")
                return _INVALID
            out = [self.value(f"{key}[{i}]", x, args[0], meta) for i, x in enumerate(v)]
            return _INVALID if any(x is _INVALID for x in out) else out
        if origin is dict:
            if not isinstance(v, dict):
                self.err(key, f"expected a mapping, got {_show(v)}")
                return _INVALID
            bad = [k for k in v if not isinstance(k, str)]
            if bad:
                self.err(key, f"keys must be strings, got {bad[0]!r}")
            self._no_interpolation(key, v)
            return dict(v)
        return self.scalar(key, v, tp, meta)

    def scalar(self, key: str, v: Any, tp: type, meta: dict[str, Any]) -> Any:
        ok = (isinstance(v, bool) if tp is bool else
              isinstance(v, int) and not isinstance(v, bool) if tp is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) if tp is float else
              isinstance(v, str) if tp is str else True)
        if not ok:
            hint = ""
            if tp in (int, float) and isinstance(v, str):
                try:
                    float(v)
                    hint = (" (YAML reads 1e-3 as text: write 1.0e-3)" if "e" in v.lower() and "." not in v
                            else " (write it without quotes)")
                except ValueError:
                    pass
            self.err(key, f"expected {_type_name(tp)}, got {_show(v)}{hint}")
            return _INVALID
        if tp is float:
            v = float(v)
        choices = meta.get("choices")
        if choices is not None and v not in choices:
            self.err(key, f"expected one of {', '.join(choices)}, got {v!r}")
            return _INVALID
        if tp in (int, float):
            lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
            if lo is not None and v < lo:
                self.err(key, f"must be >= {lo}, got {v!r}")
            if gt is not None and v <= gt:
                self.err(key, f"must be > {gt}, got {v!r}")
            if hi is not None and v > hi:
                self.err(key, f"must be <= {hi}, got {v!r}")
        if tp is str and meta.get("path"):
            v = self.path(key, v, meta["path"])
        return v

    def path(self, key: str, v: str, kind: str) -> Any:
        if not v.strip():
            self.err(key, "expected a path, got an empty string")
            return _INVALID
        p = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(v)))
        if kind == "file" and not os.path.isfile(p):
            self.err(key, f"file not found: {p}" + (" (it is a folder)" if os.path.isdir(p) else "")
                     + ("" if os.path.isabs(v) else " (relative paths are relative to the config file's folder)"))
        elif kind == "dir" and not os.path.isdir(p):
            self.err(key, f"folder not found: {p}")
        elif kind == "any" and not os.path.exists(p):
            self.err(key, f"not found: {p}" + ("" if os.path.isabs(v) else
                                               " (relative paths are relative to the config file's folder)"))
        elif kind == "out" and os.path.exists(p) and not os.path.isdir(p):
            self.err(key, f"exists and is not a folder: {p}")
        return p

    def _no_interpolation(self, key: str, v: Any) -> None:
        if isinstance(v, str) and "${" in v:
            self.err(key, "interpolation (${...}) is not supported: write the value itself")
        elif isinstance(v, dict):
            for k, x in v.items():
                self._no_interpolation(f"{key}.{k}", x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                self._no_interpolation(f"{key}[{i}]", x)

    # dataclasses ----------------------------------------------------------------------
    def build(self, cls: type, data: Any, prefix: str = "") -> Any:
        where = prefix or "config"
        if data is None:
            data = {}
        if cls is StagesConfig and isinstance(data, list):  # `stages: [infer, eval]` form
            unknown = [s for s in data if s not in STAGES]
            for s in unknown:
                self.err(where, f"unknown stage {s!r} (expected {', '.join(STAGES)})")
            data = {s: s in data for s in STAGES}
        if not isinstance(data, dict):
            self.err(where, f"expected a mapping of keys, got {_show(data)}")
            return _INVALID
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for k in data:
            if k not in fields:
                key = f"{prefix}.{k}" if prefix else str(k)
                if cls is StagesConfig:
                    self.err(key, f"unknown stage (expected {', '.join(STAGES)})")
                    continue
                close = difflib.get_close_matches(str(k), list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(fields)})"
                self.err(key, f"unknown key{hint}")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            key = f"{prefix}.{name}" if prefix else name
            if name in data:
                self.given.add(key)
                val = self.value(key, data[name], hints[name], dict(f.metadata))
                if val is not _INVALID:
                    kwargs[name] = val
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.err(key, "required key is missing")
        return _construct(cls, kwargs)


def _construct(cls, kwargs: dict[str, Any]) -> Any:
    """Build even when required fields failed validation (placeholders), so later checks can run."""
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = None
    return cls(**kwargs)


def _cross_checks(cfg: PipelineConfig, v: _Validator) -> None:
    """Rules between keys: stage toggles, engine kind, files that must exist."""
    if cfg.name is not None:
        if not cfg.name.strip() or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
            v.err("name", f"must be a plain folder name (no '/', not '.' or '..'), got {cfg.name!r}")
    on = cfg.stages_on
    if not on:
        v.err("stages", "every stage is off; turn on at least one of infer, eval, vis")
    if cfg.stages.infer:
        if "predictions" in v.given:
            v.err("predictions", "only used when stages.infer is off (the run writes its own predictions.jsonl)")
        eng = cfg.infer.engine
        if eng is None:
            if "infer.engine" not in v.given:
                v.err("infer.engine", "required when stages.infer is on (kind: torch, onnx or triton)")
        elif eng.kind in ENGINE_KINDS:
            for f in dataclasses.fields(EngineConfig):
                kinds = f.metadata.get("kinds")
                if kinds and eng.kind not in kinds and f"infer.engine.{f.name}" in v.given:
                    v.err(f"infer.engine.{f.name}", f"does not apply to kind {eng.kind!r} "
                                                    f"(only to {', '.join(kinds)})")
            if eng.kind in LOCAL_KINDS:
                if not eng.checkpoint and "infer.engine.checkpoint" not in v.given:
                    v.err("infer.engine.checkpoint", f"required for kind {eng.kind!r}")
                elif eng.checkpoint and eng.kind == "torch" and os.path.exists(eng.checkpoint):
                    from coordexp.engines.torch_engine import checkpoint_error

                    problem = checkpoint_error(eng.checkpoint)
                    if problem:
                        v.err("infer.engine.checkpoint", problem)
            else:
                if not eng.urls and "infer.engine.urls" not in v.given:
                    v.err("infer.engine.urls", "required for kind 'triton' (a list of HOST:PORT)")
                elif not eng.urls:
                    v.err("infer.engine.urls", "expected a non-empty list of HOST:PORT")
                for i, u in enumerate(eng.urls or []):
                    if isinstance(u, str) and not u.strip():
                        v.err(f"infer.engine.urls[{i}]", "empty URL")
                if "infer.batch_size" in v.given:
                    v.err("infer.batch_size", "does not apply to kind 'triton' (use infer.engine.concurrency)")
        try:
            cfg.prompt_spec()
        except (ValueError, TypeError) as e:
            v.err("infer.prompt", str(e))
    else:
        if (cfg.stages.eval or cfg.stages.vis) and not cfg.predictions and "predictions" not in v.given:
            v.err("predictions", "required when stages.infer is off and eval or vis is on "
                                 "(the predictions.jsonl to evaluate)")
    if cfg.vis is not None and cfg.vis.max_size is not None and cfg.vis.min_size is not None \
            and cfg.vis.max_size < cfg.vis.min_size:
        v.err("vis.max_size", f"must be >= vis.min_size ({cfg.vis.min_size}), got {cfg.vis.max_size}")


def validate(data: Any, base_dir: str, path: str | None = None) -> PipelineConfig:
    """Turn a parsed YAML document into a PipelineConfig or raise ConfigError naming every bad key."""
    v = _Validator(base_dir)
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping of keys at the top level, got {_show(data)}"], path)
    cfg = v.build(PipelineConfig, data)
    if cfg is not _INVALID:
        try:
            _cross_checks(cfg, v)
        except Exception:  # pragma: no cover - a half-built config: the structural errors matter
            if not v.errors:
                raise
    if v.errors or cfg is _INVALID:
        raise ConfigError(list(dict.fromkeys(v.errors)) or ["config could not be read"], path)
    cfg.config_path = os.path.abspath(path) if path else ""
    return cfg


def load_config(path: str) -> PipelineConfig:
    """Read and validate a pipeline YAML file (ConfigError on any problem, before any work)."""
    if not os.path.isfile(path):
        raise ConfigError([f"config file not found: {os.path.abspath(path)}"])
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    data = _yaml_load(text, path)
    return validate(data, os.path.dirname(os.path.abspath(path)), path)


__all__ = ["PipelineConfig", "StagesConfig", "InferConfig", "EngineConfig", "DecodingConfig", "PromptConfig",
           "EvalConfig", "VisConfig", "ConfigError", "load_config", "validate", "redact", "is_secret_key",
           "PIPELINE_SCHEMA_VERSION", "STAGES", "ENGINE_KINDS"]
