"""The run registry: one SQLite file (stdlib sqlite3, WAL) of test runs and inference jobs.

Images stay on disk; the database holds their paths and, per image, the GT, the predictions and
the match outcome (TP/FP/FN at IoU 0.5, full = box and label), so the viewer pages through 50k
images with indexed queries instead of reading JSONL files.

Schema changes go into MIGRATIONS (append only); `PRAGMA user_version` records how many ran.
Writers retry on `database is locked` (several processes register at once: each retry waits a
little longer, with jitter, so they do not collide again in lock step).
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")

KINDS = ("test", "infer")  # test run: labelled data -> metrics; inference job: no labels -> predictions
STATUSES = ("pending", "running", "completed", "failed")
ENV_VAR = "COORDEXP_REGISTRY"

MIGRATIONS: list[str] = [
    # 1: runs and their images
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('test', 'infer')),
        name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
        error TEXT,
        checkpoint_path TEXT, checkpoint_sha256 TEXT,
        dataset_path TEXT, dataset_sha256 TEXT,
        backend TEXT, engine TEXT, served_model TEXT, server TEXT,
        params_json TEXT NOT NULL DEFAULT '{}', prompt_variant TEXT,
        primary_metric_name TEXT, primary_metric REAL,
        metrics_json TEXT NOT NULL DEFAULT '{}', per_class_json TEXT NOT NULL DEFAULT '[]',
        images_per_s REAL, p50_ms REAL, p95_ms REAL,
        created_at REAL NOT NULL, started_at REAL, completed_at REAL,
        run_dir TEXT, num_images INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_created ON runs(created_at);
    CREATE TABLE images (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        path TEXT, width INTEGER, height INTEGER,
        gt_json TEXT NOT NULL DEFAULT '[]', pred_json TEXT NOT NULL DEFAULT '[]',
        tp INTEGER NOT NULL DEFAULT 0, fp INTEGER NOT NULL DEFAULT 0, fn INTEGER NOT NULL DEFAULT 0,
        precision REAL, recall REAL, f1 REAL,
        error TEXT, latency_ms REAL,
        PRIMARY KEY (run_id, idx)
    ) WITHOUT ROWID;
    CREATE INDEX images_f1 ON images(run_id, f1, idx);
    """,
    # 2: class filter (one row per class an image holds, GT or predicted), visualisation folder,
    #    timings of a run as JSON
    """
    CREATE TABLE image_classes (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        class TEXT NOT NULL, idx INTEGER NOT NULL,
        PRIMARY KEY (run_id, class, idx)
    ) WITHOUT ROWID;
    CREATE INDEX images_error ON images(run_id, error, idx);
    ALTER TABLE runs ADD COLUMN vis_dir TEXT;
    ALTER TABLE runs ADD COLUMN timings_json TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: the worst-first index covers the outcome columns, so counts, outcome filters and deep pages
    #    read the index alone (the rows hold the GT/pred JSON: large)
    """
    DROP INDEX images_f1;
    CREATE INDEX images_outcome ON images(run_id, f1, idx, tp, fp, fn);
    """,
    # 4: runs tied to their predictions (the digest the metrics were computed from), how the answers
    #    ended (stop / length / error), a note (e.g. a stale evaluation left out), one entry per run
    #    folder, and the history of an entry's changes (re-registration keeps the id)
    """
    ALTER TABLE runs ADD COLUMN pred_sha256 TEXT;
    ALTER TABLE runs ADD COLUMN finish_json TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE runs ADD COLUMN note TEXT;
    CREATE INDEX runs_dir ON runs(run_dir);
    CREATE TABLE run_history (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        changed_at REAL NOT NULL,
        change_json TEXT NOT NULL
    );
    CREATE INDEX run_history_run ON run_history(run_id, changed_at);
    """,
    # 5: the viewer's jobs (test runs and batch inference started from the web pages): what was asked,
    #    how far it got, the run it registered
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('test', 'batch')),
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
        spec_json TEXT NOT NULL DEFAULT '{}',
        progress_json TEXT NOT NULL DEFAULT '{}',
        run_id INTEGER, error TEXT, job_dir TEXT,
        created_at REAL NOT NULL, started_at REAL, ended_at REAL
    );
    CREATE INDEX jobs_created ON jobs(created_at);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

RUN_COLUMNS = ("kind", "name", "status", "error", "checkpoint_path", "checkpoint_sha256", "dataset_path",
               "dataset_sha256", "backend", "engine", "served_model", "server", "params_json", "prompt_variant",
               "primary_metric_name", "primary_metric", "metrics_json", "per_class_json", "images_per_s", "p50_ms",
               "p95_ms", "created_at", "started_at", "completed_at", "run_dir", "num_images", "vis_dir",
               "timings_json", "pred_sha256", "finish_json", "note")
JSON_FIELDS = {"params_json": "params", "metrics_json": "metrics", "per_class_json": "per_class",
               "timings_json": "timings", "finish_json": "finish"}
# what a history entry records of the entry before and after a change
HISTORY_FIELDS = ("kind", "status", "pred_sha256", "primary_metric_name", "primary_metric", "num_images", "name")


class RegistryError(ValueError):
    """A registry request that cannot be served (unknown run, bad filter, newer schema)."""


def default_path() -> str:
    """$COORDEXP_REGISTRY, else $XDG_DATA_HOME/coordexp/registry.sqlite (~/.local/share/...)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "coordexp", "registry.sqlite")


