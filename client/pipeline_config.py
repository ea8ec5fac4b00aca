"""The unified pipeline's config: one YAML file -> typed pydantic models, validated before any work.

One flat file: no inheritance (`defaults:`, `base:`, YAML merge keys `<<:`), no interpolation (`${...}`),
no environment lookups. Every problem (unknown key, wrong type, value out of range, missing file, option
that does not apply to the chosen engine) is reported at once, naming its key, e.g.
`infer.engine.kind: expected one of torch, onnx, triton, got 'tensorrt'`: pydantic checks each key,
`validate` turns its errors into those lines and then checks the rules between keys. Relative paths are
resolved against the config file's folder; `resolved()` (written to `resolved_config.json`) has absolute
paths, every default and the stage toggles, secrets redacted. Every key: configs/README.md.
"""
from __future__ import annotations

import difflib
import os
import re
import typing
from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, TypeAdapter,
                      ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from coordexp.client.config_file import REDACTED, SECRET_KEY_RE, ConfigError, is_secret_key, load_yaml, redact

PIPELINE_SCHEMA_VERSION = "coordexp.pipeline.v1"
STAGES = ("infer", "eval", "vis")
EngineKind = Literal["torch", "onnx", "triton"]
ENGINE_KINDS = typing.get_args(EngineKind)
LOCAL_KINDS = ("torch", "onnx")
# Engine keys that apply to some kinds only (schema order): an error with another kind; not in resolved().
ENGINE_KEY_KINDS = {"checkpoint": LOCAL_KINDS, "device": ("torch",), "dtype": ("torch",), "threads": LOCAL_KINDS,
                    **dict.fromkeys(("urls", "model", "concurrency", "timeout_s", "retries", "wait_for_server_s"),
                                    ("triton",))}
_INTERPOLATION = "interpolation (${...}) is not supported: write the value itself"
_RELATIVE_HINT = " (relative paths are relative to the config file's folder)"


def _problem(kind: str, sentence: str) -> PydanticCustomError:
    # The sentence goes in through the context: as the template, `{...}` would read as a placeholder.
    return PydanticCustomError(kind, "{problem}", {"problem": sentence})


def _problems(kind: str, v: Any, located: list[tuple[tuple, str]]) -> ValidationError:
    """Several problems found by one validator, each at its place below the key (pydantic prefixes it)."""
    return ValidationError.from_exception_data(kind, [{"type": _problem(kind, msg), "loc": loc, "input": v}
                                                      for loc, msg in located])


def _no_interpolation(v: Any) -> Any:
    if isinstance(v, str) and "${" in v:
        raise _problem("interpolation", _INTERPOLATION)
    return v


