"""The TensorRT-LLM plan: pinned versions, options, checkpoint facts, the LLM API config, the commands.

    make_plan(ckpt, name, repo, TrtllmOptions(...)) -> TrtllmPlan      (no TensorRT-LLM needed)

Pinned versions (`PINNED`): TensorRT-LLM 1.2.1, the first stable release with both families
(Qwen3-VL arrived in 1.2: NVIDIA/TensorRT-LLM #9060, #9689; 1.1.0, the one in the newest published
Triton image `25.12-trtllm-python-py3`, refuses `Qwen3VLForConditionalGeneration`, #10583). No
Triton image with 1.2.x is published: docker/Dockerfile.gpu builds one with tensorrtllm_backend's
`dockerfile/Dockerfile.triton.trt_llm_backend` (it takes the TensorRT-LLM tag; base
`tritonserver:25.12-py3-min`). 1.2.1 runs transformers 4.57.3, so the repository carries
transformers-4-readable copies of config.json / tokenizer_config.json (coordexp.export.trtllm_compat).
Nothing here imports TensorRT-LLM or TensorRT: they exist only inside that container.

What serves what:

- The language model is TensorRT-LLM's LLM API on its PyTorch backend (`tensorrt_llm.LLM`, the
  same engine the official `llmapi` Triton model drives), loading the Hugging Face checkpoint as
  it is: no checkpoint conversion, no `trtllm-build`. Qwen2.5-VL and Qwen3-VL exist only on that
  backend; the deprecated C++-engine multimodal ensemble (`multimodal_encoders` + `tensorrt_llm`
  models, `trtllm-build` engines) only ever supported Qwen2-VL among the Qwen VLMs.
- Our `llm` step (`coordexp.trtllm.llm_model`) is a Triton Python model with the same tensors
  as the ONNX `llm` step (plus an optional `pixel_values`), so the ensemble's inputs, outputs and
  the preprocess / postprocess steps are the ONNX repository's, unchanged.
- `--trtllm-vision trtllm` (default): TensorRT-LLM runs the vision tower itself. The LLM API of
  the pinned release takes a Qwen-VL image only as an image (its input processor runs the HF
  processor and the PyTorch vision tower); it has no input for embeddings computed elsewhere for
  these families. So the `llm` step rebuilds the resized image exactly from `pixel_values` and the
  prompt from `input_ids`, and the ensemble is preprocess -> llm -> postprocess.
- `--trtllm-vision tensorrt`: the vision tower is a TensorRT engine built by `trtexec` from our
  vision ONNX export (one optimisation profile over the patch count), run by the
  `vision_encoder` step (`coordexp.trtllm.vision`); its embeddings go to the LLM API as
  `multi_modal_embeddings`. The Qwen-VL input processor of 1.1 / 1.2 raises NotImplementedError
  for external embeddings, so it is refused (exit 2) while `EXTERNAL_EMBEDDINGS_SINCE` is None
  (no pinned release implements them); and always for families with deepstack features.
- KV cache: `enable_block_reuse: false` (block reuse breaks the second multimodal request,
  "Multimodal token count mismatch", #14125). `free_gpu_memory_fraction` is a share of the memory
  free when each LLM instance starts, and each instance (llm, llm_stream) loads its own weights.
"""
from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordexp.generation import SERVED_MAX_NEW_TOKENS
from coordexp.families import FAMILIES, FamilySpec, family_spec

# ---------------------------------------------------------------------------- pinned versions
PINNED: dict[str, str] = {
    "triton_release": "25.12",
    # built here (docker/Dockerfile.gpu stage 1) from the base below with tensorrtllm_backend
    "trtllm_image": "coordexp-serve/tritonserver-trtllm:1.2.1",
    "trtllm_base_image": "nvcr.io/nvidia/tritonserver:25.12-py3-min",
    "tensorrtllm_backend_dockerfile": "dockerfile/Dockerfile.triton.trt_llm_backend",
    "triton_image": "nvcr.io/nvidia/tritonserver:25.12-py3",
    "tensorrt_llm": "1.2.1",
    "transformers": "4.57.3",  # what TensorRT-LLM 1.2.x installs (1.1.0: 4.56.0)
    "tensorrt": "10.13.3.9",  # Triton 25.12's TensorRT (the vision engine path, refused while unsupported); unverified for 1.2.1
    "python": "3.12",
    "source": "TensorRT-LLM 1.2 release notes (Qwen3-VL: PRs #9060, #9689; 1.1.0 lacks it, #10583); "
              "tensorrtllm_backend dockerfile/Dockerfile.triton.trt_llm_backend",
}
# Qwen-VL input processors take external `multi_modal_embeddings` only after the pinned release
# (1.1 / 1.2 raise NotImplementedError): None = no pinned release does, --trtllm-vision tensorrt is refused.
EXTERNAL_EMBEDDINGS_SINCE: str | None = None

