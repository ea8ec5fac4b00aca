"""Model configs and image processors of the tiny checkpoints, by named size or explicit dimensions.

`SIZES` holds the presets (`"tiny"`: < 2 MB, `"demo"`: meant to be trained); every field can be
overridden, so tests and benchmarks can build shape-realistic random models
(`make_config("qwen3_vl", "tiny", text_hidden=2048, ...)`).
"""
from __future__ import annotations

from typing import Any

from coordexp.demo.tokenizer import FAMILIES, build_tokenizer, special_token_ids

# Model sizes. Every key can be overridden (make_config(..., text_hidden=128), CLI --text-hidden 128).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=16, text_intermediate=128,
        vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
        patch_size=16, merge_size=2, temporal_patch_size=2,
    ),
    "demo": dict(
        text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, head_dim=64, text_intermediate=512,
        vision_hidden=128, vision_layers=3, vision_heads=4, vision_intermediate=256,
        patch_size=8, merge_size=2, temporal_patch_size=2,
        init_std=0.02,  # meant to be trained: the usual init (the tiny default 0.2 is for untrained use)
    ),
}
DEFAULT_INIT_STD = 0.2  # large on purpose: random logits without near-ties -> stable greedy decoding
DEFAULT_MAX_IMAGE_SIDE = 256  # max_pixels = side**2
VOCAB_MULTIPLE = 64  # the embedding matrix is padded like the real Qwen vocabularies


def _mrope_section(family: str, head_dim: int) -> list[int]:
    half = head_dim // 2
    # Qwen3-VL: [24, 20, 20] for head_dim 128; Qwen2.5-VL: [16, 24, 24]; scaled to head_dim.
    hw = round(half * (20 if family == "qwen3_vl" else 24) / 64)
    return [half - 2 * hw, hw, hw]


def resolve_size(size: str | dict[str, Any] = "tiny", **overrides: Any) -> dict[str, Any]:
    """The size dict: a named preset (`SIZES`) or a dict, updated with the non-None overrides."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size={size!r}; expected one of {', '.join(SIZES)} or a dict")
        spec = dict(SIZES[size])
    else:
        spec = dict(SIZES["tiny"])
        overrides = {**dict(size), **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in SIZES["tiny"] and key not in _EXTRA_CONFIG_KEYS:
            known = ", ".join(sorted(SIZES["tiny"]) + sorted(_EXTRA_CONFIG_KEYS))
            raise ValueError(f"unknown size/config key {key!r}; known: {known}")
        spec[key] = value
    return spec


_EXTRA_CONFIG_KEYS = {"init_std", "mrope_section", "deepstack_visual_indexes", "fullatt_block_indexes",
                      "window_size", "num_position_embeddings", "rope_theta", "max_position_embeddings",
                      "tie_word_embeddings", "max_image_side"}


def make_config(family: str = "qwen3_vl", size: str | dict[str, Any] = "tiny", *, vocab_size: int | None = None,
                token_ids: dict[str, int] | None = None, **overrides: Any):
    """A `Qwen3VLConfig` / `Qwen2_5_VLConfig` of the given size.

    `overrides`: any key of `SIZES["tiny"]` (text_hidden, text_layers, text_heads, text_kv_heads,
    head_dim, text_intermediate, vision_hidden, vision_layers, vision_heads, vision_intermediate,
    patch_size, merge_size, temporal_patch_size) or init_std, mrope_section, deepstack_visual_indexes
    (qwen3_vl), fullatt_block_indexes / window_size (qwen2_5_vl), num_position_embeddings,
    rope_theta, max_position_embeddings, tie_word_embeddings, max_image_side.
    `token_ids`: from `special_token_ids(tokenizer)`; `vocab_size`: the (padded) embedding rows.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {', '.join(FAMILIES)}")
    s = resolve_size(size, **overrides)
    if token_ids is None or vocab_size is None:  # ids/vocab of the default tiny tokenizer
        tok = build_tokenizer(family=family)
        token_ids = token_ids if token_ids is not None else special_token_ids(tok)
        vocab_size = vocab_size or padded_vocab_size(len(tok))
    ids = dict(token_ids)
    head_dim = s["head_dim"]
    mrope = list(s.get("mrope_section") or _mrope_section(family, head_dim))
    if sum(mrope) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    if s["vision_hidden"] % s["vision_heads"]:
        raise ValueError("vision_hidden must be divisible by vision_heads")
    text, vision = _text_and_vision(s, ids, int(vocab_size))
    top = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if k in ids}
    tie = bool(s.get("tie_word_embeddings", False))
    build = _qwen3_vl_config if family == "qwen3_vl" else _qwen2_5_vl_config
    return build(s, text, vision, mrope, tie, top)


