"""Export a CoordExp Qwen3-VL checkpoint to three ONNX graphs plus host-side metadata.

Optimum's ONNX exporters do not cover Qwen-VL and transformers' own exporter leaves out the
vision tower, so the graphs are made here with `torch.onnx.export(..., dynamo=True)` from small
wrapper modules that call the checkpoint's own submodules (weights and math stay transformers'):

- `vision.onnx`: `pixel_values [N, C*tp*p*p]`, `vision_pos_ids [N, 2]` (rotary row/col),
  `interp_indices [N, 4]` / `interp_weights [N, 4]` (bilinear resampling of the learned position
  table), `attention_bias [N, N]` (0 inside an image, -inf across: the packed per-image attention)
  -> `image_embeds [N/m^2, H]`, `deepstack [D, N/m^2, H]`. The data-dependent parts (grid loops,
  per-image splits) are computed on the host by `coordexp.mrope` from `image_grid_thw`, so the
  graph has no data-dependent control flow.
- `embed.onnx`: `input_ids [B, T]` -> `inputs_embeds [B, T, H]`.
- `decoder.onnx`: `inputs_embeds [B, T, H]`, `attention_mask [B, P+T]` (int64, 1 = real token),
  `position_ids [3, B, T]` (M-RoPE, `coordexp.mrope.get_rope_index`), `deepstack [D, B, T, H]` (the
  vision deepstack features scattered to the image positions, zero elsewhere), `past_key_i` /
  `past_value_i [B, kv_heads, P, head_dim]` for every layer -> `logits [B, V]` (last position only),
  `present_key_i` / `present_value_i [B, kv_heads, P+T, head_dim]`.

A graph with more than 64 MB of weights keeps them in `<graph>.data` beside it, written tensor by
tensor, so the export's peak memory stays near the checkpoint's float32 size (an inline graph is
serialised whole in memory; `bench/bench_export_memory.py` measures the peak).

`onnx_meta.json` beside them holds everything the runtime needs (sizes, token ids, versions,
checkpoint hash); the tokenizer / processor files are copied too, so the folder is self-contained
(`CoordExpProcessor.from_pretrained(onnx_dir)` and `coordexp.engines.onnx_engine.OnnxParts(onnx_dir)`).

Qwen2.5-VL (`model_type` qwen2_5_vl) differs only in the vision graph and has no deepstack:
`vision.onnx` takes `pixel_values` / `vision_pos_ids` already permuted into window order plus
`window_bias` / `full_bias [N, N]` (window blocks / `fullatt_block_indexes` blocks) and returns
`image_embeds` in window order (the host undoes the permutation, `coordexp.mrope.vision_window_index`);
`decoder.onnx` has no `deepstack` input. What differs per family is one `coordexp.families.FamilySpec`
(graph inputs, host-side inputs, sample grid, wrapper); other families raise `UnsupportedFamily`
(a `NotImplementedError`). The wrapper modules are in `coordexp.export.onnx_wrappers`; one function
exports each graph (`export_vision_graph`, `export_embed_graph`, `export_decoder_graph`).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordexp.checkpoint import checkpoint_digest
from coordexp.families import FAMILIES, FamilyConfigError, FamilySpec, family_spec

META_NAME = "onnx_meta.json"
META_FORMAT = "coordexp-onnx/1"
GRAPHS = ("vision.onnx", "embed.onnx", "decoder.onnx")
DEFAULT_OPSET = 18
# Tokenizer / processor files copied next to the graphs (whichever the checkpoint has).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "generation_config.json", "config.json",
)
SUPPORTED_FAMILIES = tuple(FAMILIES)
# Graphs with more weights than this stream them into `<graph>.data`, tensor by tensor. An inline
# graph is serialised whole in memory (the proto, its bytes, the reload for renaming dims: several
# copies of the weights), which was the export's memory peak; small graphs stay one file.
_EXTERNAL_DATA_BYTES = 64 * 2**20
_SAVE_IN_FLIGHT_BYTES = 64 * 2**20  # weights buffered at once while streaming them to disk


class ExportError(RuntimeError):
    """The checkpoint cannot be exported (unsupported family, broken folder, exporter failure)."""


# ------------------------------------------------------------------------------------------ helpers
def model_family(config) -> str:
    return str(getattr(config, "model_type", ""))


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def check_supported(config, where: str = "the checkpoint") -> FamilySpec:
    """The family's spec; UnsupportedFamily (a NotImplementedError) naming the family and the
    supported ones, NotImplementedError for what else is not supported, FamilyConfigError for a
    config missing a field the family's graphs are built from."""
    spec = family_spec(model_family(config), where=where, what="ONNX export")
    text = config.get_text_config()
    if getattr(text, "use_sliding_window", False):
        raise NotImplementedError(f"{where}: sliding-window attention in the language model is not supported")
    missing = spec.missing_config_fields(config.vision_config)
    if missing:
        raise FamilyConfigError(f"{where}: vision_config has no {', '.join(missing)} (needed for {spec.title})")
    return spec


