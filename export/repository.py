"""Write a Triton model repository for an exported CoordExp checkpoint.

    write_repository(repo_dir, name, onnx_dir, ckpt, max_batch_size=8, max_new_tokens=256,
                     prompt=PromptSpec(), backend="onnx", validation=None) -> str

Layout (TensorRT-LLM `all_models` style: one folder per model, its config beside its code):

    <repo_dir>/
      manifest.json                 checkpoint + sha256, versions, decoding defaults, prompt, validation
      preprocess/config.pbtxt       image bytes (+ user text) -> input_ids, pixel_values, ...
      preprocess/1/model.py         `from coordexp.serving.preprocess import TritonPythonModel`
      preprocess/1/processor/       tokenizer, chat template, image processor config (no weights)
      vision_encoder/config.pbtxt   pixel_values -> image_embeds, deepstack_embeds (ONNX Runtime)
      vision_encoder/1/model.py
      llm/config.pbtxt              decode loop with KV cache (ONNX Runtime), dynamic batching
      llm/1/model.py
      llm/1/onnx/                   vision.onnx, embed.onnx, decoder.onnx, onnx_meta.json
      postprocess/config.pbtxt      output_ids -> text_output, preds_json (shared parser)
      postprocess/1/model.py
      <name>/config.pbtxt           the ensemble wiring the four steps (default name "coordexp")
      <name>/1/                     (empty: ensembles need a version folder)
      llm_stream/config.pbtxt       the same llm, decoupled (`stream` input: one response per token)
      <name>_stream/config.pbtxt    the streaming ensemble: same steps with llm_stream, gRPC stream API
                                    only (Triton refuses unary calls to a decoupled pipeline, so the
                                    unary ensemble keeps its own llm); left out with streaming=False

Every config.pbtxt is generated here as a `ModelConfig` protobuf, printed with `text_format` and
parsed back before it is written; the ensemble's wiring is checked against the step models'
tensors (names, data types, dims). The repository is assembled in a temporary sibling folder and
swapped in at the end, so a failed write never leaves half a repository behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

from coordexp.generation import SERVED_MAX_NEW_TOKENS, GenerationParams
from coordexp.checkpoint import checkpoint_digest
from coordexp.layout import HF_SUBDIR
from coordexp.prompt import PromptSpec
from coordexp import wire
from coordexp.export.model_configs import check_wiring, config_text, ensemble_config, python_model_config
from coordexp.serving import common as C
from coordexp.serving.markers import describe_server, live_servers

MANIFEST_VERSION = "coordexp.repository.v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx")
SKIP_FILES = {"README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json",
              "training.json", "train_log.txt", "train_log.jsonl", "resolved_config.json"}  # model card and training records: not served


@dataclass
class ServingOptions:
    """Instances, threads and batching of the step models: defaults suit a 2-core CPU."""

    preprocess_instances: int = 1
    vision_instances: int = 1
    vision_threads: int = 1
    vision_queue_delay_us: int = 1000
    llm_instances: int = 1
    llm_threads: int = 2
    llm_queue_delay_us: int = 3000
    postprocess_instances: int = 1
    streaming: bool = True  # also write llm_stream + <name>_stream (a second decoder session in memory)
    max_pixels: int | None = None  # None: coordexp.dataset.DEFAULT_MAX_PIXELS
    # decoding speed-ups of the llm steps (llm params `batching`, `prefix_cache`, `jump_forward`):
    llm_batching: str = "inflight"  # "inflight" (iteration-level scheduler) or "static" batches (the baseline)
    prefix_cache: bool = True  # the shared prompt prefix's KV computed once per loaded model
    jump_forward: bool = True  # guided decoding appends grammar-forced tokens without a sampling step
    extra: dict[str, Any] = field(default_factory=dict)


class RepositoryServed(RuntimeError):
    """The repository to replace is being served by a running coordexp-server."""

    def __init__(self, repo: str, servers: list[dict[str, Any]]):
        self.repo, self.servers = repo, servers
        who = "; ".join(describe_server(m) for m in servers)
        super().__init__(f"{repo} is being served by coordexp-server {who}: writing it now would replace the files "
                         "under a server that keeps answering with the model it loaded. Stop that server first, or "
                         "pass --force (the running server keeps the old model until it is restarted)")


# ---------------------------------------------------------------------------- files
def model_shim(module: str, cls: str | None = None) -> str:
    """The model.py of a step: imports its TritonPythonModel (`cls`: a class of another name)."""
    what = f"{module}.{cls}" if cls else module
    name = f"{cls} as TritonPythonModel" if cls else "TritonPythonModel"
    return (f'"""Generated by coordexp.export.repository: a thin shim, the model is {what}."""\n'
            f"from {module} import {name}  # noqa: F401\n")


TORCH_MODULES = {wire.VISION_ENCODER: ("coordexp.serving.torch_steps", "TorchVisionModel"),
                 wire.LLM: ("coordexp.serving.torch_steps", "TorchLlmModel"),
                 wire.LLM_STREAM: ("coordexp.serving.torch_steps", "TorchLlmModel")}


def copy_processor_files(ckpt: str, dst: str) -> list[str]:
    """Tokenizer / chat template / image processor files of a checkpoint (no weights)."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for entry in sorted(os.listdir(ckpt)):
        src = os.path.join(ckpt, entry)
        if not os.path.isfile(src) or entry in SKIP_FILES or entry.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(src, os.path.join(dst, entry))
        copied.append(entry)
    return copied


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for key, dist in (("torch", "torch"), ("transformers", "transformers"), ("onnx", "onnx"),
                      ("onnxruntime", "onnxruntime"), ("coordexp", "coordexp-serve"), ("tritonclient", "tritonclient"),
                      ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def find_onnx_dir(path: str) -> str | None:
    """The ONNX export folder of a repository or export folder: `path` itself when it holds
    onnx_meta.json, else one subfolder holding it, else the repository's llm/1/onnx."""
    if os.path.isfile(os.path.join(path, C.ONNX_META)):
        return path
    if os.path.isdir(path):
        for entry in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, entry, C.ONNX_META)):
                return os.path.join(path, entry)
    cand = os.path.join(path, C.ONNX_SUBDIR)
    return cand if os.path.isfile(os.path.join(cand, C.ONNX_META)) else None


