"""The prompt a checkpoint was trained with, from its training run's own record.

A CoordExp training run writes `resolved_config.json` into its output folder (the parent of every
`checkpoint-N`):

    {"schema_version": 1, "config_path": ..., "base_config_path": ..., "dataset_seed": ...,
     "resolved": {"template": {"system": TEXT, "max_pixels": N, ...},
                  "custom": {"user_prompt": TEXT, "object_field_order": "desc_first" | "geometry_first",
                             "object_ordering": "sorted" | "random", "coord_tokens": {"enabled": bool},
                             "bbox_format": "xyxy" | "cxcywh" | "cxcy_logw_logh",
                             "extra": {"prompt_variant": KEY}, ...},
                  "prompts": {"system": TEXT, "user": TEXT, ...}, ...}}

`checkpoint_prompt` is the one place that turns a checkpoint folder (+ the user's prompt flags) into
the `PromptSpec` to serve: the record's texts verbatim and its controls, image part first (as trained),
the flags on top. The exporter and the local engines both call it. A CoordExp *inference* run writes a
file of the same name (keys `stages`, `infer`): it is recognised and refused by name, and
`expected_prompt_hash` reads its `infer.prompt_template_hash`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from coordexp.grid import check_bbox_format
from coordexp.prompt import PROMPT_OPTIONS, PromptSpec

RECORD_FILE = "resolved_config.json"
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class TrainingRecordError(ValueError):
    """A training-run record that cannot be used, or a checkpoint without one: the message says what
    was looked for and what to pass instead."""


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run's `resolved_config.json` says about serving its checkpoints."""

    path: str
    prompt: PromptSpec  # recorded texts and controls, image first
    max_pixels: int | None = None  # resolved.template.max_pixels: the image budget it trained with
    config_path: str | None = None


@dataclass(frozen=True)
class PromptChoice:
    """The prompt to serve and where it came from (recorded in the export manifest)."""

    prompt: PromptSpec
    source: str  # "training_record" | "flags" | "builtin"
    record: TrainingRecord | None = None
    overrides: tuple[str, ...] = ()  # the prompt flags that replaced recorded values

    @property
    def max_pixels(self) -> int | None:
        return self.record.max_pixels if self.record else None

    def to_manifest(self) -> dict[str, Any]:
        return {"source": self.source, "record": self.record.path if self.record else None,
                "record_config_path": self.record.config_path if self.record else None,
                "overrides": list(self.overrides), "image_max_pixels": self.max_pixels,
                "prompt_template_hash": self.prompt.template_hash()}

    def describe(self) -> str:
        if self.source == "training_record":
            how = f"the training run's record {self.record.path}"
            if self.overrides:
                how += f", with {', '.join(self.overrides)} from the command line"
            return how
        return "the prompt flags" if self.source == "flags" else "the built-in prompt (--builtin-prompt)"


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _text(resolved: dict, path: str, keys: tuple[str, ...], what: str) -> str:
    for k in keys:
        v = _get(resolved, k)
        if v is not None:
            if not isinstance(v, str) or not v.strip():
                raise TrainingRecordError(f"{path}: resolved.{k} (the {what}) must be a non-empty string")
            return v
    raise TrainingRecordError(f"{path}: no {what} (looked for {' and '.join('resolved.' + k for k in keys)})")


def _choice(value: Any, allowed: tuple[str, ...], path: str, key: str, default: str | None) -> str:
    if value is None:
        if default is None:
            raise TrainingRecordError(f"{path}: resolved.{key} is missing (one of {', '.join(allowed)})")
        return default
    norm = str(value).strip().lower()
    if norm not in allowed:
        raise TrainingRecordError(f"{path}: resolved.{key} is {value!r}; expected one of {', '.join(allowed)}")
    return norm