def load_model(ckpt: str | os.PathLike, dtype: str = "float32"):
    """The checkpoint with eager attention (the form the wrappers export); `check_supported` first."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=getattr(torch, dtype),
                                                        attn_implementation="eager")
    return model.eval()


# ------------------------------------------------------------------------------------------- export
# Readable names for the exporter's symbolic dims ("s10" -> "batch"), per graph: input -> {axis: name}.
DIM_NAMES = {
    "vision.onnx": {"pixel_values": {0: "num_patches"}},
    "embed.onnx": {"input_ids": {0: "batch", 1: "seq"}},
    "decoder.onnx": {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {1: "total_seq"},
                     "past_key_*": {2: "past_seq"}, "past_value_*": {2: "past_seq"}},
}


def _name_dims(path: Path) -> None:
    """Rename the exporter's symbols (s0, s1, ...) to the names in DIM_NAMES everywhere in the
    graph (inputs, outputs, value_info, also inside expressions like `s22 + s69`)."""
    import fnmatch
    import re

    import onnx

    rules = DIM_NAMES.get(path.name)
    if not rules:
        return
    model = onnx.load(str(path), load_external_data=False)
    mapping: dict[str, str] = {}
    for inp in model.graph.input:
        for pattern, axes in rules.items():
            if fnmatch.fnmatch(inp.name, pattern):
                dims = inp.type.tensor_type.shape.dim
                for axis, name in axes.items():
                    if axis < len(dims) and dims[axis].dim_param:
                        mapping.setdefault(dims[axis].dim_param, name)
    if not mapping:
        return
    token = re.compile(r"\bs\d+\b")

    def fix(values):
        for v in values:
            if not v.type.HasField("tensor_type"):
                continue
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = token.sub(lambda m: mapping.get(m.group(0), m.group(0)), d.dim_param)

    fix(model.graph.input)
    fix(model.graph.output)
    fix(model.graph.value_info)
    onnx.save(model, str(path))  # external initializers keep their references; the .data file is untouched


def _save(program, path: Path, nbytes: int, external_data_bytes: int = _EXTERNAL_DATA_BYTES) -> list[str]:
    """Save an ONNXProgram; weights go to `<name>.data` only for graphs with more than
    `external_data_bytes` of them. Returns files written."""
    if nbytes > external_data_bytes:
        import onnx_ir

        # what ONNXProgram.save(external_data=True) does, with a bounded write buffer (its default is 1 GB)
        onnx_ir.save(program.model, str(path), external_data=path.name + ".data",
                     max_in_flight_bytes=_SAVE_IN_FLIGHT_BYTES)
    else:
        program.save(str(path), external_data=False)
    _name_dims(path)
    files = [path.name]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data.name)
    return files


def _export(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, opset: int,
            external_data_bytes: int = _EXTERNAL_DATA_BYTES) -> list[str]:
    import torch

    import logging

    nbytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    # the exporter logs one warning per missing torchvision op; they are irrelevant here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, None, input_names=list(input_names),
                                    output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                    opset_version=opset, dynamo=True, optimize=True, verbose=False)
    files = _save(program, path, nbytes, external_data_bytes)
    del program  # the ONNX IR of the graph: dropped before the next graph is traced
    gc.collect()
    return files


@dataclass(frozen=True)
class GraphDims:
    """The sizes the three graphs are built with, read once from the model's config."""

    hidden: int
    num_layers: int
    num_attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    num_deepstack: int
    merge: int
    patch: int
    temporal_patch: int
    in_channels: int
    num_grid_per_side: int
    window_size: int

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch * self.patch * self.patch

    def host_meta(self) -> dict[str, int]:
        """The onnx_meta.json keys `FamilySpec.vision_feeds` reads."""
        return {"spatial_merge_size": self.merge, "patch_size": self.patch, "num_grid_per_side": self.num_grid_per_side,
                "window_size": self.window_size}


