"""Dataset runs: one prediction line per input line, in input order, resumable, with a summary.

The one dataset loop: the torch and ONNX engines and the Triton engine (`coordexp.engines.triton`)
all run through `run_dataset`; results may arrive out of order, `PredictionWriter` puts them back.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from coordexp.dataset import DatasetItem, count_records, iter_dataset
from coordexp.generation import EngineUnavailable, GenerationParams, GenerationResult
from coordexp.run_output import (RUN_FAILURE_CODES, PredictionWriter, RunSummary, _read_json, check_output_folder,
                                 finish_summary, resume_problems, summary_path)
from coordexp.schema import ErrorCode, PredictionRecord


def prediction_from_generation(item: DatasetItem, gen: GenerationResult | None,
                               extra: dict[str, Any] | None = None, bbox_format: str = "xyxy") -> PredictionRecord:
    """The output line for one dataset item: its own error, an engine failure, or parsed text
    (`bbox_format`: how the checkpoint writes bbox_2d, its prompt's)."""
    from coordexp.parser import parse_model_output

    rec = PredictionRecord(image_id=item.index, images=item.images, width=item.width, height=item.height,
                           bbox_format=bbox_format, extra=dict(extra or {}))
    if not item.ok:
        rec.error, rec.error_message = str(item.error), item.error_message
        return rec
    if gen is None or gen.error:
        rec.error = str(ErrorCode.GENERATION_FAILED)
        rec.error_message = f"line {item.line_no}: {gen.error if gen else 'no result'}"
        rec.raw_output = gen.text if gen else ""
        return rec
    rec.raw_output = gen.text
    # the size turns on the zero-area check
    parsed = parse_model_output(gen.text, width=item.width, height=item.height, bbox_format=bbox_format)
    rec.preds = parsed.preds
    rec.repairs = parsed.repairs
    rec.errors = [str(e) for e in parsed.errors]
    if parsed.error is not None:
        rec.error = str(parsed.error)
        rec.error_message = parsed.error_message
    rec.extra.update({"num_tokens": gen.num_tokens, "finish_reason": gen.finish_reason})
    rec.extra.update(gen.extra)
    return rec


# Input-side and engine failures: a run where most lines end in one of these did not really run.

class stop_on_sigterm:
    """SIGTERM stops a run the way Ctrl-C does (KeyboardInterrupt in the main thread: the prefix is
    written, the summary says `interrupted`), instead of killing it mid-line; restored afterwards."""

    def __enter__(self) -> "stop_on_sigterm":
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class deferred_interrupts:
    """While a run writes its lines, the first Ctrl-C or SIGTERM is only recorded: the run loop stops at
    its next check (`raise_pending`, at most a poll interval later), never where the signal landed. An
    exception raised at an arbitrary bytecode can leave a lock taken: `concurrent.futures.wait` takes
    its futures' locks one by one, and a worker then blocks forever on one the interrupted main thread
    still holds, so the run hung in its clean-up. A second signal raises at once (the user insists),
    though never inside `critical()` (one line written and counted), so the summary always counts
    exactly the lines on disk. Main thread only; elsewhere nothing changes."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.signals = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "deferred_interrupts":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signals += 1
        self.pending = signum
        if self.signals > 1 and not self.depth:
            raise KeyboardInterrupt(f"signal {signum}")

    def raise_pending(self) -> None:
        """Raise KeyboardInterrupt if a signal came (called where stopping is safe)."""
        if self.pending is not None:
            raise KeyboardInterrupt(f"signal {self.pending}")

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A stretch no second signal may split (it is raised right after)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.signals > 1:
            raise KeyboardInterrupt(f"signal {self.pending}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the lines so far are a valid prefix and `summary` was written."""

    def __init__(self, summary: "RunSummary"):
        super().__init__("interrupted")
        self.summary = summary


def progress_bar(total: int, initial: int = 0, desc: str = "infer", disable: bool | None = None):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True,
                disable=disable, smoothing=0.1)


def reorder_window(concurrency: int) -> int:
    """How far reading may run ahead of writing: at most this many records lie between the next
    line to write and the next record to send (results held back behind a slow earlier one are
    capped by it)."""
    return max(64, 4 * concurrency)


