"""In-flight (continuous) batching for the decoupled `llm_stream` model: an iteration-level scheduler.

`execute()` hands its requests to `InflightScheduler.submit` and returns at once; a background
thread runs the decode loop. At every iteration:

1. queued rows join the running batch (at most `max_batch_size` rows run): their prompts go through
   one prefill call (`DecodeRows.admit`) and their KV caches are merged into the batch's;
2. the one decode loop (`coordexp.decoding.loop.DecodeLoop.decide`) picks every running row's next
   token with its own decoding parameters and its own guided hook (made with batch 1), and with
   jump-forward the run its grammar forces next;
3. rows that stopped (stop token or length limit) leave the batch at once and their request gets
   its final response as soon as its last row is done; streamed requests get one response per
   step carrying the ids so far (cumulative, as `DecoupledRun` sends them);
4. one decoder call feeds the new ids of every remaining row (`DecodeLoop.advance`).

Rows of the batch have different past lengths: the cache is LEFT padded to the longest past
(attention_mask 0 on the padding, positions given explicitly per row: prompt_len + M-RoPE delta +
tokens fed), so a row's logits are those of its own prompt and tokens; greedy answers equal the
in-process `OnnxEngine` and the static batcher token for token.

Errors stay with their request: a malformed request is refused in `submit`, a failing prefill
fails the requests it admitted (retried one by one to isolate the bad one), a failing guided hook
or sampler fails its row's request. Only a failing decoder call over the whole batch fails the
requests running in it (nothing else can be blamed). `close()` (the model's `finalize`) stops the
thread and fails every queued or running request with a clear error.

The loop depends only on the small `DecodeRows` interface ("admit these rows, feed their new ids,
keep these rows"): `coordexp.engines.onnx_engine.OnnxRows` implements it on ONNX Runtime and
`coordexp.serving.torch_parts.TorchRows` on the checkpoint in PyTorch (`--backend torch`).
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from coordexp.decoding.loop import DecodeLoop, DecodeRow, DecodeRows
from coordexp.generation import GenerationParams
from coordexp.serving.common import Generated, LlmItem, RequestError, outputs_of, prompt_batch, prompt_lengths

CANCEL_CHECK_S = 0.25  # how often running rows' requests are asked whether the client cancelled them
# send(outputs_or_error, final): one request's response sender
Send = Callable[[dict[str, np.ndarray] | BaseException, bool], None]


@dataclass(eq=False)  # identity: requests are dict keys
class _Request:
    send: Send
    stream: bool
    rows: list[list[int]]  # ids so far per row
    remaining: int
    cancelled: Callable[[], bool] | None = None
    done: bool = False
    prompt_tokens: list[int] | None = None  # each row's prompt length (usage)


class InflightScheduler:
    """The iteration-level scheduler (see the module docstring) over the one decode loop
    (`coordexp.decoding.loop.DecodeLoop`). `guided_hook(params, batch)` makes a guided logits hook
    (`coordexp.serving.llm.guided_hook_factory`); `stop_ids`: the stop tokens."""

    def __init__(self, rows: DecodeRows, stop_ids: Sequence[int], pad_token_id: int, max_batch_size: int = 8,
                 guided_hook: Callable[[GenerationParams, int], Any] | None = None, log: Callable[[str], None] = print):
        self.rows = rows
        self.loop = DecodeLoop(rows, stop_ids)
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max(1, int(max_batch_size))
        self.guided_hook = guided_hook
        self.log = log
        self.queue: list[tuple[DecodeRow, LlmItem]] = []
        self.cond = threading.Condition()
        self.closed = False
        self._cancel_checked = 0.0
        self.stats = {"steps": 0, "prefills": 0, "max_running": 0, "admitted": 0}
        self.thread = threading.Thread(target=self._loop, name="llm-inflight", daemon=True)
        self.thread.start()

    @property
    def running(self) -> list[DecodeRow]:
        return self.loop.running

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
                new.append((self._row(req, k, it), it))
        except Exception as e:  # e.g. guided decoding not available: this request alone
            send(e, True)
            return
        with self.cond:
            if self.closed:
                send(RequestError("the llm_stream model is shutting down; retry the request"), True)
                return
            self.queue.extend(new)
            self.cond.notify()

    def _row(self, req: _Request, k: int, it: LlmItem) -> DecodeRow:
        p = it.params
        hook = None
        if p.guided:
            if self.guided_hook is None:
                raise RequestError("guided decoding is not available in this llm model; send guided=false")
            hook = self.guided_hook(p, 1)
        return DecodeRow.start(p, it.ids, hook, owner=req, index=k)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; every queued or running request gets a final error."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout)
        with self.cond:
            left = [r for r, _ in self.queue] + self.loop.running
            self.queue, self.loop.running = [], []
        self._fail(left, RequestError("the llm_stream model was unloaded before this request finished"))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.queue and not self.loop.running:
                    self.cond.wait()
                if self.closed:
                    return
                free = self.max_batch_size - len(self.loop.running)
                joining, self.queue = self.queue[:free], self.queue[free:]
            try:
                self._iteration(joining)
            except Exception as e:  # never let the thread die: fail what was running, go on
                self.log(f"llm_stream in-flight scheduler: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                rows = self.loop.running + [r for r, _ in joining]
                self.loop.running, self.loop.logits = [], None
                if len(self.rows):
                    self.rows.keep([])
                self._fail(rows, e)

    def _iteration(self, joining: list[tuple[DecodeRow, LlmItem]]) -> None:
        if joining:
            self._admit([(r, it) for r, it in joining if not self._gone(r)])
        self._drop_cancelled()
        if not self.loop.running:
            return
        self.stats["max_running"] = max(self.stats["max_running"], len(self.loop.running))
        order = {id(r): b for b, r in enumerate(self.loop.running)}
        out = self.loop.decide()
        for row, exc in out.failed:
            self._fail_request(row.owner, exc)
        for row in out.advanced:
            row.owner.rows[row.index] = row.generated
        for row in out.finished:
            self._finish(row)
        touched = sorted(out.advanced + out.finished, key=lambda r: order[id(r)])
        for req in dict.fromkeys(r.owner for r in touched):
            if req.done:
                continue
            if req.remaining == 0:
                self._send(req, True)
            elif req.stream:
                self._send(req, False)
        self.loop.advance(drop=[r for r in self.loop.running if r.owner.done])
        if self.loop.running:
            self.stats["steps"] += 1

    def _admit(self, joining: list[tuple[DecodeRow, LlmItem]]) -> None:
        if not joining:
            return
        try:
            self.loop.admit([r for r, _ in joining], prompt_batch([it for _, it in joining], self.pad_token_id))
        except Exception as e:
            if len(joining) == 1:
                self._fail([joining[0][0]], e)
                return
            for pair in joining:  # isolate the request whose rows fail
                self._admit([pair])
            return
        self.stats["prefills"] += 1
        self.stats["admitted"] += len(joining)

    def _finish(self, row: DecodeRow) -> None:
        req = row.owner
        req.rows[row.index] = Generated.of(row.generated, row.closed_early)
        req.remaining -= 1

    def _send(self, req: _Request, final: bool) -> None:
        if final:
            req.done = True
        try:
            req.send(outputs_of(req.rows, self.pad_token_id, req.prompt_tokens), final)
        except Exception as e:  # the client went away: nothing more to send it
            req.done = True
            self.log(f"llm_stream: sending a response failed: {type(e).__name__}: {e}")

    def _gone(self, row: DecodeRow) -> bool:
        req = row.owner
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
        if not self.loop.running:
            return
        now = time.monotonic()
        if now - self._cancel_checked < CANCEL_CHECK_S:
            return
        self._cancel_checked = now
        self.loop.remove([r for r in self.loop.running if self._gone(r)])

    def _fail_request(self, req: _Request, exc: BaseException) -> None:
        if req.done:
            return
        req.done = True
        try:
            req.send(exc, True)
        except Exception as e:
            self.log(f"llm_stream: sending an error failed: {type(e).__name__}: {e}")

    def _fail(self, rows: Sequence[DecodeRow], exc: BaseException) -> None:
        for r in rows:
            self._fail_request(r.owner, exc)


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