@dataclass
class RunRecord:
    """One run as registered: typed fields plus JSON blobs (params, metrics, per-class rows, timings)."""

    kind: str
    name: str
    status: str = "completed"
    error: str | None = None
    checkpoint_path: str | None = None
    checkpoint_sha256: str | None = None
    dataset_path: str | None = None
    dataset_sha256: str | None = None
    backend: str | None = None
    engine: str | None = None
    served_model: str | None = None
    server: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    prompt_variant: str | None = None
    primary_metric_name: str | None = None
    primary_metric: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    images_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    run_dir: str | None = None
    vis_dir: str | None = None
    num_images: int = 0
    pred_sha256: str | None = None  # the predictions file this entry describes (its metrics were computed from it)
    finish: dict[str, int] = field(default_factory=dict)  # how the answers ended: stop / length / error
    note: str | None = None

    def row(self) -> dict[str, Any]:
        if self.kind not in KINDS:
            raise RegistryError(f"run {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise RegistryError(f"run {self.name!r}: status must be one of {STATUSES}, got {self.status!r}")
        d = {k: getattr(self, k) for k in RUN_COLUMNS if k not in JSON_FIELDS}
        for col, attr in JSON_FIELDS.items():
            d[col] = json.dumps(getattr(self, attr), ensure_ascii=False)
        return d


@dataclass
class ImageRow:
    """One image of a run: GT and preds are lists of {desc, bbox: [x1, y1, x2, y2] pixels, ...};
    a pred carries `match` (the GT index it matched with the right label, else None) and `iou`,
    a GT object `match` (the pred index, else None)."""

    idx: int
    path: str | None
    width: int | None
    height: int | None
    gt: list[dict[str, Any]] = field(default_factory=list)
    pred: list[dict[str, Any]] = field(default_factory=list)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    error: str | None = None
    latency_ms: float | None = None

    def scores(self) -> tuple[float, float, float]:
        """(precision, recall, F1), eval's per-image convention: P = 1 with nothing predicted,
        R = 1 with nothing to find, F1 = 0 when P + R = 0."""
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _retry(fn: Callable[[], T], attempts: int = 60) -> T:
    delay = 0.01
    for k in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or k == attempts - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.6, 0.5)
    raise AssertionError("unreachable")