def read_training_record(path: str | os.PathLike) -> TrainingRecord:
    """Parse a training run's `resolved_config.json`; TrainingRecordError naming the file and the key."""
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise TrainingRecordError(f"cannot read the training record {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise TrainingRecordError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TrainingRecordError(f"{path}: expected a JSON object, got {type(data).__name__}")
    resolved = data.get("resolved")
    if not isinstance(resolved, dict):
        if "infer" in data or "stages" in data:
            raise TrainingRecordError(f"{path} is a CoordExp inference run's record (it has 'stages'/'infer', no "
                                      "'resolved'), not a training run's: pass the training run's output folder "
                                      "record with --run-config (its prompt hash can be checked with "
                                      "--expect-prompt-hash)")
        raise TrainingRecordError(f"{path}: no 'resolved' object: not a CoordExp training run's {RECORD_FILE}")
    system = _text(resolved, path, ("template.system", "prompts.system"), "system prompt")
    user = _text(resolved, path, ("custom.user_prompt", "prompts.user"), "user prompt")
    variant = _get(resolved, "custom.extra.prompt_variant")
    variant = (str(variant).strip().lower() if variant is not None else "") or "default"
    field_order = _choice(_get(resolved, "custom.object_field_order"), ("desc_first", "geometry_first"), path,
                          "custom.object_field_order", None)
    ordering = _choice(_get(resolved, "custom.object_ordering"), ("sorted", "random"), path,
                       "custom.object_ordering", "sorted")
    enabled = _get(resolved, "custom.coord_tokens.enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise TrainingRecordError(f"{path}: resolved.custom.coord_tokens.enabled must be true or false, got {enabled!r}")
    raw_format = _get(resolved, "custom.bbox_format")
    try:
        bbox_format = check_bbox_format(raw_format) if raw_format is not None else "xyxy"
    except ValueError as e:
        raise TrainingRecordError(f"{path}: resolved.custom.bbox_format: {e}") from None
    max_pixels = _get(resolved, "template.max_pixels")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise TrainingRecordError(f"{path}: resolved.template.max_pixels must be a positive integer, got {max_pixels!r}")
    prompt = PromptSpec(coord_format="numeric" if enabled is False else "tokens", field_order=field_order,
                        object_order=ordering, user_text=user, system_text=system, bbox_format=bbox_format,
                        layout="image_first", run_variant=variant)
    config_path = data.get("config_path")
    return TrainingRecord(path=path, prompt=prompt, max_pixels=max_pixels,
                          config_path=config_path if isinstance(config_path, str) else None)


def find_training_record(ckpt: str | os.PathLike) -> str | None:
    """`resolved_config.json` beside the checkpoint's weights, else in its parent (the run folder)."""
    ckpt = os.path.abspath(os.fspath(ckpt))
    for folder in (ckpt, os.path.dirname(ckpt)):
        cand = os.path.join(folder, RECORD_FILE)
        if os.path.isfile(cand):
            return cand
    return None


def _given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """{PromptSpec field: value} of the prompt flags given (argparse dests; None = not given)."""
    return {o.field: flags[o.dest] for o in PROMPT_OPTIONS if flags.get(o.dest) is not None}


def checkpoint_prompt(ckpt: str | os.PathLike, flags: Mapping[str, Any] | None = None,
                      run_config: str | os.PathLike | None = None, builtin: bool = False) -> PromptChoice:
    """The prompt to serve `ckpt` with.

    - `run_config` (a training record file or the folder holding it), else the record found beside
      the checkpoint or in its parent: its prompt, with the given `flags` on top (named in `overrides`);
    - no record: the given flags over the built-in prompt, or the built-in prompt with `builtin=True`;
    - no record, no flags, not `builtin`: TrainingRecordError saying what was looked for.
    `builtin` with a record present is an error too (say which one you mean).
    """
    given = _given(flags or {})
    if run_config is not None:
        path = os.fspath(run_config)
        path = os.path.join(path, RECORD_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise TrainingRecordError(f"--run-config {run_config}: no such file")
    else:
        path = find_training_record(ckpt)
    if path is not None:
        if builtin:
            raise TrainingRecordError(f"--builtin-prompt: {ckpt} has a training record ({path}); serve its prompt "
                                      "(leave --builtin-prompt out) or name the texts with --prompt/--system-prompt")
        record = read_training_record(path)
        prompt = dataclasses.replace(record.prompt, **given) if given else record.prompt
        flags_given = tuple(o.flag for o in PROMPT_OPTIONS if o.field in given)
        return PromptChoice(prompt, "training_record", record, flags_given)
    if given:
        return PromptChoice(dataclasses.replace(PromptSpec(), **given), "flags")
    if builtin:
        return PromptChoice(PromptSpec(), "builtin")
    folder = os.path.abspath(os.fspath(ckpt))
    raise TrainingRecordError(
        f"{folder} has no training-run record: looked for {RECORD_FILE} in {folder} and in its parent "
        f"{os.path.dirname(folder)} (CoordExp writes it into the training run's output folder). Serving it with "
        "a prompt it was not trained on gives wrong answers without any error. Pass --run-config "
        "PATH/resolved_config.json, or the exact texts with --system-prompt and --prompt (plus --coord-format, "
        "--field-order, --object-order, --bbox-format as trained), or --builtin-prompt for this project's own "
        "prompt (tiny and demo checkpoints)")


def expected_prompt_hash(value: str) -> str:
    """`--expect-prompt-hash`: a sha256 hex string, or a CoordExp inference run's `resolved_config.json` /
    `summary.json` (or its folder), whose `infer.prompt_template_hash` is read."""
    v = value.strip()
    if _HASH_RE.match(v.lower()):
        return v.lower()
    path = v
    if os.path.isdir(path):
        path = next((p for p in (os.path.join(v, RECORD_FILE), os.path.join(v, "summary.json")) if os.path.isfile(p)),
                    os.path.join(v, RECORD_FILE))
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainingRecordError(f"--expect-prompt-hash {value}: neither a sha256 hex string nor a readable JSON "
                                  f"file ({e})") from None
    found = _get(data, "infer.prompt_template_hash")
    if not isinstance(found, str) or not _HASH_RE.match(found):
        raise TrainingRecordError(f"--expect-prompt-hash {value}: {path} has no infer.prompt_template_hash")
    return found


def training_record_dict(prompt: PromptSpec, max_pixels: int | None = None,
                         config_path: str = "coordexp-serve") -> dict[str, Any]:
    """A `resolved_config.json` in the training-run layout for a prompt of ours (the demo and tiny
    checkpoints carry one, so they take the same path as a real CoordExp checkpoint). "as_given" object
    order is recorded as CoordExp's "random" (its only other ordering)."""
    template: dict[str, Any] = {"system": prompt.system()}
    if max_pixels is not None:
        template["max_pixels"] = int(max_pixels)
    custom: dict[str, Any] = {
        "user_prompt": prompt.user_text, "object_field_order": prompt.field_order,
        "object_ordering": "sorted" if prompt.object_order == "sorted" else "random",
        "coord_tokens": {"enabled": prompt.coord_format == "tokens"}, "bbox_format": prompt.bbox_format}
    if prompt.run_variant and prompt.run_variant != "default":
        custom["extra"] = {"prompt_variant": prompt.run_variant}
    return {"schema_version": 1, "config_path": config_path, "base_config_path": "", "dataset_seed": 0,
            "resolved": {"template": template, "custom": custom,
                         "prompts": {"system": prompt.system(), "user": prompt.user_text}}}


def write_training_record(folder: str | os.PathLike, prompt: PromptSpec, max_pixels: int | None = None,
                          config_path: str = "coordexp-serve") -> str:
    path = os.path.join(os.fspath(folder), RECORD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(training_record_dict(prompt, max_pixels, config_path), f, ensure_ascii=False, indent=2)
        f.write("\n")
    return path