# --dtype -> LLM API dtype, KV-cache dtype, trtexec precision flag for the vision engine.
DTYPES: dict[str, dict[str, str | None]] = {
    "bf16": {"llm": "bfloat16", "kv_cache": None, "trtexec": "--bf16"},
    "fp16": {"llm": "float16", "kv_cache": None, "trtexec": "--fp16"},
    # FP8 on the PyTorch backend: FP8 KV cache always; FP8 weights only from a checkpoint that is
    # already FP8-quantized (ModelOpt, hf_quant_config.json). Our vision ONNX has no Q/DQ nodes,
    # so the vision engine stays FP16.
    "fp8": {"llm": "bfloat16", "kv_cache": "fp8", "trtexec": "--fp16"},
}
VISION_MODES = ("trtllm", "tensorrt")
TRTEXEC = "trtexec"
TRTEXEC_FALLBACK = "/usr/local/tensorrt/bin/trtexec"  # where the TensorRT tarball puts it in NVIDIA images
TRTEXEC_WORKSPACE_MIB = 4096
OPT_IMAGE = (640, 480)  # the image size the vision profile is tuned for (width, height)
BIAS_WARN_BYTES = 1 << 30
# tritonserver flags after --model-repository (docker/Dockerfile.gpu's CMD uses the same)
SERVE_FLAGS = ("--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--exit-timeout-secs=30",
               "--strict-readiness=true")
# the command of the vision ONNX export step (`coordexp.export.trtllm_export.main`)
VISION_ONNX_STEP = ("python", "-m", "coordexp.export.trtllm_export", "onnx")

# ---------------------------------------------------------------------------- repository layout
CHECKPOINT_SUBDIR = "llm/1/checkpoint"
MODEL_YAML = "llm/1/model.yaml"
VISION_PLAN = "vision_encoder/1/model.plan"
VISION_META = "vision_encoder/1/onnx_meta.json"  # host-side facts of the vision graph (coordexp.export.onnx_export)


class TrtllmUnavailable(NotImplementedError):
    """TensorRT-LLM (or TensorRT) is not importable here: only --dry-run can run."""


class PlanError(ValueError):
    """The options or the checkpoint cannot make a TensorRT-LLM repository (bad arguments: exit 2)."""


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class TrtllmOptions:
    dtype: str = "bf16"
    max_batch_size: int = 8
    max_input_len: int | None = None  # None: the prompt + the largest image + 256 spare tokens
    max_new_tokens: int = SERVED_MAX_NEW_TOKENS
    kv_cache_fraction: float = 0.8
    tp_size: int = 1
    vision: str = "trtllm"
    vision_max_patches: int | None = None  # None: the image processor's largest image
    streaming: bool = True  # + llm_stream / <name>_stream: a second LLM instance (its own weights and KV cache)

    @property
    def kv_fraction_per_instance(self) -> float:
        """Each instance takes its fraction of the memory free when IT starts: two instances in
        turn with p each take 1 - (1 - p)^2 of what was free before both (less the second's
        weights), so p = 1 - sqrt(1 - F) for a total F (0.8 -> 0.553; the official two-instance
        recipe uses ~0.3 each). Not "half each"."""
        if not self.streaming:
            return self.kv_cache_fraction
        return round(1 - math.sqrt(1 - self.kv_cache_fraction), 4)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise PlanError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vision not in VISION_MODES:
            raise PlanError(f"--trtllm-vision must be one of {', '.join(VISION_MODES)}, got {self.vision!r}")
        if self.vision == "tensorrt" and EXTERNAL_EMBEDDINGS_SINCE is None:
            raise PlanError(f"--trtllm-vision tensorrt cannot work with TensorRT-LLM {PINNED['tensorrt_llm']}: its "
                            "Qwen-VL input processor raises NotImplementedError for external multi_modal_embeddings; "
                            "use --trtllm-vision trtllm")
        if not 0.0 < self.kv_cache_fraction < 1.0:
            raise PlanError(f"--kv-cache-fraction must be in (0, 1), got {self.kv_cache_fraction}")
        if self.tp_size < 1 or self.tp_size & (self.tp_size - 1):
            raise PlanError(f"--tp-size must be a power of two >= 1, got {self.tp_size}")
        if self.max_batch_size < 1 or self.max_new_tokens < 1:
            raise PlanError("--max-batch-size and --max-new-tokens must be >= 1")
        if self.max_input_len is not None and self.max_input_len < 16:
            raise PlanError(f"--max-input-len must be >= 16, got {self.max_input_len}")
        if self.vision_max_patches is not None and self.vision_max_patches < 4:
            raise PlanError(f"--vision-max-patches must be >= 4, got {self.vision_max_patches}")


