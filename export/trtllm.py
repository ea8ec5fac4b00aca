"""The TensorRT-LLM export path: a Triton repository served by Triton's TensorRT-LLM container.

    python export/build_engine.py --ckpt CKPT --backend trtllm [--dry-run] [--repo DIR]
        [--dtype bf16|fp16|fp8] [--max-batch-size 8] [--max-input-len N] [--max-new-tokens 256]
        [--kv-cache-fraction 0.8] [--tp-size 1] [--trtllm-vision trtllm|tensorrt] [--vision-max-patches N]
    python -m coordexp.export.trtllm onnx --ckpt CKPT --out DIR      (the vision ONNX export step)

Pinned versions (`PINNED`, read in Triton's release compatibility matrix): the Triton 25.12
containers, `nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3` = TensorRT-LLM 1.1.0 + TensorRT
10.13.3.9 + Python 3.12. Nothing here imports TensorRT-LLM or TensorRT: they exist only inside that
container. `--dry-run` needs neither: it writes the whole repository (every config.pbtxt, the
LLM API's model.yaml, the processor files, manifest.json) and prints every command the real run
would execute; the real run executes them and refuses to start (exit 2) without `tensorrt_llm`.

What serves what:

- The language model is TensorRT-LLM's LLM API on its PyTorch backend (`tensorrt_llm.LLM`, the
  same engine the official `llmapi` Triton model drives), loading the Hugging Face checkpoint as
  it is: no checkpoint conversion, no `trtllm-build`. Qwen2.5-VL and Qwen3-VL exist only on that
  backend; the deprecated C++-engine multimodal ensemble (`multimodal_encoders` + `tensorrt_llm`
  models, `trtllm-build` engines) only ever supported Qwen2-VL among the Qwen VLMs.
- Our `llm` step (`coordexp.serving.trtllm_llm`) is a Triton Python model with the same tensors
  as the ONNX `llm` step (plus an optional `pixel_values`), so the ensemble's inputs, outputs and
  the preprocess / postprocess steps are the ONNX repository's, unchanged.
- `--trtllm-vision trtllm` (default): TensorRT-LLM runs the vision tower itself. The LLM API of
  the pinned release takes a Qwen-VL image only as an image (its input processor runs the HF
  processor and the PyTorch vision tower); it has no input for embeddings computed elsewhere for
  these families. So the `llm` step rebuilds the resized image exactly from `pixel_values` and the
  prompt from `input_ids`, and the ensemble is preprocess -> llm -> postprocess.
- `--trtllm-vision tensorrt`: the vision tower is a TensorRT engine built by `trtexec` from our
  vision ONNX export (one optimisation profile over the patch count), run by the
  `vision_encoder` step; its embeddings go to the LLM API as `multi_modal_embeddings`. That needs
  a TensorRT-LLM release whose Qwen-VL input processor accepts external image embeddings (newer
  than the pinned one) and is refused for Qwen3-VL (its deepstack features have no such input).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordexp.checkpoint import checkpoint_digest

# ---------------------------------------------------------------------------- pinned versions
PINNED: dict[str, str] = {
    "triton_release": "25.12",
    "trtllm_image": "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3",
    "triton_image": "nvcr.io/nvidia/tritonserver:25.12-py3",
    "tensorrt_llm": "1.1.0",
    "tensorrt": "10.13.3.9",
    "python": "3.12",
    "source": "https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/introduction/"
              "compatibility.html (row 25.12, container trtllm-python-py3)",
}

# HF architecture the LLM API's PyTorch backend loads, per checkpoint family.
ARCHITECTURES = {"qwen3_vl": "Qwen3VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

# Inputs of our vision.onnx (coordexp.export.onnx_export) and each one's trailing dimension:
# "N" = the patch count again (square attention biases), an int = fixed, "patch_dim" = C*t*p*p.
VISION_ONNX_INPUTS: dict[str, tuple[tuple[str, Any], ...]] = {
    "qwen3_vl": (("pixel_values", "patch_dim"), ("vision_pos_ids", 2), ("interp_indices", 4),
                 ("interp_weights", 4), ("attention_bias", "N")),
    "qwen2_5_vl": (("pixel_values", "patch_dim"), ("vision_pos_ids", 2), ("window_bias", "N"),
                   ("full_bias", "N")),
}

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

CHECKPOINT_SUBDIR = "llm/1/checkpoint"
MODEL_YAML = "llm/1/model.yaml"
VISION_PLAN = "vision_encoder/1/model.plan"
VISION_META = "vision_encoder/1/onnx_meta.json"  # host-side facts of the vision graph (coordexp.export.onnx_export)


class TrtllmUnavailable(NotImplementedError):
    """TensorRT-LLM (or TensorRT) is not importable here: only --dry-run can run."""


class PlanError(ValueError):
    """The options or the checkpoint cannot make a TensorRT-LLM repository (bad arguments: exit 2)."""


# ---------------------------------------------------------------------------- options
@dataclass
class TrtllmOptions:
    dtype: str = "bf16"
    max_batch_size: int = 8
    max_input_len: int | None = None  # None: the prompt + the largest image + 256 spare tokens
    max_new_tokens: int = 256
    kv_cache_fraction: float = 0.8
    tp_size: int = 1
    vision: str = "trtllm"
    vision_max_patches: int | None = None  # None: the image processor's largest image
    streaming: bool = True  # + llm_stream / <name>_stream: a second LLM instance, each with half the KV share

    @property
    def kv_fraction_per_instance(self) -> float:
        return round(self.kv_cache_fraction / 2, 4) if self.streaming else self.kv_cache_fraction

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrtllmOptions":
        return cls(dtype=getattr(args, "dtype", None) or "bf16", max_batch_size=args.max_batch_size,
                   max_input_len=getattr(args, "max_input_len", None), max_new_tokens=args.max_new_tokens,
                   kv_cache_fraction=getattr(args, "kv_cache_fraction", None) or 0.8,
                   tp_size=getattr(args, "tp_size", None) or 1, vision=getattr(args, "trtllm_vision", None) or "trtllm",
                   vision_max_patches=getattr(args, "vision_max_patches", None),
                   streaming=getattr(args, "stream", True))

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise PlanError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vision not in VISION_MODES:
            raise PlanError(f"--trtllm-vision must be one of {', '.join(VISION_MODES)}, got {self.vision!r}")
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
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def unit(self) -> int:
        """Patches per image token."""
        return self.merge_size ** 2


def read_checkpoint(ckpt: str) -> CheckpointFacts:
    try:
        config = json.loads(Path(ckpt, "config.json").read_text(encoding="utf-8"))
        proc = json.loads(Path(ckpt, "preprocessor_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{ckpt}: cannot read config.json / preprocessor_config.json ({e})") from e
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        raise PlanError(f"the TensorRT-LLM path supports Qwen3-VL (qwen3_vl) and Qwen2.5-VL (qwen2_5_vl) "
                        f"checkpoints; {ckpt} is {family!r}")
    vision = config.get("vision_config") or {}
    text = config.get("text_config") or config
    size = proc.get("size") or {}
    quantized = None
    qfile = Path(ckpt, "hf_quant_config.json")
    if qfile.is_file():
        try:
            quantized = str((json.loads(qfile.read_text(encoding="utf-8")).get("quantization") or {})
                            .get("quant_algo") or "unknown")
        except json.JSONDecodeError:
            quantized = "unreadable"
    return CheckpointFacts(
        path=os.path.abspath(ckpt), family=family,
        architecture=(config.get("architectures") or [ARCHITECTURES[family]])[0],
        text_hidden=int(text.get("hidden_size") or 0),
        max_positions=int(text.get("max_position_embeddings") or 0),
        patch_size=int(proc.get("patch_size") or vision.get("patch_size") or 14),
        merge_size=int(proc.get("merge_size") or vision.get("spatial_merge_size") or 2),
        temporal_patch_size=int(proc.get("temporal_patch_size") or vision.get("temporal_patch_size") or 2),
        in_channels=int(vision.get("in_channels") or vision.get("in_chans") or 3),
        min_pixels=int(size.get("shortest_edge") or proc.get("min_pixels") or 56 * 56),
        max_pixels=int(size.get("longest_edge") or proc.get("max_pixels") or 28 * 28 * 1280),
        num_deepstack=len(vision.get("deepstack_visual_indexes") or []),
        quantized=quantized,
        saved_with=config.get("transformers_version"),
        rope_layout=("rope_parameters" if "rope_parameters" in text and "rope_scaling" not in text
                     else "rope_scaling" if "rope_scaling" in text else None),
    )


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
    out = {}
    for name, last in VISION_ONNX_INPUTS[facts.family]:
        dim = n if last == "N" else facts.patch_dim if last == "patch_dim" else int(last)
        out[name] = (n, dim)
    return out


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
    kv: dict[str, Any] = {"free_gpu_memory_fraction": float(opts.kv_fraction_per_instance)}
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


def make_plan(ckpt: str, name: str, repo: str, opts: TrtllmOptions, prompt=None, onnx_dir: str | None = None
              ) -> TrtllmPlan:
    """Everything the export will do, computed without TensorRT-LLM."""
    from coordexp.prompt import PromptSpec

    opts.check()
    facts = read_checkpoint(ckpt)
    repo = os.path.abspath(repo)
    work = repo.rstrip(os.sep) + ".work"
    notes, warnings = [], []
    if opts.vision == "tensorrt" and facts.family == "qwen3_vl":
        raise PlanError("--trtllm-vision tensorrt is not possible for Qwen3-VL: the LLM API takes external image "
                        "embeddings as one [tokens, hidden] tensor per image and has no input for Qwen3-VL's "
                        "deepstack features; use --trtllm-vision trtllm (TensorRT-LLM runs the vision tower)")
    if facts.family == "qwen3_vl":
        warnings.append(f"Qwen3-VL on TensorRT-LLM's PyTorch backend: this export did not verify that "
                        f"{PINNED['tensorrt_llm']} lists Qwen3VLForConditionalGeneration among its supported models "
                        "(Qwen2.5-VL is listed since 0.19); if the llm model fails to load, use a newer "
                        "TensorRT-LLM container")
    if facts.rope_layout == "rope_parameters":
        warnings.append(f"config.json was written by transformers {facts.saved_with} (`rope_parameters`); TensorRT-LLM "
                        f"{PINNED['tensorrt_llm']} reads configs with its pinned transformers 4.57.1, which expects "
                        "`rope_scaling` (with `mrope_section`): check that the checkpoint loads in the container, or "
                        "re-save config.json with a transformers 4.x layout")
    profile = vision_profile(facts, opts.vision_max_patches)
    if profile["max"] < profile["largest_image"]:
        warnings.append(f"--vision-max-patches {profile['max']} is below the image processor's largest image "
                        f"({profile['largest_image']} patches): larger images fail in the vision engine")
    bias = profile["max"] ** 2 * 4
    if opts.vision == "tensorrt" and bias > BIAS_WARN_BYTES:
        warnings.append(f"the vision engine's attention bias at {profile['max']} patches is {bias / 2**30:.1f} GiB per "
                        "input: lower --vision-max-patches (and the checkpoint's max_pixels) or use "
                        "--trtllm-vision trtllm")
    max_image_tokens = profile["max"] // facts.unit
    text = prompt_tokens(ckpt, prompt or PromptSpec())
    auto_input = int(math.ceil((text - 1 + max_image_tokens + 256) / 64) * 64)
    max_input_len = int(opts.max_input_len or auto_input)
    if opts.max_input_len and opts.max_input_len < text - 1 + max_image_tokens:
        warnings.append(f"--max-input-len {opts.max_input_len} < prompt ({text - 1}) + largest image "
                        f"({max_image_tokens} tokens): big images will be rejected by TensorRT-LLM")
    max_seq_len = max_input_len + int(opts.max_new_tokens)
    if facts.max_positions and max_seq_len > facts.max_positions:
        raise PlanError(f"max input ({max_input_len}) + max new tokens ({opts.max_new_tokens}) = {max_seq_len} exceeds "
                        f"the model's max_position_embeddings ({facts.max_positions})")
    max_num_tokens = max(8192, max_input_len)
    llm_api = llm_api_config(facts, opts, max_input_len, max_seq_len, max_num_tokens)

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

    plan = TrtllmPlan(name=name, repo=repo, work_dir=work, facts=facts, options=opts, profile=profile,
                      max_input_len=max_input_len, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                      llm_api=llm_api, notes=notes, warnings=warnings)
    ckpt_dst = os.path.join(repo, CHECKPOINT_SUBDIR)
    if opts.vision == "tensorrt":
        have = onnx_dir and os.path.isfile(os.path.join(onnx_dir, "onnx_meta.json"))
        onnx_out = os.path.abspath(onnx_dir) if onnx_dir else os.path.join(work, "onnx")
        plan.onnx_dir = onnx_out
        if not have:
            plan.commands.append({"step": "vision-onnx", "what": "export the vision tower to ONNX (our exporter)",
                                  "argv": ["python", "-m", "coordexp.export.trtllm", "onnx",
                                           "--ckpt", facts.path, "--out", onnx_out]})
        plan.commands.append({"step": "vision-engine",
                              "what": f"build the vision TensorRT engine ({profile['min']}..{profile['max']} patches, "
                                      f"opt {profile['opt']})",
                              "argv": trtexec_command(facts, os.path.join(onnx_out, "vision.onnx"),
                                                      os.path.join(work, "vision.plan"), profile, opts.dtype,
                                                      os.path.join(work, "trtexec.timing.cache"))})
    plan.commands.append({"step": "checkpoint", "what": "copy the Hugging Face checkpoint the LLM API loads",
                          "argv": ["cp", "-a", facts.path + os.sep + ".", ckpt_dst]})
    plan.commands.append({"step": "serve", "what": f"serve the repository (inside {PINNED['trtllm_image']})",
                          "argv": ["tritonserver", f"--model-repository={repo}", *SERVE_FLAGS]})
    return plan


# ---------------------------------------------------------------------------- the repository
def _yaml_text(data: dict[str, Any], header: str) -> str:
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


SITE_ENV = "COORDEXP_SITE"  # docker/Dockerfile.gpu installs coordexp + transformers 5 there
SITE_DEFAULT = "/opt/coordexp/site"


def shim(module: str, cls: str, site: str | None) -> str:
    """A model.py importing `cls` of `module` as the Triton model.

    In the TensorRT-LLM container two transformers live side by side: the system one TensorRT-LLM
    pins (4.57.1 for 1.1.0) and coordexp's (>= 5.20) in $COORDEXP_SITE. Each Python model is its
    own process, so `site="first"` (preprocess, postprocess: coordexp's transformers) puts that
    folder before the system packages and `site="last"` (llm, vision: TensorRT-LLM's) after them.
    Without the folder (any other install) the shim only imports."""
    from coordexp.export.repository import model_shim

    body = model_shim(module) if cls == "TritonPythonModel" else (
        f"from {module} import {cls} as TritonPythonModel  # noqa: F401\n")
    body = body.split("\n", 1)[1] if body.startswith('"""') else body
    if site is None:
        path_code = ""
    else:
        add = "sys.path.insert(0, _site)" if site == "first" else "sys.path.append(_site)"
        path_code = ("import os\nimport sys\n\n"
                     f'_site = os.environ.get("{SITE_ENV}", "{SITE_DEFAULT}")\n'
                     f"if os.path.isdir(_site) and _site not in sys.path:\n    {add}\n")
    return (f'"""Generated by coordexp.export.trtllm: a thin shim, the model is {module}.{cls}."""\n'
            + path_code + body.replace("# noqa: F401", "# noqa: F401,E402" if path_code else "# noqa: F401"))


def build_configs(plan: TrtllmPlan, prompt, decoding, options, pad_id: int, stop_ids: list[int],
                  manifest: dict[str, Any]) -> dict[str, Any]:
    """{model: ModelConfig} of the repository, built with coordexp.export.repository's own functions
    and checked with its `check_wiring`."""
    from coordexp.export import repository as R
    from coordexp import wire
    from coordexp.serving import common as C

    pb, _ = R.config_protos()
    mbs = plan.options.max_batch_size
    merge = plan.facts.merge_size
    configs = {
        wire.PREPROCESS: R.python_model_config(
            wire.PREPROCESS, mbs, options.preprocess_instances,
            {"processor_dir": C.PROCESSOR_SUBDIR, "prompt_json": prompt.to_dict(),
             "max_pixels": str(options.max_pixels or "")}),
        wire.POSTPROCESS: R.python_model_config(
            wire.POSTPROCESS, mbs, options.postprocess_instances,
            {"processor_dir": C.PROCESSOR_SUBDIR, "coord_mode": manifest["coord_mode"]}),
    }
    llm = R.python_model_config(
        wire.LLM, mbs, options.llm_instances,
        {"model_yaml": MODEL_YAML, "processor_dir": C.PROCESSOR_SUBDIR, "vision": plan.options.vision,
         "max_new_tokens": str(plan.options.max_new_tokens), "decoding_defaults": decoding.to_dict(),
         "pad_token_id": str(pad_id), "stop_token_ids": stop_ids, "merge_size": str(merge),
         "prompt_json": prompt.to_dict()},
        queue_delay_us=options.llm_queue_delay_us)
    # the one extra input: the preprocess output the LLM API needs to rebuild the image
    R.add_tensors(pb, llm.input, [wire.Tensor(wire.PIXEL_VALUES, "FP32", (-1, -1), optional=True, ragged=True)])
    if plan.options.vision == "trtllm":  # no vision step feeds these
        for t in llm.input:
            if t.name in (wire.IMAGE_EMBEDS, wire.DEEPSTACK_EMBEDS):
                t.optional = True
    configs[wire.LLM] = llm
    if plan.options.vision == "tensorrt":
        vis = R.python_model_config(
            wire.VISION_ENCODER, mbs, options.vision_instances,
            {"plan": VISION_PLAN, "onnx_meta": VISION_META, "merge_size": str(merge),
             "max_patches": str(plan.profile["max"]),
             "processor_dir": C.PROCESSOR_SUBDIR},
            queue_delay_us=options.vision_queue_delay_us)
        vis.instance_group[0].kind = pb.ModelInstanceGroup.KIND_GPU
        configs[wire.VISION_ENCODER] = vis
    ens = R.ensemble_config(plan.name, mbs, {
        "manifest_json": json.dumps(manifest, sort_keys=True, separators=(",", ":")),
        "prompt_variant": prompt.variant, "backend": "trtllm"})
    steps = list(ens.ensemble_scheduling.step)
    del ens.ensemble_scheduling.step[:]
    for step in steps:
        if step.model_name == wire.VISION_ENCODER and plan.options.vision == "trtllm":
            continue
        new = ens.ensemble_scheduling.step.add()
        new.CopyFrom(step)
        if step.model_name == wire.LLM:
            new.input_map[wire.PIXEL_VALUES] = wire.PIXEL_VALUES
            if plan.options.vision == "trtllm":
                for k in (wire.IMAGE_EMBEDS, wire.DEEPSTACK_EMBEDS):
                    del new.input_map[k]
    configs[plan.name] = ens
    ensembles = [plan.name]
    if options.streaming:  # the ONNX repository's streaming pair, on the same TensorRT-LLM glue
        llm_s = pb.ModelConfig()
        llm_s.CopyFrom(llm)
        llm_s.name = wire.LLM_STREAM
        R.add_tensors(pb, llm_s.input, [wire.STREAM_TENSOR])
        llm_s.model_transaction_policy.decoupled = True
        configs[wire.LLM_STREAM] = llm_s
        ens_s = pb.ModelConfig()
        ens_s.CopyFrom(ens)
        ens_s.name = wire.stream_ensemble_name(plan.name)
        R.add_tensors(pb, ens_s.input, [wire.STREAM_TENSOR])
        for step in ens_s.ensemble_scheduling.step:
            if step.model_name == wire.LLM:
                step.model_name = wire.LLM_STREAM
                step.input_map[wire.STREAM] = wire.STREAM
        configs[ens_s.name] = ens_s
        ensembles.append(ens_s.name)
    problems = [p for name in ensembles for p in R.check_wiring(configs, name)]
    if problems:
        raise ValueError("inconsistent ensemble wiring:\n  " + "\n  ".join(problems))
    return configs


def write_trtllm_repository(plan: TrtllmPlan, prompt=None, decoding=None, options=None, dry_run: bool = True,
                            copy_checkpoint: bool = False) -> dict[str, Any]:
    """Write the repository `plan.repo` (replacing it). Returns the manifest.

    The checkpoint copy and the vision engine are the real run's (`copy_checkpoint`, the trtexec
    command); a dry run writes everything else."""
    from coordexp.generation import GenerationParams
    from coordexp.export import repository as R
    from coordexp.processor import CoordExpProcessor
    from coordexp.prompt import PromptSpec
    from coordexp import wire
    from coordexp.serving import common as C

    prompt = prompt or PromptSpec()
    options = options or R.ServingOptions(streaming=plan.options.streaming)
    decoding = decoding or GenerationParams(max_new_tokens=plan.options.max_new_tokens)
    repo = plan.repo
    parent = os.path.dirname(repo)
    os.makedirs(parent, exist_ok=True)
    import tempfile

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(repo)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        proc_dst = os.path.join(tmp, C.PROCESSOR_SUBDIR)
        copied = R.copy_processor_files(plan.facts.path, proc_dst)
        processor = CoordExpProcessor.from_pretrained(proc_dst)
        processor.prompt_text(prompt)
        pad_id = int(processor.pad_token_id)
        stop_ids = [int(i) for i in processor.stop_token_ids]
        manifest: dict[str, Any] = {
            "schema_version": R.MANIFEST_VERSION,
            "name": plan.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "exporter": {"tool": "coordexp.export.build_engine", "writer": "coordexp.export.trtllm"},
            "versions": R.library_versions(),
            "checkpoint": checkpoint_digest(plan.facts.path).to_manifest(),
            "backend": "trtllm",
            "max_batch_size": plan.options.max_batch_size,
            "max_new_tokens": plan.options.max_new_tokens,
            "decoding_defaults": decoding.to_dict(),
            "prompt": prompt.to_dict(),
            "coord_mode": "norm1000",
            "models": {"ensemble": plan.name,
                       "steps": [s[0] for s in wire.ENSEMBLE_STEPS
                                 if not (s[0] == wire.VISION_ENCODER and plan.options.vision == "trtllm")],
                       "stream_ensemble": wire.stream_ensemble_name(plan.name) if options.streaming else None},
            "layout": {"processor_dir": C.PROCESSOR_SUBDIR, "processor_files": copied,
                       "checkpoint_dir": CHECKPOINT_SUBDIR, "model_yaml": MODEL_YAML,
                       "vision_plan": VISION_PLAN if plan.options.vision == "tensorrt" else None,
                       "vision_meta": VISION_META if plan.options.vision == "tensorrt" else None},
            "serving": {k: v for k, v in options.__dict__.items() if k != "extra"} | dict(options.extra),
            "validation": None,
            "trtllm": {"pinned": dict(PINNED), "dry_run": bool(dry_run), **_plan_summary(plan)},
        }
        if options.streaming != plan.options.streaming:
            raise ValueError("the plan's and the repository's streaming settings differ (KV-cache split)")
        if options.streaming:
            manifest["trtllm"]["kv_cache_note"] = ("llm and llm_stream are two TensorRT-LLM instances (two copies of the "
                                                   "weights); each gets half of --kv-cache-fraction. Export with "
                                                   "--no-stream for one instance.")
        configs = build_configs(plan, prompt, decoding, options, pad_id, stop_ids, manifest)
        texts = {m: R.config_text(cfg) for m, cfg in configs.items()}
        modules = {wire.PREPROCESS: ("coordexp.serving.preprocess", "TritonPythonModel", "first"),
                   wire.POSTPROCESS: ("coordexp.serving.postprocess", "TritonPythonModel", "first"),
                   wire.LLM: ("coordexp.serving.trtllm_llm", "TritonPythonModel", "last"),
                   wire.LLM_STREAM: ("coordexp.serving.trtllm_llm", "TritonPythonModel", "last"),
                   wire.VISION_ENCODER: ("coordexp.serving.trtllm_llm", "TrtVisionEncoderModel", "last")}
        for model, text in texts.items():
            os.makedirs(os.path.join(tmp, model, "1"), exist_ok=True)
            Path(tmp, model, "config.pbtxt").write_text(text, encoding="utf-8")
            if model in modules:
                Path(tmp, model, "1", "model.py").write_text(shim(*modules[model]), encoding="utf-8")
        Path(tmp, MODEL_YAML).write_text(_yaml_text(plan.llm_api, (
            f"# tensorrt_llm.LLM(**this) - TorchLlmArgs of TensorRT-LLM {PINNED['tensorrt_llm']} (PyTorch backend).\n"
            "# Written by coordexp.export.trtllm; `model` is relative to the repository root.\n")), encoding="utf-8")
        if copy_checkpoint:
            shutil.copytree(plan.facts.path, os.path.join(tmp, CHECKPOINT_SUBDIR))
        built = os.path.join(plan.work_dir, "vision.plan")
        if plan.options.vision == "tensorrt" and not dry_run:  # trtexec wrote it into the work folder
            shutil.copy2(built, os.path.join(tmp, VISION_PLAN))
            shutil.copy2(os.path.join(plan.onnx_dir, "onnx_meta.json"), os.path.join(tmp, VISION_META))
        Path(tmp, C.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        R.swap_in(tmp, repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _plan_summary(plan: TrtllmPlan) -> dict[str, Any]:
    d = plan.to_dict()
    return {"options": d["options"], "family": plan.facts.family, "architecture": plan.facts.architecture,
            "vision_profile": plan.profile, "max_input_len": plan.max_input_len, "max_seq_len": plan.max_seq_len,
            "max_num_tokens": plan.max_num_tokens, "llm_api": plan.llm_api, "commands": d["commands"],
            "notes": plan.notes, "warnings": plan.warnings}


# ---------------------------------------------------------------------------- entry points
def tensorrt_llm_version() -> str | None:
    """The importable tensorrt_llm's version, None when it is not installed (it is never imported)."""
    from importlib import metadata
    from importlib.util import find_spec

    if find_spec("tensorrt_llm") is None:
        return None
    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return "unknown"


def plan_lines(plan: TrtllmPlan, dry_run: bool) -> list[str]:
    o = plan.options
    kv = plan.llm_api["kv_cache_config"]
    lines = [f"{'dry run: nothing was built; ' if dry_run else ''}TensorRT-LLM repository for {plan.facts.path}",
             f"pinned     : {PINNED['trtllm_image']} (TensorRT-LLM {PINNED['tensorrt_llm']}, TensorRT "
             f"{PINNED['tensorrt']})",
             f"model      : {plan.facts.family} ({plan.facts.architecture}), dtype {o.dtype}, tp {o.tp_size}",
             f"batching   : max_batch_size {o.max_batch_size}, max_input_len {plan.max_input_len}, max_new_tokens "
             f"{o.max_new_tokens}, max_seq_len {plan.max_seq_len}, max_num_tokens {plan.max_num_tokens}",
             f"kv cache   : free_gpu_memory_fraction {o.kv_fraction_per_instance}"
             + (f" per LLM instance (llm and llm_stream: half of {o.kv_cache_fraction} each)" if o.streaming else "")
             + (f", dtype {kv['dtype']}" if "dtype" in kv else ""),
             f"vision     : {o.vision}" + (f" (engine profile {plan.profile['min']}/{plan.profile['opt']}/"
                                          f"{plan.profile['max']} patches)" if o.vision == "tensorrt" else
                                          " (TensorRT-LLM runs the vision tower)"),
             f"repository : {plan.repo}", "", "commands:"]
    for i, c in enumerate(plan.commands, 1):
        lines.append(f"  # {i}. {c['step']}: {c['what']}")
        lines.append("  " + shlex.join(c["argv"]))
    files = sorted(str(p.relative_to(plan.repo)) for p in Path(plan.repo).rglob("*") if p.is_file()) \
        if os.path.isdir(plan.repo) else []
    lines += ["", "written:"] + [f"  {f}" for f in files if "/processor/" not in f]
    nproc = sum(1 for f in files if "/processor/" in f)
    if nproc:
        lines.append(f"  preprocess/1/processor/ ({nproc} tokenizer / processor files)")
    if dry_run:
        later = [CHECKPOINT_SUBDIR + "/ (the checkpoint copy)"]
        if o.vision == "tensorrt":
            later += [VISION_PLAN + " (trtexec's engine)", VISION_META + " (from the vision ONNX export)"]
        lines += ["", "written by the real run only:"] + [f"  {f}" for f in later]
    lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    if plan.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in plan.warnings]
    return lines


def export_trtllm_format(args: argparse.Namespace) -> dict[str, Any]:
    """build_engine's --backend trtllm. Returns {repo, plan, manifest, lines, dry_run}.

    Raises TrtllmUnavailable (exit 2) when not a dry run and tensorrt_llm is not importable, and
    PlanError (exit 2) for options the checkpoint cannot take."""
    from coordexp.prompt import PromptSpec

    opts = TrtllmOptions.from_args(args)
    dry = bool(getattr(args, "dry_run", False))
    if not dry and tensorrt_llm_version() is None:
        raise TrtllmUnavailable(
            "TensorRT-LLM is not installed here (its PyPI entry is only a placeholder). Build inside the TensorRT-LLM "
            f"container - {PINNED['trtllm_image']}, or docker/Dockerfile.gpu which starts from it - or review "
            "everything first with --dry-run, which needs neither TensorRT-LLM nor a GPU.")
    try:
        plan = make_plan(args.ckpt, args.name, args.repo, opts, PromptSpec(), getattr(args, "onnx_dir", None))
    except PlanError as e:
        raise TrtllmUnavailable(str(e)) from e  # build_engine maps it to exit 2
    if not dry:
        run_commands(plan)
    from coordexp.export.repository import ServingOptions

    manifest = write_trtllm_repository(plan, PromptSpec(), options=ServingOptions(streaming=opts.streaming),
                                       dry_run=dry, copy_checkpoint=not dry)
    return {"repo": plan.repo, "dry_run": dry, "plan": plan.to_dict(), "manifest": manifest,
            "lines": plan_lines(plan, dry)}


def run_commands(plan: TrtllmPlan) -> None:
    """The real run's build steps (inside the container): vision ONNX export, trtexec."""
    for c in plan.commands:
        if c["step"] == "vision-onnx":
            export_vision_onnx(plan.facts.path, c["argv"][-1])
        elif c["step"] == "vision-engine":
            exe = shutil.which(TRTEXEC) or (TRTEXEC_FALLBACK if os.path.exists(TRTEXEC_FALLBACK) else None)
            if exe is None:
                raise TrtllmUnavailable(f"trtexec not found (PATH, {TRTEXEC_FALLBACK}); it ships with TensorRT in "
                                        f"{PINNED['trtllm_image']}")
            os.makedirs(plan.work_dir, exist_ok=True)
            subprocess.run([exe, *c["argv"][1:]], check=True)


def export_vision_onnx(ckpt: str, out: str) -> dict[str, Any]:
    from coordexp.export.onnx_export import export_onnx

    return export_onnx(ckpt, out, log=lambda s: print(f"[trtllm] {s}", file=sys.stderr, flush=True))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordexp.export.trtllm",
                                description="Steps of the TensorRT-LLM export "
                                            "(build_engine --backend trtllm runs them).")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("onnx", help="export the checkpoint's graphs (the vision engine is built from vision.onnx)")
    o.add_argument("--ckpt", required=True)
    o.add_argument("--out", required=True)
    sub.add_parser("versions", help="print the pinned versions as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "versions":
        print(json.dumps({**PINNED, "installed_tensorrt_llm": tensorrt_llm_version()}, indent=2))
        return 0
    export_vision_onnx(a.ckpt, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
