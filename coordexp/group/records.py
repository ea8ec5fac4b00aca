"""Stage-A lines: the answer cleaner, the record writer (current and older shape), the validator
(the group-level stage's rules) and the reader used by `--resume`.

Current shape (upstream today): `group_id`, `mission`, `label` (pass|fail), `images` (file names),
`per_image` with keys exactly `image_1 .. image_N`, non-empty values; we add `raw_texts` and
`clean_texts` (and `preds` in detect mode). Older shape: `图片_1 .. 图片_N` keys, `timestamp`, and
(written by the old tool) absolute image paths.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from coordexp.tokens import ENDOFTEXT, IM_END, IMAGE_PAD, VISION_END, VISION_START

LABELS = ("pass", "fail")
CURRENT_PREFIX, LEGACY_PREFIX = "image_", "图片_"
# Per-image error codes of the errors file.
UNREADABLE = "image_load_failed"
TOO_LARGE = "image_too_large"
GENERATION_FAILED = "generation_failed"
EMPTY_ANSWER = "empty_answer"
PARSE_FAILED = "parse_failed"  # --task detect only: text mode keeps free text as it is
EMPTY_GROUP = "empty_group"

_CHAT_TOKENS = ("<|im_start|>", IM_END, ENDOFTEXT, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>",
                "<|vision_pad|>")
_ROLE_HEADER = re.compile(r"<\|im_start\|>(?:system|user|assistant)[ \t]*\n?")
_THINK = re.compile(r"<think>.*?</think>|</?think>", re.S)
_SPACES = re.compile(r"[ \t\u3000\xa0]+")


def clean_text(raw: str) -> str:
    """The answer without the chat template's special tokens (role headers, end/vision tokens, an
    empty or closed think block) and with whitespace normalised: each line stripped, runs of
    spaces collapsed, blank lines dropped."""
    text = _ROLE_HEADER.sub("", raw or "")
    text = _THINK.sub("", text)
    for tok in _CHAT_TOKENS:
        text = text.replace(tok, " ")
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


class RecordError(ValueError):
    """A Stage-A line that breaks the rules (the message names the line and the field)."""


@dataclass
class StageARecord:
    """One validated line, normalised to the current shape (file names, `image_N` keys)."""

    group_id: str
    mission: str
    label: str
    images: list[str]
    per_image: dict[str, str]
    shape: str = "current"  # "current" | "legacy": how the line was written
    extra: dict[str, Any] = field(default_factory=dict)  # every other key, as read

    @property
    def key(self) -> tuple[str, str, str, tuple[str, ...]]:
        """What identifies a group across runs (resubmissions differ by label)."""
        return (self.mission, self.label, self.group_id, tuple(self.images))


def _need(d: dict, key: str, kind: type, where: str) -> Any:
    if key not in d or d[key] is None:
        raise RecordError(f"{where}: {key!r} is required")
    if not isinstance(d[key], kind):
        raise RecordError(f"{where}: {key!r} must be a {kind.__name__}")
    return d[key]


def _per_image(raw: Any, n: int, where: str) -> tuple[dict[str, str], str]:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: 'per_image' must be a mapping")
    prefix = LEGACY_PREFIX if any(str(k).startswith(LEGACY_PREFIX) for k in raw) else CURRENT_PREFIX
    expected = [f"{prefix}{i}" for i in range(1, n + 1)]
    if sorted(raw) != sorted(expected):
        raise RecordError(f"{where}: 'per_image' keys must be exactly {expected[0]} .. {expected[-1]} "
                          f"({n} images); got {sorted(raw, key=str)}")
    out = {}
    for i, k in enumerate(expected, start=1):
        v = raw[k]
        if not isinstance(v, str) or not v.strip():
            raise RecordError(f"{where}: per_image.{k} must be a non-empty text")
        out[f"{CURRENT_PREFIX}{i}"] = v
    return out, "legacy" if prefix == LEGACY_PREFIX else "current"


def validate_record(value: Any, where: str = "stage_a") -> StageARecord:
    """The group-level stage's rules, for both shapes; RecordError names the field."""
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected a JSON object")
    gid, mission, label = (_need(value, k, str, where) for k in ("group_id", "mission", "label"))
    if label not in LABELS:
        raise RecordError(f"{where}: 'label' must be pass or fail, got {label!r}")
    images = _need(value, "images", list, where)
    if not images or not all(isinstance(x, str) and x for x in images):
        raise RecordError(f"{where}: 'images' must be a non-empty list of file names")
    per_image, shape = _per_image(value.get("per_image"), len(images), where)
    for key in ("raw_texts", "clean_texts"):
        if key in value and (not isinstance(value[key], list) or len(value[key]) != len(images)):
            raise RecordError(f"{where}: {key!r} must list one text per image ({len(images)})")
    extra = {k: v for k, v in value.items() if k not in ("group_id", "mission", "label", "images", "per_image")}
    return StageARecord(group_id=gid, mission=mission, label=label, images=[os.path.basename(x) for x in images],
                        per_image=per_image, shape=shape, extra=extra)


def make_record(group: Any, raw_texts: Sequence[str], clean_texts: Sequence[str], legacy: bool = False,
                preds: Sequence[list] | None = None) -> dict[str, Any]:
    """The line for a group whose every image got a non-empty answer (`group`: a discover.Group)."""
    prefix = LEGACY_PREFIX if legacy else CURRENT_PREFIX
    rec: dict[str, Any] = {"group_id": group.group_id, "mission": group.mission, "label": group.label,
                           "images": group.names,
                           "per_image": {f"{prefix}{i}": t for i, t in enumerate(clean_texts, start=1)},
                           "raw_texts": list(raw_texts), "clean_texts": list(clean_texts)}
    if preds is not None:
        rec["preds"] = [list(p) for p in preds]
    if legacy:
        rec["timestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    validate_record(rec, f"group {group.where}")  # never write a line downstream would refuse
    return rec


def error_record(group: Any, errors: Sequence[dict[str, Any]], raw_texts: Sequence[str | None] = ()) -> dict[str, Any]:
    """The errors-file line of a group that is not written to the main file."""
    return {"group_id": group.group_id, "mission": group.mission, "label": group.label, "folder": group.folder,
            "images": group.names, "errors": list(errors), "raw_texts": list(raw_texts)}


def read_lines(path: str) -> tuple[list[tuple[int, Any]], int]:
    """(line number, parsed JSON) of every complete line and the byte length they take; a torn last
    line (a run killed while writing) is left out. A bad line in the middle raises RecordError."""
    rows, size, torn = [], 0, None
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            if torn is not None:
                raise RecordError(f"{path}:{torn}: not valid JSON")
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                torn = no
                continue
            if not raw.endswith(b"\n"):
                torn = no
                continue
            rows.append((no, value))
            size += len(raw)
    return rows, size


def read_stage_a(path: str) -> list[StageARecord]:
    """Every line of a Stage-A file (either shape), validated; RecordError names the bad line."""
    rows, _ = read_lines(path)
    return [validate_record(v, f"{path}:{no}") for no, v in rows]
