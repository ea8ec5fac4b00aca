"""`coordexp-client parse`: model text -> parsed preds, errors and repairs, as JSON (debugging).

    coordexp-client parse answer.txt                  # the whole file is one model output
    echo '{"objects": []}' | coordexp-client parse    # stdin
    coordexp-client parse outputs.txt --jsonl         # one model output per line
    coordexp-client parse predictions.jsonl --field raw_output   # reparse an artifact's raw_output
    coordexp-client parse answer.txt --bbox-format cxcy_logw_logh --width 640 --height 480

With --jsonl / --field one JSON line is printed per input line (with its `line` number, and the
record's `image_id` when --field is used); otherwise one indented JSON object. With --field the
record's own `coord_mode`, `bbox_format`, `width` and `height` apply unless the flags say otherwise,
so `parse` gives exactly what `infer` wrote for that answer (the image size turns on the zero-area
check, as in `infer`). The exit status
is 0 either way: parse errors are reported in the JSON, not by the exit status.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from coordexp.grid import BBOX_FORMATS, COORD_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "parse",
        help="parse model text (CoordJSON) into predictions, showing errors and repairs",
        description="Parse model output text with the shared CoordExp parser and print the result as JSON.",
    )
    p.add_argument("file", nargs="?", default="-", metavar="FILE", help="input file ('-' or omitted: stdin)")
    p.add_argument("--coord-mode", choices=COORD_MODES, default=None,
                   help="coordinate mode for range checks (default: the record's coord_mode with --field, "
                        "else norm1000)")
    p.add_argument("--bbox-format", choices=BBOX_FORMATS, default=None,
                   help="how bbox_2d is written (default: the record's bbox_format with --field, else xyxy)")
    p.add_argument("--width", type=int, default=None, help="image width: drops geometry with no area at this size "
                   "(default: the record's width with --field)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the record's with --field)")
    p.add_argument("--jsonl", action="store_true", help="treat each input line as a separate model output")
    p.add_argument("--field", default=None, metavar="NAME",
                   help="input lines are JSON objects (e.g. predictions.jsonl); parse this field "
                        "(e.g. raw_output); implies --jsonl")
    p.set_defaults(func=run)


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read()


def _parse_line(line_no: int, line: str, args: argparse.Namespace) -> dict[str, Any]:
    from coordexp.schema import ErrorCode

    head: dict[str, Any] = {"line": line_no}
    mode = args.coord_mode or "norm1000"
    fmt, width, height = args.bbox_format or "xyxy", args.width, args.height
    if args.field is not None:
        try:
            rec = json.loads(line)
        except ValueError as e:
            return {**head, "preds": [], "error": ErrorCode.INVALID_INPUT.value,
                    "error_message": f"line {line_no}: not valid JSON ({e})"}
        if not isinstance(rec, dict) or not isinstance(rec.get(args.field), str):
            return {**head, "preds": [], "error": ErrorCode.INVALID_INPUT.value,
                    "error_message": f"line {line_no}: no string field {args.field!r}"}
        if "image_id" in rec:
            head["image_id"] = rec["image_id"]
        if args.coord_mode is None and rec.get("coord_mode") in COORD_MODES:
            mode = rec["coord_mode"]
        if args.bbox_format is None and rec.get("bbox_format") in BBOX_FORMATS:
            fmt = rec["bbox_format"]
        width = width if width is not None else _size(rec.get("width"))
        height = height if height is not None else _size(rec.get("height"))
        text = rec[args.field]
    else:
        text = line
    return _parsed(head, text, mode, fmt, width, height)


def _size(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _parsed(head: dict[str, Any], text: str, mode: str, fmt: str, width: int | None, height: int | None
            ) -> dict[str, Any]:
    from coordexp.parser import parse_model_output

    head = {**head, "coord_mode": mode, "bbox_format": fmt}
    if width is not None and height is not None:
        head.update(width=width, height=height)
    else:
        width = height = None  # the zero-area check needs both
    return {**head, **parse_model_output(text, coord_mode=mode, width=width, height=height, bbox_format=fmt).to_dict()}


def run(args: argparse.Namespace) -> int:
    if args.bbox_format not in (None, "xyxy") and args.coord_mode not in (None, "norm1000"):
        print(f"error: --bbox-format {args.bbox_format} is defined on the norm1000 grid only", file=sys.stderr)
        return 2
    data = _read(args.file)
    if args.jsonl or args.field is not None:
        lines = data.split("\n")  # not splitlines(): U+2028 etc. may sit inside a JSON string
        if lines and lines[-1] == "":
            lines.pop()
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        for i, line in enumerate(lines, start=1):
            print(json.dumps(_parse_line(i, line, args), ensure_ascii=False))
    else:
        out = _parsed({}, data, args.coord_mode or "norm1000", args.bbox_format or "xyxy", args.width, args.height)
        print(json.dumps(out, ensure_ascii=False, indent=2))
    sys.stdout.flush()
    return 0
