"""transformers-4-readable copies of a transformers-5 checkpoint's config.json / tokenizer_config.json.

TensorRT-LLM <= 1.2.x runs transformers 4.x (1.2.1: 4.57.3), which cannot read what transformers 5
writes (shared/notes/gpu-serving.md):
- `tokenizer_config.json` `"extra_special_tokens": [...]` (a list): 4.x calls `.keys()` on it
  (AttributeError). The 4.x form of the same tokens is `additional_special_tokens` (a list).
- `config.json` `rope_parameters`: TensorRT-LLM's Qwen-VL code sets `rope_scaling['type'] = 'mrope'`
  and reads `rope_scaling['mrope_section']` (TypeError when `rope_scaling` is None). The 4.x form is
  `rope_scaling = {"type": "mrope", "mrope_section": [...], ...}` with `rope_theta` beside it.

`transformers4_problems` states those 4.x rules, so a test checks the copies against them.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

TRANSFORMERS4_SUBDIR = "llm/1/transformers4"  # in the repository: the two rewritten files
FILES = ("config.json", "tokenizer_config.json")


def _rope4(section: dict[str, Any]) -> None:
    """One (sub)config: rope_parameters -> rope_scaling (+ rope_theta), in place."""
    rope = section.pop("rope_parameters", None)
    if not isinstance(rope, dict):
        return
    rope = dict(rope)
    if "rope_theta" in rope:
        section.setdefault("rope_theta", rope.pop("rope_theta"))
    if "mrope_section" in rope:  # the multimodal RoPE of the text model
        rope["type"] = "mrope"
        rope.setdefault("rope_type", "default")
    section["rope_scaling"] = rope


def config_for_transformers4(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers 4.x (and TensorRT-LLM's Qwen-VL code) reads it."""
    out = copy.deepcopy(config)
    _rope4(out)
    for key in ("text_config", "vision_config"):
        if isinstance(out.get(key), dict):
            _rope4(out[key])
    text = out.get("text_config")
    if isinstance(text, dict) and "rope_scaling" in text and "rope_scaling" not in out:
        out["rope_scaling"] = copy.deepcopy(text["rope_scaling"])  # 4.x Qwen-VL code reads the top level too
    return out


def tokenizer_config_for_transformers4(tc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(tc)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        known = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = known + [t for t in extra if t not in known]
    return out


def transformers4_problems(config: dict[str, Any], tc: dict[str, Any]) -> list[str]:
    """What transformers 4.x / TensorRT-LLM <= 1.2 would trip on (empty: readable)."""
    problems = []
    if not isinstance(tc.get("extra_special_tokens", {}), dict):
        problems.append("tokenizer_config.json: extra_special_tokens is not a dict (4.x calls .keys() on it)")
    if not isinstance(tc.get("additional_special_tokens", []), list):
        problems.append("tokenizer_config.json: additional_special_tokens is not a list")
    for where, section in (("config.json", config), ("config.json text_config", config.get("text_config") or {})):
        if "rope_parameters" in section:
            problems.append(f"{where}: rope_parameters (a transformers-5 field; 4.x reads rope_scaling)")
    text = config.get("text_config") or config
    scaling = config.get("rope_scaling") or text.get("rope_scaling")
    if not isinstance(scaling, dict) or scaling.get("type") != "mrope" or not scaling.get("mrope_section"):
        problems.append("config.json: no rope_scaling {type: mrope, mrope_section} (TensorRT-LLM's Qwen-VL code needs it)")
    if "rope_theta" not in text and "rope_theta" not in config:
        problems.append("config.json: no rope_theta")
    return problems


def write_transformers4_copies(ckpt: str, dst: str) -> list[str]:
    """The two rewritten files of `ckpt` into `dst`; ValueError when they still break the 4.x rules."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = config_for_transformers4(json.load(f))
    tc_path = os.path.join(ckpt, "tokenizer_config.json")
    tc = {}
    if os.path.isfile(tc_path):
        with open(tc_path, encoding="utf-8") as f:
            tc = tokenizer_config_for_transformers4(json.load(f))
    problems = transformers4_problems(config, tc)
    if problems:
        raise ValueError(f"{ckpt} cannot be made readable for TensorRT-LLM's transformers 4.x: {'; '.join(problems)}")
    written = []
    for name, data in zip(FILES, (config, tc)):
        if name == "tokenizer_config.json" and not data:
            continue
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        written.append(name)
    return written
