"""Typed records of the CoordExp data contracts (input JSONL, predictions; see README and eval/README.md).

This is the ONE schema module: the client, eval, vis and the Triton models import it.
Records are plain dataclasses that read from and write to the JSON dicts users already have.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable

SCHEMA_VERSION = "coordexp.v1"

GEOMETRY_TYPES = ("bbox_2d", "poly")
INVALID_GEOMETRY_KEYS = ("bbox", "polygon", "line")


class ErrorCode(str, Enum):
    """Error codes written to a prediction line's `error` field.

    The first seven are the contract's (used by CoordExp's existing tools); the rest name
    input/serving failures that the contract folds into a record-level error.
    """

    EMPTY_PRED = "empty_pred"
    INVALID_COORD = "invalid_coord"
    INVALID_GEOMETRY = "invalid_geometry"
    GENERATION_FAILED = "generation_failed"
    IMAGE_LOAD_FAILED = "image_load_failed"
    MULTI_IMAGE_NOT_SUPPORTED = "multi_image_not_supported"
    SIZE_MISMATCH = "size_mismatch"
    # Beyond the contract's list:
    INVALID_INPUT = "invalid_input"  # the JSONL line is not JSON / not an object / lacks a field
    IMAGE_TOO_LARGE = "image_too_large"  # refused before decoding (decompression-bomb guard)
    # No parse_failed: nothing recoverable from the model text is the contract's empty_pred
    # (upstream's code too), with the reason in error_message (issue 14).

    def __str__(self) -> str:  # so f"{code}" prints the wire value
        return self.value


class ContractError(ValueError):
    """A record that breaks the data contract. `code` is an ErrorCode."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class PredObject:
    """One detection: `points` are grid values (0..999) in norm1000 mode, always [x1, y1, x2, y2] for a
    box; `slots` are the four numbers the model wrote when its bbox format is a centre format."""

    type: str  # "bbox_2d" | "poly"
    points: list[int]
    desc: str
    score: float = 1.0
    slots: list[int] | None = None  # bbox_2d as written in a centre format (cx, cy, size, size)

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type, "points": list(self.points), "desc": self.desc, "score": self.score}
        if self.slots is not None:
            d["slots"] = list(self.slots)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PredObject":
        slots = d.get("slots")
        return cls(type=d["type"], points=list(d["points"]), desc=d["desc"], score=float(d.get("score", 1.0)),
                   slots=list(slots) if isinstance(slots, list) else None)


@dataclass
class GTObject:
    """A ground-truth object of an input record (coordinates as stored: grid ints)."""

    desc: str
    type: str
    points: list[float]

    @classmethod
    def from_dict(cls, d: Any, where: str = "object") -> "GTObject":
        if not isinstance(d, dict):
            raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: expected an object, got {type(d).__name__}")
        desc = d.get("desc", d.get("label"))
        if not isinstance(desc, str) or not desc.strip():
            raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: 'desc' must be a non-empty string")
        bad = [k for k in INVALID_GEOMETRY_KEYS if k in d]
        if bad:
            raise ContractError(ErrorCode.INVALID_GEOMETRY, f"{where}: geometry key {bad[0]!r} is not allowed")
        geoms = [k for k in GEOMETRY_TYPES if k in d]
        if len(geoms) != 1:
            raise ContractError(
                ErrorCode.INVALID_GEOMETRY, f"{where}: needs exactly one of bbox_2d/poly, found {geoms or 'none'}"
            )
        gtype = geoms[0]
        pts = [coord_value(v, f"{where}.{gtype}") for v in (d[gtype] or [])]
        check_arity(gtype, pts, where)
        return cls(desc=desc, type=gtype, points=pts)

    def to_dict(self) -> dict[str, Any]:
        return {"desc": self.desc, self.type: list(self.points)}


def coord_value(v: Any, where: str) -> float:
    """A coordinate as stored in *.norm.jsonl (int) or *.coord.jsonl ("<|coord_k|>")."""
    from coordexp.tokens import coord_token_value  # local: tokens imports nothing heavy either

    if isinstance(v, str):
        k = coord_token_value(v)
        if k is None:
            raise ContractError(ErrorCode.INVALID_COORD, f"{where}: {v!r} is not a coordinate")
        return k
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ContractError(ErrorCode.INVALID_COORD, f"{where}: {v!r} is not a number")
    return v


def check_arity(gtype: str, pts: list, where: str) -> None:
    if gtype == "bbox_2d" and len(pts) != 4:
        raise ContractError(ErrorCode.INVALID_GEOMETRY, f"{where}: bbox_2d needs 4 numbers, got {len(pts)}")
    if gtype == "poly" and (len(pts) < 6 or len(pts) % 2):
        raise ContractError(
            ErrorCode.INVALID_GEOMETRY, f"{where}: poly needs an even count >= 6 of numbers, got {len(pts)}"
        )