class Registry:
    """A connection to one registry file; creates and migrates it on open."""

    def __init__(self, path: str | None = None):
        self.path = os.path.abspath(path or default_path())
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so a writer takes the lock up front
        self.db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        _retry(lambda: self.db.execute("PRAGMA journal_mode=WAL"))
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=NORMAL")
        _retry(self._migrate)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        if self.schema_version > SCHEMA_VERSION:
            raise RegistryError(f"{self.path}: schema version {self.schema_version} is newer than this code's "
                                f"{SCHEMA_VERSION}; upgrade coordexp-serve")
        if self.schema_version == SCHEMA_VERSION:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            v = self.schema_version  # another process may have migrated while we waited for the lock
            for k in range(v, SCHEMA_VERSION):
                for stmt in _statements(MIGRATIONS[k]):
                    self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={k + 1}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx() -> T:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.db)
                self.db.execute("COMMIT")
                return out
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return _retry(tx)

    # ---- writing
    def add_run(self, run: RunRecord, images: Sequence[ImageRow] = (), replace: bool = False) -> int:
        """Register a run and its images in one transaction; returns the run id. `replace`: a run
        folder has one entry: registering the folder again (an `infer` job that `eval` then scored, a
        rerun, a resume) updates that entry in place, its id kept and the change in its history."""
        row = run.row()
        if images:
            row["num_images"] = len(images)

        def tx(db: sqlite3.Connection) -> int:
            old = None
            if replace and run.run_dir:
                rows = db.execute("SELECT * FROM runs WHERE run_dir = ? ORDER BY id", (run.run_dir,)).fetchall()
                if rows:
                    old = rows[0]
                    for extra in rows[1:]:  # entries of this folder from before ids were kept
                        db.execute("DELETE FROM runs WHERE id = ?", (extra["id"],))
            if old is None:
                cols = ", ".join(row)
                cur = db.execute(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
                run_id = int(cur.lastrowid)
            else:
                run_id = int(old["id"])
                new = {k: v for k, v in row.items() if k != "created_at"}
                if new.get("vis_dir") is None and old["vis_dir"] and os.path.isdir(old["vis_dir"]):
                    new["vis_dir"] = old["vis_dir"]  # `vis` noted its gallery; re-registering keeps it
                db.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in new)} WHERE id = ?", [*new.values(), run_id])
                db.execute("DELETE FROM images WHERE run_id = ?", (run_id,))
                db.execute("DELETE FROM image_classes WHERE run_id = ?", (run_id,))
                before = {k: old[k] for k in HISTORY_FIELDS}
                after = {k: row.get(k) for k in HISTORY_FIELDS}
                if before != after:
                    db.execute("INSERT INTO run_history (run_id, changed_at, change_json) VALUES (?, ?, ?)",
                               (run_id, time.time(), json.dumps({"before": before, "after": after})))
            _insert_images(db, run_id, images)
            return run_id
        return self._write(tx)

    # ---- the viewer's jobs
    def add_job(self, kind: str, spec: dict[str, Any]) -> int:
        return self._write(lambda db: int(db.execute(
            "INSERT INTO jobs (kind, status, spec_json, created_at) VALUES (?, 'pending', ?, ?)",
            (kind, json.dumps(spec, ensure_ascii=False), time.time())).lastrowid))

    def update_job(self, job_id: int, **fields: Any) -> None:
        cols = {"status", "progress", "run_id", "error", "job_dir", "started_at", "ended_at"}
        bad = set(fields) - cols
        if bad:
            raise RegistryError(f"job {job_id}: unknown field(s) {sorted(bad)}")
        sets = {("progress_json" if k == "progress" else k): (json.dumps(v) if k == "progress" else v)
                for k, v in fields.items()}
        self._write(lambda db: db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in sets)} WHERE id = ?",
                                          [*sets.values(), int(job_id)]))

    def get_job(self, job_id: int) -> dict[str, Any]:
        r = self.db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if r is None:
            raise RegistryError(f"no job with id {job_id} in {self.path}")
        return _job_dict(r)

    def list_jobs(self, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM jobs", []
        if status:
            sql, args = sql + " WHERE status = ?", [status]
        return [_job_dict(r) for r in self.db.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, int(limit)])]

    def history(self, run_id: int) -> list[dict[str, Any]]:
        """An entry's changes, oldest first: {changed_at, before, after}."""
        return [{"changed_at": r["changed_at"], **json.loads(r["change_json"])}
                for r in self.db.execute("SELECT * FROM run_history WHERE run_id = ? ORDER BY changed_at",
                                         (int(run_id),))]

    def update_run(self, run_id: int, **fields: Any) -> None:
        sets = {}
        for k, v in fields.items():
            col = next((c for c, a in JSON_FIELDS.items() if a == k), k)
            if col not in RUN_COLUMNS:
                raise RegistryError(f"run {run_id}: unknown field {k!r}")
            sets[col] = json.dumps(v) if col in JSON_FIELDS else v
        self.get_run(run_id)
        self._write(lambda db: db.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in sets)} WHERE id = ?",
                                          [*sets.values(), run_id]))

    def delete_run(self, run_id: int) -> None:
        self.get_run(run_id)
        self._write(lambda db: db.execute("DELETE FROM runs WHERE id = ?", (run_id,)))

    # ---- reading
    def get_run(self, run_id: int) -> dict[str, Any]:
        r = self.db.execute("SELECT * FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        if r is None:
            raise RegistryError(f"no run with id {run_id} in {self.path}")
        return _run_dict(r)

    def list_runs(self, kind: str | None = None, status: str | None = None, checkpoint: str | None = None,
                  dataset: str | None = None, since: float | None = None, until: float | None = None,
                  limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        """Newest first; `checkpoint` / `dataset` match a substring of the path or a digest prefix."""
        where, args = [], []
        if kind:
            where.append("kind = ?"); args.append(kind)  # noqa: E702
        if status:
            where.append("status = ?"); args.append(status)  # noqa: E702
        for col, val in (("checkpoint", checkpoint), ("dataset", dataset)):
            if val:
                where.append(f"(instr({col}_path, ?) > 0 OR {col}_sha256 LIKE ?)")
                args += [val, val + "%"]
        if since is not None:
            where.append("created_at >= ?"); args.append(since)  # noqa: E702
        if until is not None:
            where.append("created_at <= ?"); args.append(until)  # noqa: E702
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        return [_run_dict(r, light=True) for r in self.db.execute(sql, [*args, int(limit), int(offset)])]

    def image(self, run_id: int, idx: int) -> dict[str, Any]:
        r = self.db.execute("SELECT * FROM images WHERE run_id = ? AND idx = ?", (int(run_id), int(idx))).fetchone()
        if r is None:
            raise RegistryError(f"run {run_id} has no image {idx}")
        return _image_dict(r)

    def all_images(self, run_id: int, preds: bool = True) -> list[dict[str, Any]]:
        """Every image of a run in input order; `preds=False` leaves the predictions out (compare needs
        only the GT outcomes, and JSON decoding is most of the time at 50k images)."""
        cols = "*" if preds else ("run_id, idx, path, width, height, gt_json, '[]' AS pred_json, tp, fp, fn, precision, "
                                  "recall, f1, error, latency_ms")
        return [_image_dict(r) for r in
                self.db.execute(f"SELECT {cols} FROM images WHERE run_id = ? ORDER BY idx", (int(run_id),))]

    def classes(self, run_id: int) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT class FROM image_classes WHERE run_id = ? "
                                              "ORDER BY class", (int(run_id),))]


