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

`onnx_meta.json` beside them holds everything the runtime needs (sizes, token ids, versions,
checkpoint hash); the tokenizer / processor files are copied too, so the folder is self-contained
(`CoordExpProcessor.from_pretrained(onnx_dir)` and `coordexp.engines.onnx_engine.OnnxParts(onnx_dir)`).

Qwen2.5-VL (`model_type` qwen2_5_vl) differs only in the vision graph and has no deepstack:
`vision.onnx` takes `pixel_values` / `vision_pos_ids` already permuted into window order plus
`window_bias` / `full_bias [N, N]` (window blocks / `fullatt_block_indexes` blocks) and returns
`image_embeds` in window order (the host undoes the permutation, `coordexp.mrope.vision_window_index`);
`decoder.onnx` has no `deepstack` input. Other families raise `NotImplementedError`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from coordexp.checkpoint import checkpoint_digest

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
SUPPORTED_FAMILIES = ("qwen3_vl", "qwen2_5_vl")
_EXTERNAL_DATA_BYTES = 1_500_000_000  # graphs above this keep their weights in a `<graph>.data` file


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


def check_supported(config, where: str = "the checkpoint") -> str:
    """The family name, or NotImplementedError naming what is not supported."""
    fam = model_family(config)
    if fam not in SUPPORTED_FAMILIES:
        raise NotImplementedError(f"ONNX export supports Qwen3-VL (qwen3_vl) and Qwen2.5-VL (qwen2_5_vl) "
                                  f"checkpoints; {where} is model_type {fam!r}")
    text = config.get_text_config()
    if getattr(text, "use_sliding_window", False):
        raise NotImplementedError(f"{where}: sliding-window attention in the language model is not supported")
    return fam