def _path(kind: str) -> AfterValidator:
    """An existing "file" / "dir" / "any" path, or an "out" folder, resolved against the config's folder."""
    def check(v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise _problem("path", "expected a path, got an empty string")
        p = os.path.abspath(os.path.join(info.context["base_dir"], os.path.expanduser(v)))
        hint = "" if os.path.isabs(v) else _RELATIVE_HINT
        if kind == "file" and not os.path.isfile(p):
            raise _problem("path", f"file not found: {p}" + (" (it is a folder)" if os.path.isdir(p) else "") + hint)
        if kind == "dir" and not os.path.isdir(p):
            raise _problem("path", f"folder not found: {p}")
        if kind == "any" and not os.path.exists(p):
            raise _problem("path", f"not found: {p}{hint}")
        if kind == "out" and os.path.exists(p) and not os.path.isdir(p):
            raise _problem("path", f"exists and is not a folder: {p}")
        return p
    return AfterValidator(check)


# YAML reads `1` as an int: a number key holds 1.0 (and says `got 0.0` when out of range).
_AS_FLOAT = BeforeValidator(lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v)
Float = Annotated[float, _AS_FLOAT]
# A list item in (0, 1]; the bounds come first so that they see the value as a float.
UnitFloat = Annotated[float, Field(gt=0, le=1), _AS_FLOAT, BeforeValidator(_no_interpolation)]
Url = Annotated[str, BeforeValidator(_no_interpolation)]
File, Folder = Annotated[str, _path("file")], Annotated[str, _path("dir")]
AnyPath, OutFolder = Annotated[str, _path("any")], Annotated[str, _path("out")]


def _section(tp: Any) -> Optional[type[BaseModel]]:
    """The model class of a section's annotation (also inside Optional[...]), else None."""
    return next((t for t in (tp, *typing.get_args(tp)) if isinstance(t, type) and issubclass(t, BaseModel)), None)


class _Model(BaseModel):
    """Strict (YAML `"16"` is not 16, `1` is not true), unknown keys rejected, a null section = its defaults."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _raw_value(cls, v: Any, info: ValidationInfo) -> Any:
        f = cls.model_fields[info.field_name]
        return {} if v is None and f.default_factory is not None and _section(f.annotation) else _no_interpolation(v)


class StagesConfig(_Model):
    infer: bool = True  # run the model over `data` and write predictions.jsonl
    eval: bool = True  # COCO + F1-ish metrics into eval/
    vis: bool = True  # GT vs prediction overlays + gallery into vis/

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, v: Any) -> Any:  # the `stages: [infer, eval]` form
        if not isinstance(v, list):
            return v
        if unknown := [s for s in v if s not in STAGES]:
            raise _problems("stage", v, [((), f"unknown stage {s!r} (expected {', '.join(STAGES)})") for s in unknown])
        return {s: s in v for s in STAGES}


class EngineConfig(_Model):
    kind: EngineKind  # torch / onnx (in-process, local checkpoint) or triton (servers)
    checkpoint: Optional[AnyPath] = None  # torch: HF checkpoint folder; onnx: ONNX export folder (or its checkpoint)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: Optional[int] = Field(None, ge=1)  # CPU threads of the local engine
    urls: list[Url] = Field(default_factory=list)  # HOST:PORT of Triton gRPC endpoints
    model: str = "coordexp"  # served model (ensemble) name
    concurrency: int = Field(8, ge=1)  # requests in flight
    timeout_s: Float = Field(120.0, gt=0)  # per request
    retries: int = Field(5, ge=0)
    wait_for_server_s: Float = Field(60.0, ge=0)  # for a server that went away, before failing


class DecodingConfig(_Model):
    max_new_tokens: Optional[int] = Field(None, ge=1)  # null: 256 locally, the served export's default on Triton
    temperature: Float = Field(0.0, ge=0)  # 0 = greedy
    top_p: Float = Field(1.0, gt=0, le=1)
    repetition_penalty: Optional[Float] = Field(None, gt=0)  # null: 1.0 locally, the served export's default on Triton
    seed: int = Field(0, ge=0)
    guided: bool = False  # constrain decoding to valid CoordJSON where the engine supports it
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)


class PromptConfig(_Model):  # null: the checkpoint's training record (or the repository's prompt)
    coord_format: Optional[Literal["tokens", "numeric"]] = None
    field_order: Optional[Literal["desc_first", "geometry_first"]] = None
    object_order: Optional[Literal["sorted", "as_given", "random"]] = None
    bbox_format: Optional[Literal["xyxy", "cxcywh", "cxcy_logw_logh"]] = None
    layout: Optional[Literal["image_first", "text_first"]] = None
    user_text: Optional[str] = None
    system_text: Optional[str] = None


class InferConfig(_Model):
    engine: Optional[EngineConfig] = None  # required when stages.infer is on
    batch_size: int = Field(1, ge=1)  # local engines: images per generate call
    max_pixels: int = Field(64_000_000, ge=1)  # refuse larger images before decoding
    resume: bool = False  # continue an interrupted run's predictions.jsonl
    force: bool = False  # replace an earlier run's predictions in run_dir (its evaluation is archived)
    progress: Optional[bool] = None  # progress bar (null: when stderr is a terminal)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)


class EvalConfig(_Model):
    metrics: Literal["coco", "f1ish", "both"] = "both"
    iou_thrs: list[UnitFloat] = Field(default_factory=lambda: [0.3, 0.5], min_length=1)  # 0.5 is primary
    semantic: bool = True  # compute the embedding (semantic) desc figure too (false: no embedding model)
    semantic_thr: Float = Field(0.6, ge=-1, le=1)
    # which desc rule the headline "full" F1 counts: exact (normalised) labels, or semantic (can accept a wrong shape)
    desc_match: Literal["exact", "semantic"] = "exact"
    allow_partial: bool = False  # a run with fewer prediction lines than GT images: no warning
    coco_backend: Literal["faster-coco-eval", "pycocotools"] = "faster-coco-eval"
    gt_coord_mode: Optional[Literal["norm1000", "qwen3_rel1000", "pixel"]] = None
    reparse: bool = False  # re-parse raw_output with the shared parser
    plots: bool = True


class VisConfig(_Model):
    iou: Float = Field(0.5, gt=0, le=1)  # IoU threshold of a match
    limit: Optional[int] = Field(None, ge=0)  # render at most N images (the N worst)
    only_errors: bool = False  # only images with an FP, an FN or an error
    desc_match: Literal["exact", "semantic"] = "exact"  # as eval's: what counts as a right desc
    semantic: bool = False  # older spelling of desc_match: semantic
    min_size: int = Field(384, ge=16)  # panels' shorter side is upscaled to this
    max_size: int = Field(1280, ge=16)  # panels' longer side is downscaled to this
    image_root: Optional[Folder] = None  # null: the folder of `data`


class PipelineConfig(_Model):
    name: str  # run name: the run folder is <output_dir>/<name>/
    output_dir: OutFolder
    data: File  # input JSONL (CoordExp format); also the GT of eval and vis
    schema_version: Literal["coordexp.pipeline.v1"] = PIPELINE_SCHEMA_VERSION
    predictions: Optional[File] = None  # an existing predictions.jsonl; only with stages.infer off
    stages: StagesConfig = Field(default_factory=StagesConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    vis: VisConfig = Field(default_factory=VisConfig)
    metadata: dict[str, Any] = Field(default_factory=dict)  # free-form, into resolved_config.json
    _config_path: str = PrivateAttr("")  # set by validate(); not a key of the file

    @field_validator("metadata", mode="before")
    @classmethod
    def _free_form(cls, v: Any) -> Any:
        """Free-form, but string keys and no interpolation inside; each place is reported as one
        preformatted location ("tracking.endpoint", "l[0]")."""
        if not isinstance(v, dict):
            return v
        bad = [k for k in v if not isinstance(k, str)]
        problems = [((), f"keys must be strings, got {bad[0]!r}")] if bad else []
        if problems := problems + [((where,), _INTERPOLATION) for where in _interpolations(v)]:
            raise _problems("metadata", v, problems)
        return v

    @property
    def config_path(self) -> str:
        return self._config_path

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    @property
    def stages_on(self) -> list[str]:
        return [s for s in STAGES if getattr(self.stages, s)]

    def generation_params(self):
        from coordexp.generation import GenerationParams

        d = self.infer.decoding.model_dump()
        d["max_new_tokens"] = d["max_new_tokens"] or GenerationParams().max_new_tokens  # null: the default
        d["repetition_penalty"] = d["repetition_penalty"] or 1.0
        return GenerationParams(**d)

    def prompt_spec(self):
        """The prompt fields given (over the default PromptSpec: validation and the resolved config)."""
        from coordexp.prompt import PromptSpec

        return PromptSpec(**self.prompt_fields())

    def prompt_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.infer.prompt.model_dump().items() if v is not None}

    def prompt_flags(self) -> dict[str, Any]:
        """The given prompt fields as the prompt flags' argparse dests (`coordexp.engines.load_engine`)."""
        from coordexp.prompt import PROMPT_OPTIONS

        given = self.prompt_fields()
        return {o.dest: given[o.field] for o in PROMPT_OPTIONS if o.field in given}

    def resolved(self) -> dict[str, Any]:
        """Everything the run uses, absolute paths, defaults filled in, secrets redacted."""
        out: dict[str, Any] = {"schema_version": PIPELINE_SCHEMA_VERSION, "config_file": self.config_path,
                               "run_dir": self.run_dir, **self.model_dump(exclude={"schema_version"})}
        eng = self.infer.engine
        if not self.stages.infer:
            out["infer"] = None  # not run: the predictions come from `predictions`
        elif eng is not None:  # keep only the engine keys that apply to its kind
            out["infer"]["engine"] = {k: v for k, v in eng.model_dump().items()
                                      if eng.kind in ENGINE_KEY_KINDS.get(k, ENGINE_KINDS)}
            if eng.kind == "triton":  # the served prompt is fixed at export: its keys stay as given
                out["infer"].pop("batch_size", None)
            else:
                out["infer"]["decoding"]["max_new_tokens"] = self.generation_params().max_new_tokens
                out["infer"]["prompt"] = self.prompt_spec().to_dict()  # validate() built it already
        for stage in ("eval", "vis"):
            if not getattr(self.stages, stage):
                out[stage] = None
        return redact(out)


def _interpolations(v: Any, where: str = "") -> list[str]:
    """Where `${` occurs in a free-form value: "a.b", "l[0]"."""
    if isinstance(v, dict):
        return [w for k, x in v.items() for w in _interpolations(x, f"{where}.{k}" if where else str(k))]
    if isinstance(v, list):
        return [w for i, x in enumerate(v) for w in _interpolations(x, f"{where}[{i}]")]
    return [where] if isinstance(v, str) and "${" in v else []


# -- pydantic errors -> "key: problem" lines ----------------------------------------------------------

_TYPE_WORDS = {"bool_type": "true or false", "int_type": "an integer", "float_type": "a number",
               "string_type": "a string", "literal_error": "a string", "list_type": "a list", "dict_type": "a mapping"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le")}
_QUOTED = r"'([^']*)'"
_RANGE_ERRORS = set(_BOUNDS)  # a value only out of range still takes part in the rules between keys


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _number_hint(v: str) -> str:
    try:
        float(v)
    except ValueError:
        return ""
    return (" (YAML reads 1e-3 as text: write 1.0e-3)" if "e" in v.lower() and "." not in v
            else " (write it without quotes)")


def _message(err: Any, owner: Optional[type[BaseModel]], name: Any) -> str:
    t, v = err["type"], err["input"]
    if t == "missing":
        return "required key is missing"
    if t in ("extra_forbidden", "invalid_key") and owner is StagesConfig:
        return f"unknown stage (expected {', '.join(STAGES)})"
    if t in ("extra_forbidden", "invalid_key") and owner is not None:
        known = list(owner.model_fields)
        close = difflib.get_close_matches(str(name), known, n=1)
        return "unknown key" + (f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(known)})")
    if t == "literal_error" and isinstance(v, str):  # ctx: "'torch', 'onnx' or 'triton'"
        return f"expected one of {', '.join(re.findall(_QUOTED, err['ctx']['expected']))}, got {v!r}"
    if t in _TYPE_WORDS and v is None:
        return f"expected {'a dict' if t == 'dict_type' else _TYPE_WORDS[t]}, got null"
    if t in _TYPE_WORDS:
        hint = _number_hint(v) if t in ("int_type", "float_type") and isinstance(v, str) else ""
        return f"expected {_TYPE_WORDS[t]}, got {_show(v)}{hint}"
    if t == "model_type":
        return f"expected a mapping of keys, got {_show(v)}"
    if t in _BOUNDS:
        op, bound = _BOUNDS[t][0], err["ctx"][_BOUNDS[t][1]]
        return f"must be {op} {int(bound) if float(bound).is_integer() else bound}, got {v!r}"
    if t == "too_short":
        return "expected a non-empty list"
    return err["msg"]  # our own checks (paths, stages, interpolation): already the sentence


def _error_lines(e: ValidationError, data: dict) -> list[str]:
    """One "key: problem" line per error, in the order the file is read: a section's unknown keys
    first (in the file's order), then its keys in schema order, list items by index."""
    lines = []
    for err in e.errors(include_url=False):
        loc = list(err["loc"])
        if err["type"] == "invalid_key":  # pydantic puts repr() of a non-string key there
            loc[-1] = err["input"]
        key, order, cls, owner, node = "", [], PipelineConfig, None, data
        for part in loc:
            owner = cls
            if cls is None:  # a list index, or a metadata location
                key += f"[{part}]" if isinstance(part, int) else f".{part}"
                order.append((1, part if isinstance(part, int) else 0))
                continue
            key += f".{part}" if key else str(part)
            if isinstance(part, str) and part in cls.model_fields:
                order.append((1, list(cls.model_fields).index(part)))
                cls = _section(cls.model_fields[part].annotation)
                node = node.get(part) if isinstance(node, dict) else None
            else:  # a key the section does not know
                order.append((0, list(node).index(part) if isinstance(node, dict) and part in node else 0))
                cls = None
        lines.append((order, f"{key}: {_message(err, owner, loc[-1] if loc else '')}"))
    return [line for _, line in sorted(lines, key=lambda x: x[0])]


# -- rules between keys ---------------------------------------------------------------------------

def _salvage(cls: type[BaseModel], data: Any, bad: list[tuple[tuple, str]], ctx: dict[str, Any]) -> Any:
    """`cls` built from `data` with each value that failed (`bad`: error locations and types) replaced
    by its default (None where required), so the rules between keys still run and every problem is
    reported at once. A value only out of range is kept as written (vis.min_size vs vis.max_size)."""
    if cls is StagesConfig and isinstance(data, list):  # its unknown names are reported already
        data = {s: s in data for s in STAGES}
    values: dict[str, Any] = {}
    for name, f in cls.model_fields.items():
        if name not in data:
            if f.is_required():
                values[name] = None  # a placeholder the rules skip
            continue
        raw, errs = data[name], [(loc[1:], t) for loc, t in bad if loc[:1] == (name,)]
        sub = _section(f.annotation)
        if sub is not None and (isinstance(raw, dict) or (raw is None and f.default_factory)
                                or (sub is StagesConfig and isinstance(raw, list))):
            values[name] = _salvage(sub, {} if raw is None else raw, errs, ctx)  # a section: key by key
        elif errs and (sub is not None or not all(t in _RANGE_ERRORS for _, t in errs)):
            if f.is_required():
                values[name] = None  # a bad value: the default (the placeholder if required)
        elif errs or sub is not None:
            values[name] = raw  # only out of range: as written; or null for an optional section
        else:  # a good value, validated on its own (only for a config that failed: no cache)
            tp = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
            values[name] = TypeAdapter(tp, config=ConfigDict(strict=True)).validate_python(raw, context=ctx)
    return cls.model_construct(_fields_set=set(cls.model_fields) & set(data), **values)


def _rules(cfg: PipelineConfig) -> list[str]:
    """Rules between keys: stage toggles, engine kind, files that must exist. A key written in the
    file counts even when its value failed (`model_fields_set`)."""
    errors: list[str] = []

    def err(key: str, msg: str) -> None:
        errors.append(f"{key}: {msg}")

    name = cfg.name
    if name is not None and (not name.strip() or name in (".", "..") or "/" in name or "\\" in name):
        err("name", f"must be a plain folder name (no '/', not '.' or '..'), got {name!r}")
    if not cfg.stages_on:
        err("stages", "every stage is off; turn on at least one of infer, eval, vis")
    infer, eng = cfg.infer, cfg.infer.engine
    if cfg.stages.infer:
        if "predictions" in cfg.model_fields_set:
            err("predictions", "only used when stages.infer is off (the run writes its own predictions.jsonl)")
        if eng is None and "engine" not in infer.model_fields_set:
            err("infer.engine", "required when stages.infer is on (kind: torch, onnx or triton)")
        elif eng is not None and eng.kind in ENGINE_KINDS:  # (a bad kind is reported already)
            for key, kinds in ENGINE_KEY_KINDS.items():
                if eng.kind not in kinds and key in eng.model_fields_set:
                    err(f"infer.engine.{key}", f"does not apply to kind {eng.kind!r} (only to {', '.join(kinds)})")
            if eng.kind in LOCAL_KINDS:
                if not eng.checkpoint and "checkpoint" not in eng.model_fields_set:
                    err("infer.engine.checkpoint", f"required for kind {eng.kind!r}")
                elif eng.checkpoint and eng.kind == "torch" and os.path.exists(eng.checkpoint):
                    from coordexp.checkpoint import checkpoint_error

                    if problem := checkpoint_error(eng.checkpoint):
                        err("infer.engine.checkpoint", problem)
            else:
                if not eng.urls:
                    err("infer.engine.urls", "expected a non-empty list of HOST:PORT" if "urls" in eng.model_fields_set
                        else "required for kind 'triton' (a list of HOST:PORT)")
                for i, u in enumerate(eng.urls or []):
                    if isinstance(u, str) and not u.strip():
                        err(f"infer.engine.urls[{i}]", "empty URL")
                if "batch_size" in infer.model_fields_set:
                    err("infer.batch_size", "does not apply to kind 'triton' (use infer.engine.concurrency)")
        try:
            cfg.prompt_spec()
        except (ValueError, TypeError) as e:
            err("infer.prompt", str(e))
    elif (cfg.stages.eval or cfg.stages.vis) and not cfg.predictions and "predictions" not in cfg.model_fields_set:
        err("predictions", "required when stages.infer is off and eval or vis is on "
                           "(the predictions.jsonl to evaluate)")
    if cfg.vis.max_size < cfg.vis.min_size:
        err("vis.max_size", f"must be >= vis.min_size ({cfg.vis.min_size}), got {cfg.vis.max_size}")
    return errors


def validate(data: Any, base_dir: str, path: str | None = None) -> PipelineConfig:
    """Turn a parsed YAML document into a PipelineConfig or raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping of keys at the top level, got {_show(data)}"], path)
    ctx, errors = {"base_dir": base_dir}, []  # the paths' validators read base_dir
    try:
        cfg = PipelineConfig.model_validate(data, context=ctx)
    except ValidationError as e:
        errors = _error_lines(e, data)
        cfg = _salvage(PipelineConfig, data, [(err["loc"], err["type"]) for err in e.errors()], ctx)
    try:
        errors += _rules(cfg)
    except Exception:  # pragma: no cover - a half-built config: the errors about single keys matter
        if not errors:
            raise
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)), path)
    cfg._config_path = os.path.abspath(path) if path else ""
    return cfg


def load_config(path: str) -> PipelineConfig:
    """Read and validate a pipeline YAML file (ConfigError on any problem, before any work)."""
    if not os.path.isfile(path):
        raise ConfigError([f"config file not found: {os.path.abspath(path)}"])
    with open(path, "r", encoding="utf-8") as f:
        data = load_yaml(f.read(), path)
    return validate(data, os.path.dirname(os.path.abspath(path)), path)


__all__ = ["PipelineConfig", "StagesConfig", "InferConfig", "EngineConfig", "DecodingConfig", "PromptConfig",
           "EvalConfig", "VisConfig", "ConfigError", "load_config", "validate", "redact", "is_secret_key",
           "PIPELINE_SCHEMA_VERSION", "STAGES", "ENGINE_KINDS", "REDACTED", "SECRET_KEY_RE"]
