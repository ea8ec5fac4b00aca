"""The one decode loop of every engine: static batches (in-process engines, the static llm steps,
export validation) and the in-flight scheduler (`coordexp.serving.inflight`) both drive it.

`DecodeLoop` runs rows over a `DecodeRows` implementation (a model runtime's batched KV cache:
`coordexp.engines.onnx_engine.OnnxRows`, `coordexp.serving.torch_parts.TorchRows` /
`TorchFixedRows`). One iteration is two calls:

1. `decide()`: every running row picks its next token from its own logits with its own parameters:
   stop tokens suppressed with `ignore_eos`, then its guided hook (rows of one static batch share a
   batch hook, each row at its `slot`; in-flight rows have one hook each), then the repetition
   penalty, temperature / top-p and its own seeded generator (`coordexp.decoding.sampling`). A stop
   token ends the row (not kept), any other is appended and the row ends at `max_new_tokens`. With
   jump-forward (`DecodeRows.jump_forward`, guided rows) the tokens the grammar forces next are
   appended at once with the same bookkeeping. Errors stay with their row (`Outcome.failed`).
2. `advance(drop)`: rows that ended, failed or are dropped leave the batch, the others feed their new
   ids (one, or the chosen one plus the forced run) in one decoder call.

Static batching is this loop with admission closed after the first batch (`decode_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from coordexp.decoding.sampling import choose_tokens
from coordexp.generation import GenerationParams


class DecodeRows(Protocol):
    """The running batch as the loop drives it: rows in batch order, each with its KV cache."""

    jump_forward: bool  # whether guided rows append grammar-forced runs (fed as one chunk)

    def __len__(self) -> int:
        ...

    def admit(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
              image_embeds: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
        """Prefill these LEFT padded prompts and append their rows at the end of the batch -> their
        next-token logits [n, V] float32. On an exception the batch is unchanged."""
        ...

    def step(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Feed each running row its new ids (batch order; one id, or more with jump-forward) ->
        the next logits [B, V] float32 (each row's last position)."""
        ...

    def keep(self, positions: Sequence[int]) -> None:
        """Keep only the rows at these batch positions (ascending), dropping the others."""
        ...


def closed_early(hook: Any, slot: int) -> bool:
    """Guided decoding had to close row `slot`'s answer early to fit the token limit (no hook: no)."""
    state = getattr(hook, "state", None)
    return bool(state is not None and state.closed_early[slot])


@dataclass(eq=False)  # identity: rows are looked up by object
class DecodeRow:
    """One row's decoding state. `hook`: its guided logits hook, at row `slot` of it; `seq`: the
    repetition-penalty history (prompt + generated; None without a penalty); `owner` / `index`: whom
    the row answers (the scheduler's request, the row within it)."""

    params: GenerationParams
    hook: Any = None
    slot: int = 0
    seq: list[int] | None = None
    rng: np.random.Generator | None = None
    generated: list[int] = field(default_factory=list)
    owner: Any = None
    index: int = 0

    @classmethod
    def start(cls, params: GenerationParams, prompt_ids: Sequence[int], hook: Any = None, slot: int = 0,
              owner: Any = None, index: int = 0) -> "DecodeRow":
        seq = [int(t) for t in prompt_ids] if params.repetition_penalty != 1.0 else None
        rng = None if params.greedy else np.random.default_rng(int(params.seed))
        return cls(params, hook, slot, seq, rng, [], owner, index)

    @property
    def closed_early(self) -> bool:
        return closed_early(self.hook, self.slot)


@dataclass
class Outcome:
    """What one `decide()` did: rows that got new ids, rows that ended (stop token or limit), rows
    whose hook or sampler raised."""

    advanced: list[DecodeRow] = field(default_factory=list)
    finished: list[DecodeRow] = field(default_factory=list)
    failed: list[tuple[DecodeRow, BaseException]] = field(default_factory=list)