def _check_onnx_dir(onnx_dir: str) -> dict[str, Any]:
    meta_path = os.path.join(onnx_dir, C.ONNX_META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{onnx_dir} is not an ONNX export folder (no {C.ONNX_META})")
    with open(meta_path, "r", encoding="utf-8") as f:
        meta = json.load(f)
    graphs = meta.get("graphs") or {}
    missing = [g["file"] for g in graphs.values() if isinstance(g, dict) and g.get("file")
               and not os.path.isfile(os.path.join(onnx_dir, g["file"]))]
    if missing:
        raise FileNotFoundError(f"{onnx_dir}: missing graph file(s) {', '.join(missing)}")
    return meta


# ---------------------------------------------------------------------------- the writer
def write_repository(repo_dir: str, name: str = wire.ENSEMBLE, onnx_dir: str | None = None, ckpt: str | None = None,
                     max_batch_size: int = 8, max_new_tokens: int = SERVED_MAX_NEW_TOKENS, prompt: PromptSpec | None = None,
                     backend: str = "onnx", validation: dict[str, Any] | None = None,
                     options: ServingOptions | None = None, decoding: GenerationParams | None = None,
                     move_onnx: bool = False, torch: Any = None, replace_served: bool = False,
                     prompt_source: dict[str, Any] | None = None) -> str:
    """Write (or replace) the Triton repository `repo_dir` whose ensemble is called `name`.

    `onnx_dir`: the export folder (vision.onnx, embed.onnx, decoder.onnx, onnx_meta.json); it is
    copied (`move_onnx=True`: moved) to `<repo_dir>/llm/1/onnx`. `ckpt`: the checkpoint it was
    exported from (processor files are copied, weights are hashed for the manifest).
    `backend="torch"`: no `onnx_dir`; the checkpoint itself is copied to `<repo_dir>/llm/1/hf` and
    the vision_encoder / llm steps run it in PyTorch (`torch`: coordexp.serving.torch_parts.TorchOptions).
    A repository a running coordexp-server serves is not replaced (RepositoryServed) unless
    `replace_served`: then it is, the server's marker is kept, and that server goes on answering with
    the model it loaded (Triton runs without model control: it never reloads) until it is restarted.
    `prompt_source`: where `prompt` came from (`coordexp.training_record.PromptChoice.to_manifest()`);
    its `image_max_pixels` becomes the served processor's image budget.
    Returns the repository's absolute path.
    """
    if backend not in ("onnx", "torch"):
        raise ValueError(f"backend {backend!r} is not supported by this writer (only 'onnx', 'torch')")
    if not name or name in wire.MODELS[:-1] or os.sep in name or name.startswith("."):
        raise ValueError(f"invalid ensemble name {name!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if ckpt is None or (onnx_dir is None and backend == "onnx"):
        raise ValueError("write_repository needs ckpt (and onnx_dir for backend 'onnx')")
    from coordexp.checkpoint import checkpoint_error

    err = checkpoint_error(ckpt)
    if err:
        raise FileNotFoundError(err)
    prompt = prompt or PromptSpec()
    options = options or ServingOptions()
    decoding = decoding or GenerationParams(max_new_tokens=max_new_tokens)
    if decoding.max_new_tokens > max_new_tokens:
        raise ValueError(f"default max_new_tokens {decoding.max_new_tokens} exceeds the limit {max_new_tokens}")
    if backend == "torch":
        from coordexp.serving.torch_parts import TorchOptions

        onnx_dir, meta, torch = None, {}, torch or TorchOptions()
    else:
        onnx_dir = os.path.abspath(onnx_dir)
        meta = _check_onnx_dir(onnx_dir)
    if validation and validation.get("prompt") not in (None, prompt.to_dict()):
        raise ValueError(f"the export was validated with prompt {validation['prompt'].get('variant')!r}, not with "
                         f"the one being written ({prompt.variant!r})")
    repo_dir = os.path.abspath(repo_dir)
    served = live_servers(repo_dir) if os.path.isdir(repo_dir) else []
    if served and not replace_served:
        raise RepositoryServed(repo_dir, served)
    parent = os.path.dirname(repo_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(repo_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the server may run as another user (containers)
    try:
        _assemble(tmp, name, onnx_dir, ckpt, meta, max_batch_size, max_new_tokens, prompt, backend,
                  validation, options, decoding, move_onnx, torch, prompt_source)
        served = live_servers(repo_dir) if os.path.isdir(repo_dir) else []  # one may have started meanwhile
        if served and not replace_served:
            raise RepositoryServed(repo_dir, served)
        for m in served:  # the server still serves this path: the next export must see it too
            marker = os.path.join(repo_dir, os.path.basename(m["marker"]))
            if os.path.isfile(marker):
                shutil.copy2(marker, tmp)
        swap_in(tmp, repo_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo_dir


def swap_in(tmp: str, repo_dir: str) -> None:
    """Replace `repo_dir` by the finished folder `tmp` (a sibling), so that a failed write never
    leaves half a repository behind and a previous one is removed only once the new one is there."""
    parent = os.path.dirname(os.path.abspath(repo_dir)) or "."
    old = None
    if os.path.exists(repo_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(repo_dir)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(repo_dir, old)
    os.rename(tmp, repo_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prompt_entries(prompt: PromptSpec, prompt_source: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's prompt keys, the same for every format: the prompt (texts and controls), where it
    came from, CoordExp's prompt_template_hash of it."""
    return {"prompt": prompt.to_dict(), "prompt_source": prompt_source, "prompt_template_hash": prompt.template_hash()}


def served_processor(ckpt: str, dst: str, prompt: PromptSpec, prompt_source: dict[str, Any] | None) -> tuple[Any, list[str]]:
    """Copy the checkpoint's processor files to `dst`, with the training run's image budget when it has
    one, and load them (a broken folder fails here, not at server start). (processor, files copied)"""
    from coordexp.processor import CoordExpProcessor, write_image_budget

    copied = copy_processor_files(ckpt, dst)
    budget = (prompt_source or {}).get("image_max_pixels")
    if budget:
        write_image_budget(dst, int(budget))
    processor = CoordExpProcessor.from_pretrained(dst)
    processor.prompt_text(prompt)
    return processor, copied


def build_record(name: str, backend: str, max_batch_size: int, max_new_tokens: int, prompt: PromptSpec,
                 options: ServingOptions, decoding: GenerationParams | None = None, torch: Any = None,
                 prompt_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest entries a build request decides (the writer writes them from here, so
    `repository_current` compares like with like)."""
    rec: dict[str, Any] = {
        "schema_version": MANIFEST_VERSION, "name": name, "backend": backend, "max_batch_size": max_batch_size,
        "max_new_tokens": max_new_tokens,
        "decoding_defaults": (decoding or GenerationParams(max_new_tokens=max_new_tokens)).to_dict(),
        **prompt_entries(prompt, prompt_source),
        "serving": {k: v for k, v in options.__dict__.items() if k != "extra"} | dict(options.extra)}
    if torch is not None:
        rec["torch"] = torch.to_params()
    return json.loads(json.dumps(rec))  # as the manifest reads back


def new_manifest(rec: dict[str, Any], ckpt: str, writer: str, steps: list[str], streaming: bool,
                 layout: dict[str, Any], own: dict[str, Any], validation: dict[str, Any] | None) -> dict[str, Any]:
    """manifest.json of every format (ONNX, torch, TensorRT-LLM): the build request's entries (`rec`,
    from `build_record`), the checkpoint digest, library versions, the models and the layout, then the
    format's own entry (`own`: {"onnx" | "torch": ...}; TensorRT-LLM adds `trtllm` after)."""
    name = rec["name"]
    return {
        "schema_version": rec["schema_version"],
        "name": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"tool": "coordexp.export.build_engine", "writer": writer},
        "versions": library_versions(),
        "checkpoint": checkpoint_digest(ckpt).to_manifest(),
        "backend": rec["backend"],
        "max_batch_size": rec["max_batch_size"],
        "max_new_tokens": rec["max_new_tokens"],
        "decoding_defaults": rec["decoding_defaults"],
        **{k: rec[k] for k in ("prompt", "prompt_source", "prompt_template_hash")},
        "coord_mode": "norm1000",  # both prompt formats answer on the 0..999 grid
        "models": {"ensemble": name, "steps": list(steps),
                   "stream_ensemble": wire.stream_ensemble_name(name) if streaming else None},
        "layout": layout,
        **own,
        "serving": rec["serving"],
        "validation": validation,
    }


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def _differences(key: str, have: Any, want: Any) -> list[str]:
    """'key: value in the repository, value requested' for every leaf that differs."""
    if isinstance(have, dict) and isinstance(want, dict):
        return [d for k in sorted(set(have) | set(want), key=str)
                for d in _differences(f"{key}.{k}", have.get(k, ABSENT), want.get(k, ABSENT))]
    show = (lambda v: repr(v) if v is ABSENT else json.dumps(v))
    return [] if have == want else [f"{key} {show(have)} in the repository, {show(want)} requested"]


def _missing_files(repo: str, manifest: dict[str, Any]) -> list[str]:
    models = manifest.get("models") or {}
    names = [models.get("ensemble"), *(models.get("steps") or [])]
    if models.get("stream_ensemble"):
        names += [models["stream_ensemble"], wire.LLM_STREAM]
    missing = [f"{n}/config.pbtxt" for n in names if not n or not os.path.isfile(os.path.join(repo, n, "config.pbtxt"))]
    layout = manifest.get("layout") or {}
    if layout.get("onnx_dir"):
        try:
            _check_onnx_dir(os.path.join(repo, layout["onnx_dir"]))
        except (OSError, ValueError) as e:
            missing.append(str(e))
    elif not os.path.isdir(os.path.join(repo, layout.get("hf_dir") or HF_SUBDIR)):
        missing.append(layout.get("hf_dir") or HF_SUBDIR)
    return missing


def repository_current(repo: str, ckpt: str, want: Mapping[str, Any], validated: bool = False) -> tuple[bool, str]:
    """(current, why): whether `repo` is a complete repository written from exactly these weights (the one
    checkpoint digest) with `want` (manifest keys, dotted for nested ones: `build_record(...)`, "onnx.opset")
    under this machine's library versions, and (`validated`) with a validation report."""
    try:
        with open(os.path.join(repo, C.MANIFEST), "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return False, f"no {C.MANIFEST} in {repo}"
    except (OSError, ValueError) as e:
        return False, f"{os.path.join(repo, C.MANIFEST)} is unreadable ({e})"
    missing = _missing_files(repo, manifest)
    if missing:
        return False, "incomplete repository: " + ", ".join(missing[:3])
    sha = checkpoint_digest(ckpt).sha256
    have_sha = (manifest.get("checkpoint") or {}).get("weights_sha256")
    if have_sha != sha:
        return False, f"exported from other weights (sha256 {str(have_sha)[:12]}, this checkpoint {sha[:12]})"
    reasons = []
    for key, value in {**want, "versions": library_versions()}.items():
        have: Any = manifest
        for part in key.split("."):
            have = have.get(part, ABSENT) if isinstance(have, dict) else ABSENT
        reasons += _differences(key, have, json.loads(json.dumps(value)))
    if validated and not manifest.get("validation"):
        reasons.append("it was written without validation")
    if reasons:
        return False, "; ".join(reasons[:4]) + (f" (+{len(reasons) - 4} more)" if len(reasons) > 4 else "")
    return True, f"same checkpoint (sha256 {sha[:12]}), options, prompt and library versions"


def _step_configs(name: str, max_batch_size: int, max_new_tokens: int, prompt: PromptSpec, backend: str,
                  options: ServingOptions, decoding: GenerationParams, manifest: dict[str, Any], pad_id: int,
                  merge: int, torch: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Every model's ModelConfig ({name: config}) and the ensembles among them."""
    if options.llm_batching not in ("inflight", "static"):
        raise ValueError(f"llm_batching must be 'inflight' or 'static', got {options.llm_batching!r}")
    # `batching`: the llm steps (unary and decoupled, ONNX Runtime or torch) schedule in flight or in
    # static batches
    llm_params = {"onnx_dir": C.ONNX_SUBDIR, "intra_op_threads": str(options.llm_threads), "batching": options.llm_batching,
                  "max_new_tokens": str(max_new_tokens), "decoding_defaults": decoding.to_dict(),
                  "pad_token_id": str(pad_id), "merge_size": str(merge), "prompt_json": prompt.to_dict(),
                  "prefix_cache": str(options.prefix_cache).lower(), "jump_forward": str(options.jump_forward).lower()}
    vision_params = {"onnx_dir": C.ONNX_SUBDIR, "intra_op_threads": str(options.vision_threads),
                     "merge_size": str(merge)}
    if torch is not None:  # the torch steps read the checkpoint copy and their TorchOptions
        for params in (llm_params, vision_params):
            del params["onnx_dir"]
            params.update({"hf_dir": HF_SUBDIR, **torch.to_params()})
    configs = {
        wire.PREPROCESS: python_model_config(
            wire.PREPROCESS, max_batch_size, options.preprocess_instances,
            {"processor_dir": C.PROCESSOR_SUBDIR, "prompt_json": prompt.to_dict(),
             "max_pixels": str(options.max_pixels or "")}),
        wire.VISION_ENCODER: python_model_config(
            wire.VISION_ENCODER, max_batch_size, options.vision_instances,
            vision_params, queue_delay_us=options.vision_queue_delay_us),
        wire.LLM: python_model_config(wire.LLM, max_batch_size, options.llm_instances, llm_params,
                                   queue_delay_us=options.llm_queue_delay_us),
        wire.POSTPROCESS: python_model_config(
            wire.POSTPROCESS, max_batch_size, options.postprocess_instances,
            {"processor_dir": C.PROCESSOR_SUBDIR, "coord_mode": manifest["coord_mode"],
             "bbox_format": prompt.bbox_format}),
    }
    ens_params = {"manifest_json": json.dumps(manifest, sort_keys=True, separators=(",", ":")),
                  "prompt_variant": prompt.variant, "backend": backend}
    configs[name] = ensemble_config(name, max_batch_size, ens_params)
    ensembles = [name]
    if options.streaming:
        configs[wire.LLM_STREAM] = python_model_config(wire.LLM_STREAM, max_batch_size, options.llm_instances, llm_params,
                                                    queue_delay_us=options.llm_queue_delay_us, decoupled=True)
        stream_name = wire.stream_ensemble_name(name)
        configs[stream_name] = ensemble_config(stream_name, max_batch_size, ens_params, stream=True)
        ensembles.append(stream_name)
    return configs, ensembles


def _copy_model(root: str, onnx_dir: str | None, ckpt: str, move_onnx: bool) -> None:
    """The ONNX graphs to llm/1/onnx, or (no onnx_dir: --backend torch) the checkpoint to llm/1/hf."""
    dst = os.path.join(root, C.ONNX_SUBDIR if onnx_dir else HF_SUBDIR)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if onnx_dir is None:
        shutil.copytree(ckpt, dst, ignore=lambda _d, names: [n for n in names if n in SKIP_FILES])
    elif move_onnx:
        shutil.move(onnx_dir, dst)
    else:
        shutil.copytree(onnx_dir, dst)


def _assemble(root: str, name: str, onnx_dir: str | None, ckpt: str, meta: dict[str, Any], max_batch_size: int,
              max_new_tokens: int, prompt: PromptSpec, backend: str, validation: dict[str, Any] | None,
              options: ServingOptions, decoding: GenerationParams, move_onnx: bool, torch: Any = None,
              prompt_source: dict[str, Any] | None = None) -> dict[str, Any]:
    _copy_model(root, onnx_dir, ckpt, move_onnx)
    processor, copied = served_processor(ckpt, os.path.join(root, C.PROCESSOR_SUBDIR), prompt, prompt_source)
    pad_id = int(processor.pad_token_id)
    merge = int(processor.merge_size)
    if meta.get("pad_token_id") is not None and int(meta["pad_token_id"]) != pad_id:
        raise ValueError(f"onnx_meta pad_token_id {meta['pad_token_id']} != the checkpoint's {pad_id}")

    rec = build_record(name, backend, max_batch_size, max_new_tokens, prompt, options, decoding, torch, prompt_source)
    layout = {("hf_dir" if torch else "onnx_dir"): HF_SUBDIR if torch else C.ONNX_SUBDIR,
              "processor_dir": C.PROCESSOR_SUBDIR, "processor_files": copied}
    own = rec["torch"] if torch else {k: meta.get(k) for k in ("format", "family", "architecture", "opset", "dtype",
                                                              "weights", "quantization", "versions") if k in meta}
    manifest = new_manifest(rec, ckpt, "coordexp.export.repository", [s[0] for s in wire.ENSEMBLE_STEPS],
                            options.streaming, layout, {("torch" if torch else "onnx"): own}, validation)

    configs, ensembles = _step_configs(name, max_batch_size, max_new_tokens, prompt, backend, options, decoding,
                                       manifest, pad_id, merge, torch)
    problems = [p for ens in ensembles for p in check_wiring(configs, ens)]
    if problems:
        raise ValueError("inconsistent ensemble wiring:\n  " + "\n  ".join(problems))
    texts = {m: config_text(cfg) for m, cfg in configs.items()}  # all validated before any is written

    modules = {wire.PREPROCESS: "coordexp.serving.preprocess", wire.VISION_ENCODER: "coordexp.serving.vision_encoder",
               wire.LLM: "coordexp.serving.llm", wire.LLM_STREAM: "coordexp.serving.llm",
               wire.POSTPROCESS: "coordexp.serving.postprocess"}
    for model, text in texts.items():
        os.makedirs(os.path.join(root, model, "1"), exist_ok=True)
        with open(os.path.join(root, model, "config.pbtxt"), "w", encoding="utf-8") as f:
            f.write(text)
        if model in modules:
            shim = model_shim(*TORCH_MODULES[model]) if torch and model in TORCH_MODULES else model_shim(modules[model])
            with open(os.path.join(root, model, "1", "model.py"), "w", encoding="utf-8") as f:
                f.write(shim)
    with open(os.path.join(root, C.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    return manifest
