"""Coordinate tokens `<|coord_0|>` ... `<|coord_999|>` and the Qwen special tokens."""
from __future__ import annotations

import re

NUM_COORD_TOKENS = 1000
COORD_TOKEN_RE = re.compile(r"<\|coord_(\d{1,4})\|>")
_EXACT_RE = re.compile(r"^\s*<\|coord_(\d{1,4})\|>\s*$")

# Qwen2.5-VL / Qwen3-VL special tokens, in the order their tokenizers define them.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


def coord_token(k: int) -> str:
    if not 0 <= k < NUM_COORD_TOKENS:
        raise ValueError(f"coordinate {k} is outside 0..{NUM_COORD_TOKENS - 1}")
    return f"<|coord_{k}|>"


def coord_tokens() -> list[str]:
    return [coord_token(k) for k in range(NUM_COORD_TOKENS)]


def coord_token_value(text: str) -> int | None:
    """`"<|coord_17|>"` -> 17; anything else -> None. Values above 999 are returned as read
    so that validation (not this lookup) reports them as invalid_coord."""
    m = _EXACT_RE.match(text)
    return int(m.group(1)) if m else None