def padded_vocab_size(real_vocab: int) -> int:
    """Embedding rows for a tokenizer of `real_vocab` tokens (padded like the real Qwen vocabularies)."""
    return -(-real_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _text_and_vision(s: dict[str, Any], ids: dict[str, int], vocab_size: int):
    """The family-independent parts of the text and vision sub-configs."""
    init_std = s.get("init_std", DEFAULT_INIT_STD)
    text: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=s["text_hidden"], intermediate_size=s["text_intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"],
        max_position_embeddings=s.get("max_position_embeddings", 4096),
        initializer_range=init_std,
        bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"),
    )
    vision: dict[str, Any] = dict(
        depth=s["vision_layers"], hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
        num_heads=s["vision_heads"], patch_size=s["patch_size"], spatial_merge_size=s["merge_size"],
        temporal_patch_size=s["temporal_patch_size"], out_hidden_size=s["text_hidden"],
        initializer_range=init_std,
    )
    return text, vision


def _qwen3_vl_config(s: dict[str, Any], text: dict[str, Any], vision: dict[str, Any], mrope: list[int],
                     tie: bool, top: dict[str, int]):
    from transformers import Qwen3VLConfig

    text.update(head_dim=s["head_dim"], rope_parameters={
        "rope_type": "default", "rope_theta": float(s.get("rope_theta", 5_000_000.0)),
        "mrope_section": mrope, "mrope_interleaved": True})
    max_side = s.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    side = -(-max_side // s["patch_size"])  # patches per side of the largest image
    deepstack = s.get("deepstack_visual_indexes")
    if deepstack is None:
        deepstack = list(range(min(s["vision_layers"], 3)))
    vision.update(hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=list(deepstack),
                  num_position_embeddings=int(s.get("num_position_embeddings", side * side)))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **top)


def _qwen2_5_vl_config(s: dict[str, Any], text: dict[str, Any], vision: dict[str, Any], mrope: list[int],
                       tie: bool, top: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    if s["head_dim"] * s["text_heads"] != s["text_hidden"]:
        raise ValueError("qwen2_5_vl derives head_dim = text_hidden / text_heads; adjust head_dim")
    text.update(rope_parameters={"rope_type": "default", "rope_theta": float(s.get("rope_theta", 1_000_000.0)),
                                 "mrope_section": mrope},
                use_sliding_window=False, max_window_layers=s["text_layers"])
    full = s.get("fullatt_block_indexes")
    if full is None:
        full = [s["vision_layers"] - 1]
    vision.update(hidden_act="silu", fullatt_block_indexes=list(full),
                  window_size=int(s.get("window_size", s["patch_size"] * s["merge_size"] * 4)),
                  tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **top)


def make_image_processor(family: str = "qwen3_vl", size: str | dict[str, Any] = "tiny", *,
                         min_pixels: int | None = None, max_pixels: int | None = None, **overrides: Any):
    """The PIL `Qwen2VLImageProcessorPil` matching the vision tower of `make_config(family, size, ...)`."""
    from transformers import Qwen2VLImageProcessorPil

    s = resolve_size(size, **overrides)
    factor = s["patch_size"] * s["merge_size"]
    max_side = s.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    if family == "qwen3_vl":  # the released preprocessor configs: Qwen3-VL 0.5/0.5, Qwen2.5-VL CLIP's
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    else:
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    lo = int(min_pixels if min_pixels is not None else 4 * factor * factor)
    hi = int(max_pixels if max_pixels is not None else max_side * max_side)
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {lo}, {hi}")
    return Qwen2VLImageProcessorPil(
        min_pixels=lo, max_pixels=hi,
        patch_size=s["patch_size"], merge_size=s["merge_size"], temporal_patch_size=s["temporal_patch_size"],
        image_mean=mean, image_std=std,
    )