def _statements(script: str) -> Iterable[str]:
    for s in script.split(";"):
        if s.strip():
            yield s


def _insert_images(db: sqlite3.Connection, run_id: int, images: Sequence[ImageRow]) -> None:
    rows, classes = [], []
    for im in images:
        p, r, f1 = im.scores()
        rows.append((run_id, im.idx, im.path, im.width, im.height, json.dumps(im.gt, ensure_ascii=False),
                     json.dumps(im.pred, ensure_ascii=False), im.tp, im.fp, im.fn, p, r, f1, im.error,
                     im.latency_ms))
        classes += [(run_id, c, im.idx) for c in {o.get("desc", "") for o in (*im.gt, *im.pred)}]
    db.executemany("INSERT INTO images (run_id, idx, path, width, height, gt_json, pred_json, tp, fp, fn, precision,"
                   " recall, f1, error, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.executemany("INSERT OR IGNORE INTO image_classes (run_id, class, idx) VALUES (?, ?, ?)", classes)


def _run_dict(r: sqlite3.Row, light: bool = False) -> dict[str, Any]:
    d = dict(r)
    for col, attr in JSON_FIELDS.items():
        raw = d.pop(col, None)
        if light and col in ("per_class_json",):
            continue
        d[attr] = json.loads(raw) if raw else {}
    return d


def _job_dict(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    d["spec"] = json.loads(d.pop("spec_json") or "{}")
    d["progress"] = json.loads(d.pop("progress_json") or "{}")
    return d


def _image_dict(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    d["gt"] = json.loads(d.pop("gt_json"))
    d["pred"] = json.loads(d.pop("pred_json"))
    return d
