"""Layer 1 and the DFA of layer 2: the CoordJSON grammar (xgrammar EBNF) and the byte-level DFA
that mirrors it for the budget planner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from coordexp.tokens import NUM_COORD_TOKENS

COORD = 256  # DFA symbol: one coord token
INF = 1 << 30
_DESC_REST = bytes([0x20]) + bytes(b for b in range(0x21, 0x7F) if b not in b'"\\<')
_DESC_FIRST = _DESC_REST[1:]  # no leading space (the parser drops a whitespace-only desc)
_DIGITS = b"0123456789"
_COMMA, _RBRACKET = ord(","), ord("]")


# ================================================================================= the grammar
def _char_class(chars: bytes) -> str:
    """An EBNF character class of these bytes, as \\xNN ranges."""
    vals = sorted(set(chars))
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(f"\\x{vals[i]:02x}" if i == j else f"\\x{vals[i]:02x}-\\x{vals[j]:02x}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def grammar_ebnf(coord_format: str = "tokens", field_order: str = "desc_first",
                 coord_ids: Sequence[int] | None = None) -> str:
    """The CoordJSON grammar (xgrammar EBNF) for one prompt format. `coord_ids`: the 1000 coord token
    ids (coord-token mode only)."""
    if coord_format == "tokens":
        if coord_ids is None or len(coord_ids) != NUM_COORD_TOKENS:
            raise ValueError("coord-token mode needs the 1000 coord token ids")
        coord = "Token(" + ", ".join(str(int(i)) for i in coord_ids) + ")"
    elif coord_format == "numeric":
        coord = '"0" | [1-9] [0-9]? [0-9]?'
    else:
        raise ValueError(f"coord_format={coord_format!r}")
    if field_order == "desc_first":
        obj = '"{\\"desc\\": \\"" desc "\\", " geometry "}"'
    elif field_order == "geometry_first":
        obj = '"{" geometry ", \\"desc\\": \\"" desc "\\"}"'
    else:
        raise ValueError(f"field_order={field_order!r}")
    return "\n".join([
        'root ::= "{\\"objects\\": [" (object (", " object)*)? "]}"',
        f"object ::= {obj}",
        "geometry ::= bbox | poly",
        'bbox ::= "\\"bbox_2d\\": [" c ", " c ", " c ", " c "]"',
        'poly ::= "\\"poly\\": [" c ", " c ", " c ", " c ", " c ", " c (", " c ", " c)* "]"',
        # no space at either end: the parser would strip it (a repair)
        f"desc ::= {_char_class(_DESC_FIRST)} ({_char_class(_DESC_REST)}* {_char_class(_DESC_FIRST)})?",
        f"c ::= {coord}",
        "",
    ])


# ================================================================================= the DFA
class _Dfa:
    """The same language as `grammar_ebnf`, as a DFA over bytes and the COORD symbol, with tags the
    planner and the duplicate check need (desc states, coordinate slots, geometry regions)."""

    # One function (~90 lines) on purpose: the nested builders share the state lists, and the body reads
    # top to bottom in the order of the grammar it mirrors.
    def __init__(self, coord_format: str, field_order: str):
        self.trans: list[dict[int, int]] = []
        self.kind: list[str] = []  # "lit" | "desc0" | "desc" | "slot" | "num" | "accept"
        self.geom: list[str | None] = []  # geometry type for states inside its [...]
        self.index: list[int] = []  # coordinate index for slot/num states (-1 elsewhere)
        numeric = coord_format == "numeric"

        def new(kind: str = "lit", geom: str | None = None, index: int = -1) -> int:
            self.trans.append({})
            self.kind.append(kind)
            self.geom.append(geom)
            self.index.append(index)
            return len(self.trans) - 1

        def add(q: int, sym: int, r: int) -> None:
            if self.trans[q].get(sym, r) != r:
                raise AssertionError(f"DFA conflict at state {q} on {sym}")
            self.trans[q][sym] = r

        def lit(froms: Sequence[int], text: bytes, target: int, geom: str | None = None) -> None:
            cur = list(froms)
            for i, b in enumerate(text):
                nxt = target if i == len(text) - 1 else new("lit", geom)
                for q in cur:
                    add(q, b, nxt)
                cur = [nxt]

        def coordinate(slot: int, geom: str, index: int) -> list[int]:
            """Transitions of one coordinate from `slot`; the states where it may end."""
            if not numeric:
                end = new("lit", geom)
                add(slot, COORD, end)
                return [end]
            zero, n1, n2, n3 = (new("num", geom, index) for _ in range(4))
            add(slot, ord("0"), zero)
            for d in _DIGITS:
                if d != ord("0"):
                    add(slot, d, n1)
                add(n1, d, n2)
                add(n2, d, n3)
            return [zero, n1, n2, n3]

        def geometry(key: int, after: int) -> None:
            # bbox_2d: exactly 4 coordinates
            slot = new("slot", "bbox_2d", 0)
            lit([key], b'bbox_2d": [', slot)
            for i in range(4):
                ends = coordinate(slot, "bbox_2d", i)
                if i < 3:
                    slot = new("slot", "bbox_2d", i + 1)
                    lit(ends, b", ", slot, "bbox_2d")
            lit(ends, b"]", after, "bbox_2d")
            # poly: 6, 8, 10, ... coordinates (after the 8th: back to the 7th slot's behaviour)
            slots = [new("slot", "poly", i) for i in range(8)]
            lit([key], b'poly": [', slots[0])
            ends = [coordinate(slots[i], "poly", i) for i in range(8)]
            for i in range(7):
                lit(ends[i], b", ", slots[i + 1], "poly")
            lit(ends[7], b", ", slots[6], "poly")
            lit(ends[5] + ends[7], b"]", after, "poly")

        self.start = new()
        self.accept = new("accept")
        first = new()  # after '{"objects": ['
        nxt = new()  # after an object
        obj = new()  # after an object's '{'
        lit([self.start], b'{"objects": [', first)
        lit([first, nxt], b"]}", self.accept)
        lit([first], b"{", obj)
        lit([nxt], b", {", obj)
        # d1: in a desc, after a non-space byte (it may close); d2: after a space (it may not)
        d0, d1, d2 = new("desc0"), new("desc"), new("desc")
        for b in _DESC_FIRST:
            add(d0, b, d1)
            add(d1, b, d1)
            add(d2, b, d1)
        add(d1, 0x20, d2)
        add(d2, 0x20, d2)
        self.desc0, self.desc1, self.desc2 = d0, d1, d2
        key, after = new(), new()  # before the geometry key's name; after the geometry's ']'
        if field_order == "desc_first":
            lit([obj], b'"desc": "', d0)
            lit([d1], b'", "', key)
            geometry(key, after)
            lit([after], b"}", nxt)
        else:
            lit([obj], b'"', key)
            geometry(key, after)
            lit([after], b', "desc": "', d0)
            lit([d1], b'"}', nxt)
        self.n = len(self.trans)


@dataclass
class _Acc:
    """A row's geometry bookkeeping: the coordinates of the open geometry, the geometries written."""

    vals: list[int] = field(default_factory=list)
    digits: str = ""
    seen: set = field(default_factory=set)
    closed: tuple | None = None  # the geometry the last step completed

    def copy(self) -> "_Acc":
        return _Acc(list(self.vals), self.digits, self.seen, None)
