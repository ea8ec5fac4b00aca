"""Tiny, offline, deterministic Qwen3-VL / Qwen2.5-VL checkpoints for tests and demos.

`build_tiny_checkpoint(out_dir, family="qwen3_vl", seed=0)` writes a folder that loads like a real
CoordExp checkpoint (`AutoModelForImageTextToText`, `AutoTokenizer`, `coordexp.processor`):

- a byte-level BPE tokenizer trained here (the Qwen pre-tokenizer; up to 600 merges - about 520
  fit the small built-in English corpus plus the synthetic label vocabulary and the CoordExp
  prompts), holding the Qwen
  special tokens and the 1000 coord tokens `<|coord_0|>`..`<|coord_999|>` as single added special
  tokens, eos `<|im_end|>`, pad `<|endoftext|>`, and the family's real Qwen chat template;
- the PIL `Qwen2VLImageProcessorPil` with patch/merge/temporal sizes matching the vision tower and
  min/max pixels suited to small images;
- a randomly initialised (seeded, std 0.2 so greedy decoding has no ties) model, saved as
  safetensors, plus `generation_config.json`, the processor files and a model card README.md.

Same arguments and seed -> byte-identical files. Sizes are parameters: `size="tiny"` (default,
< 2 MB) or `size="demo"` (bigger, meant to be trained), and any field of `SIZES` can be overridden.

CLI: `coordexp-make-tiny OUT --seed 0 [--family qwen3_vl|qwen2_5_vl] [--size tiny|demo]
[--text-hidden N] [--patch-size N] ...`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from coordexp.tokens import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    QWEN_SPECIAL_TOKENS,
    VISION_END,
    VISION_START,
    coord_tokens,
)

FAMILIES = ("qwen3_vl", "qwen2_5_vl")
VIDEO_PAD = "<|video_pad|>"

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
DEFAULT_NUM_MERGES = 600
VOCAB_MULTIPLE = 64  # the embedding matrix is padded like the real Qwen vocabularies

# ---------------------------------------------------------------------------------------------
# Chat templates (verbatim from the released checkpoints)
# ---------------------------------------------------------------------------------------------

# Qwen/Qwen2-VL-*-Instruct and Qwen/Qwen2.5-VL-*-Instruct chat_template.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-*-Instruct chat_template.jinja (5292 bytes, sha256 3636d0f0...a489e4).
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3_VL_CHAT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

CHAT_TEMPLATES = {"qwen3_vl": QWEN3_VL_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE}

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Qwen2 pre-tokenizer split (same as transformers' Qwen2Tokenizer).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "ellipse", "diamond", "hexagon", "cross", "ring"]
LABELS = [f"{c} {s}" for c in COLORS for s in SHAPES]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Detect all objects in the image and describe each one with a short label and a box.
There is a red circle in the top left corner of the image, next to a small blue square.
On the right side there is a large green triangle, and below it a yellow rectangle.
Objects are ordered from the top of the image to the bottom, then from left to right.
A cat sits on the table near the window. Two people are walking a dog in the park.
The car is parked in front of the house. A bird flies over the river at sunset.
This is a photo of a kitchen with a white refrigerator, a wooden chair and a plate of food.
Count the number of shapes, find their colors, and write the answer as one line of JSON.
Each coordinate is an integer between zero and nine hundred ninety nine.
The model answers with a list of objects; when nothing is there the list is empty.
Please describe the scene: a person holding an umbrella stands on the street in the rain.
In the background there are trees, buildings, a bus, a bicycle and a traffic light.
You are a helpful assistant. What can you see in this picture? I can see several objects.
"""


def tokenizer_corpus() -> list[str]:
    """The small, fixed training corpus of the tiny tokenizer (deterministic order)."""
    from coordexp.prompt import PromptSpec, format_coordjson

    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    lines += LABELS + [f"a {lab}" for lab in LABELS] + [f'"desc": "{lab}"' for lab in LABELS]
    for coord_format in ("tokens", "numeric"):
        for field_order in ("desc_first", "geometry_first"):
            spec = PromptSpec(coord_format=coord_format, field_order=field_order)
            lines += [spec.system(), spec.user_text]
            if coord_format == "numeric":
                objs = [{"desc": LABELS[i], "bbox_2d": [10 * i, 20 * i, 100 + 10 * i, 200 + 20 * i]} for i in range(12)]
                objs += [{"desc": LABELS[-1], "poly": [1, 2, 30, 4, 50, 600, 7, 800]}]
                lines.append(format_coordjson(objs, spec))
    lines += ['{"objects": []}', '{"objects": [{"desc": "', '", "bbox_2d": [', '], "poly": [', "]}]}", "]}, {"]
    return lines