def _batches(items: Iterable[DatasetItem], size: int) -> Iterable[list[DatasetItem]]:
    batch: list[DatasetItem] = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _engine_inputs(engine: Any, batch: list[DatasetItem]) -> tuple[list[DatasetItem], list[Any]]:
    """The items of a batch that can run, and what the engine gets for each: the decoded image, or
    the file's bytes for engines that take them (decoded once here all the same, so a body that does
    not decode is the record's own error and never reaches a server)."""
    runnable, inputs = [], []
    for it in batch:
        if not it.ok:
            continue
        try:
            image = it.pil_image()
        except Exception as e:  # verified header, broken body
            it.fail(ErrorCode.IMAGE_LOAD_FAILED, f"line {it.line_no}: cannot decode image ({e})")
            continue
        runnable.append(it)
        inputs.append(it.image_bytes if engine.takes_encoded else image)
    return runnable, inputs


def _generate(engine: Any, runnable: list[DatasetItem], inputs: list[Any], params: GenerationParams
              ) -> dict[int, GenerationResult]:
    """Results by item index; a failing batch fails its records, an `EngineUnavailable` ends the run."""
    if not runnable:
        return {}
    try:
        gens = engine.generate_batch(inputs, params)
    except EngineUnavailable:
        raise
    except Exception as e:  # one bad batch must not end the run
        gens = [GenerationResult(text="", error=f"{type(e).__name__}: {e}") for _ in runnable]
    return {it.index: g for it, g in zip(runnable, gens)}


@dataclass
class _Loop:
    """State of one `run_dataset` call: the writer, the progress bar, the batches in flight."""

    engine: Any
    params: GenerationParams
    writer: PredictionWriter
    bar: Any
    line_extra: dict[str, Any]
    in_flight: dict[Any, list[DatasetItem]] = field(default_factory=dict)
    failure: EngineUnavailable | None = None
    interrupted_at: float | None = None  # perf_counter() when Ctrl-C / SIGTERM arrived
    on_progress: Any = None  # (lines written, errors so far) after every write (the viewer's jobs)
    stop: Any = None  # a threading.Event: set -> the run stops as on Ctrl-C (a cancelled job)
    signals: deferred_interrupts | None = None  # Ctrl-C / SIGTERM, recorded by the handler, acted on here

    def write(self, batch: list[DatasetItem], results: dict[int, GenerationResult]) -> None:
        n = 0
        for it in batch:
            n += self.writer.submit(prediction_from_generation(it, results.get(it.index), self.line_extra,
                                                               self.engine.prompt.bbox_format))
            it.image_bytes = None  # done with it: only records behind a gap stay in memory
        if n:
            self.bar.update(n)
            facts = self.engine.progress_facts()
            self.bar.set_postfix(errors=sum(self.writer.errors.values()), **facts, refresh=False)
            if self.on_progress is not None:
                self.on_progress(self.writer.written, dict(self.writer.errors))

    def stopped(self) -> None:
        """Raise KeyboardInterrupt when the run was asked to stop (a signal, a cancelled job)."""
        if self.signals is not None:
            self.signals.raise_pending()
        if self.stop is not None and self.stop.is_set():
            raise KeyboardInterrupt("stopped")

    def reap(self, block: bool) -> None:
        """Write the batches that finished (wait for one first when `block`; a stop request ends the wait)."""
        if not self.in_flight:
            return
        while True:
            # done(), not wait()'s answer: wait() never reports a future cancelled before it started
            # (the pool's shutdown cancels those), and the clean-up after an interrupt waited forever
            done = [f for f in self.in_flight if f.done()]
            if done or not block:
                break
            concurrent.futures.wait(list(self.in_flight), timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
            self.stopped()
        for fut in done:
            batch = self.in_flight.pop(fut)
            try:
                self.write(batch, fut.result())
            except concurrent.futures.CancelledError:  # never started: redone on --resume
                pass
            except EngineUnavailable as e:
                self.failure = self.failure or e


def _drive(loop: _Loop, items: Iterable[DatasetItem], batch_size: int, concurrency: int) -> None:
    """Read lazily, keep up to `concurrency` batches in flight, write in input order."""
    window = reorder_window(concurrency * batch_size)
    pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="coordexp-run")
    try:
        next_index = loop.writer.written
        for batch in _batches(items, batch_size):
            loop.stopped()
            while loop.in_flight and (len(loop.in_flight) >= concurrency
                                      or next_index - loop.writer.written >= window):
                loop.reap(block=True)
            if loop.failure is not None:
                return
            next_index = batch[-1].index + 1
            runnable, inputs = _engine_inputs(loop.engine, batch)
            if not runnable:
                loop.write(batch, {})
                continue
            loop.in_flight[pool.submit(_generate, loop.engine, runnable, inputs, loop.params)] = batch
            loop.reap(block=False)
        while loop.in_flight and loop.failure is None:
            loop.reap(block=True)
            loop.stopped()
    except BaseException:
        # Ctrl-C / SIGTERM: the batches in flight may wait minutes for a server (timeouts, retries);
        # the engine gives them up at once, so the run stops within seconds with its prefix written
        loop.interrupted_at = time.perf_counter()
        loop.engine.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        while loop.in_flight:  # let finished batches land: the prefix on disk is as long as it can be
            loop.reap(block=True)