def graph_dims(model, spec: FamilySpec) -> GraphDims:
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    hidden = int(tcfg.hidden_size)
    return GraphDims(
        hidden=hidden, num_layers=int(tcfg.num_hidden_layers), num_attention_heads=int(tcfg.num_attention_heads),
        kv_heads=int(tcfg.num_key_value_heads),
        head_dim=int(getattr(tcfg, "head_dim", None) or hidden // tcfg.num_attention_heads),
        vocab_size=int(tcfg.vocab_size),
        num_deepstack=len(vcfg.deepstack_visual_indexes) if spec.deepstack else 0,
        merge=int(vcfg.spatial_merge_size), patch=int(vcfg.patch_size), temporal_patch=int(vcfg.temporal_patch_size),
        in_channels=int(vcfg.in_channels),
        num_grid_per_side=int(model.model.visual.num_grid_per_side) if spec.learned_position_grid else 0,
        window_size=int(getattr(vcfg, "window_size", 0) or 0))


def _auto(axes_per_input) -> tuple[dict, ...]:
    import torch

    return tuple({axis: torch.export.Dim.AUTO for axis in axes} for axes in axes_per_input)


def export_vision_graph(model, spec: FamilySpec, dims: GraphDims, out: Path, opset: int, gen, dtype,
                        external_data_bytes: int = _EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """vision.onnx, traced on the family's sample images with the host-side inputs the runtime computes.
    Returns {files, inputs, outputs, seconds}."""
    import numpy as np
    import torch

    from coordexp import mrope
    from coordexp.export import onnx_wrappers

    t0 = time.perf_counter()
    grid = spec.sample_grid(dims.merge, dims.patch, dims.window_size)
    n = int(mrope.num_patches(grid).sum())
    pix = torch.randn(n, dims.patch_dim, generator=gen).numpy()
    feeds, _ = spec.vision_feeds(dims.host_meta(), pix, grid, np.float32)
    args = tuple(torch.from_numpy(feeds[name]).to(dtype) if name == "pixel_values" else torch.from_numpy(feeds[name])
                 for name in spec.vision_input_names)
    module = getattr(onnx_wrappers, spec.vision_wrapper)(model.model.visual).eval()
    files = _export(module, args, out / "vision.onnx", spec.vision_input_names, spec.vision_outputs,
                    _auto(spec.vision_dynamic_axes()), opset, external_data_bytes)
    return {"files": files, "inputs": spec.vision_input_names, "outputs": list(spec.vision_outputs),
            "seconds": round(time.perf_counter() - t0, 2)}


def export_embed_graph(model, dims: GraphDims, out: Path, opset: int, gen,
                       external_data_bytes: int = _EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """embed.onnx: input_ids [B, T] -> inputs_embeds [B, T, H]."""
    import torch

    from coordexp.export.onnx_wrappers import EmbedWrapper

    t0 = time.perf_counter()
    ids = torch.randint(0, dims.vocab_size, (2, 5), generator=gen)
    files = _export(EmbedWrapper(model.model.language_model.embed_tokens).eval(), (ids,), out / "embed.onnx",
                    ["input_ids"], ["inputs_embeds"], _auto([(0, 1)]), opset, external_data_bytes)
    return {"files": files, "inputs": ["input_ids"], "outputs": ["inputs_embeds"],
            "seconds": round(time.perf_counter() - t0, 2)}


def decoder_names(dims: GraphDims) -> tuple[list[str], list[str]]:
    """decoder.onnx's input and output names (`deepstack` only with deepstack features)."""
    in_names = ["inputs_embeds", "attention_mask", "position_ids"] + (["deepstack"] if dims.num_deepstack else [])
    out_names = ["logits"]
    for i in range(dims.num_layers):
        in_names += [f"past_key_{i}", f"past_value_{i}"]
        out_names += [f"present_key_{i}", f"present_value_{i}"]
    return in_names, out_names


def export_decoder_graph(model, dims: GraphDims, out: Path, opset: int, gen, dtype,
                         external_data_bytes: int = _EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """decoder.onnx, traced at B=2, T=5 new tokens, P=3 cached (row 1 left padded)."""
    import torch

    from coordexp.export.onnx_wrappers import DecoderWrapper, PlainDecoderWrapper

    t0 = time.perf_counter()
    b, t, p = 2, 5, 3
    embeds = torch.randn(b, t, dims.hidden, generator=gen).to(dtype)
    amask = torch.ones(b, p + t, dtype=torch.int64)
    amask[1, :2] = 0
    pos = torch.arange(p, p + t).view(1, 1, t).expand(3, b, t).contiguous()
    deep = torch.zeros(dims.num_deepstack, b, t, dims.hidden, dtype=dtype)
    past = []
    for _ in range(dims.num_layers):
        past += [torch.randn(b, dims.kv_heads, p, dims.head_dim, generator=gen).to(dtype),
                 torch.randn(b, dims.kv_heads, p, dims.head_dim, generator=gen).to(dtype)]
    in_names, out_names = decoder_names(dims)
    kv_dyn = list(_auto([(0, 2)] * (2 * dims.num_layers)))
    if dims.num_deepstack:
        module, args = DecoderWrapper(model), (embeds, amask, pos, deep, past)
        dyn = (*_auto([(0, 1), (0, 1), (1, 2), (1, 2)]), kv_dyn)
    else:
        module, args = PlainDecoderWrapper(model), (embeds, amask, pos, past)
        dyn = (*_auto([(0, 1), (0, 1), (1, 2)]), kv_dyn)
    files = _export(module.eval(), args, out / "decoder.onnx", in_names, out_names, dyn, opset, external_data_bytes)
    return {"files": files, "inputs": in_names, "outputs": out_names, "seconds": round(time.perf_counter() - t0, 2)}


def _clear_graphs(out: Path) -> None:
    for name in GRAPHS:
        for p in (out / name, out / (name + ".data")):
            if p.exists():
                p.unlink()


def _eager(model):
    """An already loaded model, switched to the eager attention the wrappers export."""
    model.config._attn_implementation = "eager"
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = "eager"
    return model


def _copy_processor_files(ckpt, out: Path) -> list[str]:
    """The processor files, and the training run's record (beside the weights or in the run folder), so
    an export folder run on its own (`--local EXPORT --engine onnx`) uses the trained prompt too."""
    from coordexp.training_record import RECORD_FILE, find_training_record

    copied = []
    for name in PROCESSOR_FILES:
        src = Path(ckpt) / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)
    record = find_training_record(ckpt)
    if record is not None:
        shutil.copy2(record, out / RECORD_FILE)
        copied.append(RECORD_FILE)
    return copied


def build_meta(model, spec: FamilySpec, dims: GraphDims, graphs: dict[str, dict[str, Any]], processor, ckpt,
               digest, copied: list[str], dtype: str, opset: int) -> dict[str, Any]:
    """onnx_meta.json: everything the runtime needs (sizes, token ids, versions, checkpoint hash)."""
    vcfg = model.config.vision_config
    return {
        "format": META_FORMAT,
        "family": spec.name,
        "architecture": type(model).__name__,
        "graphs": {key: {"file": f"{key}.onnx", "inputs": g["inputs"], "outputs": g["outputs"]}
                   for key, g in graphs.items()},
        "files": sorted(set(f for g in graphs.values() for f in g["files"])),
        "processor_files": copied,
        "dtype": dtype,
        "hidden_size": dims.hidden,
        "num_layers": dims.num_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_kv_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "vocab_size": dims.vocab_size,
        "num_deepstack": dims.num_deepstack,
        "deepstack_visual_indexes": list(getattr(vcfg, "deepstack_visual_indexes", None) or []),
        "window_size": dims.window_size,
        "fullatt_block_indexes": list(getattr(vcfg, "fullatt_block_indexes", None) or []),
        "vision_hidden_size": int(vcfg.hidden_size),
        "spatial_merge_size": dims.merge,
        "patch_size": dims.patch,
        "temporal_patch_size": dims.temporal_patch,
        "in_channels": dims.in_channels,
        "num_grid_per_side": dims.num_grid_per_side,
        "patch_dim": dims.patch_dim,
        "image_token_id": int(processor.image_token_id),
        "video_token_id": int(processor.video_token_id),
        "vision_start_token_id": int(processor.vision_start_token_id),
        "vision_end_token_id": int(processor.vision_end_token_id),
        "stop_token_ids": [int(i) for i in processor.stop_token_ids],
        "pad_token_id": int(processor.pad_token_id),
        "eos_token_id": int(processor.im_end_token_id),
        "max_position_embeddings": int(getattr(model.config.text_config, "max_position_embeddings", 0) or 0),
        "opset": int(opset),
        "versions": versions(),
        "checkpoint": os.path.abspath(str(ckpt)),
        "checkpoint_sha256": digest.sha256,
        "weights_sha256": digest.files,
    }


def export_onnx(ckpt: str | os.PathLike, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                dtype: str = "float32", model=None, log=None,
                external_data_bytes: int = _EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """Export `ckpt` into `out_dir` (created; existing graphs are replaced). Returns the meta dict
    (also written to `out_dir/onnx_meta.json`).

    `model`: an already loaded model to export instead of loading `ckpt` (its weights are what the
    graphs get; the hashes still come from `ckpt`). `log`: a callable taking one line of progress.
    `external_data_bytes`: graphs with more weights than this keep them in `<graph>.data`, streamed
    to disk (small graphs stay one file); 1.5e9 gives the earlier layout, and its memory peak.
    """
    import torch

    from coordexp.checkpoint import checkpoint_error
    from coordexp.processor import CoordExpProcessor

    log = log or (lambda s: None)
    err = checkpoint_error(str(ckpt))
    if err:
        raise FileNotFoundError(err)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; expected float32, float16 or bfloat16")
    t_start = time.perf_counter()
    digest = checkpoint_digest(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_graphs(out)
    processor = CoordExpProcessor.from_pretrained(str(ckpt))
    if model is None:  # the family checked on the config, before the weights are loaded
        from transformers import AutoConfig

        spec = check_supported(AutoConfig.from_pretrained(str(ckpt)), str(ckpt))
        model = load_model(ckpt, dtype=dtype)
    else:
        spec = check_supported(model.config, "the model")
        model = _eager(model)
    model = model.eval()
    dims = graph_dims(model, spec)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)  # one stream for all sample inputs, drawn in graph order
    graphs: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        log("exporting vision.onnx")
        graphs["vision"] = export_vision_graph(model, spec, dims, out, opset, gen, tdtype, external_data_bytes)
        log("exporting embed.onnx")
        graphs["embed"] = export_embed_graph(model, dims, out, opset, gen, external_data_bytes)
        log("exporting decoder.onnx")
        graphs["decoder"] = export_decoder_graph(model, dims, out, opset, gen, tdtype, external_data_bytes)
    copied = _copy_processor_files(ckpt, out)
    meta = build_meta(model, spec, dims, graphs, processor, ckpt, digest, copied, dtype, opset)
    meta["export_seconds"] = dict({k: g["seconds"] for k, g in graphs.items()},
                                  total=round(time.perf_counter() - t_start, 2))
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out} in {meta['export_seconds']['total']} s")
    return meta


def read_meta(onnx_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(onnx_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir} is not an ONNX export folder (no {META_NAME})")
    return json.loads(path.read_text(encoding="utf-8"))