def build_tokenizer(num_merges: int = DEFAULT_NUM_MERGES, extra_texts: list[str] | None = None,
                    family: str = "qwen3_vl", chat_template: str | None = None):
    """A small byte-level BPE tokenizer with the Qwen pre-tokenizer, as a transformers
    `Qwen2Tokenizer` (tokenizers backend).

    Layout like the real Qwen vocabularies: the BPE vocabulary (256 byte symbols + merges) first,
    then the Qwen special tokens (`coordexp.tokens.QWEN_SPECIAL_TOKENS`, in that order), then the
    1000 coord tokens, all added as special tokens. eos `<|im_end|>`, pad `<|endoftext|>`, no unk
    (byte-level: every text encodes). `extra_texts` are added to the BPE training corpus.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import AddedToken, Qwen2Tokenizer

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {', '.join(FAMILIES)}")
    raw = Tokenizer(BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, min_frequency=1, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    raw.train_from_iterator(tokenizer_corpus() + list(extra_texts or []), trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    specials = list(QWEN_SPECIAL_TOKENS) + coord_tokens()
    added = {len(vocab) + i: AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                        single_word=False) for i, t in enumerate(specials)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=IM_END,
                         pad_token=ENDOFTEXT, errors="replace", model_max_length=32768,
                         added_tokens_decoder=added,
                         # like the released tokenizer_config.json (the coord tokens stay plain special
                         # added tokens: `skip_special_tokens=True` would drop them)
                         extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t != ENDOFTEXT])
    got = tok.convert_tokens_to_ids(specials)
    if got != list(added):
        raise RuntimeError("special tokens did not get the expected ids")
    tok.chat_template = chat_template if chat_template is not None else CHAT_TEMPLATES[family]
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids(VISION_START),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids(VISION_END),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    }
    unk = tokenizer.unk_token_id
    for name, value in ids.items():
        if value is None or (unk is not None and value == unk and name != "pad_token_id"):
            raise ValueError(f"tokenizer lacks the token for {name}")
    return ids


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

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
        vocab_size = vocab_size or -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    ids = dict(token_ids)
    init_std = s.get("init_std", DEFAULT_INIT_STD)
    head_dim = s["head_dim"]
    mrope = list(s.get("mrope_section") or _mrope_section(family, head_dim))
    if sum(mrope) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    if s["vision_hidden"] % s["vision_heads"]:
        raise ValueError("vision_hidden must be divisible by vision_heads")
    max_side = s.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    text: dict[str, Any] = dict(
        vocab_size=int(vocab_size),
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
    top = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if k in ids}
    tie = bool(s.get("tie_word_embeddings", False))
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": float(s.get("rope_theta", 5_000_000.0)),
            "mrope_section": mrope, "mrope_interleaved": True})
        side = -(-max_side // s["patch_size"])  # patches per side of the largest image
        deepstack = s.get("deepstack_visual_indexes")
        if deepstack is None:
            deepstack = list(range(min(s["vision_layers"], 3)))
        vision.update(hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=list(deepstack),
                      num_position_embeddings=int(s.get("num_position_embeddings", side * side)))
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **top)

    from transformers import Qwen2_5_VLConfig

    if head_dim * s["text_heads"] != s["text_hidden"]:
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


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def _init_weights(model, seed: int, std: float, real_vocab: int) -> None:
    """Deterministic re-initialisation: every matrix ~ N(0, std), biases 0, norm weights 1.
    Embedding / lm_head rows past the tokenizer's vocabulary are zeroed so they are never sampled."""
    import torch

    # Norm scales are found by module type, not by name: Qwen2.5-VL's merger calls its RMSNorm `ln_q`.
    norm_weights = {f"{mod_name}.weight" if mod_name else "weight" for mod_name, mod in model.named_modules()
                    if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None}
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
            elif name in norm_weights or ("norm" in name and name.endswith("weight")):
                p.fill_(1.0)
            else:
                p.zero_()
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and emb.weight.shape[0] > real_vocab:
                emb.weight[real_vocab:].zero_()


