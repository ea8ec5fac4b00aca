"""Dataset runs: one prediction line per input line, in input order, resumable, with a summary.

Used by the local engines here and by the Triton client (which feeds results out of order
through the same `PredictionWriter`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from coordexp.dataset import DatasetItem, count_records, iter_dataset
from coordexp.generation import GenerationParams, GenerationResult
from coordexp.schema import SCHEMA_VERSION, ErrorCode, PredictionRecord


def prediction_from_generation(item: DatasetItem, gen: GenerationResult | None,
                               extra: dict[str, Any] | None = None) -> PredictionRecord:
    """The output line for one dataset item: its own error, an engine failure, or parsed text."""
    from coordexp.parser import parse_model_output

    rec = PredictionRecord(image_id=item.index, images=item.images, width=item.width, height=item.height,
                           extra=dict(extra or {}))
    if not item.ok:
        rec.error, rec.error_message = str(item.error), item.error_message
        return rec
    if gen is None or gen.error:
        rec.error = str(ErrorCode.GENERATION_FAILED)
        rec.error_message = f"line {item.line_no}: {gen.error if gen else 'no result'}"
        rec.raw_output = gen.text if gen else ""
        return rec
    rec.raw_output = gen.text
    parsed = parse_model_output(gen.text)
    rec.preds = parsed.preds
    rec.repairs = parsed.repairs
    if parsed.error is not None:
        rec.error = str(parsed.error)
        rec.error_message = parsed.error_message
    rec.extra.update({"num_tokens": len(gen.token_ids), "finish_reason": gen.finish_reason})
    rec.extra.update(gen.extra)
    return rec


def _existing_lines(out_path: str) -> tuple[list[dict], int]:
    """Complete, valid lines of an interrupted run and their byte length; a torn last line is dropped."""
    rows: list[dict] = []
    size = 0
    with open(out_path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the line being written when the run died
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not isinstance(row, dict) or row.get("image_id") != len(rows):
                raise ValueError(
                    f"{out_path}: line {len(rows) + 1} is not the prediction for image_id {len(rows)}; "
                    "cannot resume from this file (remove it or pick another --out)"
                )
            rows.append(row)
            size += len(raw)
    return rows, size


class PredictionWriter:
    """Writes records strictly in image_id order, whatever order they arrive in.

    Only out-of-order results are held in memory; every line is flushed as soon as it can be
    written, so a killed run leaves a valid prefix that `resume=True` continues from.
    """

    def __init__(self, out_path: str, resume: bool = False):
        self.out_path = out_path
        os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
        self.errors: Counter[str] = Counter()
        self.written = 0
        self.tokens = 0
        self.resumed_from = 0
        if resume and os.path.exists(out_path):
            rows, size = _existing_lines(out_path)
            with open(out_path, "r+b") as f:  # cut a torn tail before appending
                f.truncate(size)
            for r in rows:
                if r.get("error"):
                    self.errors[r["error"]] += 1
                self.tokens += int(r.get("num_tokens") or 0)
            self.written = self.resumed_from = len(rows)
            self._f = open(out_path, "a", encoding="utf-8")
        else:
            self._f = open(out_path, "w", encoding="utf-8")
        self._pending: dict[int, PredictionRecord] = {}

    @property
    def next_index(self) -> int:
        return self.written

    def submit(self, rec: PredictionRecord) -> int:
        """Queue a record; returns how many lines were written by this call."""
        if rec.image_id < self.written or rec.image_id in self._pending:
            raise ValueError(f"duplicate prediction for image_id {rec.image_id}")
        self._pending[rec.image_id] = rec
        n = 0
        while self.written in self._pending:
            r = self._pending.pop(self.written)
            self._f.write(r.to_json() + "\n")
            if r.error:
                self.errors[str(r.error)] += 1
            self.tokens += int(r.extra.get("num_tokens") or 0)
            self.written += 1
            n += 1
        if n:
            self._f.flush()
        return n

    def close(self) -> None:
        if self._pending:
            missing = sorted(self._pending)[:5]
            self._f.close()
            raise RuntimeError(f"run ended with results queued after a gap (first queued ids: {missing})")
        self._f.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


@dataclass
class RunSummary:
    records_read: int = 0
    records_written: int = 0
    resumed_from: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    generated_tokens: int = 0
    tokens_per_s: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in self.__dict__.items() if k != "extra"}}
        d.update(self.extra)
        return d

    def write(self, out_path: str) -> str:
        path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "summary.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path


def finish_summary(writer: PredictionWriter, started: float, processed: int, **fields: Any) -> RunSummary:
    """Summary for a run; rates count this session's work only (not resumed lines)."""
    secs = time.perf_counter() - started
    s = RunSummary(records_read=writer.written, records_written=writer.written, resumed_from=writer.resumed_from,
                   errors=dict(sorted(writer.errors.items())), seconds=round(secs, 3),
                   generated_tokens=writer.tokens, **fields)
    s.images_per_s = round(processed / secs, 3) if secs > 0 else 0.0
    s.tokens_per_s = round(s.extra.pop("session_tokens", writer.tokens) / secs, 3) if secs > 0 else 0.0
    return s


def progress_bar(total: int, initial: int = 0, desc: str = "infer", disable: bool | None = None):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True,
                disable=disable, smoothing=0.1)


def _batches(items: Iterable[DatasetItem], size: int) -> Iterable[list[DatasetItem]]:
    batch: list[DatasetItem] = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_dataset(data_path: str, out_path: str, engine: Any, params: GenerationParams, batch_size: int = 1,
                resume: bool = False, max_pixels: int | None = None, progress: bool | None = None) -> RunSummary:
    """Run a local engine over an input JSONL; returns (and writes) the summary."""
    from coordexp.dataset import DEFAULT_MAX_PIXELS

    total = count_records(data_path)
    started = time.perf_counter()
    with PredictionWriter(out_path, resume=resume) as writer:
        tokens_before = writer.tokens
        bar = progress_bar(total, writer.written, desc=f"infer[{engine.name}]",
                           disable=None if progress is None else not progress)
        extra = {"prompt_variant": engine.prompt.variant, "engine": engine.name}
        items = iter_dataset(data_path, max_pixels or DEFAULT_MAX_PIXELS, skip=writer.written)
        for batch in _batches(items, batch_size):
            runnable = [it for it in batch if it.ok]
            results: dict[int, GenerationResult] = {}
            if runnable:
                imgs = []
                for it in runnable:
                    try:
                        imgs.append(it.pil_image())
                    except Exception as e:  # verified header, broken body
                        it.fail(ErrorCode.IMAGE_LOAD_FAILED, f"line {it.line_no}: cannot decode image ({e})")
                runnable = [it for it in runnable if it.ok]
                try:
                    gens = engine.generate_batch(imgs, params) if runnable else []
                except Exception as e:  # one bad batch must not end the run
                    gens = [GenerationResult(text="", error=f"{type(e).__name__}: {e}") for _ in runnable]
                results = {it.index: g for it, g in zip(runnable, gens)}
            for it in batch:
                writer.submit(prediction_from_generation(it, results.get(it.index), extra))
            bar.update(len(batch))
            if writer.errors:
                bar.set_postfix(errors=sum(writer.errors.values()), refresh=False)
        bar.close()
        processed = writer.written - writer.resumed_from
        summary = finish_summary(writer, started, processed, engine=engine.describe(), params=params.to_dict(),
                                 prompt=engine.prompt.to_dict(),
                                 extra={"session_tokens": writer.tokens - tokens_before,
                                        "data": os.path.abspath(data_path), "out": os.path.abspath(out_path)})
    summary.write(out_path)
    return summary