# ---------------------------------------------------------------------------- checkpoint facts
@dataclass
class CheckpointFacts:
    """What the plan needs from a checkpoint folder (config.json + the image processor; no weights)."""

    path: str
    family: str
    architecture: str
    text_hidden: int
    max_positions: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    in_channels: int
    min_pixels: int
    max_pixels: int
    num_deepstack: int
    quantized: str | None = None  # quant_algo of an already quantized checkpoint (hf_quant_config.json)
    saved_with: str | None = None  # transformers_version in config.json
    rope_layout: str | None = None  # "rope_parameters" (transformers 5) or "rope_scaling" (transformers 4)

    @property
    def spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def unit(self) -> int:
        """Patches per image token."""
        return self.merge_size ** 2


def _quantized(ckpt: str) -> str | None:
    qfile = Path(ckpt, "hf_quant_config.json")
    if not qfile.is_file():
        return None
    try:
        return str((json.loads(qfile.read_text(encoding="utf-8")).get("quantization") or {})
                   .get("quant_algo") or "unknown")
    except json.JSONDecodeError:
        return "unreadable"


def read_checkpoint(ckpt: str) -> CheckpointFacts:
    """Raises PlanError (unreadable files) or UnsupportedFamily (a family the plan does not know)."""
    try:
        config = json.loads(Path(ckpt, "config.json").read_text(encoding="utf-8"))
        proc = json.loads(Path(ckpt, "preprocessor_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{ckpt}: cannot read config.json / preprocessor_config.json ({e})") from e
    spec = family_spec(config.get("model_type"), where=ckpt, what="the TensorRT-LLM path")
    vision = config.get("vision_config") or {}
    text = config.get("text_config") or config
    size = proc.get("size") or {}
    return CheckpointFacts(
        path=os.path.abspath(ckpt), family=spec.name,
        architecture=(config.get("architectures") or [spec.architecture])[0],
        text_hidden=int(text.get("hidden_size") or 0),
        max_positions=int(text.get("max_position_embeddings") or 0),
        patch_size=int(proc.get("patch_size") or vision.get("patch_size") or 14),
        merge_size=int(proc.get("merge_size") or vision.get("spatial_merge_size") or 2),
        temporal_patch_size=int(proc.get("temporal_patch_size") or vision.get("temporal_patch_size") or 2),
        in_channels=int(vision.get("in_channels") or vision.get("in_chans") or 3),
        min_pixels=int(size.get("shortest_edge") or proc.get("min_pixels") or 56 * 56),
        max_pixels=int(size.get("longest_edge") or proc.get("max_pixels") or 28 * 28 * 1280),
        num_deepstack=len(vision.get("deepstack_visual_indexes") or []),
        quantized=_quantized(ckpt),
        saved_with=config.get("transformers_version"),
        rope_layout=("rope_parameters" if "rope_parameters" in text and "rope_scaling" not in text
                     else "rope_scaling" if "rope_scaling" in text else None),
    )


# ---------------------------------------------------------------------------- the vision engine
def smart_patches(facts: CheckpointFacts, width: int, height: int) -> int:
    """Patch count of a width x height image after the Qwen-VL processor's smart_resize."""
    factor = facts.patch_size * facts.merge_size
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > facts.max_pixels:
        beta = math.sqrt((height * width) / facts.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < facts.min_pixels:
        beta = math.sqrt(facts.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // facts.patch_size) * (w // facts.patch_size)


def vision_profile(facts: CheckpointFacts, max_patches: int | None = None) -> dict[str, int]:
    """min / opt / max patch counts of the vision engine's optimisation profile."""
    unit = facts.unit
    largest = (facts.max_pixels // (facts.patch_size ** 2)) // unit * unit
    hi = int(max_patches) // unit * unit if max_patches else largest
    lo = unit
    opt = min(hi, max(lo, smart_patches(facts, *OPT_IMAGE)))
    return {"min": lo, "opt": opt, "max": max(hi, lo), "largest_image": largest}


def vision_shapes(facts: CheckpointFacts, n: int) -> dict[str, tuple[int, ...]]:
    return facts.spec.vision_shapes(n, facts.patch_dim)


def shapes_flag(shapes: dict[str, tuple[int, ...]]) -> str:
    """trtexec's shape syntax: name:AxB,name2:CxD."""
    return ",".join(f"{k}:{'x'.join(str(d) for d in v)}" for k, v in shapes.items())


def trtexec_command(facts: CheckpointFacts, onnx_path: str, plan_path: str, profile: dict[str, int], dtype: str,
                    timing_cache: str) -> list[str]:
    """The trtexec command that builds the vision engine from our vision.onnx (TensorRT 10 flags)."""
    return [TRTEXEC, f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
            f"--minShapes={shapes_flag(vision_shapes(facts, profile['min']))}",
            f"--optShapes={shapes_flag(vision_shapes(facts, profile['opt']))}",
            f"--maxShapes={shapes_flag(vision_shapes(facts, profile['max']))}",
            str(DTYPES[dtype]["trtexec"]), f"--memPoolSize=workspace:{TRTEXEC_WORKSPACE_MIB}",
            f"--timingCacheFile={timing_cache}", "--skipInference"]


# ---------------------------------------------------------------------------- the plan
@dataclass
class TrtllmPlan:
    name: str
    repo: str
    work_dir: str
    facts: CheckpointFacts
    options: TrtllmOptions
    profile: dict[str, int]
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    llm_api: dict[str, Any]
    onnx_dir: str | None = None  # where the vision ONNX export is (tensorrt vision only)
    commands: list[dict[str, Any]] = field(default_factory=list)  # {"step", "argv", "what"}
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["commands"] = [dict(c, shell=shlex.join(c["argv"])) for c in self.commands]
        return d

    def summary(self) -> dict[str, Any]:
        """What the manifest records of the plan."""
        d = self.to_dict()
        return {"options": d["options"], "family": self.facts.family, "architecture": self.facts.architecture,
                "vision_profile": self.profile, "max_input_len": self.max_input_len, "max_seq_len": self.max_seq_len,
                "max_num_tokens": self.max_num_tokens, "llm_api": self.llm_api, "commands": d["commands"],
                "notes": self.notes, "warnings": self.warnings}


def prompt_tokens(ckpt: str, prompt) -> int:
    """Tokens of the rendered prompt with one (unexpanded) image placeholder."""
    from coordexp.processor import CoordExpProcessor

    proc = CoordExpProcessor.from_pretrained(ckpt)
    return len(proc.tokenizer(proc.prompt_text(prompt))["input_ids"])


def llm_api_config(plan_facts: CheckpointFacts, opts: TrtllmOptions, max_input_len: int, max_seq_len: int,
                   max_num_tokens: int) -> dict[str, Any]:
    """The keyword arguments of `tensorrt_llm.LLM(...)` (TorchLlmArgs), written as llm/1/model.yaml.

    `model` is relative to the repository root (the model resolves it); the other keys are the
    LLM API's own names, so the file also works with the official `llmapi` Triton model."""
    dt = DTYPES[opts.dtype]
    # block reuse breaks the second multimodal request (#14125)
    kv: dict[str, Any] = {"free_gpu_memory_fraction": float(opts.kv_fraction_per_instance), "enable_block_reuse": False}
    if dt["kv_cache"]:
        kv["dtype"] = dt["kv_cache"]
    return {
        "model": CHECKPOINT_SUBDIR,
        "backend": "pytorch",
        "dtype": dt["llm"],
        "tensor_parallel_size": int(opts.tp_size),
        "max_batch_size": int(opts.max_batch_size),
        "max_input_len": int(max_input_len),
        "max_seq_len": int(max_seq_len),
        "max_num_tokens": int(max_num_tokens),
        "trust_remote_code": False,
        "kv_cache_config": kv,
    }


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _family_warnings(facts: CheckpointFacts, opts: TrtllmOptions) -> list[str]:
    """Refuses a separate vision engine for families with deepstack features; warns of what is unverified."""
    spec = facts.spec
    if opts.vision == "tensorrt" and spec.deepstack:
        raise PlanError(f"--trtllm-vision tensorrt is not possible for {spec.title}: the LLM API takes external image "
                        f"embeddings as one [tokens, hidden] tensor per image and has no input for {spec.title}'s "
                        "deepstack features; use --trtllm-vision trtllm (TensorRT-LLM runs the vision tower)")
    warnings = []
    since = spec.trtllm_listed_since
    if since and _version(since) > _version(PINNED["tensorrt_llm"]):
        raise PlanError(f"{spec.title} needs TensorRT-LLM >= {since}; the pinned {PINNED['tensorrt_llm']} cannot serve it")
    if spec.trtllm_listed_since is None:
        listed = ", ".join(f"{s.title} is listed since {s.trtllm_listed_since}" for s in FAMILIES.values()
                           if s.trtllm_listed_since)
        warnings.append(f"{spec.title} on TensorRT-LLM's PyTorch backend: this export did not verify that "
                        f"{PINNED['tensorrt_llm']} lists {spec.architecture} among its supported models "
                        f"({listed}); if the llm model fails to load, use a newer TensorRT-LLM container")
    return warnings


def _profile_warnings(profile: dict[str, int], opts: TrtllmOptions) -> list[str]:
    warnings = []
    if profile["max"] < profile["largest_image"]:
        warnings.append(f"--vision-max-patches {profile['max']} is below the image processor's largest image "
                        f"({profile['largest_image']} patches): larger images fail in the vision engine")
    bias = profile["max"] ** 2 * 4
    if opts.vision == "tensorrt" and bias > BIAS_WARN_BYTES:
        warnings.append(f"the vision engine's attention bias at {profile['max']} patches is {bias / 2**30:.1f} GiB per "
                        "input: lower --vision-max-patches (and the checkpoint's max_pixels) or use "
                        "--trtllm-vision trtllm")
    return warnings


def _sequence_lengths(facts: CheckpointFacts, opts: TrtllmOptions, profile: dict[str, int], text: int,
                      warnings: list[str]) -> tuple[int, int, int]:
    """(max_input_len, max_seq_len, max_num_tokens) for a prompt of `text` tokens."""
    max_image_tokens = profile["max"] // facts.unit
    auto_input = int(math.ceil((text - 1 + max_image_tokens + 256) / 64) * 64)
    max_input_len = int(opts.max_input_len or auto_input)
    if opts.max_input_len and opts.max_input_len < text - 1 + max_image_tokens:
        warnings.append(f"--max-input-len {opts.max_input_len} < prompt ({text - 1}) + largest image "
                        f"({max_image_tokens} tokens): big images will be rejected by TensorRT-LLM")
    max_seq_len = max_input_len + int(opts.max_new_tokens)
    if facts.max_positions and max_seq_len > facts.max_positions:
        raise PlanError(f"max input ({max_input_len}) + max new tokens ({opts.max_new_tokens}) = {max_seq_len} exceeds "
                        f"the model's max_position_embeddings ({facts.max_positions})")
    return max_input_len, max_seq_len, max(8192, max_input_len)


def _notes(facts: CheckpointFacts, opts: TrtllmOptions) -> list[str]:
    notes = []
    if opts.dtype == "fp8":
        if facts.quantized:
            notes.append(f"fp8: the checkpoint is already quantized ({facts.quantized}, hf_quant_config.json); the LLM "
                         "API loads its FP8 weights, the KV cache is FP8")
        else:
            notes.append("fp8: FP8 KV cache only (kv_cache_config.dtype: fp8; Hopper or newer). FP8 weights on the "
                         "PyTorch backend need a checkpoint quantized beforehand with TensorRT Model Optimizer "
                         "(hf_quant_config.json); pass that checkpoint as --ckpt. The vision engine stays FP16.")
    notes.append(f"language model: tensorrt_llm.LLM (PyTorch backend, TensorRT-LLM {PINNED['tensorrt_llm']}) loads "
                 f"{facts.architecture} from the Hugging Face checkpoint directly: no checkpoint conversion and no "
                 "trtllm-build. The deprecated C++-engine multimodal ensemble only ever supported Qwen2-VL.")
    if opts.vision == "trtllm":
        notes.append("vision: TensorRT-LLM runs the vision tower (PyTorch) inside the LLM API; the llm step rebuilds "
                     "the resized image from pixel_values and the prompt from input_ids. No separate vision step, "
                     "no TensorRT vision engine.")
    else:
        notes.append("vision: TensorRT engine from our vision.onnx (trtexec), run by the vision_encoder step; the "
                     "embeddings go to the LLM API as multi_modal_embeddings. Needs a TensorRT-LLM release whose "
                     f"Qwen-VL input processor accepts external image embeddings (not {PINNED['tensorrt_llm']}).")
    if opts.tp_size > 1:
        notes.append(f"tensor parallel size {opts.tp_size}: the LLM API spawns its {opts.tp_size} MPI workers itself; "
                     "give the container that many GPUs (compose: deploy.resources.reservations.devices count)")
    return notes


def _add_commands(plan: TrtllmPlan, onnx_dir: str | None) -> None:
    """The real run's steps, in order: [vision ONNX export, trtexec,] checkpoint copy, serve."""
    facts, opts, profile, work, repo = plan.facts, plan.options, plan.profile, plan.work_dir, plan.repo
    if opts.vision == "tensorrt":
        have = onnx_dir and os.path.isfile(os.path.join(onnx_dir, "onnx_meta.json"))
        onnx_out = os.path.abspath(onnx_dir) if onnx_dir else os.path.join(work, "onnx")
        plan.onnx_dir = onnx_out
        if not have:
            plan.commands.append({"step": "vision-onnx", "what": "export the vision tower to ONNX (our exporter)",
                                  "argv": [*VISION_ONNX_STEP, "--ckpt", facts.path, "--out", onnx_out]})
        plan.commands.append({"step": "vision-engine",
                              "what": f"build the vision TensorRT engine ({profile['min']}..{profile['max']} patches, "
                                      f"opt {profile['opt']})",
                              "argv": trtexec_command(facts, os.path.join(onnx_out, "vision.onnx"),
                                                      os.path.join(work, "vision.plan"), profile, opts.dtype,
                                                      os.path.join(work, "trtexec.timing.cache"))})
    plan.commands.append({"step": "checkpoint", "what": "copy the Hugging Face checkpoint the LLM API loads",
                          "argv": ["cp", "-a", facts.path + os.sep + ".", os.path.join(repo, CHECKPOINT_SUBDIR)]})
    plan.commands.append({"step": "serve", "what": f"serve the repository (inside {PINNED['trtllm_image']})",
                          "argv": ["tritonserver", f"--model-repository={repo}", *SERVE_FLAGS]})


def make_plan(ckpt: str, name: str, repo: str, opts: TrtllmOptions, prompt=None, onnx_dir: str | None = None
              ) -> TrtllmPlan:
    """Everything the export will do, computed without TensorRT-LLM. Raises PlanError or
    UnsupportedFamily for options / checkpoints it cannot take."""
    from coordexp.prompt import PromptSpec

    opts.check()
    facts = read_checkpoint(ckpt)
    repo = os.path.abspath(repo)
    warnings = _family_warnings(facts, opts)
    profile = vision_profile(facts, opts.vision_max_patches)
    warnings += _profile_warnings(profile, opts)
    max_input_len, max_seq_len, max_num_tokens = _sequence_lengths(
        facts, opts, profile, prompt_tokens(ckpt, prompt or PromptSpec()), warnings)
    plan = TrtllmPlan(name=name, repo=repo, work_dir=repo.rstrip(os.sep) + ".work", facts=facts, options=opts,
                      profile=profile, max_input_len=max_input_len, max_seq_len=max_seq_len,
                      max_num_tokens=max_num_tokens,
                      llm_api=llm_api_config(facts, opts, max_input_len, max_seq_len, max_num_tokens),
                      notes=_notes(facts, opts), warnings=warnings)
    _add_commands(plan, onnx_dir)
    return plan

