"""A served CoordExp ensemble as the client sees it: its interface (checked against `coordexp.wire`),
its export manifest, request tensors from decoding parameters and results from response tensors."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordexp import wire
from coordexp.generation import GenerationParams, GenerationResult, RequestPrompt

@dataclass
class ModelInterface:
    name: str
    version: str = ""
    inputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, dims)
    outputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    max_batch_size: int = 0
    decoupled: bool = False
    platform: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], config: dict[str, Any] | None = None) -> "ModelInterface":
        """From `get_model_metadata(as_json=True)` and `get_model_config(as_json=True)["config"]`."""
        config = dict(config or {})

        def tensors(key: str) -> dict[str, tuple[str, list[int]]]:
            return {t["name"]: (t.get("datatype", ""), [int(d) for d in t.get("shape", [])])
                    for t in metadata.get(key, [])}

        versions = metadata.get("versions") or []
        policy = config.get("model_transaction_policy") or {}
        return cls(name=metadata.get("name", ""), version=str(versions[-1]) if versions else "",
                   inputs=tensors("inputs"), outputs=tensors("outputs"),
                   max_batch_size=int(config.get("max_batch_size", 0) or 0),
                   decoupled=bool(policy.get("decoupled", False)), platform=metadata.get("platform", ""),
                   config=config)

    def problems(self) -> list[str]:
        """What makes this model unusable by this client (empty: compatible); the expected tensors
        are the wire contract's ensemble inputs and outputs."""
        out = []
        known = {t.name: t for t in (*wire.ENSEMBLE_INPUTS, wire.STREAM_TENSOR)}
        for t in known.values():
            if t.client_required and t.name not in self.inputs:
                out.append(f"input {t.name!r} ({t.wire_dtype}) is missing")
        for name, t in known.items():
            if name in self.inputs and self.inputs[name][0] != t.wire_dtype:
                out.append(f"input {name!r} is {self.inputs[name][0]}, expected {t.wire_dtype}")
        for name in self.inputs:
            if name in known and int(np.prod(self.request_shape(name))) != 1:
                out.append(f"input {name!r} has shape {self.inputs[name][1]}; expected one element per request")
        for t in wire.ENSEMBLE_OUTPUTS:
            if not t.client_required:
                continue
            if t.name not in self.outputs:
                out.append(f"output {t.name!r} ({t.wire_dtype}) is missing")
            elif self.outputs[t.name][0] != t.wire_dtype:
                out.append(f"output {t.name!r} is {self.outputs[t.name][0]}, expected {t.wire_dtype}")
        return out

    def request_shape(self, name: str) -> list[int]:
        """The shape of one request's tensor: metadata dims (batch dim included when
        max_batch_size > 0) with every variable dim set to 1."""
        dims = list(self.inputs[name][1])
        if self.max_batch_size > 0 and (not dims or dims[0] != -1):
            dims = [-1] + dims  # metadata normally includes it; be tolerant
        return [1 if d < 0 else d for d in dims] or [1]

    @property
    def streams(self) -> bool:
        """Answers over the gRPC stream API: a decoupled model, or an ensemble with a decoupled step
        (CoordExp's `<name>_stream`, recognised by its `stream` input)."""
        return self.decoupled or wire.STREAM in self.inputs

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in wire.ENSEMBLE_OUTPUTS if t.name in self.outputs]


def fit_params_to_server(params: GenerationParams, manifest: dict[str, Any] | None,
                         explicit_max_new_tokens: bool, explicit_repetition_penalty: bool = False) -> GenerationParams:
    """The served export's own defaults for what the caller did not set explicitly: max_new_tokens and
    the repetition penalty (a served default of 1.0 leaves the request's as it is)."""
    import dataclasses

    defaults = (manifest or {}).get("decoding_defaults") or {}
    served = defaults.get("max_new_tokens") or manifest_summary(manifest)["max_new_tokens"]
    if not explicit_max_new_tokens and isinstance(served, int):
        params = dataclasses.replace(params, max_new_tokens=served)
    penalty = defaults.get("repetition_penalty")
    if not explicit_repetition_penalty and isinstance(penalty, (int, float)) and penalty != 1.0:
        params = dataclasses.replace(params, repetition_penalty=float(penalty))
    return params


