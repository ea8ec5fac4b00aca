"""`GuidedBatch` (masks for a batch of rows) and its two faces: a transformers `LogitsProcessor` for
the torch reference and a numpy hook for the ONNX engine and the Triton `llm` model."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from coordexp.guided.grammar import (_Acc)
from coordexp.guided.guide import CoordJsonGuide, get_guide, xgr
from coordexp.prompt import PromptSpec




# ================================================================================= per batch
class GuidedBatch:
    """Per-row matchers + DFA states; builds the mask of every step (shared by both engines)."""

    def __init__(self, processor, prompt: PromptSpec, max_new_tokens: int, batch: int, ignore_eos: bool = False):
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.batch = int(batch)
        self.ignore_eos = bool(ignore_eos)
        self.guide: CoordJsonGuide | None = None  # set on the first step (the logits give the vocab size)
        self.closed_early = [False] * self.batch
        self.errors: list[str | None] = [None] * self.batch
        self.acc = [_Acc() for _ in range(self.batch)]
        self.count = [0] * self.batch  # tokens accepted per row
        self.done = [False] * self.batch  # stopped, or left unmasked (complete under ignore_eos, error)
        self.mask_s = 0.0  # time spent in the adapters (accepting tokens, building and applying masks) ...
        self.mask_cpu_s = 0.0  # ... and the CPU time of this process (robust on a loaded machine)
        self._setup_s = (0.0, 0.0)  # the one-off setup, not counted
        self.masked_steps = 0  # row-steps masked
        self.forced = 0  # tokens jump-forward appended without a model choice (stop tokens not counted)

    def _setup(self, vocab_size: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        g = self.guide = get_guide(self.processor, self.prompt, vocab_size)
        self.matchers = [g.new_matcher() for _ in range(self.batch)]
        self.state = [g.dfa.start] * self.batch
        self.bitmask = xgr.allocate_token_bitmask(self.batch, vocab_size)
        self._setup_s = (time.perf_counter() - t0, time.process_time() - c0)

    def accept(self, row: int, token: int) -> None:
        """The row generated `token` (not a stop token)."""
        if self.done[row]:
            return
        g = self.guide
        if not self.matchers[row].accept_token(int(token)):
            self._fail(row, f"token {token} rejected by the grammar at position {self.count[row]}")
            return
        acc = self.acc[row]
        q = g.feed(self.state[row], acc, int(token))
        if q < 0:
            self._fail(row, f"token {token} outside the planner's DFA at position {self.count[row]}")
            return
        if acc.closed is not None:
            acc.seen.add(acc.closed)
        self.state[row] = q
        self.count[row] += 1

    def stop(self, row: int) -> None:
        self.done[row] = True

    def _fail(self, row: int, why: str) -> None:
        self.errors[row] = why
        self.done[row] = True

    def row_mask(self, row: int, logits=None) -> np.ndarray | None:
        """The allowed tokens (bool [V]) for the row's next token: the grammar's (xgrammar fills
        the bitmask) in the skeleton's canonical tokenization, then the budget planner and the
        duplicate check. None: leave this row's logits alone. `logits` [B, V] (torch) tells whether
        the budget cut the model's own first choice (-> guided_closed_early)."""
        got = self._allowed(row)
        if got is None:
            return None
        bits, ids, keep = got
        if keep is not None and not keep.all() and not self.closed_early[row]:
            # closed early = the budget removed the token the model ranks first under the grammar
            if logits is None:
                self.closed_early[row] = True
            else:
                lr = logits[row].detach().float().cpu().numpy()
                self.closed_early[row] = not keep[int(np.argmax(lr[ids]))]
        return bits

    def _allowed(self, row: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
        """(allowed bool [V], the grammar's ids, what the budget planner kept of them or None when it
        did not look) for the row's next token; None when the row is left alone."""
        if self.done[row]:
            return None
        g = self.guide
        q = self.state[row]
        if q == g.dfa.accept and self.ignore_eos:
            self.done[row] = True  # complete; stop tokens are suppressed: nothing left to allow
            return None
        self.matchers[row].fill_next_token_bitmask(self.bitmask, row)
        words = self.bitmask[row].numpy()
        bits = g.allowed_here(q, np.unpackbits(words.view(np.uint8), bitorder="little")[:g.vocab_size].view(bool))
        left = self.max_new_tokens - self.count[row]  # tokens left, this one included
        tight = left - 1 < g.max_cost
        acc = self.acc[row]
        dup = g.duplicate_possible(q, acc)
        order = g.inversion_possible(q, acc)
        if not (tight or dup or order):
            return bits, None, None
        ids = np.flatnonzero(bits)
        keep = np.ones(len(ids), dtype=bool)
        budget = None
        if tight:
            costs = g.token_costs(q, ids)
            keep = costs <= left - 1
            if not keep.any():  # not even the cheapest ending fits: keep the cheapest tokens
                keep = costs == costs.min()
                self.closed_early[row] = True  # the answer will be cut, whatever the model wants
            budget = keep.copy()
        for banned, bans in ((dup, g.duplicate_bans), (order, lambda *a: g.inversion_bans(*a, left))):
            if banned:  # never at the cost of an empty mask (the budget comes first)
                ban = bans(q, acc, ids)
                if (keep & ~ban).any():
                    keep &= ~ban
        if not keep.all():
            bits[ids[~keep]] = False
        return bits, ids, budget

    def forced_tokens(self, row: int, limit: int) -> list[int]:
        """Jump-forward: the tokens the mask leaves no choice about after the row's last accepted
        token, at most `limit`, accepted into the row's matcher and state as they are found. Ends at
        the first step with a choice, at a step where the budget planner narrowed the choice before
        the row's `guided_closed_early` is known (that needs the model's logits), or with a stop
        token when only stop tokens are allowed (the row is then done; the id is the first stop id
        allowed). Greedy decoding would pick exactly these: every other logit is -inf."""
        t0, c0 = time.perf_counter(), time.process_time()
        run: list[int] = []
        g = self.guide
        while len(run) < limit and g is not None:
            got = self._allowed(row)
            if got is None:
                break
            bits, _, budget = got
            if budget is not None and not budget.all() and not self.closed_early[row]:
                break
            if self.ignore_eos:
                bits = bits & ~g.is_stop  # the decode loop suppresses them
            ids = np.flatnonzero(bits)
            if len(ids) == 0:
                break
            if g.is_stop[ids].all():
                run.append(int(ids[0]))
                self.stop(row)
                break
            if len(ids) != 1:
                break
            run.append(int(ids[0]))
            self.accept(row, int(ids[0]))
            self.forced += 1
        self.mask_s += time.perf_counter() - t0
        self.mask_cpu_s += time.process_time() - c0
        return run

    def mask(self, logits, rows: Sequence[int]) -> None:
        """Mask `logits` (a torch tensor [B, V], in place) for the given rows: -inf where not allowed.
        On CPU through numpy (np.copyto ... where: 5x faster than xgrammar's CPU kernel at a
        150k vocabulary), elsewhere with `masked_fill_` on the logits' device."""
        import torch

        if self.guide is None:
            self._setup(int(logits.shape[-1]))  # once per batch (the guide itself is cached)
        arr = logits.numpy() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
        n = 0
        for r in rows:
            bits = self.row_mask(r, logits)
            if bits is None:
                continue
            n += 1
            if arr is not None:
                np.copyto(arr[r], -np.inf, where=~bits)
            else:
                logits[r].masked_fill_(torch.from_numpy(~bits).to(logits.device), float("-inf"))
        self.masked_steps += n

    def timed(self, t0: float, c0: float) -> None:
        """Count the time since (t0 perf_counter, c0 process_time), less the one-off setup."""
        self.mask_s += time.perf_counter() - t0 - self._setup_s[0]
        self.mask_cpu_s += time.process_time() - c0 - self._setup_s[1]
        self._setup_s = (0.0, 0.0)

    def extras(self) -> list[dict[str, Any]]:
        out = []
        for row in range(self.batch):
            d: dict[str, Any] = {"guided": True, "guided_closed_early": bool(self.closed_early[row])}
            if self.errors[row]:
                d["guided_error"] = self.errors[row]
            out.append(d)
        return out


# ================================================================================= engine adapters
from transformers import LogitsProcessor  # noqa: E402  (xgrammar imports transformers anyway)


class GuidedLogitsProcessor(LogitsProcessor):
    """transformers `LogitsProcessor` for `model.generate` (the torch reference engine).

    Call order in `generate`: after the repetition penalty / min_new_tokens, before temperature and
    top-p -- the same place `OnnxParts.generate` calls its logits hook."""

    def __init__(self, processor, prompt: PromptSpec, params, batch: int):
        self.state = GuidedBatch(processor, prompt, params.max_new_tokens, batch, ignore_eos=params.ignore_eos)
        self.stop_ids = set(int(s) for s in processor.stop_token_ids)
        self.prompt_len: int | None = None

    def __call__(self, input_ids, scores):
        import torch

        t0, c0 = time.perf_counter(), time.process_time()
        s = self.state
        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1])
        else:
            last = input_ids[:, -1].tolist()
            for row, tok in enumerate(last):
                if s.done[row]:
                    continue
                if tok in self.stop_ids:
                    s.stop(row)
                else:
                    s.accept(row, tok)
        if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not scores.is_contiguous():
            scores = scores.float().contiguous()
        s.mask(scores, range(s.batch))
        s.timed(t0, c0)
        return scores

    def extras(self) -> list[dict[str, Any]]:
        return self.state.extras()