def load_model(ckpt: str | os.PathLike, dtype: str = "float32"):
    """The checkpoint with eager attention (the form the wrappers export)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(ckpt))
    check_supported(config, str(ckpt))
    model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=getattr(torch, dtype),
                                                        attn_implementation="eager")
    return model.eval()


# ----------------------------------------------------------------------------------------- wrappers
def _wrappers():
    """Wrapper module classes (defined lazily: torch is imported only when exporting)."""
    import torch
    from torch import nn
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    class VisionWrapper(nn.Module):
        """Qwen3VLVisionModel.forward with the grid-derived tensors as inputs and the packed
        per-image attention as one attention over all patches with a block-diagonal bias."""

        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.deepstack_indexes = list(visual.deepstack_visual_indexes)

        @staticmethod
        def _attention(attn, x, cos, sin, bias):
            n = x.shape[0]
            q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, N, hd]
            w = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + bias
            w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(w, v).transpose(0, 1).reshape(n, -1)
            return attn.proj(out)

        def forward(self, pixel_values, vision_pos_ids, interp_indices, interp_weights, attention_bias):
            vis = self.visual
            h = vis.patch_embed(pixel_values)
            pos = (vis.pos_embed(interp_indices) * interp_weights[:, :, None].to(h.dtype)).sum(1)
            h = h + pos.to(h.dtype)
            cos, sin = vis.rotary_pos_emb(h, vision_pos_ids)
            bias = attention_bias.to(torch.float32)
            feats = []
            for i, blk in enumerate(vis.blocks):
                h = h + self._attention(blk.attn, blk.norm1(h), cos, sin, bias)
                h = h + blk.mlp(blk.norm2(h))
                if i in self.deepstack_indexes:
                    feats.append(vis.deepstack_merger_list[self.deepstack_indexes.index(i)](h))
            merged = vis.merger(h)
            return merged, torch.stack(feats, dim=0)

    class Vision25Wrapper(nn.Module):
        """Qwen2_5_VisionTransformerPretrainedModel.forward for inputs already in window order (the
        host permutes patches and rotary positions, and un-permutes the merged output): window
        blocks use `window_bias`, the `fullatt_block_indexes` blocks `full_bias`."""

        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.full = set(int(i) for i in visual.fullatt_block_indexes)

        def forward(self, pixel_values, vision_pos_ids, window_bias, full_bias):
            vis = self.visual
            h = vis.patch_embed(pixel_values)
            cos, sin = vis.rotary_pos_emb(h, vision_pos_ids)
            wb, fb = window_bias.to(torch.float32), full_bias.to(torch.float32)
            for i, blk in enumerate(vis.blocks):
                bias = fb if i in self.full else wb
                h = h + VisionWrapper._attention(blk.attn, blk.norm1(h), cos, sin, bias)
                h = h + blk.mlp(blk.norm2(h))
            return vis.merger(h)

    class EmbedWrapper(nn.Module):
        def __init__(self, embed):
            super().__init__()
            self.embed = embed

        def forward(self, input_ids):
            return self.embed(input_ids)

    class _KVCache:
        """The part of transformers' Cache API a decoder layer uses: `update` concatenates."""

        def __init__(self, past):
            self.past = past
            self.present = [None] * (len(past) // 2)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k = torch.cat([self.past[2 * layer_idx], key_states], dim=2)
            v = torch.cat([self.past[2 * layer_idx + 1], value_states], dim=2)
            self.present[layer_idx] = (k, v)
            return k, v

    class DecoderWrapper(nn.Module):
        """The text model's forward (+ lm_head on the last position) with an explicit KV cache,
        explicit 3-row M-RoPE positions and (Qwen3-VL) dense deepstack features."""

        def __init__(self, model):
            super().__init__()
            self.lm = model.model.language_model
            self.lm_head = model.lm_head

        def run(self, inputs_embeds, attention_mask, position_ids, deepstack, past):
            lm = self.lm
            t = inputs_embeds.shape[1]
            kv_len = attention_mask.shape[1]
            dtype = inputs_embeds.dtype
            q_pos = torch.arange(t, device=inputs_embeds.device) + (kv_len - t)
            k_pos = torch.arange(kv_len, device=inputs_embeds.device)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, :, :] & (attention_mask[:, None, :] > 0)
            mask = torch.where(allowed, torch.zeros((), dtype=dtype),
                               torch.full((), torch.finfo(dtype).min, dtype=dtype))[:, None, :, :]
            cos, sin = lm.rotary_emb(inputs_embeds, position_ids)
            cache = _KVCache(list(past))
            h = inputs_embeds
            n_deep = deepstack.shape[0] if deepstack is not None else 0
            for i, layer in enumerate(lm.layers):
                h = layer(h, position_embeddings=(cos, sin), attention_mask=mask, past_key_values=cache)
                if isinstance(h, tuple):
                    h = h[0]
                if i < n_deep:
                    h = h + deepstack[i].to(h.dtype)
            h = lm.norm(h[:, -1:, :])
            logits = self.lm_head(h)[:, 0, :].float()
            presents = []
            for k, v in cache.present:
                presents += [k, v]
            return (logits, *presents)

        def forward(self, inputs_embeds, attention_mask, position_ids, deepstack, past):
            return self.run(inputs_embeds, attention_mask, position_ids, deepstack, past)

    class PlainDecoderWrapper(DecoderWrapper):
        """Without the deepstack input (Qwen2.5-VL)."""

        def forward(self, inputs_embeds, attention_mask, position_ids, past):
            return self.run(inputs_embeds, attention_mask, position_ids, None, past)

    VisionWrapper.Vision25 = Vision25Wrapper
    DecoderWrapper.Plain = PlainDecoderWrapper
    return VisionWrapper, EmbedWrapper, DecoderWrapper


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


def _save(program, path: Path, nbytes: int) -> list[str]:
    """Save an ONNXProgram; weights go to `<name>.data` only for big graphs. Returns files written."""
    program.save(str(path), external_data=nbytes > _EXTERNAL_DATA_BYTES)
    _name_dims(path)
    files = [path.name]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data.name)
    return files


def _export(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, opset: int) -> list[str]:
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
    return _save(program, path, nbytes)