def run_dataset(data_path: str, out_path: str, engine: Any, params: GenerationParams, batch_size: int = 1,
                resume: bool = False, max_pixels: int | None = None, progress: bool | None = None,
                concurrency: int = 1, image_root: str | None = None, force: bool = False,
                on_progress: Any = None, stop: Any = None) -> RunSummary:
    """Run any engine over an input JSONL; returns (and writes) the summary.

    `concurrency` batches are in flight at once for engines that allow it (`engine.concurrent`, the
    Triton engine); local engines run one batch at a time. `image_root`: where relative image paths
    start (default: the JSONL's folder). When the engine raises `EngineUnavailable` the run stops
    there (`status: incomplete`, `failure`); Ctrl-C raises `RunInterrupted` (`status: interrupted`);
    either way summary.json is written and the lines so far are a valid prefix for `resume=True`,
    which refuses lines of another dataset, engine, prompt, checkpoint or decoding parameters; a
    resumed run that was complete already changes nothing (its summary is returned as it was).
    An `out_path` holding lines of an earlier run is refused (OutputExists) unless `resume` or `force`.
    `on_progress(lines written, errors)` is called after every write; setting the `stop` event ends
    the run as Ctrl-C does (`status: interrupted`, RunInterrupted).
    `failed_share` in the summary: the share of lines with an input or engine error."""
    from coordexp.dataset import DEFAULT_MAX_PIXELS

    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size and concurrency must be >= 1 (got {batch_size}, {concurrency})")
    concurrency = concurrency if engine.concurrent else 1
    archived = check_output_folder(out_path, resume, force)
    for a in archived:
        print(f"note: --force: the earlier evaluation is archived as {a}", file=sys.stderr)
    total = count_records(data_path)
    started = time.perf_counter()
    status = "complete"
    check = lambda rows: resume_problems(out_path, rows, data_path, engine, params)  # noqa: E731
    with deferred_interrupts() as interrupts, \
            PredictionWriter(out_path, resume=resume, check_resume=check) as writer:
        writer.guard = interrupts.critical
        before = _read_json(summary_path(out_path)) or {}
        if resume and writer.written == total and before.get("status") == "complete" \
                and os.path.abspath(str(before.get("out", ""))) == os.path.abspath(out_path):
            s = RunSummary.from_dict(before)  # nothing to do: the finished run's summary stays as it was
            s.extra["unchanged"] = True
            return s
        tokens_before = writer.tokens
        name = engine.progress_name()
        bar = progress_bar(total, writer.written, desc=f"infer[{name}]",
                           disable=None if progress is None else not progress)
        loop = _Loop(engine, params, writer, bar, {"prompt_variant": engine.prompt.variant, "engine": engine.name},
                     on_progress=on_progress, stop=stop, signals=interrupts)
        try:
            _drive(loop, iter_dataset(data_path, max_pixels or DEFAULT_MAX_PIXELS, skip=writer.written,
                                      image_root=image_root), batch_size, concurrency)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            bar.close()
        if loop.failure is not None:
            status = "incomplete"
        if status != "complete":
            writer.drop_pending()
        summary = _summary(writer, loop, started, tokens_before, status, total, concurrency, data_path, out_path)
    summary.write(out_path)
    if status == "interrupted":
        raise RunInterrupted(summary)
    return summary


def _summary(writer: PredictionWriter, loop: _Loop, started: float, tokens_before: int, status: str, total: int,
             concurrency: int, data_path: str, out_path: str) -> RunSummary:
    engine = loop.engine
    failed = sum(n for code, n in writer.errors.items() if code in RUN_FAILURE_CODES)
    extra = {"session_tokens": writer.tokens - tokens_before, "data": os.path.abspath(data_path),
             "out": os.path.abspath(out_path), "status": status, "records_total": total,
             "concurrency": concurrency, "checkpoint_sha256": engine.checkpoint_sha256(),
             "failed_share": round(failed / writer.written, 4) if writer.written else 0.0,
             **engine.run_facts()}
    if loop.failure is not None:
        extra["failure"] = str(loop.failure)
    if status == "interrupted":
        extra["interrupted"] = True
    return finish_summary(writer, started, loop.interrupted_at, engine=engine.describe(),
                          params=loop.params.to_dict(), prompt=engine.prompt.to_dict(), extra=extra)