@dataclass
class InputRecord:
    """One line of an input JSONL dataset. `images` are relative to the JSONL's folder."""

    images: list[str]
    width: int
    height: int
    objects: list[GTObject] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # summary, metadata, ...: carried through

    @classmethod
    def from_dict(cls, d: Any, line_no: int | None = None) -> "InputRecord":
        where = f"line {line_no}" if line_no is not None else "record"
        if not isinstance(d, dict):
            raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("images", "width", "height") if k not in d]
        if missing:
            raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: missing field(s) {', '.join(missing)}")
        images = d["images"]
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: 'images' must be a non-empty list of paths")
        for key in ("width", "height"):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: {key!r} must be a positive integer, got {v!r}")
        objs_raw = d.get("objects") or []
        if not isinstance(objs_raw, list):
            raise ContractError(ErrorCode.INVALID_INPUT, f"{where}: 'objects' must be a list")
        objects = [GTObject.from_dict(o, f"{where} objects[{i}]") for i, o in enumerate(objs_raw)]
        extra = {k: v for k, v in d.items() if k not in ("images", "width", "height", "objects")}
        return cls(images=images, width=d["width"], height=d["height"], objects=objects, extra=extra)


@dataclass
class PredictionRecord:
    """One line of `predictions.jsonl` (one per input line, same order)."""

    image_id: int
    images: list[str]
    width: int | None
    height: int | None
    raw_output: str = ""
    preds: list[PredObject] = field(default_factory=list)
    coord_mode: str = "norm1000"
    bbox_format: str = "xyxy"  # how the model wrote bbox_2d; preds' points are decoded to x1 y1 x2 y2
    error: str | None = None
    error_message: str | None = None
    repairs: list[str] = field(default_factory=list)  # what the parser repaired or dropped, and why
    errors: list[str] = field(default_factory=list)  # codes of dropped objects (non-fatal; upstream's `errors`)
    extra: dict[str, Any] = field(default_factory=dict)  # engine facts: tokens, prompt variant, ...

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "image_id": self.image_id,
            "images": list(self.images),
            "width": self.width,
            "height": self.height,
            "coord_mode": self.coord_mode,
            "bbox_format": self.bbox_format,
            "raw_output": self.raw_output,
            "preds": [p.to_dict() for p in self.preds],
        }
        if self.error is not None:
            d["error"] = str(self.error)
            if self.error_message:
                d["error_message"] = self.error_message
        if self.repairs:
            d["repairs"] = list(self.repairs)
        if self.errors:
            d["errors"] = [str(e) for e in self.errors]
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PredictionRecord":
        known = {"image_id", "images", "width", "height", "coord_mode", "bbox_format", "raw_output", "preds", "error",
                 "error_message", "repairs", "errors"}
        return cls(
            image_id=d["image_id"],
            images=list(d.get("images") or []),
            width=d.get("width"),
            height=d.get("height"),
            raw_output=d.get("raw_output", ""),
            preds=[PredObject.from_dict(p) for p in (d.get("preds") or [])],
            coord_mode=d.get("coord_mode", "norm1000"),
            bbox_format=d.get("bbox_format") or "xyxy",
            error=d.get("error"),
            error_message=d.get("error_message"),
            repairs=list(d.get("repairs") or []),
            errors=[str(e) for e in (d.get("errors") or [])],
            extra={k: v for k, v in d.items() if k not in known},
        )


MAX_LINE_BYTES = 16 << 20  # a record line longer than this is refused (one record, not a data dump)


def read_jsonl(path: str) -> Iterable[tuple[int, Any | Exception]]:
    """Yield (line_no starting at 1, parsed value or the exception) for every line.

    Every line yields exactly once (a blank line yields an error), so a caller can write one
    output line per input line whatever the line holds. Lines are split on b"\n" only (as
    `count_records` counts them) and decoded strictly: invalid UTF-8, NUL bytes and overlong lines are
    that line's own `invalid_input`, never a silently altered value.
    """
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield i, ContractError(ErrorCode.INVALID_INPUT, f"line {i}: {len(raw) / 2**20:.1f} MiB long, "
                                                                f"the limit is {MAX_LINE_BYTES >> 20} MiB")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, ContractError(ErrorCode.INVALID_INPUT, f"line {i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                                                f"at column {e.start + 1})")
                continue
            if "\x00" in line:
                yield i, ContractError(ErrorCode.INVALID_INPUT, f"line {i}: contains a NUL byte")
                continue
            if not line.strip():
                yield i, ContractError(ErrorCode.INVALID_INPUT, f"line {i}: empty line")
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, ContractError(ErrorCode.INVALID_INPUT, f"line {i}: not valid JSON ({e.msg} at column {e.colno})")