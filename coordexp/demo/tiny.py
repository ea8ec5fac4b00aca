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

The parts live next to this module: `tokenizer` (BPE tokenizer, corpus), `chat_templates`,
`configs` (sizes, model configs, image processors); their public names are re-exported here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from coordexp.demo.chat_templates import (  # re-exported (see __all__)
    CHAT_TEMPLATES,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE_SHA256,
)
from coordexp.demo.configs import (  # re-exported (see __all__)
    DEFAULT_INIT_STD,
    DEFAULT_MAX_IMAGE_SIDE,
    SIZES,
    VOCAB_MULTIPLE,
    make_config,
    make_image_processor,
    padded_vocab_size,
    resolve_size,
)
from coordexp.demo.tokenizer import (  # re-exported (see __all__)
    COLORS,
    DEFAULT_NUM_MERGES,
    FAMILIES,
    LABELS,
    SHAPES,
    VIDEO_PAD,
    build_tokenizer,
    special_token_ids,
    tokenizer_corpus,
)

__all__ = [
    "CHAT_TEMPLATES", "COLORS", "DEFAULT_INIT_STD", "DEFAULT_MAX_IMAGE_SIDE", "DEFAULT_NUM_MERGES", "FAMILIES",
    "LABELS", "PROCESSOR_CLASSES", "QWEN2_5_VL_CHAT_TEMPLATE", "QWEN3_VL_CHAT_TEMPLATE",
    "QWEN3_VL_CHAT_TEMPLATE_SHA256", "SHAPES", "SIZES", "VIDEO_PAD", "VOCAB_MULTIPLE", "build_model",
    "build_tiny_checkpoint", "build_tokenizer", "cli_command", "file_hashes", "main", "make_config",
    "make_image_processor", "padded_vocab_size", "resolve_size", "special_token_ids", "tokenizer_corpus",
]

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
                          command: str | None = None, training_record: bool = True, **overrides: Any) -> Path:
    """Build and save a tiny random checkpoint into `out_dir`; returns the folder.

    Deterministic: the same arguments give byte-identical files. `overrides` are the size keys
    accepted by `make_config` (e.g. text_hidden=128, patch_size=8, tie_word_embeddings=True).
    `training_record`: also write a `resolved_config.json` in CoordExp's training-run layout with the
    built-in prompt (what the demo trains with), so the exporter serves it like a real checkpoint.
    """
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(num_merges=num_merges, family=family)
    ids = special_token_ids(tokenizer)
    real_vocab = len(tokenizer)
    vocab_size = padded_vocab_size(real_vocab)
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
    if training_record:
        from coordexp.prompt import PromptSpec
        from coordexp.training_record import write_training_record

        write_training_record(out, PromptSpec(), max_pixels=int(image_processor.size["longest_edge"]),
                              config_path="coordexp-make-tiny")
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
tokenizer, built fully offline by `coordexp.demo.tiny`. It produces meaningless text: use it to test loading, the input
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