class DecodeLoop:
    def __init__(self, rows: DecodeRows, stop_ids: Sequence[int]):
        self.rows = rows
        self.stop = set(int(s) for s in stop_ids)
        self.stop_list = sorted(self.stop)
        self.running: list[DecodeRow] = []
        self.logits: np.ndarray | None = None  # next-token logits of the running rows, batch order
        self.iterations = 0
        self._chunks: dict[int, list[int]] = {}  # id(row) -> ids to feed (after decide)
        self._ended: set[int] = set()  # id(row) of rows that ended or failed (after decide)
        self._sharing: dict[int, list[DecodeRow]] = {}  # id(hook) -> every row admitted with it

    def admit(self, new: Sequence[DecodeRow], batch: Sequence[np.ndarray]) -> None:
        """Prefill `batch` (input_ids, attention_mask, image_grid_thw, image_embeds, deepstack: one
        LEFT padded row per `new` row) and let the rows join; on an exception nothing changes."""
        logits = np.asarray(self.rows.admit(*batch), dtype=np.float32)
        for r in new:
            if r.hook is not None:
                self._sharing.setdefault(id(r.hook), []).append(r)
        self.running.extend(new)
        self.logits = logits if self.logits is None else np.concatenate([self.logits, logits], axis=0)

    def remove(self, gone: Sequence[DecodeRow]) -> None:
        """These rows leave the batch between iterations (a cancelled or failed request)."""
        drop = set(map(id, gone))
        keep = [b for b, r in enumerate(self.running) if id(r) not in drop]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[b] for b in keep]
        self.rows.keep(keep)
        self.logits = self.logits[keep] if self.running else None

    # ------------------------------------------------------------------------ one iteration
    def decide(self) -> Outcome:
        out = Outcome()
        self._chunks, self._ended = {}, set()
        logits = self._hooked(out)
        jump = self.rows.jump_forward
        for b, row in enumerate(self.running):
            if id(row) in self._ended:  # its hook failed
                continue
            try:
                tok = int(choose_tokens(logits[b:b + 1], [np.asarray(row.seq)] if row.seq is not None else [],
                                        row.params, [row.rng])[0])
            except Exception as e:
                self._fail(row, e, out)
                continue
            p = row.params
            if tok in self.stop and not p.ignore_eos:
                self._end(row, out)
                continue
            self._append(row, tok)
            out.advanced.append(row)
            chunk = [tok]
            if len(row.generated) >= p.max_new_tokens:
                self._end(row, out)
                continue
            if jump and not self._jump(row, chunk, out):
                continue
            self._chunks[id(row)] = chunk
        self.iterations += 1
        return out

    def advance(self, drop: Sequence[DecodeRow] = ()) -> None:
        """Rows that ended, failed or are in `drop` leave; the others feed their new ids."""
        gone = self._ended | set(map(id, drop))
        keep = [b for b, r in enumerate(self.running) if id(r) not in gone]
        chunks = [self._chunks[id(self.running[b])] for b in keep]
        self.running = [self.running[b] for b in keep]
        self.rows.keep(keep)
        self._chunks, self._ended = {}, set()
        self.logits = self.rows.step(chunks) if self.running else None

    # ------------------------------------------------------------------------ helpers
    def _hooked(self, out: Outcome) -> np.ndarray:
        """The running rows' logits after `ignore_eos` and their guided hooks (one call per hook)."""
        logits = self.logits
        if any(r.params.ignore_eos for r in self.running):
            logits = logits.copy()
            stops = [s for s in self.stop_list if s < logits.shape[1]]
            for b, r in enumerate(self.running):
                if r.params.ignore_eos:
                    logits[b, stops] = -np.inf
        groups: dict[int, list[int]] = {}
        for b, r in enumerate(self.running):
            if r.hook is not None:
                groups.setdefault(id(r.hook), []).append(b)
        for key in [k for k in self._sharing if k not in groups]:  # every row of that hook has left
            del self._sharing[key]
        if not groups:
            return logits
        logits = logits.copy()
        for key, positions in groups.items():
            hook = self.running[positions[0]].hook
            size = max(r.slot for r in self._sharing[key]) + 1
            full = np.zeros((size, logits.shape[1]), dtype=np.float32)  # rows that ended: zeros
            generated: list[list[int]] = [[] for _ in range(size)]
            for r in self._sharing[key]:
                generated[r.slot] = r.generated
            for b in positions:
                full[self.running[b].slot] = logits[b]
            # `active` only for hooks that jump forward (their rows may add several ids a step); the
            # plain hook API is (step, generated, logits), a row running when it holds `step` ids
            kw = ({"active": [self.running[b].slot for b in positions]}
                  if getattr(hook, "forced_tokens", None) is not None else {})
            try:
                masked = np.asarray(hook(self.iterations, generated, full, **kw), dtype=np.float32)
            except Exception as e:
                for b in positions:
                    self._fail(self.running[b], e, out)
                continue
            for b in positions:
                logits[b] = masked[self.running[b].slot]
        return logits

    @staticmethod
    def _append(row: DecodeRow, tok: int) -> None:
        row.generated.append(tok)
        if row.seq is not None:
            row.seq.append(tok)

    def _jump(self, row: DecodeRow, chunk: list[int], out: Outcome) -> bool:
        """Append the run the grammar forces after the chosen token to `chunk`; False when the row
        ended inside it (stop token or limit) or its hook failed."""
        forced_of = getattr(row.hook, "forced_tokens", None)
        if forced_of is None:
            return True
        p = row.params
        try:
            run = forced_of(row.slot, row.generated, p.max_new_tokens - len(row.generated))
        except Exception as e:
            self._fail(row, e, out)
            return False
        for tok in run:
            tok = int(tok)
            if tok in self.stop and not p.ignore_eos:
                self._end(row, out)
                return False
            self._append(row, tok)
            chunk.append(tok)
            if len(row.generated) >= p.max_new_tokens:
                self._end(row, out)
                return False
        return True

    def _end(self, row: DecodeRow, out: Outcome) -> None:
        self._ended.add(id(row))
        out.finished.append(row)

    def _fail(self, row: DecodeRow, exc: BaseException, out: Outcome) -> None:
        self._ended.add(id(row))
        out.failed.append((row, exc))


def decode_batch(rows: DecodeRows, stop_ids: Sequence[int], input_ids: np.ndarray, attention_mask: np.ndarray,
                 image_grid_thw: np.ndarray, image_embeds: np.ndarray, deepstack: np.ndarray,
                 params: GenerationParams, logits_hook: Any = None,
                 on_step: Callable[[list[list[int]], list[int]], None] | None = None) -> list[list[int]]:
    """A static batch: the loop with admission closed after the first batch. Generated ids per row
    (stop token excluded) of a LEFT padded batch `[B, T]`, all rows sharing `params` and the batch
    hook `logits_hook` (row b at slot b). The repetition penalty sees each row's padded prompt, as
    transformers' `generate` does. `on_step(generated, finished)` after every step: the ids so far
    and the rows that ended at it (each row reported once). A failing row fails the batch."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} differ")
    batch = [DecodeRow.start(params, input_ids[b], logits_hook, slot=b) for b in range(input_ids.shape[0])]
    loop = DecodeLoop(rows, stop_ids)
    loop.admit(batch, (input_ids, attention_mask, image_grid_thw, image_embeds, deepstack))
    generated = [r.generated for r in batch]
    while loop.running:
        out = loop.decide()
        if out.failed:
            raise out.failed[0][1]
        if on_step is not None:
            on_step(generated, [r.slot for r in out.finished])
        loop.advance()
    return generated
