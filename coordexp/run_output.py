"""A dataset run's output side: the prediction lines (`PredictionWriter`: input order, torn-line
safe, resumable), the output folder's rules (an evaluated run is never silently replaced), what a
resumed run must match, and `summary.json` (`RunSummary`). `coordexp.runner.run_dataset` drives it."""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from coordexp.dataset import count_records
from coordexp.generation import GenerationParams
from coordexp.schema import SCHEMA_VERSION, ErrorCode, PredictionRecord

RUN_FAILURE_CODES = {str(c) for c in (ErrorCode.INVALID_INPUT, ErrorCode.IMAGE_LOAD_FAILED, ErrorCode.IMAGE_TOO_LARGE,
                                      ErrorCode.SIZE_MISMATCH, ErrorCode.MULTI_IMAGE_NOT_SUPPORTED,
                                      ErrorCode.GENERATION_FAILED)}  # lines that count as failed


def summary_path(out_path: str) -> str:
    """Where a run's summary.json goes: beside its predictions file."""
    return os.path.join(os.path.dirname(os.path.abspath(out_path)), "summary.json")


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


class OutputExists(ValueError):
    """The output already holds a run: continue it (--resume) or replace it on purpose (--force)."""


def eval_dirs(run_dir: str) -> list[str]:
    """The evaluation folders of a run folder (each holds a metrics.json)."""
    import glob

    cands = [os.path.join(run_dir, "eval"), run_dir, *sorted(glob.glob(os.path.join(glob.escape(run_dir), "eval*")))]
    return [c for c in dict.fromkeys(os.path.normpath(c) for c in cands)
            if os.path.isfile(os.path.join(c, "metrics.json")) and ".replaced-" not in c]


def check_output_folder(out_path: str, resume: bool = False, force: bool = False) -> list[str]:
    """Refuse an output whose folder holds another run's summary.json (it would be overwritten), and
    an output that already holds prediction lines unless the run continues it (`resume`) or replaces
    it (`force`: its evaluations are archived as `<eval>.replaced-<UTC time>`, so no metrics are left
    beside predictions they were not computed from). Returns the archived folders."""
    other = (_read_json(summary_path(out_path)) or {}).get("out")
    if isinstance(other, str) and os.path.abspath(other) != os.path.abspath(out_path):
        raise ValueError(f"{summary_path(out_path)} belongs to another run ({other}); writing {out_path} would "
                         "overwrite it: give each run its own folder")
    if resume or not os.path.isfile(out_path) or os.path.getsize(out_path) == 0:
        return []
    run_dir = os.path.dirname(os.path.abspath(out_path))
    evals = eval_dirs(run_dir)
    if not force:
        with open(out_path, "rb") as f:
            n = sum(1 for _ in f)
        what = f" and its evaluation ({', '.join(os.path.relpath(e, run_dir) for e in evals)})" if evals else ""
        raise OutputExists(f"{out_path} already holds {n} prediction lines of an earlier run{what}: continue it "
                           "with --resume, pass --force to replace it (its evaluation is archived), or give this "
                           "run its own --out")
    import datetime as _dt

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    archived = []
    for e in evals:
        if os.path.abspath(e) == run_dir:  # metrics.json beside the predictions: archive the file itself
            os.replace(os.path.join(e, "metrics.json"), os.path.join(e, f"metrics.json.replaced-{stamp}"))
            archived.append(os.path.join(e, f"metrics.json.replaced-{stamp}"))
        else:
            os.replace(e, f"{e}.replaced-{stamp}")
            archived.append(f"{e}.replaced-{stamp}")
    return archived


def _images_of(value: Any) -> list[str]:
    """The `images` a prediction line carries for an input value (as coordexp.dataset reads it)."""
    imgs = value.get("images") if isinstance(value, dict) else None
    return [imgs] if isinstance(imgs, str) else list(imgs) if isinstance(imgs, list) else []


def resume_problems(out_path: str, rows: list[dict], data_path: str, engine: Any,
                    params: GenerationParams) -> list[str]:
    """Why the lines of `out_path` cannot be continued by this run (empty: they can): another
    dataset, more lines than the dataset, another engine, prompt, checkpoint or decoding parameters."""
    from coordexp.schema import read_jsonl

    out: list[str] = []
    total = count_records(data_path)
    if len(rows) > total:
        out.append(f"{out_path} has {len(rows)} lines but {data_path} has only {total}")
    for k, (row, (line_no, value)) in enumerate(zip(rows, read_jsonl(data_path))):
        if row.get("images") != _images_of(value):
            out.append(f"line {k + 1} of {out_path} is for {row.get('images')} but line {line_no} of {data_path} is "
                       f"{_images_of(value)}: another dataset")
            break
    last = rows[-1] if rows else {}
    for key, now in (("engine", engine.name), ("prompt_variant", engine.prompt.variant)):
        if last.get(key) not in (None, now):
            out.append(f"the lines so far were written with {key} {last[key]!r}, this run has {now!r}")
    before = _read_json(summary_path(out_path)) or {}
    if os.path.abspath(str(before.get("out", ""))) == os.path.abspath(out_path):
        old = before.get("params") or {}
        diff = [f"{k} {old[k]!r} -> {v!r}" for k, v in params.to_dict().items() if k in old and old[k] != v]
        if diff:
            out.append("other decoding parameters than the run so far: " + ", ".join(diff))
        sha = engine.checkpoint_sha256()
        if before.get("checkpoint_sha256") and sha and before["checkpoint_sha256"] != sha:
            out.append(f"another checkpoint: the run so far used weights {before['checkpoint_sha256'][:12]}…, "
                       f"this one {sha[:12]}…")
    return out


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


