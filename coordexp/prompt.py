"""The CoordExp prompt (system + user text) and the CoordJSON answer format it asks for.

A `PromptSpec` names one prompt variant; its `variant` string is recorded in every prediction
run and in the export manifest so results can be traced to the exact prompt.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from coordexp.grid import BBOX_FORMATS, check_bbox_format, encode_bbox
from coordexp.tokens import coord_token

COORD_FORMATS = ("tokens", "numeric")
FIELD_ORDERS = ("desc_first", "geometry_first")
# "random": a checkpoint trained on objects in random order (CoordExp's `object_ordering: random`);
# at inference it is written as given, like "as_given"
OBJECT_ORDERS = ("sorted", "as_given", "random")
# Where the image part stands in the user message. CoordExp trains with the image first; its own
# inference client sends the text first (its published evaluation numbers come from that order).
MESSAGE_LAYOUTS = ("image_first", "text_first")
# CoordExp's names of our coord formats (its `coord_mode` in prompt_template_hash)
UPSTREAM_COORD_MODES = {"tokens": "coord_tokens", "numeric": "norm1000_text"}

_FORMAT_RULES = {
    "tokens": "Write every coordinate as one coordinate token <|coord_k|> with k from 0 to 999 "
    "(0 = left/top edge, 999 = right/bottom edge), unquoted.",
    "numeric": "Write every coordinate as an integer from 0 to 999 "
    "(0 = left/top edge, 999 = right/bottom edge).",
}


@dataclass(frozen=True)
class PromptSpec:
    coord_format: str = "tokens"  # "tokens" (<|coord_k|>) or "numeric" (plain ints)
    field_order: str = "desc_first"  # "desc_first" or "geometry_first"
    object_order: str = "sorted"  # objects by top-left anchor (min y, then min x)
    user_text: str = "Detect all objects in the image."
    system_text: str | None = None  # None: the default system prompt for the format
    bbox_format: str = "xyxy"  # how bbox_2d's four slots are written (coordexp.grid.BBOX_FORMATS)
    layout: str = "image_first"  # the user message's parts: image then text (as CoordExp trains), or text first
    # the training run's prompt variant key (CoordExp's `custom.extra.prompt_variant`, e.g. "coco_80");
    # None: a prompt of ours (built in, or from flags)
    run_variant: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("coord_format", COORD_FORMATS), ("field_order", FIELD_ORDERS),
                              ("object_order", OBJECT_ORDERS), ("bbox_format", BBOX_FORMATS),
                              ("layout", MESSAGE_LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"prompt {name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")

    @property
    def variant(self) -> str:
        """A short name of this prompt, recorded with every run (the exact texts are in the manifest)."""
        suffix = ("" if self.bbox_format == "xyxy" else f"/{self.bbox_format}") + \
            ("" if self.layout == "image_first" else f"+{self.layout}")
        if self.run_variant is not None:
            return f"run:{self.run_variant}/{self.coord_format}/{self.field_order}/{self.object_order}{suffix}"
        custom = "" if self.system_text is None and self.user_text == PromptSpec.user_text else "+custom"
        return f"coordexp/{self.coord_format}/{self.field_order}/{self.object_order}/v1{custom}{suffix}"

    def template_hash(self) -> str:
        """CoordExp's `prompt_template_hash` of this prompt (the research code records it with every
        inference run): sha256 of its controls and texts as sorted-key JSON."""
        payload = {"ordering": self.object_order, "coord_mode": UPSTREAM_COORD_MODES[self.coord_format],
                   "prompt_variant": self.run_variant or "default", "object_field_order": self.field_order,
                   "bbox_format": self.bbox_format, "system_prompt": self.system(), "user_prompt": self.user_text,
                   "do_resize": False}
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()

    def system(self) -> str:
        if self.system_text is not None:
            return self.system_text
        slots = {"xyxy": "x1, y1, x2, y2", "cxcywh": "cx, cy, w, h", "cxcy_logw_logh": "cx, cy, logw, logh"}[self.bbox_format]
        example = (f'{{"objects": [{{"desc": "<label>", "bbox_2d": [{slots}]}}]}}' if self.field_order == "desc_first"
                   else f'{{"objects": [{{"bbox_2d": [{slots}], "desc": "<label>"}}]}}')
        order = ("Order objects by their top-left corner (top to bottom, then left to right). "
                 if self.object_order == "sorted" else "")
        return (
            "You are a visual grounding model. Answer with exactly one line of CoordJSON: "
            f"{example}. Use \"bbox_2d\" for boxes or \"poly\" (flat x, y list) for polygons. "
            f"{_FORMAT_RULES[self.coord_format]} {order}Answer {{\"objects\": []}} when nothing is there."
        )

    def messages(self) -> list[dict[str, Any]]:
        """Chat messages for the Qwen chat template with one image placeholder."""
        parts: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": self.user_text}]
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system()}]},
            {"role": "user", "content": parts if self.layout == "image_first" else parts[::-1]},
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "variant": self.variant}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PromptSpec":
        d = dict(d or {})
        d.pop("variant", None)
        if "bbox_format" in d:
            d["bbox_format"] = check_bbox_format(d["bbox_format"])
        return cls(**d)


class PromptOption(NamedTuple):
    """One command-line flag of a prompt variant."""

    flag: str
    dest: str  # argparse attribute
    field: str  # PromptSpec field it sets
    choices: tuple[str, ...] | None
    help: str


# The prompt flags, defined once: the client's subcommands (client/options.py) and the exporter
# (export/build_engine.py) both add them from this table, so a variant is spelled the same everywhere.
PROMPT_OPTIONS: tuple[PromptOption, ...] = (
    PromptOption("--coord-format", "coord_format", "coord_format", COORD_FORMATS,
                 "coordinates as coord tokens <|coord_k|> or numeric integers (default tokens)"),
    PromptOption("--field-order", "field_order", "field_order", FIELD_ORDERS,
                 "desc before or after the geometry in each object (default desc_first)"),
    PromptOption("--object-order", "object_order", "object_order", OBJECT_ORDERS,
                 "objects sorted by their top-left corner, or as given (default sorted)"),
    PromptOption("--prompt", "user_text", "user_text", None,
                 f"user text of the prompt (default {PromptSpec.user_text!r})"),
    PromptOption("--system-prompt", "system_prompt", "system_text", None,
                 "system text of the prompt (default: the format's own system prompt)"),
    PromptOption("--bbox-format", "bbox_format", "bbox_format", BBOX_FORMATS,
                 "how bbox_2d's four numbers are written: x1 y1 x2 y2, or centre + size (default xyxy)"),
    PromptOption("--message-layout", "layout", "layout", MESSAGE_LAYOUTS,
                 "image before the user text (as CoordExp trains, default) or after it (as CoordExp's own "
                 "inference client sends it: only to reproduce its published evaluation)"),
)


def add_prompt_options(group: Any) -> None:
    """Add the PROMPT_OPTIONS flags to an argparse parser or group; each defaults to None (not given)."""
    for o in PROMPT_OPTIONS:
        group.add_argument(o.flag, dest=o.dest, choices=o.choices, default=None, help=o.help)


def prompt_from_options(values: Mapping[str, Any], base: PromptSpec | None = None) -> PromptSpec:
    """`base` (default PromptSpec()) with the given flags (by argparse dest; None = not given) applied."""
    d = (base or PromptSpec()).to_dict()
    d.pop("variant")
    for o in PROMPT_OPTIONS:
        if values.get(o.dest) is not None:
            d[o.field] = values[o.dest]
    return PromptSpec(**d)


def sort_key(points: Sequence[float]) -> tuple[float, float]:
    """Top-left anchor: (min y, min x)."""
    return (min(points[1::2]), min(points[0::2]))


def format_coordjson(objects: Sequence[dict[str, Any]], spec: PromptSpec = PromptSpec()) -> str:
    """The answer the model is trained to write for `objects` ([{desc, bbox_2d|poly}] in grid ints).

    Coord-token mode writes bare `<|coord_k|>` literals (not valid JSON, by design of the format).
    """
    objs = list(objects)
    if spec.object_order == "sorted":
        objs.sort(key=lambda o: sort_key(o.get("bbox_2d") or o.get("poly")))
    parts = []
    for o in objs:
        gtype = "bbox_2d" if "bbox_2d" in o else "poly"
        vals = [int(v) for v in o[gtype]]
        if gtype == "bbox_2d" and spec.bbox_format != "xyxy":
            vals = encode_bbox(vals, spec.bbox_format)
        coords = ", ".join(coord_token(v) if spec.coord_format == "tokens" else str(v) for v in vals)
        desc = f'"desc": {json.dumps(o["desc"], ensure_ascii=False)}'
        geom = f'"{gtype}": [{coords}]'
        parts.append("{" + (f"{desc}, {geom}" if spec.field_order == "desc_first" else f"{geom}, {desc}") + "}")
    return '{"objects": [' + ", ".join(parts) + "]}"