def build_model(config, seed: int = 0, init_std: float | None = None, real_vocab: int | None = None):
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        torch.manual_seed(int(seed))
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    std = init_std if init_std is not None else config.get_text_config().initializer_range
    _init_weights(model, seed, std, real_vocab or config.get_text_config().vocab_size)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------

def _video_processor_config(family: str, image_processor) -> dict[str, Any]:
    """video_preprocessor_config.json, so that AutoProcessor (which needs torchvision for videos)
    builds the family's video processor with the same patch geometry."""
    base = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
        "merge_size": image_processor.merge_size, "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size, "resample": 3,
        "rescale_factor": 1 / 255, "size": dict(image_processor.size),
    }
    if family == "qwen3_vl":
        return {**base, "do_sample_frames": True, "fps": 2, "min_frames": 4, "max_frames": 768,
                "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}
    return {**base, "do_sample_frames": False, "min_frames": 4, "max_frames": 768,
            "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor"}


PROCESSOR_CLASSES = {"qwen3_vl": "Qwen3VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def file_hashes(out_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in a checkpoint folder (name -> hex)."""
    out = Path(out_dir)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def build_tiny_checkpoint(out_dir: str | os.PathLike, family: str = "qwen3_vl", seed: int = 0,
                          size: str | dict[str, Any] = "tiny", *, num_merges: int = DEFAULT_NUM_MERGES,
                          min_pixels: int | None = None, max_pixels: int | None = None,
                          command: str | None = None, **overrides: Any) -> Path:
    """Build and save a tiny random checkpoint into `out_dir`; returns the folder.

    Deterministic: the same arguments give byte-identical files. `overrides` are the size keys
    accepted by `make_config` (e.g. text_hidden=128, patch_size=8, tie_word_embeddings=True).
    """
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(num_merges=num_merges, family=family)
    ids = special_token_ids(tokenizer)
    real_vocab = len(tokenizer)
    vocab_size = -(-real_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    spec = resolve_size(size, **overrides)
    config = make_config(family, spec, vocab_size=vocab_size, token_ids=ids)
    image_processor = make_image_processor(family, spec, min_pixels=min_pixels, max_pixels=max_pixels)

    model = build_model(config, seed=seed, init_std=spec.get("init_std", DEFAULT_INIT_STD), real_vocab=real_vocab)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
        pad_token_id=ids["pad_token_id"], do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # compact tokenizer.json (same content as the pretty-printed one; keeps the folder < 2 MB)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    image_processor.save_pretrained(out)
    # processor files: what AutoProcessor reads (the chat template is saved with the tokenizer too)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = PROCESSOR_CLASSES[family]
    _write_json(out / "preprocessor_config.json", pre)
    _write_json(out / "video_preprocessor_config.json", _video_processor_config(family, image_processor))
    _write_json(out / "processor_config.json", {"processor_class": PROCESSOR_CLASSES[family]})
    (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    _write_model_card(out, family=family, seed=seed, spec=spec, config=config, real_vocab=real_vocab,
                      command=command or cli_command(family, seed, size, num_merges=num_merges,
                                                     min_pixels=min_pixels, max_pixels=max_pixels, **overrides),
                      n_params=sum(p.numel() for p in model.parameters()), image_processor=image_processor)
    return out


def cli_command(family: str = "qwen3_vl", seed: int = 0, size: str | dict[str, Any] = "tiny", *,
                num_merges: int = DEFAULT_NUM_MERGES, min_pixels: int | None = None, max_pixels: int | None = None,
                **overrides: Any) -> str:
    """The `coordexp-make-tiny` command line that rebuilds these files (OUT = the folder)."""
    parts = ["coordexp-make-tiny", "OUT", "--seed", str(seed), "--family", family]
    values = {**overrides, "min_pixels": min_pixels, "max_pixels": max_pixels}
    if isinstance(size, str):
        if size != "tiny":
            parts += ["--size", size]
    else:  # a dict: spell out every key that differs from the tiny preset
        values = {**{k: v for k, v in dict(size).items() if SIZES["tiny"].get(k) != v}, **values}
    if num_merges != DEFAULT_NUM_MERGES:
        parts += ["--num-merges", str(num_merges)]
    for k in sorted(values):
        v = values[k]
        flag = k.replace("_", "-")
        if v is None or v is False:
            continue
        if flag not in _CLI_KEYS:
            return " ".join(parts) + f"  # plus Python overrides: {k}={v!r}"
        parts += [f"--{flag}"] if v is True else [f"--{flag}", str(v)]
    return " ".join(parts)


def _write_model_card(out: Path, *, family: str, seed: int, spec: dict[str, Any], config, real_vocab: int,
                      command: str, n_params: int, image_processor) -> None:
    text = config.get_text_config()
    size = image_processor.size
    arch = "Qwen3VLForConditionalGeneration" if family == "qwen3_vl" else "Qwen2_5_VLForConditionalGeneration"
    card = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [coordexp, tiny-random, test-fixture]
---
# Tiny random {family} checkpoint (CoordExp Serve test fixture)

A randomly initialised `{arch}` with a locally trained byte-level BPE
tokenizer, built fully offline by `coordexp.tiny`. It produces meaningless text: use it to test loading, the input
pipeline, generation, export and serving, never for quality.

- seed: {seed}
- command: `{command}`
- parameters: {n_params:,}
- text: hidden {text.hidden_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} heads,
  {text.num_key_value_heads} KV heads
- vision: hidden {spec['vision_hidden']}, {spec['vision_layers']} layers, patch {spec['patch_size']},
  merge {spec['merge_size']}, temporal patch {spec['temporal_patch_size']}
- vocabulary: {real_vocab} tokens (BPE + Qwen special tokens + 1000 coord tokens
  `<|coord_0|>`..`<|coord_999|>`, all single special tokens), embedding rows {text.vocab_size}
- weights: N(0, {spec.get('init_std', DEFAULT_INIT_STD)}) for every matrix, float32, safetensors
- eos `<|im_end|>`, pad `<|endoftext|>`; the Qwen chat template of the family
- image processor: `Qwen2VLImageProcessorPil`, min_pixels {size['shortest_edge']}, max_pixels
  {size['longest_edge']} (images are resized to multiples of {spec['patch_size'] * spec['merge_size']} px)

Same command and seed give byte-identical files.

```python
from transformers import AutoModelForImageTextToText
from coordexp.processor import CoordExpProcessor  # AutoProcessor also works where torchvision is installed
model = AutoModelForImageTextToText.from_pretrained("OUT")
proc = CoordExpProcessor.from_pretrained("OUT")
inputs = proc.encode([image], spec)  # input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw
text = proc.decode(model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:])
```
"""
    (out / "README.md").write_text(card, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

_CLI_KEYS = {k.replace("_", "-") for k in SIZES["tiny"]} | {"init-std", "max-image-side", "tie-word-embeddings",
                                                             "min-pixels", "max-pixels"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="coordexp-make-tiny",
        description="Build a tiny random Qwen3-VL / Qwen2.5-VL checkpoint (offline, deterministic).")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=FAMILIES, default="qwen3_vl")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="preset; the flags below override it")
    for key in SIZES["tiny"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, dest=key)
    p.add_argument("--init-std", type=float, default=None, dest="init_std")
    p.add_argument("--max-image-side", type=int, default=None, dest="max_image_side",
                   help="max_pixels = side^2 (default %d)" % DEFAULT_MAX_IMAGE_SIDE)
    p.add_argument("--min-pixels", type=int, default=None, dest="min_pixels",
                   help="image processor min_pixels (default: 4 * (patch*merge)^2)")
    p.add_argument("--max-pixels", type=int, default=None, dest="max_pixels",
                   help="image processor max_pixels (default: max-image-side^2)")
    p.add_argument("--tie-word-embeddings", action="store_true", default=None, dest="tie_word_embeddings")
    p.add_argument("--num-merges", type=int, default=DEFAULT_NUM_MERGES)
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in list(SIZES["tiny"]) + ["init_std", "max_image_side",
                                                                     "tie_word_embeddings"]}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    out = build_tiny_checkpoint(args.out, family=args.family, seed=args.seed, size=args.size,
                                num_merges=args.num_merges, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                **overrides)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({args.family}, seed {args.seed}, {total / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
