"""In-flight (continuous) batching for the decoupled `llm_stream` model: an iteration-level scheduler.

`execute()` hands its requests to `InflightScheduler.submit` and returns at once; a background
thread runs the decode loop. At every iteration:

1. queued rows join the running batch (at most `max_batch_size` rows run): their prompts go through
   one prefill call (`DecodeRows.admit`) and their KV caches are merged into the batch's;
2. every running row picks its next token from its own logits with its own decoding parameters
   (repetition penalty, temperature / top-p with its own seeded RNG, `ignore_eos`, its own guided
   hook made by the guided-hook factory with batch 1);
3. rows that stopped (stop token or length limit) leave the batch at once and their request gets
   its final response as soon as its last row is done; streamed requests get one response per
   step carrying the ids so far (cumulative, as `DecoupledRun` sends them);
4. one decoder call feeds the chosen token of every remaining row (`DecodeRows.step`); with
   jump-forward on (`OnnxParts.jump_forward`), a guided row also appends the run of tokens its
   grammar forces next and feeds [token, forced...] as one chunk in that same call (rows with
   shorter chunks padded at the front with attention_mask 0, as `OnnxParts.generate` does).

Rows of the batch have different past lengths: the cache is LEFT padded to the longest past
(attention_mask 0 on the padding, positions given explicitly per row: prompt_len + M-RoPE delta +
step, as `OnnxParts.generate` computes them), so a row's logits are those of its own prompt and
tokens; greedy answers equal the in-process `OnnxEngine` and the static batcher token for token.

Errors stay with their request: a malformed request is refused in `submit`, a failing prefill
fails the requests it admitted (retried one by one to isolate the bad one), a failing guided hook
or sampler fails its row's request. Only a failing decoder call over the whole batch fails the
requests running in it (nothing else can be blamed). `close()` (the model's `finalize`) stops the
thread and fails every queued or running request with a clear error.

The decode loop depends only on the small `DecodeRows` interface ("admit these rows, feed one
token per row, keep these rows"): `OnnxRows` implements it on `OnnxParts`, and
`coordexp.serving.torch_parts.TorchRows` on the checkpoint in PyTorch (`--backend torch`); the token
choice is `coordexp.decoding.sampling`, as in the static loops.
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from coordexp.decoding.blocks import chunk_block, left_pad
from coordexp.decoding.sampling import choose_tokens
from coordexp.generation import GenerationParams
from coordexp.serving.common import Generated, LlmItem, RequestError, outputs_of, pad_stack, prompt_lengths

CANCEL_CHECK_S = 0.25  # how often running rows' requests are asked whether the client cancelled them
# send(outputs_or_error, final): one request's response sender
Send = Callable[[dict[str, np.ndarray] | BaseException, bool], None]


class DecodeRows(Protocol):
    """The running batch as the scheduler drives it: rows in batch order, each with its KV cache."""

    def __len__(self) -> int:
        ...

    def admit(self, items: Sequence[LlmItem]) -> np.ndarray:
        """Prefill these rows and append them at the end of the batch -> their next-token logits
        [n, V] float32. On an exception the batch is unchanged."""
        ...

    jump_forward: bool  # whether guided rows append grammar-forced runs (fed as one chunk)

    def step(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """Feed each running row its new ids (batch order; one id, or more with jump-forward) ->
        the next logits [B, V] float32 (each row's last position)."""
        ...

    def keep(self, positions: Sequence[int]) -> None:
        """Keep only the rows at these batch positions (ascending), dropping the others' caches."""
        ...


def prompt_batch(items: Sequence[LlmItem], pad_token_id: int) -> tuple[np.ndarray, ...]:
    """Rows joining the batch as one LEFT padded prefill: (input_ids, attention_mask, image_grid_thw,
    image_embeds, deepstack)."""
    input_ids = pad_stack([it.ids for it in items], value=pad_token_id, left=True)
    prompt_mask = pad_stack([np.ones_like(it.ids) for it in items], value=0, left=True)
    grid = np.stack([it.grid for it in items]).astype(np.int64)
    embeds = np.concatenate([it.embeds for it in items], axis=0)
    deep = np.concatenate([it.deepstack for it in items], axis=1)
    return input_ids, prompt_mask, grid, embeds, deep


def trimmed_start(mask: np.ndarray) -> int:
    """The first cache column a row still uses (after the longest rows left, the columns before it
    are padding every row has)."""
    used = np.flatnonzero(mask.any(axis=0))
    return int(used[0]) if len(used) else mask.shape[1]


class OnnxRows:
    """`DecodeRows` on `OnnxParts`: one left-padded KV cache for the batch (past lengths differ per
    row; the padding has attention_mask 0), trimmed when the longest rows leave."""

    def __init__(self, parts: Any, pad_token_id: int):
        self.parts = parts
        self.pad_token_id = int(pad_token_id)
        self.presents: list[np.ndarray] = []  # [k0, v0, k1, v1, ...], each [B, kv_heads, P, head_dim]
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, P]
        self.base = np.zeros(0, dtype=np.int64)  # prompt_len + M-RoPE delta per row
        self.steps = np.zeros(0, dtype=np.int64)  # tokens fed per row since its prefill

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def admit(self, items: Sequence[LlmItem]) -> np.ndarray:
        input_ids, prompt_mask, grid, embeds, deep = prompt_batch(items, self.pad_token_id)
        logits, presents, mask, deltas = self.parts.prefill(input_ids, prompt_mask, grid, embeds, deep)
        mask = np.asarray(mask, dtype=np.int64)
        base = prompt_mask.sum(-1).astype(np.int64) + np.asarray(deltas, dtype=np.int64).reshape(-1)
        if not len(self):
            self.presents, self.mask = list(presents), mask
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            self.presents = [np.concatenate([left_pad(old, length, 2), left_pad(new, length, 2)], axis=0)
                             for old, new in zip(self.presents, presents)]
            self.mask = np.concatenate([left_pad(self.mask, length, 1), left_pad(mask, length, 1)], axis=0)
        self.base = np.concatenate([self.base, base])
        self.steps = np.concatenate([self.steps, np.zeros(len(items), dtype=np.int64)])
        return np.asarray(logits, dtype=np.float32)

    @property
    def jump_forward(self) -> bool:
        return bool(getattr(self.parts, "jump_forward", False))

    def step(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        ids, new_mask, pos = chunk_block(chunks, self.base + self.steps, self.pad_token_id)
        feeds, mask = self.parts.step_feeds(ids, new_mask, pos, self.mask, self.presents)
        logits, presents = self.parts.decoder_step(feeds)
        self.presents, self.mask = list(presents), mask
        self.steps = self.steps + np.asarray([len(c) for c in chunks], dtype=np.int64)
        return logits

    def keep(self, positions: Sequence[int]) -> None:
        sel = np.asarray(positions, dtype=np.int64)
        if len(sel) == len(self):
            return
        self.mask, self.base, self.steps = self.mask[sel], self.base[sel], self.steps[sel]
        start = trimmed_start(self.mask)  # the padding columns no remaining row needs: cut them
        if start:
            self.mask = np.ascontiguousarray(self.mask[:, start:])
            self.presents = [np.ascontiguousarray(t[sel][:, :, start:]) for t in self.presents]
        else:
            self.presents = [t[sel] for t in self.presents]

@dataclass(eq=False)  # identity: requests are dict keys
class _Request:
    send: Send
    stream: bool
    rows: list[list[int]]  # ids so far per row
    remaining: int
    cancelled: Callable[[], bool] | None = None
    done: bool = False
    prompt_tokens: list[int] | None = None  # each row's prompt length (usage)


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int  # row within its request
    item: LlmItem
    hook: Any = None
    seq: list[int] | None = None  # repetition-penalty history (prompt + generated)
    rng: np.random.Generator | None = None
    generated: list[int] = field(default_factory=list)


class InflightScheduler:
    """The iteration-level scheduler (see the module docstring). `guided_hook(params, batch)` makes
    a guided logits hook (`coordexp.serving.llm.guided_hook_factory`); `stop_ids`: the stop tokens."""

    def __init__(self, rows: DecodeRows, stop_ids: Sequence[int], pad_token_id: int, max_batch_size: int = 8,
                 guided_hook: Callable[[GenerationParams, int], Any] | None = None, log: Callable[[str], None] = print):
        self.rows = rows
        self.stop = set(int(s) for s in stop_ids)
        self.stop_list = sorted(self.stop)
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max(1, int(max_batch_size))
        self.guided_hook = guided_hook
        self.log = log
        self.running: list[_Row] = []
        self.logits: np.ndarray | None = None  # next-token logits of the running rows, batch order
        self.queue: list[_Row] = []
        self.cond = threading.Condition()
        self.closed = False
        self._cancel_checked = 0.0
        self.stats = {"steps": 0, "prefills": 0, "max_running": 0, "admitted": 0}
        self.thread = threading.Thread(target=self._loop, name="llm-inflight", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ requests in
    def submit(self, items: Sequence[LlmItem], send: Send, stream: bool,
               cancelled: Callable[[], bool] | None = None) -> None:
        """Queue one request's rows; its responses go through `send(outputs_or_error, final)`."""
        if not items:
            send(outputs_of([], self.pad_token_id), True)
            return
        req = _Request(send, bool(stream), [[] for _ in items], len(items), cancelled, prompt_tokens=prompt_lengths(items))
        new = []
        try:
            for k, it in enumerate(items):
                new.append(self._row(req, k, it))
        except Exception as e:  # e.g. guided decoding not available: this request alone
            send(e, True)
            return
        with self.cond:
            if self.closed:
                send(RequestError("the llm_stream model is shutting down; retry the request"), True)
                return
            self.queue.extend(new)
            self.cond.notify()

    def _row(self, req: _Request, k: int, it: LlmItem) -> _Row:
        p = it.params
        hook = None
        if p.guided:
            if self.guided_hook is None:
                raise RequestError("guided decoding is not available in this llm model; send guided=false")
            hook = self.guided_hook(p, 1)
        seq = [int(t) for t in it.ids] if p.repetition_penalty != 1.0 else None
        rng = None if p.greedy else np.random.default_rng(int(p.seed))
        return _Row(req, k, it, hook, seq, rng)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; every queued or running request gets a final error."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout)
        with self.cond:
            left = self.queue + self.running
            self.queue, self.running = [], []
        self._fail(left, RequestError("the llm_stream model was unloaded before this request finished"))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.queue and not self.running:
                    self.cond.wait()
                if self.closed:
                    return
                free = self.max_batch_size - len(self.running)
                joining, self.queue = self.queue[:free], self.queue[free:]
            try:
                self._iteration(joining)
            except Exception as e:  # never let the thread die: fail what was running, go on
                self.log(f"llm_stream in-flight scheduler: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                rows, self.running, self.logits = self.running + joining, [], None
                self._reset_rows()
                self._fail(rows, e)

    def _reset_rows(self) -> None:
        if len(self.rows):
            self.rows.keep([])

    def _iteration(self, joining: list[_Row]) -> None:
        if joining:
            joining = [r for r in joining if not self._gone(r)]
            self._admit(joining)
        self._drop_cancelled()
        if not self.running:
            return
        self.stats["max_running"] = max(self.stats["max_running"], len(self.running))
        tokens = np.empty(len(self.running), dtype=np.int64)
        failed: dict[int, BaseException] = {}
        for b, row in enumerate(self.running):
            try:
                tokens[b] = self._choose(row, self.logits[b:b + 1])
            except Exception as e:
                failed[b] = e
        keep, touched = [], []
        chunks: dict[int, list[int]] = {}
        for b, row in enumerate(self.running):
            req = row.request
            if b in failed:
                self._fail_request(req, failed[b])
                continue
            if req.done:  # another row of the request failed at this step
                continue
            if not touched or touched[-1] is not req:
                touched.append(req)
            tok = int(tokens[b])
            p = row.item.params
            if tok in self.stop and not p.ignore_eos:
                self._finish(row)
                continue
            row.generated.append(tok)
            if row.seq is not None:
                row.seq.append(tok)
            req.rows[row.index] = row.generated
            chunk = [tok]
            if len(row.generated) >= p.max_new_tokens or not self._jump(row, chunk, failed, b):
                if b not in failed:
                    self._finish(row)
                else:
                    self._fail_request(req, failed[b])
            else:
                keep.append(b)
                chunks[b] = chunk
        keep = [b for b in keep if not self.running[b].request.done]
        for req in dict.fromkeys(touched):
            if req.done:
                continue
            if req.remaining == 0:
                self._send(req, True)
            elif req.stream:
                self._send(req, False)
        self.running = [self.running[b] for b in keep]
        self.rows.keep(keep)
        if not self.running:
            self.logits = None
            return
        self.logits = self.rows.step([chunks[b] for b in keep])
        self.stats["steps"] += 1

    def _admit(self, joining: list[_Row]) -> None:
        if not joining:
            return
        try:
            logits = self.rows.admit([r.item for r in joining])
        except Exception as e:
            if len(joining) == 1:
                self._fail([joining[0]], e)
                return
            for r in joining:  # isolate the request whose rows fail
                self._admit([r])
            return
        self.stats["prefills"] += 1
        self.stats["admitted"] += len(joining)
        self.running.extend(joining)
        self.logits = logits if self.logits is None else np.concatenate([self.logits, logits], axis=0)

    def _choose(self, row: _Row, logits: np.ndarray) -> int:
        p = row.item.params
        if p.ignore_eos:
            logits = logits.copy()
            logits[:, [s for s in self.stop_list if s < logits.shape[1]]] = -np.inf
        if row.hook is not None:
            logits = np.asarray(row.hook(len(row.generated), [row.generated], logits), dtype=np.float32)
        seqs = [np.asarray(row.seq)] if row.seq is not None else []
        return int(choose_tokens(logits, seqs, p, [row.rng])[0])

    def _jump(self, row: _Row, chunk: list[int], failed: dict[int, BaseException], b: int) -> bool:
        """Jump-forward (guided rows, `DecodeRows.jump_forward`): append the run the grammar forces
        after the chosen token to `chunk` with the same bookkeeping as a chosen token. False when
        the row ended inside the run (stop token or length limit; or its hook failed -> `failed`)."""
        forced_of = (getattr(row.hook, "forced_tokens", None)
                     if getattr(self.rows, "jump_forward", False) else None)
        if forced_of is None:
            return True
        p = row.item.params
        try:
            run = forced_of(0, row.generated, p.max_new_tokens - len(row.generated))
        except Exception as e:
            failed[b] = e
            return False
        for tok in run:
            tok = int(tok)
            if tok in self.stop and not p.ignore_eos:
                return False
            row.generated.append(tok)
            if row.seq is not None:
                row.seq.append(tok)
            chunk.append(tok)
            if len(row.generated) >= p.max_new_tokens:
                return False
        return True

    def _finish(self, row: _Row) -> None:
        req = row.request
        state = getattr(row.hook, "state", None)
        closed = bool(state is not None and state.closed_early[0])
        req.rows[row.index] = Generated.of(row.generated, closed)
        req.remaining -= 1

    def _send(self, req: _Request, final: bool) -> None:
        if final:
            req.done = True
        try:
            req.send(outputs_of(req.rows, self.pad_token_id, req.prompt_tokens), final)
        except Exception as e:  # the client went away: nothing more to send it
            req.done = True
            self.log(f"llm_stream: sending a response failed: {type(e).__name__}: {e}")

    def _gone(self, row: _Row) -> bool:
        req = row.request
        if req.done:
            return True
        if req.cancelled is not None:
            try:
                if req.cancelled():
                    self._fail_request(req, RequestError("request cancelled"))
                    return True
            except Exception:
                pass
        return False

    def _drop_cancelled(self) -> None:
        """Rows whose request was cancelled (or already failed) leave the batch now. Asked at most
        every CANCEL_CHECK_S: a sender's `is_cancelled` is a round trip to the server process."""
        if not self.running:
            return
        now = time.monotonic()
        if now - self._cancel_checked < CANCEL_CHECK_S:
            return
        self._cancel_checked = now
        keep = [b for b, r in enumerate(self.running) if not self._gone(r)]
        if len(keep) < len(self.running):
            self.running = [self.running[b] for b in keep]
            self.rows.keep(keep)
            self.logits = self.logits[keep] if self.running else None

    def _fail_request(self, req: _Request, exc: BaseException) -> None:
        if req.done:
            return
        req.done = True
        try:
            req.send(exc, True)
        except Exception as e:
            self.log(f"llm_stream: sending an error failed: {type(e).__name__}: {e}")

    def _fail(self, rows: Sequence[_Row], exc: BaseException) -> None:
        for r in rows:
            self._fail_request(r.request, exc)


def owned(item: LlmItem) -> LlmItem:
    """The item with arrays of its own: the request's input tensors may be released once `execute`
    returns, while the row decodes on."""
    return LlmItem(np.array(item.ids), np.array(item.grid), np.array(item.embeds), np.array(item.deepstack),
                   item.params)


def submit_requests(pb_utils: Any, scheduler: InflightScheduler, parser: Any, requests: Sequence[Any],
                    names: Sequence[str]) -> None:
    """`execute()` of the in-flight llm_stream: parse every request (`parser.items_of`, a bad one
    gets its error now) and queue it with its response sender; returns at once."""
    from coordexp.serving.common import error_response, request_view, response, wants_stream

    final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    for request in requests:
        sender = request.get_response_sender()

        def send(res, final, sender=sender):
            msg = error_response(pb_utils, res) if isinstance(res, BaseException) else response(pb_utils, res)
            sender.send(msg, flags=final_flag if final else 0)

        try:
            view = request_view(pb_utils, request, names)
            items = [owned(it) for it in parser.items_of(view)]
            stream = wants_stream(view)
        except Exception as e:
            send(e, True)
            continue
        scheduler.submit(items, send, stream, getattr(sender, "is_cancelled", None))


def scheduler_for(rows: DecodeRows, stop_ids: Sequence[int], batcher: Any, config: dict[str, Any]
                  ) -> InflightScheduler:
    """The llm / llm_stream model's scheduler (either backend): the batcher's pad id and guided hooks,
    at most the model config's max_batch_size rows running (8 when unset)."""
    return InflightScheduler(rows, stop_ids, batcher.pad_token_id,
                             max_batch_size=int(config.get("max_batch_size") or 0) or 8,
                             guided_hook=batcher.guided_hook)