def finish_of(line: dict[str, Any]) -> str:
    """How a prediction line's answer ended: "stop" (the model closed it), "length" (the token limit
    cut it) or "error" (no answer: an input or engine failure)."""
    if line.get("error") in RUN_FAILURE_CODES:
        return "error"
    reason = line.get("finish_reason")
    return reason if reason in ("stop", "length") else "stop"


class OutputWriteError(RuntimeError):
    """The predictions file cannot take another line (disk full, file size limit, I/O error); the lines
    written so far are kept, complete, for a resumed run."""


class PredictionWriter:
    """Writes records strictly in image_id order, whatever order they arrive in.

    Only out-of-order results are held in memory; every line is flushed as soon as it can be
    written, so a killed run leaves a valid prefix that `resume=True` continues from.
    """

    def __init__(self, out_path: str, resume: bool = False, check_resume: Any = None):
        """`check_resume(rows) -> problems`: refuse (ValueError) to continue lines it objects to."""
        self.out_path = out_path
        os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()  # finish_reason of every line: stop | length | error
        self.written = 0
        self.tokens = 0
        self.resumed_from = 0
        self.generated = 0  # lines of this session that reached the model (throughput counts these only)
        if resume and os.path.exists(out_path):
            rows, size = _existing_lines(out_path)
            problems = check_resume(rows) if check_resume is not None else []
            if problems:
                raise ValueError(f"cannot resume {out_path}: " + "; ".join(problems)
                                 + " (remove it or pick another --out to start over)")
            with open(out_path, "r+b") as f:  # cut a torn tail before appending
                f.truncate(size)
            for r in rows:
                if r.get("error"):
                    self.errors[r["error"]] += 1
                self.finish[finish_of(r)] += 1
                self.tokens += int(r.get("num_tokens") or 0)
            self.written = self.resumed_from = len(rows)
            self._f = open(out_path, "ab", buffering=0)  # unbuffered: nothing half-written hides in a buffer
            self._size = size
        else:
            self._f = open(out_path, "wb", buffering=0)
            self._size = 0  # bytes of complete lines on disk: a failed write is cut back to it
        self._pending: dict[int, PredictionRecord] = {}
        self.guard: Any = contextlib.nullcontext  # () -> a context no interrupt splits (deferred_interrupts)

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
            r = self._pending[self.written]
            with self.guard():  # a line is written and counted, or neither
                self._write_line((r.to_json() + "\n").encode("utf-8"))
                del self._pending[self.written]
                if r.error:
                    self.errors[str(r.error)] += 1
                self.finish[finish_of(r.to_dict())] += 1
                if str(r.error) not in RUN_FAILURE_CODES:
                    self.generated += 1
                self.tokens += int(r.extra.get("num_tokens") or 0)
                self.written += 1
                n += 1
        return n

    def _write_line(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[self._f.write(view):]
        except OSError as e:
            try:  # keep only complete lines: what --resume continues from
                self._f.truncate(self._size)
            except OSError:
                pass
            why = e.strerror or str(e)
            raise OutputWriteError(f"cannot write {self.out_path}: {why} (disk full or a file size limit?); "
                                   f"its {self.written} complete lines are kept: free space and run the same "
                                   "command with --resume") from None
        self._size += len(data)

    def drop_pending(self) -> list[int]:
        """Forget the records queued behind a gap (a run that stopped early); their ids."""
        ids = sorted(self._pending)
        self._pending.clear()
        return ids

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSummary":
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names and k != "schema_version"})

    def write(self, out_path: str) -> str:
        path = summary_path(out_path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path


def finish_summary(writer: PredictionWriter, started: float, ended: float | None = None, **fields: Any) -> RunSummary:
    """Summary for a run; rates count this session's work only (not resumed lines), and images only
    where the model answered (a line that failed to load is not throughput). `ended`: when the run
    stopped (an interrupt's moment, not the clean-up after it)."""
    secs = (ended or time.perf_counter()) - started
    s = RunSummary(records_read=writer.written, records_written=writer.written, resumed_from=writer.resumed_from,
                   errors=dict(sorted(writer.errors.items())), seconds=round(secs, 3),
                   generated_tokens=writer.tokens, **fields)
    s.extra["finish_reasons"] = {k: writer.finish.get(k, 0) for k in ("stop", "length", "error")}
    s.extra["images_generated"] = writer.generated
    s.images_per_s = round(writer.generated / secs, 3) if secs > 0 else 0.0
    s.tokens_per_s = round(s.extra.pop("session_tokens", writer.tokens) / secs, 3) if secs > 0 else 0.0
    return s