def request_problems(iface: ModelInterface, manifest: dict[str, Any] | None, params: GenerationParams,
                     user_text: RequestPrompt | str | None = None,
                     prompt_overrides: dict[str, Any] | None = None) -> list[str]:
    """What was asked that the served model cannot do (checked before any work). `user_text`: the
    request's prompt parts (a RequestPrompt, or the user text alone)."""
    out = []
    asked = RequestPrompt.of(user_text)
    for value, name, what in ((asked.system_text, wire.SYSTEM_TEXT_INPUT, "a system text"),
                              (asked.layout, wire.MESSAGE_LAYOUT_INPUT, "a message layout")):
        if value is not None and name not in iface.inputs:
            out.append(f"{what}: the served model has no {name!r} input (exported before it existed: export again)")
    user_text = asked.user_text
    if params.guided and wire.GUIDED not in iface.inputs:
        out.append(f"--guided: the served model has no {wire.GUIDED!r} input")
    if params.ignore_eos and wire.IGNORE_EOS not in iface.inputs:
        out.append(f"--ignore-eos: the served model has no {wire.IGNORE_EOS!r} input")
    if user_text is not None and wire.TEXT_INPUT not in iface.inputs:
        out.append(f"--prompt: the served model has no {wire.TEXT_INPUT!r} input")
    limit = manifest_summary(manifest)["max_new_tokens"]
    if isinstance(limit, int) and params.max_new_tokens > limit:
        out.append(f"--max-new-tokens {params.max_new_tokens} exceeds the served model's limit of {limit} "
                   f"(set at export); pass --max-new-tokens {limit} or less")
    out.extend(fixed_prompt_conflicts(manifest, **(prompt_overrides or {})))
    return out


def request_values(params: GenerationParams, image_bytes: bytes, prompt: RequestPrompt | str | None,
                   stream: bool = False) -> dict[str, Any]:
    """Input name -> scalar value of one request (before shaping), from the wire table. `prompt`: the
    request's prompt parts (a RequestPrompt, or the user text alone)."""
    vals: dict[str, Any] = {wire.IMAGE_BYTES_INPUT: bytes(image_bytes), wire.STREAM: stream}
    for t in wire.ENSEMBLE_INPUTS:
        if t.param is not None:
            vals[t.name] = getattr(params, t.param)
    p = RequestPrompt.of(prompt)
    for name, value in ((wire.TEXT_INPUT, p.user_text), (wire.SYSTEM_TEXT_INPUT, p.system_text),
                        (wire.MESSAGE_LAYOUT_INPUT, p.layout)):
        if value is not None:
            vals[name] = value.encode("utf-8")
    return vals


def build_arrays(iface: ModelInterface, params: GenerationParams, image_bytes: bytes,
                 user_text: RequestPrompt | str | None = None, stream: bool = False) -> dict[str, np.ndarray]:
    """The request tensors as numpy arrays, shaped for `iface` (optional inputs the model does
    not declare are left out)."""
    arrays = {}
    for name, value in request_values(params, image_bytes, user_text, stream).items():
        if name not in iface.inputs:
            continue
        dtype = wire.NUMPY_DTYPES[iface.inputs[name][0]]
        arrays[name] = np.array([value], dtype=dtype).reshape(iface.request_shape(name))
    return arrays


def build_inputs(iface: ModelInterface, params: GenerationParams, image_bytes: bytes,
                 user_text: RequestPrompt | str | None = None, stream: bool = False) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, arr in build_arrays(iface, params, image_bytes, user_text, stream).items():
        t = grpcclient.InferInput(name, list(arr.shape), iface.inputs[name][0])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def requested_outputs(iface: ModelInterface) -> list:
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(n) for n in iface.output_names]


def first_value(arr: np.ndarray | None) -> Any:
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    return flat[0] if flat.size else None


