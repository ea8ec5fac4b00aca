"""The ONE parser for model text: CoordJSON answer -> ``list[PredObject]`` (+ what was repaired).

Imported by the Triton postprocess model, the client, eval and vis; pure Python, no heavy imports.

    parse_model_output(text, coord_mode="norm1000", width=None, height=None, bbox_format="xyxy") -> ParseResult

What it accepts
---------------
- coord-token mode (bare, unquoted ``<|coord_N|>`` literals; quoted ones too) and numeric mode
  (plain integers), in either key order (desc first or geometry first);
- ``{"objects": [...]}``, a bare list ``[...]``, one bare object ``{"desc": ..., "bbox_2d": ...}``, and
  upstream's legacy shapes: an index-keyed ``{"0": {...}, "1": {...}}`` (read in key order) and an
  object map ``{"obj": {...}, ...}`` (every value an object; read in text order);
- ``label`` as an alias of ``desc`` (``desc`` wins when both are there);
- code fences, prose around the JSON, ``<think>...</think>`` blocks, Qwen special tokens.

Repairs (each one is written to ``ParseResult.repairs``)
-----------------------------------------------------
1. Coord tokens are replaced by their integers, so the text becomes JSON-ish.
2. The text is tried as strict JSON (``json.JSONDecoder.raw_decode`` from the first ``{``/``[``).
3. Otherwise a small scanner walks the text: it turns single-quoted strings into JSON strings,
   removes trailing commas, closes brackets the model forgot mid-text, and, when the text ends
   inside the JSON (cut at ``max_new_tokens``), cuts it back to the last complete object and
   closes the brackets. An object open at the very end of the text is dropped and noted, even
   when only its ``}`` is missing (upstream's parser drops it too, and its test pins that). So a
   cut ``[<|coord_1|>, <|coord_2|>`` never becomes a 2-number (or 4-number) box.
4. Only then ``json_repair`` fixes what is left (missing commas, unquoted keys, Python literals)
   on text whose truncated tail has already been removed.

Validation (after repair), per object, in this order
----------------------------------------------------
- not an object -> dropped (no contract code: ``errors`` gets nothing, as upstream);
- a ``bbox`` / ``polygon`` / ``line`` key -> dropped, ``invalid_geometry``;
- not exactly one of ``bbox_2d`` / ``poly``, or not a list -> dropped, ``invalid_geometry``;
- a coordinate that is not an integer (bool, string, non-integral float), negative, or above
  the mode's maximum -> dropped, ``invalid_coord``. Integral floats (``12.0``), digit strings
  (``"12"``), coord-token strings and ``[[x, y], ...]`` point pairs are accepted and noted;
- wrong arity (``bbox_2d``: 4; ``poly``: even and >= 6) -> dropped, ``invalid_geometry``;
- missing / empty / non-string desc -> dropped (no contract code, as upstream); descs are stripped;
- with ``width``/``height``: a geometry whose box (min/max of its points) is empty in integer
  pixels (``round(coordexp.grid.to_pixels(...))``) -> dropped, ``invalid_geometry`` (as upstream);
- an object cut by the end of the text -> dropped (no contract code).
- an inverted ``bbox_2d`` (``x2 < x1`` or ``y2 < y1``, e.g. ``[802, 79, 503, 260]``) is KEPT as
  written, with a note in ``repairs`` (so in ``parse`` output and in the prediction line's
  ``repairs``): its points are what the model drew, eval's default mode scores it as drawn (no
  area: a false positive) and ``--compat coordexp`` drops it as upstream's evaluator does (its
  parser keeps it unchanged too). It is never swapped: that would hide the model's mistake and
  break upstream parity.
Extra keys and the model's score hints are ignored (score 1.0); duplicates are kept and noted.

Box formats (``bbox_format``, the checkpoint's; norm1000 only): ``xyxy`` reads ``bbox_2d`` as
``[x1, y1, x2, y2]``. ``cxcywh`` and ``cxcy_logw_logh`` read it as centre + size
(``coordexp.grid.decode_bbox``): the slots are range-checked as grid values, kept as written in
``PredObject.slots``, and ``points`` holds the decoded ``[x1, y1, x2, y2]`` (never inverted, so no
inverted-box note); the zero-area check runs on the decoded box. Polygons are plain points in every format.

Modes: ``norm1000`` 0..999, ``qwen3_rel1000`` 0..1000, ``pixel`` any integer >= 0; others: ``ValueError``.

Error codes (``ParseResult.error``: fatal, the line has no preds; ``ParseResult.errors``: the
contract code of every dropped object, in text order, also when others survive -- upstream's list)
-----------------------------------
- at least one object survives -> ``None`` (drops are in ``errors`` / ``repairs`` / ``num_dropped``);
- empty or whitespace-only text (after removing special tokens) -> ``empty_pred``;
- a valid empty answer (``{"objects": []}``, ``[]``) -> ``None``: "nothing there" is an answer;
- nothing recoverable (prose only, a bare string/number, an object without an ``objects`` list,
  text cut before any object was complete) -> ``empty_pred`` (the contract's code; upstream's
  too), the detail in ``error_message``;
- JSON recovered but every object was dropped -> the first entry of ``errors`` (``invalid_coord``
  or ``invalid_geometry``), else ``empty_pred``; ``error_message`` repeats that drop note.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from coordexp.grid import COORD_MODES, check_bbox_format
from coordexp.json_scan import WS as _WS, closing_brackets, scan
from coordexp.parse_validate import BARE_COORD_RE, TRUNCATED, Ctx, validate
from coordexp.schema import GEOMETRY_TYPES, INVALID_GEOMETRY_KEYS, ErrorCode, PredObject
from coordexp.tokens import QWEN_SPECIAL_TOKENS

__all__ = ["ParseResult", "parse_model_output", "strip_special", "replace_coord_tokens", "COORD_MODE_MAX"]

# Largest valid coordinate per mode (None: no upper bound).
COORD_MODE_MAX: dict[str, int | None] = {"norm1000": 999, "qwen3_rel1000": 1000, "pixel": None}
assert set(COORD_MODE_MAX) == set(COORD_MODES)

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS))
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_THINK_RE = re.compile(r"<think>.*?</think>", re.S)
_QUOTED_COORD_RE = re.compile(r"([\"'])<\|coord_(\d+)\|>\1")
_START_OBJECTS_RE = re.compile(r"\{\s*[\"']?objects[\"']?\s*:")
_START_LIST_RE = re.compile(r"\[\s*[{\]]")
_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*")


@dataclass
class ParseResult:
    preds: list[PredObject] = field(default_factory=list)
    error: ErrorCode | None = None
    error_message: str | None = None
    repairs: list[str] = field(default_factory=list)  # what was repaired or dropped, and why
    errors: list[ErrorCode] = field(default_factory=list)  # code of each dropped object (non-fatal)
    num_dropped: int = 0  # objects seen (or started) in the text but not in preds
    truncated: bool = False  # the text ended inside the JSON (cut, or closing brackets missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preds": [p.to_dict() for p in self.preds],
            "error": None if self.error is None else str(self.error),
            "error_message": self.error_message,
            "repairs": list(self.repairs),
            "errors": [str(e) for e in self.errors],
            "num_dropped": self.num_dropped,
            "truncated": self.truncated,
        }


def strip_special(text: str) -> str:
    """Remove the Qwen special tokens (``<|im_end|>``, ``<|endoftext|>``, ...); coord tokens stay."""
    return _SPECIAL_RE.sub("", text)


def replace_coord_tokens(text: str) -> tuple[str, int]:
    """``<|coord_N|>`` (bare or quoted) -> ``N``. Returns the new text and how many were quoted."""
    text, n_quoted = _QUOTED_COORD_RE.subn(r"\2", text)
    return BARE_COORD_RE.sub(r"\1", text), n_quoted


def _snip(s: str, n: int = 48) -> str:
    s = " ".join(s.split())
    return repr(s if len(s) <= n else s[: n - 1] + "…")


# ----------------------------------------------------------------------------------------------
# Loading and validation.


def _loads(text: str, repairs: list[str]) -> tuple[bool, Any]:
    try:
        return True, json.loads(text, strict=False)
    except ValueError:
        pass
    try:
        import json_repair
    except ImportError:  # pragma: no cover - json-repair is a dependency
        return False, None
    try:
        value = json_repair.loads(text)
    except Exception:  # noqa: BLE001 - any failure of the repair library is a parse failure
        return False, None
    if isinstance(value, (dict, list)) and (value or text.strip() in ("{}", "[]")):
        repairs.append("fixed malformed JSON with json_repair")
        return True, value
    return False, None


def _start_candidates(text: str) -> list[int]:
    """Where the answer may start, best guess first: ``{"objects"``, then a list of objects
    (``[{`` / ``[]``) or the first ``{``, whichever comes first, then the other."""
    cands: list[int] = []
    m = _START_OBJECTS_RE.search(text)
    if m:
        cands.append(m.start())
    m = _START_LIST_RE.search(text)
    rest = sorted(p for p in ((m.start() if m else -1), text.find("{")) if p >= 0)
    cands.extend(rest)
    return list(dict.fromkeys(p for p in cands if p >= 0))


def _note_outside(text: str, where: str, repairs: list[str]) -> None:
    if "```" in text and "removed ``` code fence" not in repairs:
        repairs.append("removed ``` code fence")
    rest = _FENCE_RE.sub("", text).strip()
    if rest:
        repairs.append(f"ignored text {where} the JSON: {_snip(rest)}")


def _objects_of(value: Any, repairs: list[str]) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if "objects" in value:
            objs = value["objects"]
            return objs if isinstance(objs, list) else None
        keys = set(GEOMETRY_TYPES) | set(INVALID_GEOMETRY_KEYS) | {"desc", "label"}
        if keys & set(value):
            repairs.append("read a bare object as a one-object list")
            return [value]
        if value and all(isinstance(k, str) and k.isdigit() for k in value):  # upstream's legacy {"0": {...}}
            repairs.append("read an index-keyed object as the objects list (in key order)")
            return [value[k] for k in sorted(value, key=int)]
        if value and all(isinstance(v, dict) for v in value.values()):  # legacy {"obj": {...}, ...}
            repairs.append("read an object map as the objects list (in text order)")
            return list(value.values())
    return None


def _fail(res: ParseResult, code: ErrorCode, message: str) -> ParseResult:
    res.preds = []
    res.error = code
    res.error_message = message
    return res


# ----------------------------------------------------------------------------------------------


def parse_model_output(text: str, coord_mode: str = "norm1000", width: int | None = None,
                       height: int | None = None, bbox_format: str = "xyxy") -> ParseResult:
    """Parse one model answer (CoordJSON, possibly damaged) into predictions. Never raises on
    bad text; raises ``ValueError`` for an unknown ``coord_mode`` or ``bbox_format`` (or a centre
    format outside norm1000). ``width``/``height`` (the image's) turn on the zero-area-at-pixel-size
    check. See the module docstring."""
    if coord_mode not in COORD_MODE_MAX:
        raise ValueError(f"unknown coord_mode {coord_mode!r}; expected one of {', '.join(COORD_MODES)}")
    bbox_format = check_bbox_format(bbox_format)
    if bbox_format != "xyxy" and coord_mode != "norm1000":
        raise ValueError(f"bbox_format {bbox_format!r} is defined on the norm1000 grid only, not {coord_mode!r}")
    ctx = Ctx(coord_mode, COORD_MODE_MAX[coord_mode], width, height, bbox_format)
    res = ParseResult()
    repairs = res.repairs
    if text is None:
        text = ""
    elif isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        raise TypeError(f"model text must be str, got {type(text).__name__}")

    # 1. Special tokens, think blocks, coord tokens.
    specials = [t for t in _SPECIAL_RE.findall(text) if t not in _END_TOKENS]
    if specials:
        repairs.append(f"removed special token(s) {', '.join(dict.fromkeys(specials))}")
    text = strip_special(text)
    if "<think>" in text:
        text, n_think = _THINK_RE.subn("", text)
        if n_think:
            repairs.append("removed <think> block")
    if not text.strip():
        return _fail(res, ErrorCode.EMPTY_PRED, "empty model output")
    text, n_quoted = replace_coord_tokens(text)
    if n_quoted:
        repairs.append(f"unquoted {n_quoted} quoted coord token(s)")

    first: ParseResult | None = None
    for start in _start_candidates(text):
        attempt = ParseResult(repairs=list(repairs))
        if _parse_from(text, start, ctx, attempt):
            return attempt
        first = first or attempt
    if first is None:
        return _fail(res, ErrorCode.EMPTY_PRED, f"no JSON object or list in the text: {_snip(text)}")
    return first


@dataclass
class _Recovered:
    """What steps 2-3 got out of the text: the JSON value and how it was closed."""

    ok: bool = False
    value: Any = None
    tail_drop: str | None = None  # the note for an object cut by the end of the text and dropped
    truncated_root: bool = False  # the root object was closed by repair at the end of the text
    brace_only: bool = False  # the cut object lacked only its closing brace
    stop: bool | None = None  # set: nothing more to try here, `_parse_from` returns it (res holds the failure)


def _strict(text: str, start: int, repairs: list[str]) -> _Recovered | None:
    """2. Strict JSON first."""
    try:
        value, end = json.JSONDecoder(strict=False).raw_decode(text, start)
    except ValueError:
        return None
    _note_outside(text[end:], "after", repairs)
    return _Recovered(ok=True, value=value)


def _close_at_end(sc: Any, repairs: list[str]) -> _Recovered:
    """3a. The text stops right after a complete value of the last open object. An element of the
    objects list is then only marked (`brace_only`: `_cut_back` drops it, as upstream does); the
    root object is closed (``{"objects": []`` is a whole answer; a bare object is dropped later)."""
    stack = sc.stack
    top = stack[-1] if stack else None
    rec = _Recovered()
    if sc.in_string or top is None or top.opener != "{" or not (top.elem or (len(stack) == 1 and sc.n_elems == 0)):
        return rec
    body = "".join(sc.out).rstrip(_WS)
    if body.endswith(","):
        body = body[:-1].rstrip(_WS)
    last = body[-1:]
    # after a complete value: a string that follows ':', a closed list/object, a number
    # or literal (only extra keys can hold those); not after a key, ':' or the '{'.
    if not ((last == '"' and sc.string_after == ":") or last in ("]", "}") or last.isalnum()):
        return rec
    if top.elem:
        rec.brace_only = True
        return rec
    closers = closing_brackets([f.opener for f in stack])
    trial: list[str] = []
    rec.ok, rec.value = _loads(body + closers, trial)
    if rec.ok:
        repairs.append(f"text ends before the closing bracket(s): appended {closers!r}")
        repairs.extend(trial)
        rec.truncated_root = True
    return rec


def _cut_back(sc: Any, text: str, res: ParseResult, brace_only: bool) -> _Recovered:
    """3b. Cut back to the last complete object and close the brackets open there."""
    repairs = res.repairs
    rec = _Recovered()
    open_elem = next((f for f in sc.stack if f.elem), None)
    if open_elem is not None:
        res.num_dropped += 1
        why = ("text ends before its closing '}' (dropped, as upstream)" if brace_only
               else "text cut mid-object")
        rec.tail_drop = f"dropped objects[{sc.n_elems}]: {TRUNCATED}: {why}: {_snip(text[open_elem.src:])}"
        repairs.append(rec.tail_drop)
    if sc.safe_len is None:
        if rec.tail_drop is None:
            repairs.append("text cut before any complete object")
        _fail(res, ErrorCode.EMPTY_PRED, rec.tail_drop or "text cut before any complete object")
        rec.stop = rec.tail_drop is not None
        return rec
    tail = "".join(sc.out[sc.safe_len:]).strip(_WS + ",")
    if open_elem is None and tail.strip("]}" + _WS):
        repairs.append(f"dropped unfinished text at the end: {_snip(tail)}")
    closers = closing_brackets(sc.safe_stack)
    if closers:
        repairs.append(f"text ends before the closing bracket(s): appended {closers!r}")
    rec.ok, rec.value = _loads("".join(sc.out[: sc.safe_len]) + closers, repairs)
    return rec


def _repaired(text: str, start: int, res: ParseResult) -> _Recovered:
    """3. Scanner + truncation-aware cut, then json_repair."""
    repairs = res.repairs
    sc = scan(text, start)
    if sc.single_quoted:
        repairs.append("replaced single quotes with double quotes")
    if sc.trailing_commas:
        repairs.append(f"removed {sc.trailing_commas} trailing comma(s)")
    if sc.inserted:
        repairs.append(f"inserted missing closing bracket(s) {''.join(sc.inserted)!r}")
    if sc.stray:
        repairs.append(f"removed stray closing bracket(s) {''.join(sc.stray)!r}")
    if sc.root_closed:
        _note_outside(text[sc.src_end:], "after", repairs)
        ok, value = _loads("".join(sc.out), repairs)
        return _Recovered(ok=ok, value=value)
    res.truncated = True
    rec = _close_at_end(sc, repairs)
    return rec if rec.ok else _cut_back(sc, text, res, rec.brace_only)


def _keep_valid(objs: list[Any], ctx: Ctx, rec: _Recovered, res: ParseResult) -> None:
    """4. Validate every object: valid ones become preds, the others are dropped with a note."""
    repairs = res.repairs
    seen: dict[tuple, int] = {}
    first_note: str | None = None
    for idx, obj in enumerate(objs):
        where = f"objects[{idx}]"
        got = validate(obj, where, ctx, repairs)
        if isinstance(got, tuple):
            code, why = got
            note = f"dropped {where}: {code}: {why}"
            repairs.append(note)
            res.num_dropped += 1
            if isinstance(code, ErrorCode):
                if not res.errors:
                    first_note = note
                res.errors.append(code)
            continue
        key = (got.type, tuple(got.points))
        if key in seen:
            repairs.append(f"kept duplicate {where}: same {got.type} as objects[{seen[key]}]")
        else:
            seen[key] = idx
        res.preds.append(got)
    if res.preds or not res.num_dropped:
        return
    if res.errors:
        res.error, res.error_message = res.errors[0], first_note
    else:  # every drop was a truncated tail, a non-object or a missing desc
        drops = [n for n in repairs if n.startswith("dropped objects[")]
        first = min(drops, key=lambda n: int(n[len("dropped objects["):].split("]", 1)[0]))  # text order
        res.error, res.error_message = ErrorCode.EMPTY_PRED, first


def _parse_from(text: str, start: int, ctx: Ctx, res: ParseResult) -> bool:
    """Parse the answer starting at text[start] into `res`. False when no objects list was found
    there (so the caller may try another start); `res` then holds the failure."""
    _note_outside(text[:start], "before", res.repairs)
    rec = _strict(text, start, res.repairs) or _repaired(text, start, res)
    if rec.stop is not None:
        return rec.stop
    if not rec.ok:
        _fail(res, ErrorCode.EMPTY_PRED, f"no CoordJSON could be recovered: {_snip(text[start:])}")
        return False
    objs = _objects_of(rec.value, res.repairs)
    if objs and not any(isinstance(o, dict) for o in objs):
        objs = None  # e.g. [1, 2, 3, 4] or json_repair's reading of prose: not a list of objects
    if objs is None:
        _fail(res, ErrorCode.EMPTY_PRED,
              f"no 'objects' list in the JSON: {_snip(json.dumps(rec.value, ensure_ascii=False))}")
        return False
    if rec.truncated_root and isinstance(rec.value, dict) and "objects" not in rec.value:
        # a bare object cut before its '}': dropped like a cut element of the list
        note = f"dropped objects[0]: {TRUNCATED}: text ends before its closing '}}' (dropped, as upstream)"
        res.repairs.append(note)
        res.num_dropped += 1
        _fail(res, ErrorCode.EMPTY_PRED, note)
        return True
    _keep_valid(objs, ctx, rec, res)
    return True
