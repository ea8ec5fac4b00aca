"""The torch modules `coordexp.export.onnx_export` traces, one per graph (imports torch: load lazily).

Each wraps the checkpoint's own submodules (weights and math stay transformers'), with the
data-dependent parts (grid loops, per-image splits, M-RoPE positions) as explicit inputs the host
computes (`coordexp.families.FamilySpec.vision_feeds`, `coordexp.mrope`):

- vision, one per family (`FamilySpec.vision_wrapper` names it): `Qwen3VisionWrapper`,
  `Qwen25VisionWrapper`;
- embed: `EmbedWrapper`;
- decoder: `DecoderWrapper` (with the deepstack input) and `PlainDecoderWrapper` (without).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision


def packed_attention(attn, x, cos, sin, bias):
    """A Qwen-VL vision attention block over all patches at once, `bias` [N, N] separating them
    (0 = may attend, -inf = may not): the packed `cu_seqlens` attention without data-dependent splits."""
    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, N, hd]
    w = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + bias
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v).transpose(0, 1).reshape(n, -1)
    return attn.proj(out)


class Qwen3VisionWrapper(nn.Module):
    """Qwen3VLVisionModel.forward with the grid-derived tensors as inputs and the packed
    per-image attention as one attention over all patches with a block-diagonal bias."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.deepstack_indexes = list(visual.deepstack_visual_indexes)

    def forward(self, pixel_values, vision_pos_ids, interp_indices, interp_weights, attention_bias):
        vis = self.visual
        h = vis.patch_embed(pixel_values)
        pos = (vis.pos_embed(interp_indices) * interp_weights[:, :, None].to(h.dtype)).sum(1)
        h = h + pos.to(h.dtype)
        cos, sin = vis.rotary_pos_emb(h, vision_pos_ids)
        bias = attention_bias.to(torch.float32)
        feats = []
        for i, blk in enumerate(vis.blocks):
            h = h + packed_attention(blk.attn, blk.norm1(h), cos, sin, bias)
            h = h + blk.mlp(blk.norm2(h))
            if i in self.deepstack_indexes:
                feats.append(vis.deepstack_merger_list[self.deepstack_indexes.index(i)](h))
        merged = vis.merger(h)
        return merged, torch.stack(feats, dim=0)


class Qwen25VisionWrapper(nn.Module):
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
            h = h + packed_attention(blk.attn, blk.norm1(h), cos, sin, bias)
            h = h + blk.mlp(blk.norm2(h))
        return vis.merger(h)


class EmbedWrapper(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class KVCache:
    """The part of transformers' Cache API a decoder layer uses: `update` concatenates."""

    def __init__(self, past):
        self.past = past
        self.present = [None] * (len(past) // 2)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = torch.cat([self.past[2 * layer_idx], key_states], dim=2)
        v = torch.cat([self.past[2 * layer_idx + 1], value_states], dim=2)
        self.present[layer_idx] = (k, v)
        return k, v


def causal_padding_mask(attention_mask, t: int, dtype, device):
    """[B, 1, T, P+T] additive mask: causal over the cache + new tokens, padding masked out."""
    kv_len = attention_mask.shape[1]
    q_pos = torch.arange(t, device=device) + (kv_len - t)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, :, :] & (attention_mask[:, None, :] > 0)
    return torch.where(allowed, torch.zeros((), dtype=dtype),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype))[:, None, :, :]


class DecoderWrapper(nn.Module):
    """The text model's forward (+ lm_head on the last position) with an explicit KV cache,
    explicit 3-row M-RoPE positions and (Qwen3-VL) dense deepstack features."""

    def __init__(self, model):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head

    def run(self, inputs_embeds, attention_mask, position_ids, deepstack, past):
        lm = self.lm
        mask = causal_padding_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype, inputs_embeds.device)
        cos, sin = lm.rotary_emb(inputs_embeds, position_ids)
        cache = KVCache(list(past))
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