def generation_from_arrays(out: dict[str, np.ndarray | None], params: GenerationParams) -> GenerationResult:
    """Response tensors -> GenerationResult (text as the model wrote it; ids trimmed to
    sequence_length when the server gives it)."""
    raw = first_value(out.get(wire.TEXT_OUTPUT))
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw or "")
    ids: list[int] = []
    if out.get(wire.OUTPUT_IDS) is not None:
        ids = [int(v) for v in np.asarray(out[wire.OUTPUT_IDS]).reshape(-1)]
        n = first_value(out.get(wire.SEQUENCE_LENGTH))
        if n is not None and 0 <= int(n) <= len(ids):
            ids = ids[: int(n)]
    finish = "length" if ids and len(ids) >= params.max_new_tokens else "stop"
    extra: dict[str, Any] = {}
    if params.guided:  # the same facts the in-process engines record
        closed = first_value(out.get(wire.GUIDED_CLOSED_EARLY))
        extra = {"guided": True, **({"guided_closed_early": bool(closed)} if closed is not None else {})}
    served = first_value(out.get(wire.PREDS_JSON))
    served_preds = json.loads(served) if isinstance(served, (bytes, bytearray, str)) and served else None
    prompt_tokens = first_value(out.get(wire.PROMPT_TOKENS))
    return GenerationResult(text=text, token_ids=ids, finish_reason=finish, extra=extra, served_preds=served_preds,
                            prompt_tokens=int(prompt_tokens) if prompt_tokens is not None else 0)


def generation_from_result(result, iface: ModelInterface, params: GenerationParams) -> GenerationResult:
    return generation_from_arrays({n: result.as_numpy(n) for n in iface.output_names}, params)



async def fetch_manifest(client, model: str, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The export manifest of one of our ensembles (None for a foreign model).

    The repository writer (`coordexp.export.repository`) stores the whole manifest.json as the
    ensemble config's `manifest_json` parameter, so a client reads it without file access."""
    if config is None:
        try:
            config = (await client.get_model_config(model, as_json=True, client_timeout=10)).get("config", {})
        except Exception:
            return None
    params = config.get("parameters") or {}
    p = params.get("manifest_json")
    raw = p.get("string_value") if isinstance(p, dict) else None
    if not raw:
        return None
    try:
        m = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return m if isinstance(m, dict) else None


def manifest_summary(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The facts people ask for (checkpoint, weights hash, export date, versions, prompt variant)
    from the repository writer's manifest."""
    m = manifest or {}
    ckpt = m.get("checkpoint") if isinstance(m.get("checkpoint"), dict) else {}
    prompt = m.get("prompt") if isinstance(m.get("prompt"), dict) else {}
    return {"checkpoint": ckpt.get("path"), "hash": ckpt.get("weights_sha256"), "export_date": m.get("created"),
            "versions": m.get("versions"), "prompt_variant": prompt.get("variant"), "backend": m.get("backend"),
            "max_new_tokens": m.get("max_new_tokens")}


def served_prompt(manifest: dict[str, Any] | None, user_text: RequestPrompt | str | None = None):
    """The PromptSpec the served model uses (the manifest's `prompt`; the default without one)
    with the request's prompt parts applied."""
    from coordexp.prompt import PromptSpec

    spec = PromptSpec()
    p = (manifest or {}).get("prompt")
    if isinstance(p, dict):
        try:
            spec = PromptSpec.from_dict(p)
        except (TypeError, ValueError):
            pass
    return RequestPrompt.of(user_text).apply(spec)


def prompt_variant(manifest: dict[str, Any] | None, user_text: RequestPrompt | str | None) -> str:
    """The variant recorded on every line ("+custom" when the user text is not the default)."""
    return served_prompt(manifest, user_text).variant


def fixed_prompt_conflicts(manifest: dict[str, Any] | None, coord_format: str | None = None,
                           field_order: str | None = None, object_order: str | None = None,
                           system_prompt: str | None = None, bbox_format: str | None = None,
                           layout: str | None = None) -> list[str]:
    """Prompt options that cannot be honoured remotely (the prompt is fixed at export)."""
    from coordexp.prompt import PROMPT_OPTIONS

    spec = served_prompt(manifest, None)
    out = []
    for key, want in (("coord_format", coord_format), ("field_order", field_order), ("object_order", object_order),
                      ("bbox_format", bbox_format), ("layout", layout)):
        if want is not None and want != getattr(spec, key):
            flag = next(o.flag for o in PROMPT_OPTIONS if o.field == key)
            out.append(f"{flag} {want}: the served model was exported with {getattr(spec, key)}")
    if system_prompt is not None:
        out.append("--system-prompt: the served model's system prompt is fixed at export")
    return out
