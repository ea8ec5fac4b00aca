"""The tiny checkpoints' tokenizer: a small byte-level BPE trained offline on a fixed corpus.

`build_tokenizer()` trains it (the Qwen pre-tokenizer; up to 600 merges), adds the Qwen special
tokens and the 1000 coord tokens as single special tokens and sets the family's chat template.
Same arguments -> the same vocabulary and merges.
"""
from __future__ import annotations

import json

from coordexp.demo.chat_templates import CHAT_TEMPLATES
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
DEFAULT_NUM_MERGES = 600

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

