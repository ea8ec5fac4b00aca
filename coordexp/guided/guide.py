"""Layers 2 and 3: `CoordJsonGuide`, the per-vocabulary token tables, budget planner and duplicate
guard over the grammar's DFA."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

try:
    import xgrammar as xgr
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "guided decoding needs xgrammar: pip install --no-deps 'xgrammar>=0.2.8,<0.3' 'apache-tvm-ffi>=0.1.11' "
        f"(or `pip install coordexp-serve[guided]`, which also pulls triton): {e}") from e

from coordexp.guided.grammar import _COMMA, _DESC_REST, _RBRACKET, COORD, INF, _Acc, _Dfa, grammar_ebnf
from coordexp.prompt import PromptSpec
from coordexp.tokens import NUM_COORD_TOKENS, coord_tokens




class CoordJsonGuide:
    """Everything shared by all rows for one (tokenizer, vocabulary size, prompt format): the
    compiled grammar, the DFA, the cost table and the token classes. Build with `get_guide`."""

    def __init__(self, tokenizer, vocab_size: int, coord_format: str, field_order: str,
                 stop_token_ids: Sequence[int], canonical: bool = True, bbox_format: str = "xyxy"):
        t0 = time.perf_counter()
        self.vocab_size = int(vocab_size)
        self.canonical = bool(canonical)
        self.coord_format = coord_format
        self.field_order = field_order
        # x2 >= x1, y2 >= y1 holds for xyxy boxes only: in a centre format the third and fourth
        # numbers are sizes, free of the first two
        self.box_order = bbox_format == "xyxy"
        self.stop_ids = [int(s) for s in stop_token_ids]
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.stop_ids)
        vocab = tokenizer.get_vocab()
        missing = [t for t in coord_tokens() if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no coord tokens ({missing[0]} ...): not a CoordExp checkpoint")
        self.coord_ids = np.asarray([vocab[t] for t in coord_tokens()], dtype=np.int64)
        self.ebnf = grammar_ebnf(coord_format, field_order, self.coord_ids.tolist())
        self.compiled = xgr.GrammarCompiler(self.info, max_threads=1).compile_grammar(self.ebnf)
        self.dfa = _Dfa(coord_format, field_order)
        V = self.vocab_size
        self.coord_value = np.full(V, -1, dtype=np.int64)
        self.coord_value[self.coord_ids] = np.arange(NUM_COORD_TOKENS)
        self.is_coord = self.coord_value >= 0
        self.is_stop = np.zeros(V, dtype=bool)
        self.is_stop[[s for s in self.stop_ids if s < V]] = True
        decoded = list(self.info.decoded_vocab)[:V]
        self.token_bytes: list[bytes] = decoded + [b""] * (V - len(decoded))
        # desc tokens: every byte a desc byte (-> the state stays "in desc"); desc-first tokens too
        self.plain = np.zeros(V, dtype=bool)
        self.plain_first = np.zeros(V, dtype=bool)
        self.plain_space_end = np.zeros(V, dtype=bool)  # -> the desc state after a space
        for t, b in enumerate(self.token_bytes):
            if b and not self.is_coord[t] and not b.translate(None, _DESC_REST):
                self.plain[t] = True
                self.plain_first[t] = b[0] != 0x20
                self.plain_space_end[t] = b[-1] == 0x20
        self._delta: dict[tuple[int, int], int] = {}
        # state -> the only tokens allowed there (the skeleton's canonical tokenization, see the package doc)
        self.canon: dict[int, np.ndarray] = self._canonical_tokens(tokenizer) if self.canonical else {}
        self.cost = self._costs()
        self.max_cost = int(max(self.cost))
        self.build_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ DFA over tokens
    def symbols(self, t: int) -> Sequence[int]:
        return (COORD,) if self.is_coord[t] else self.token_bytes[t]

    def delta(self, q: int, t: int) -> int:
        """The DFA state after token `t` from state `q`; -1 when the token is not allowed."""
        key = (q, t)
        r = self._delta.get(key)
        if r is None:
            r = -1
            if 0 <= t < self.vocab_size and not self.is_stop[t] and self.symbols(t):
                r = q
                for s in self.symbols(t):
                    r = self.dfa.trans[r].get(s, -1)
                    if r < 0:
                        break
            self._delta[key] = r
        return r

    def feed(self, q: int, acc: _Acc, t: int) -> int:
        """Advance state and geometry bookkeeping by token `t` (allowed from `q`); the new state."""
        trans, geom = self.dfa.trans, self.dfa.geom
        acc.closed = None
        for s in self.symbols(t):
            r = trans[q].get(s, -1)
            if r < 0:
                return -1
            g = geom[q]
            if g is not None:
                if s == COORD:
                    acc.vals.append(int(self.coord_value[t]))
                elif 48 <= s <= 57:
                    acc.digits += chr(s)
                elif s in (_COMMA, _RBRACKET):
                    if acc.digits:
                        acc.vals.append(int(acc.digits))
                        acc.digits = ""
                    if s == _RBRACKET and geom[r] is None:
                        acc.closed = (g, tuple(acc.vals))
                        acc.vals = []
            q = r
        return q

    def _canonical_tokens(self, tokenizer) -> dict[int, np.ndarray]:
        """For every state inside the fixed skeleton (not in a desc, not at a coordinate): the first
        token of the tokenizer's own encoding of each way the skeleton can go on from there, up to
        the next free part (desc text, a coordinate) or the end. These are the tokens the model was
        trained on (`format_coordjson` text, tokenized); from such a state no other token is allowed."""
        dfa = self.dfa
        free = ("desc0", "desc", "slot", "num")
        memo: dict[int, list[bytes]] = {}

        def rest(q: int) -> list[bytes]:
            """The skeleton strings from q to the next free state (acyclic: every loop of the DFA
            goes through a desc, slot or num state)."""
            if dfa.kind[q] in free or q == dfa.accept:
                return [b""]
            if q not in memo:
                memo[q] = [bytes([s]) + tail for s, r in dfa.trans[q].items() if s != COORD for tail in rest(r)]
            return memo[q]

        canon: dict[int, np.ndarray] = {}
        for q in range(dfa.n):
            if dfa.kind[q] in free or q == dfa.accept:
                continue
            firsts = set()
            for text in rest(q):
                ids = tokenizer.encode(text.decode(), add_special_tokens=False) if text else []
                if not ids or self.delta(q, int(ids[0])) < 0:
                    firsts = set()  # this tokenizer spells it some other way: leave the state free
                    break
                firsts.add(int(ids[0]))
            if firsts:
                canon[q] = np.asarray(sorted(firsts), dtype=np.int64)
        return canon

    def allowed_here(self, q: int, bits: np.ndarray) -> np.ndarray:
        """The grammar's bitmask `bits` (bool [V]) narrowed to the canonical tokens of state q."""
        ids = self.canon.get(q)
        if ids is None:
            return bits
        out = np.zeros_like(bits)
        out[ids] = bits[ids]
        return out if out.any() else bits  # never leave nothing (the DFA and xgrammar agree; a safety net)

    def _costs(self) -> np.ndarray:
        """cost[q]: fewest tokens from q to a complete answer, over the tokens that spell the
        skeleton of the format (a realisable upper bound of the true minimum, and self-consistent:
        from every state one of those tokens lowers the cost by exactly one)."""
        from coordexp.prompt import PromptSpec, format_coordjson

        spec = PromptSpec(coord_format=self.coord_format, field_order=self.field_order, object_order="as_given")
        skeleton = format_coordjson([{"desc": "a", "bbox_2d": [0, 0, 0, 0]},
                                     {"desc": "a", "poly": [0, 0, 0, 0, 0, 0, 0, 0]}], spec)
        skeleton += "\x01" + format_coordjson([], spec)
        skeleton = skeleton.replace("<|coord_0|>", "\x01").encode()
        closing = [t for t, b in enumerate(self.token_bytes)
                   if b and not self.is_coord[t] and not self.is_stop[t] and b in skeleton]
        closing.append(int(self.coord_ids[0]))  # all coord tokens cost the same: one stands for them
        n = self.dfa.n
        rev: list[list[int]] = [[] for _ in range(n)]
        for q in range(n):
            for t in (self.canon[q].tolist() if q in self.canon else closing):
                r = self.delta(q, t)
                if r >= 0:
                    rev[r].append(q)
        cost = np.full(n, INF, dtype=np.int64)
        cost[self.dfa.accept] = 0
        frontier = [self.dfa.accept]
        while frontier:
            nxt = []
            for r in frontier:
                for q in rev[r]:
                    if cost[q] == INF:
                        cost[q] = cost[r] + 1
                        nxt.append(q)
            frontier = nxt
        if (cost == INF).any():
            bad = int(np.flatnonzero(cost == INF)[0])
            raise RuntimeError(f"guided: DFA state {bad} cannot reach a complete answer with this tokenizer")
        return cost

    def token_costs(self, q: int, ids: np.ndarray) -> np.ndarray:
        """cost of the state each of `ids` (allowed from q) leads to; stop tokens cost 0."""
        out = np.empty(len(ids), dtype=np.int64)
        kind = self.dfa.kind[q]
        rest = np.ones(len(ids), dtype=bool)
        if kind in ("desc0", "desc"):
            cls = (self.plain_first if kind == "desc0" else self.plain)[ids]
            out[cls] = np.where(self.plain_space_end[ids[cls]], self.cost[self.dfa.desc2], self.cost[self.desc1])
            rest &= ~cls
        elif kind == "slot" and self.coord_format == "tokens":
            cls = self.is_coord[ids]
            out[cls] = self.cost[self.dfa.trans[q][COORD]]
            rest &= ~cls
        for k in np.flatnonzero(rest):
            t = int(ids[k])
            if self.is_stop[t]:
                out[k] = 0
            else:
                r = self.delta(q, t)
                out[k] = self.cost[r] if r >= 0 else INF
        return out

    @property
    def desc1(self) -> int:
        return self.dfa.desc1

    # ------------------------------------------------------------------ duplicates
    def duplicate_possible(self, q: int, acc: _Acc) -> bool:
        """Cheap pre-check: could one token from q complete a geometry already written?"""
        g = self.dfa.geom[q]
        if g is None or not acc.seen:
            return False
        vals = tuple(acc.vals)
        n = len(vals)
        if g == "bbox_2d":
            return self.dfa.index[q] == 3 and n == 3 and any(gt == g and pts[:3] == vals for gt, pts in acc.seen)
        return any(gt == g and 0 <= len(pts) - n <= 2 and pts[:n] == vals for gt, pts in acc.seen)

    # ------------------------------------------------------------------ box order
    def inversion_possible(self, q: int, acc: _Acc) -> bool:
        """Cheap pre-check: is q writing x2 or y2 of an xyxy bbox_2d (which must not be below x1 / y1)?"""
        return self.box_order and self.dfa.geom[q] == "bbox_2d" and len(acc.vals) in (2, 3)

    def inversion_bans(self, q: int, acc: _Acc, ids: np.ndarray, left: int) -> np.ndarray:
        """Which of `ids` (allowed from q, `left` tokens left with this one) would write an inverted
        box (x2 < x1 or y2 < y1), or in numeric mode start a number that cannot reach its lower
        bound within the budget. The parser notes an inverted box as a repair, so guided answers
        never hold one (unless the budget leaves nothing else)."""
        if self.coord_format == "tokens":
            vals = self.coord_value[ids]
            return (vals >= 0) & (vals < acc.vals[len(acc.vals) - 2])
        ban = np.zeros(len(ids), dtype=bool)
        for k, t in enumerate(ids.tolist()):
            if self.is_stop[t]:
                continue
            a = acc.copy()
            r = self.feed(q, a, t)
            if r < 0:
                continue
            if a.closed is not None:
                ban[k] = a.closed[0] == "bbox_2d" and _digits_to_order(a.closed[1]) is None
            else:
                extra = _digits_to_order(a.vals, a.digits)
                ban[k] = extra is None or self.cost[r] + extra > left - 1
        return ban

    def duplicate_bans(self, q: int, acc: _Acc, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` (allowed from q) would complete a geometry already in `acc.seen`
        (or, numeric bbox, leave only such completions)."""
        ban = np.zeros(len(ids), dtype=bool)
        g = self.dfa.geom[q]
        if g is None or not acc.seen:
            return ban
        seen_g = [pts for (gt, pts) in acc.seen if gt == g]
        if not seen_g:
            return ban
        idx = self.dfa.index[q]
        if g == "bbox_2d":
            prefix = tuple(acc.vals)
            if len(prefix) != 3 or idx != 3:
                return ban
            banned = {pts[3] for pts in seen_g if pts[:3] == prefix}
            if not banned:
                return ban
            if self.coord_format == "tokens":
                vals = self.coord_value[ids]
                return np.isin(vals, list(banned)) & (vals >= 0)
            for k, t in enumerate(ids.tolist()):
                if self.is_stop[t]:
                    continue
                a = acc.copy()
                r = self.feed(q, a, t)
                if a.closed is not None:
                    ban[k] = a.closed[1][3] in banned
                elif r >= 0 and self.dfa.kind[r] == "num" and self.dfa.index[r] == 3:
                    ban[k] = not _number_alive(a.digits, banned)
            return ban
        # poly: only the token that closes it can complete a duplicate
        for k, t in enumerate(ids.tolist()):
            if self.is_stop[t] or self.is_coord[t] or _RBRACKET not in self.token_bytes[t]:
                continue
            a = acc.copy()
            self.feed(q, a, t)
            if a.closed is not None and a.closed in acc.seen:
                ban[k] = True
        return ban

    def new_matcher(self):
        return xgr.GrammarMatcher(self.compiled)


def _digits_to_order(pts: Sequence[int], digits: str = "") -> int | None:
    """How many more digits the number in progress needs so that these bbox_2d coordinates end with
    x2 >= x1 and y2 >= y1 (0: fine as it stands); None when they cannot (numbers 0..999, no
    leading zeros)."""
    for i in (2, 3):
        if len(pts) > i and pts[i] < pts[i - 2]:
            return None
    i = len(pts)
    if not digits or i not in (2, 3):
        return 0
    lo = pts[i - 2]
    for extra in range(0, 1 if digits == "0" else 4 - len(digits)):
        if int(digits + "9" * extra) >= lo:
            return extra
    return None


def _number_alive(digits: str, banned: set) -> bool:
    """Can a number that starts with `digits` still end on a value not in `banned`?"""
    if digits and int(digits) not in banned:
        return True
    if digits == "0" or len(digits) >= 3:
        return False
    return any(_number_alive(digits + d, banned) for d in ("123456789" if not digits else "0123456789"))


_GUIDES: dict[tuple, CoordJsonGuide] = {}


def get_guide(processor, prompt: PromptSpec, vocab_size: int, canonical: bool = True) -> CoordJsonGuide:
    """The (cached) guide for this processor's tokenizer, vocabulary size and prompt format
    (`canonical=False`: the skeleton in any tokenization, as before jump-forward; measurements only)."""
    key = (id(processor.tokenizer), int(vocab_size), prompt.coord_format, prompt.field_order, bool(canonical),
           prompt.bbox_format)
    guide = _GUIDES.get(key)
    if guide is None or guide._tokenizer_ref is not processor.tokenizer:
        guide = CoordJsonGuide(processor.tokenizer, vocab_size, prompt.coord_format, prompt.field_order,
                               processor.stop_token_ids, canonical=canonical, bbox_format=prompt.bbox_format)
        guide._tokenizer_ref = processor.tokenizer  # keeps id() unique while cached
        _GUIDES[key] = guide
    return guide