class GuidedLogitsHook:
    """`logits_hook(step, generated, logits[B, V]) -> logits` for `OnnxParts.generate` (in-process
    ONNX engine and the Triton llm model). A row is running at `step` when it holds `step` ids, or,
    when the loop passes `active` (the rows still running; jump-forward appends several ids per
    step), when it is listed there. Ids the hook has not seen yet are accepted first."""

    def __init__(self, processor, prompt: PromptSpec, params, batch: int):
        self.state = GuidedBatch(processor, prompt, params.max_new_tokens, batch, ignore_eos=params.ignore_eos)

    def _sync(self, row: int, ids: Sequence[int]) -> None:
        s = self.state
        for t in ids[s.count[row]:]:
            if s.done[row]:
                break
            s.accept(row, int(t))

    def __call__(self, step: int, generated: Sequence[Sequence[int]], logits: np.ndarray,
                 active: Sequence[int] | None = None) -> np.ndarray:
        import torch

        t0, c0 = time.perf_counter(), time.process_time()
        s = self.state
        running = set(active) if active is not None else {r for r, ids in enumerate(generated) if len(ids) == step}
        rows = []
        for row, ids in enumerate(generated):
            if s.done[row]:
                continue
            if row in running:
                if s.guide is not None:
                    self._sync(row, ids)
                rows.append(row)
            else:
                s.stop(row)  # it emitted a stop token at the last step
        out = np.ascontiguousarray(logits, dtype=np.float32)
        if out is logits:
            out = out.copy()
        s.mask(torch.from_numpy(out), rows)
        s.timed(t0, c0)
        return out

    def forced_tokens(self, row: int, ids: Sequence[int], limit: int) -> list[int]:
        """Jump-forward for a decode loop: `ids` the row's ids so far (its last token just chosen);
        the tokens the grammar forces next (`GuidedBatch.forced_tokens`), at most `limit`."""
        s = self.state
        if s.guide is None or s.done[row]:
            return []
        self._sync(row, ids)
        return s.forced_tokens(row, limit)

    def extras(self) -> list[dict[str, Any]]:
        return self.state.extras()


def guided_logits_processor(processor, prompt: PromptSpec, params, batch: int = 1) -> GuidedLogitsProcessor:
    """The guided-decoding `LogitsProcessor` for the torch reference (`model.generate`)."""
    return GuidedLogitsProcessor(processor, prompt, params, batch)


def guided_logits_hook(processor, prompt: PromptSpec, params, batch: int = 1) -> GuidedLogitsHook:
    """The guided-decoding logits hook for `OnnxParts.generate` (same masks as the processor)."""
    return GuidedLogitsHook(processor, prompt, params, batch)