def export_onnx(ckpt: str | os.PathLike, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                dtype: str = "float32", model=None, log=None) -> dict[str, Any]:
    """Export `ckpt` into `out_dir` (created; existing graphs are replaced). Returns the meta dict
    (also written to `out_dir/onnx_meta.json`).

    `model`: an already loaded model to export instead of loading `ckpt` (its weights are what the
    graphs get; the hashes still come from `ckpt`). `log`: a callable taking one line of progress.
    """
    import numpy as np
    import torch

    from coordexp import mrope
    from coordexp.engines.torch_engine import checkpoint_error
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
    for name in GRAPHS:
        for p in (out / name, out / (name + ".data")):
            if p.exists():
                p.unlink()

    processor = CoordExpProcessor.from_pretrained(str(ckpt))
    if model is None:
        model = load_model(ckpt, dtype=dtype)
    else:
        check_supported(model.config, "the model")
        model.config._attn_implementation = "eager"
        for sub in (model.config.text_config, model.config.vision_config):
            sub._attn_implementation = "eager"
    model.eval()
    cfg = model.config
    tcfg, vcfg = cfg.text_config, cfg.vision_config
    family = model_family(cfg)
    qwen3 = family == "qwen3_vl"
    VisionWrapper, EmbedWrapper, DecoderWrapper = _wrappers()
    tdtype = getattr(torch, dtype)
    hidden = int(tcfg.hidden_size)
    n_layers = int(tcfg.num_hidden_layers)
    kv_heads = int(tcfg.num_key_value_heads)
    head_dim = int(getattr(tcfg, "head_dim", None) or hidden // tcfg.num_attention_heads)
    n_deep = len(vcfg.deepstack_visual_indexes) if qwen3 else 0
    merge = int(vcfg.spatial_merge_size)
    patch = int(vcfg.patch_size)
    tps = int(vcfg.temporal_patch_size)
    in_ch = int(vcfg.in_channels)
    side = int(model.model.visual.num_grid_per_side) if qwen3 else 0
    AUTO = torch.export.Dim.AUTO
    timings: dict[str, float] = {}
    files: list[str] = []

    with torch.no_grad():
        # ---- vision: two images (two attention segments, so the bias is exercised)
        gen = torch.Generator().manual_seed(0)
        if qwen3:
            grid = np.array([[1, 4, 6], [1, 4, 4]], dtype=np.int64)
            n = int(mrope.num_patches(grid).sum())
            pix = torch.randn(n, in_ch * tps * patch * patch, generator=gen).to(tdtype)
            idx, wts = mrope.vision_interpolation(grid, side, merge)
            vargs = (pix, torch.from_numpy(mrope.vision_position_ids(grid, merge)), torch.from_numpy(idx),
                     torch.from_numpy(wts), torch.from_numpy(mrope.vision_attention_bias(grid)))
            vmodule = VisionWrapper(model.model.visual)
            v_in = ["pixel_values", "vision_pos_ids", "interp_indices", "interp_weights", "attention_bias"]
            v_out = ["image_embeds", "deepstack"]
            v_dyn = ({0: AUTO}, {0: AUTO}, {0: AUTO}, {0: AUTO}, {0: AUTO, 1: AUTO})
        else:  # window attention: an image spanning several windows, plus a small one
            vws = max(1, int(vcfg.window_size) // merge // patch)
            grid = np.array([[1, merge * (vws + 1), merge * (vws + 2)], [1, 2 * merge, 2 * merge]], dtype=np.int64)
            n = int(mrope.num_patches(grid).sum())
            pix = torch.randn(n, in_ch * tps * patch * patch, generator=gen).to(tdtype)
            win, cu_win = mrope.vision_window_index(grid, merge, int(vcfg.window_size), patch)
            vargs = (pix, torch.from_numpy(mrope.vision_position_ids(grid, merge)),
                     torch.from_numpy(mrope.segment_bias(mrope.segments_from_cu(cu_win))),
                     torch.from_numpy(mrope.vision_attention_bias(grid)))
            vmodule = VisionWrapper.Vision25(model.model.visual)
            v_in = ["pixel_values", "vision_pos_ids", "window_bias", "full_bias"]
            v_out = ["image_embeds"]
            v_dyn = ({0: AUTO}, {0: AUTO}, {0: AUTO, 1: AUTO}, {0: AUTO, 1: AUTO})
        t0 = time.perf_counter()
        log("exporting vision.onnx")
        files += _export(vmodule.eval(), vargs, out / "vision.onnx", v_in, v_out, v_dyn, opset)
        timings["vision"] = round(time.perf_counter() - t0, 2)

        # ---- embed
        t0 = time.perf_counter()
        log("exporting embed.onnx")
        ids = torch.randint(0, int(tcfg.vocab_size), (2, 5), generator=gen)
        files += _export(EmbedWrapper(model.model.language_model.embed_tokens).eval(), (ids,), out / "embed.onnx",
                         ["input_ids"], ["inputs_embeds"], ({0: AUTO, 1: AUTO},), opset)
        timings["embed"] = round(time.perf_counter() - t0, 2)

        # ---- decoder: B=2, T=5 new tokens, P=3 cached
        b, t, p = 2, 5, 3
        embeds = torch.randn(b, t, hidden, generator=gen).to(tdtype)
        amask = torch.ones(b, p + t, dtype=torch.int64)
        amask[1, :2] = 0
        pos = torch.arange(p, p + t).view(1, 1, t).expand(3, b, t).contiguous()
        deep = torch.zeros(n_deep, b, t, hidden, dtype=tdtype)
        past = []
        for _ in range(n_layers):
            past += [torch.randn(b, kv_heads, p, head_dim, generator=gen).to(tdtype),
                     torch.randn(b, kv_heads, p, head_dim, generator=gen).to(tdtype)]
        in_names = ["inputs_embeds", "attention_mask", "position_ids"] + (["deepstack"] if n_deep else [])
        out_names = ["logits"]
        for i in range(n_layers):
            in_names += [f"past_key_{i}", f"past_value_{i}"]
            out_names += [f"present_key_{i}", f"present_value_{i}"]
        kv_dyn = [{0: AUTO, 2: AUTO}] * (2 * n_layers)
        if n_deep:
            dmodule, dargs = DecoderWrapper(model), (embeds, amask, pos, deep, past)
            dyn = ({0: AUTO, 1: AUTO}, {0: AUTO, 1: AUTO}, {1: AUTO, 2: AUTO}, {1: AUTO, 2: AUTO}, kv_dyn)
        else:
            dmodule, dargs = DecoderWrapper.Plain(model), (embeds, amask, pos, past)
            dyn = ({0: AUTO, 1: AUTO}, {0: AUTO, 1: AUTO}, {1: AUTO, 2: AUTO}, kv_dyn)
        t0 = time.perf_counter()
        log("exporting decoder.onnx")
        files += _export(dmodule.eval(), dargs, out / "decoder.onnx", in_names, out_names, dyn, opset)
        timings["decoder"] = round(time.perf_counter() - t0, 2)

    copied = []
    for name in PROCESSOR_FILES:
        src = Path(ckpt) / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)

    image_ids = [processor.image_token_id, processor.video_token_id]
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "family": family,
        "architecture": type(model).__name__,
        "graphs": {
            "vision": {"file": "vision.onnx", "inputs": v_in, "outputs": v_out},
            "embed": {"file": "embed.onnx", "inputs": ["input_ids"], "outputs": ["inputs_embeds"]},
            "decoder": {"file": "decoder.onnx", "inputs": in_names, "outputs": out_names},
        },
        "files": sorted(set(files)),
        "processor_files": copied,
        "dtype": dtype,
        "hidden_size": hidden,
        "num_layers": n_layers,
        "num_attention_heads": int(tcfg.num_attention_heads),
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(tcfg.vocab_size),
        "num_deepstack": n_deep,
        "deepstack_visual_indexes": list(getattr(vcfg, "deepstack_visual_indexes", None) or []),
        "window_size": int(getattr(vcfg, "window_size", 0) or 0),
        "fullatt_block_indexes": list(getattr(vcfg, "fullatt_block_indexes", None) or []),
        "vision_hidden_size": int(vcfg.hidden_size),
        "spatial_merge_size": merge,
        "patch_size": patch,
        "temporal_patch_size": tps,
        "in_channels": in_ch,
        "num_grid_per_side": side,
        "patch_dim": in_ch * tps * patch * patch,
        "image_token_id": int(image_ids[0]),
        "video_token_id": int(image_ids[1]),
        "vision_start_token_id": int(processor.vision_start_token_id),
        "vision_end_token_id": int(processor.vision_end_token_id),
        "stop_token_ids": [int(i) for i in processor.stop_token_ids],
        "pad_token_id": int(processor.pad_token_id),
        "eos_token_id": int(processor.im_end_token_id),
        "max_position_embeddings": int(getattr(tcfg, "max_position_embeddings", 0) or 0),
        "opset": int(opset),
        "versions": versions(),
        "checkpoint": os.path.abspath(str(ckpt)),
        "checkpoint_sha256": digest.sha256,
        "weights_sha256": digest.files,
        "export_seconds": dict(timings, total=round(time.perf_counter() - t_start, 2)),
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out} in {meta['export_seconds']['total']} s")
    return meta


def read_meta(onnx_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(onnx_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir} is not an ONNX export folder (no {META_NAME})")
    return json.loads(path.read_text(encoding="utf-8"))
