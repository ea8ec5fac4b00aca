"""The parser's scanner: one pass over model text that normalises quotes and trailing commas, closes
brackets the model forgot and records where the last complete object ended (the safe cut point for a
truncated answer). Only `coordexp.parser` uses it."""
from __future__ import annotations

from dataclasses import dataclass, field

WS = " \t\r\n"


def closing_brackets(openers: list[str]) -> str:
    return "".join("}" if o == "{" else "]" for o in reversed(openers))



@dataclass
class Frame:
    opener: str  # "{" or "["
    src: int  # index in the source text
    elem: bool  # an element of the objects list


@dataclass
class Scan:
    out: list[str]
    root_closed: bool = False
    src_end: int = 0  # source index just after the root's closer
    in_string: bool = False
    stack: list[Frame] = field(default_factory=list)
    safe_len: int | None = None  # length of `out` at the last safe cut point ...
    safe_stack: list[str] = field(default_factory=list)  # ... and the brackets open there
    n_elems: int = 0  # complete elements of the objects list
    single_quoted: int = 0
    trailing_commas: int = 0
    inserted: list[str] = field(default_factory=list)  # closers inserted where the model forgot them
    stray: list[str] = field(default_factory=list)  # closers without an opener (skipped)
    string_after: str = ""  # the significant character before the last string (":" -> a value)


def _closes_single_quote(src: str, k: int) -> bool:
    """Is the ' before index k the end of a single-quoted string (not an apostrophe)?"""
    n = len(src)
    while k < n and src[k] in WS:
        k += 1
    return k >= n or src[k] in ",:}]"


# One function (~85 lines) on purpose: a single pass over the characters whose state (quote,
# bracket stack, safe cut point) every branch updates; split up, that state would be passed around.
def scan(src: str, start: int) -> Scan:
    sc = Scan(out=[])
    out, stack = sc.out, sc.stack
    quote: str | None = None
    i, n = start, len(src)

    def closed(frame: Frame) -> None:
        if frame.elem:
            sc.n_elems += 1
        if frame.elem or len(stack) == 1:  # after a whole object, or a whole value of the root
            sc.safe_len = len(out)
            sc.safe_stack = [f.opener for f in stack]

    while i < n:
        c = src[i]
        if quote is not None:
            if c == "\\":
                if i + 1 < n:
                    nxt = src[i + 1]
                    if quote == "'" and nxt == "'":
                        out.append("'")
                    else:
                        out.append(c)
                        out.append(nxt)
                    i += 2
                else:  # text ends on a backslash inside a string
                    i += 1
                continue
            if c == quote:
                if quote == "'" and not _closes_single_quote(src, i + 1):
                    out.append("'")  # an apostrophe inside a single-quoted string
                else:
                    out.append('"')
                    quote = None
                i += 1
                continue
            out.append('\\"' if c == '"' else c)  # '"' only reaches here inside '...'
            i += 1
            continue
        if c == '"' or c == "'":
            if c == "'":
                sc.single_quoted += 1
            j = len(out) - 1
            while j >= 0 and out[j] in WS:
                j -= 1
            sc.string_after = out[j] if j >= 0 else ""
            quote = c
            out.append('"')
        elif c == "{" or c == "[":
            parents = [f.opener for f in stack]
            elem = c == "{" and parents in (["["], ["{", "["])
            stack.append(Frame(c, i, elem))
            out.append(c)
        elif c == "}" or c == "]":
            opener = "{" if c == "}" else "["
            j = len(out) - 1
            while j >= 0 and out[j] in WS:
                j -= 1
            if j >= 0 and out[j] == ",":
                del out[j]
                sc.trailing_commas += 1
            if stack[-1].opener != opener:
                if not any(f.opener == opener for f in stack):
                    sc.stray.append(c)
                    i += 1
                    continue
                while stack[-1].opener != opener:  # the model forgot to close these
                    frame = stack.pop()
                    closer = "}" if frame.opener == "{" else "]"
                    out.append(closer)
                    sc.inserted.append(closer)
                    closed(frame)
            frame = stack.pop()
            out.append(c)
            if not stack:
                sc.root_closed = True
                sc.src_end = i + 1
                return sc
            closed(frame)
        else:
            out.append(c)
        i += 1
    sc.in_string = quote is not None
    sc.src_end = n
    return sc
