"""Jobs the viewer starts: test runs (a labelled dataset under the data root -> predictions, eval, a
registered test run) and batch inference (uploaded images, or a folder under the data root ->
predictions, a registered inference job, downloads). They run in the background through the same
library the CLI uses (`coordexp.runner`, `coordexp.eval`, `coordexp.runs.register`), at most
`max_running` at once (the rest wait, pending), with their state in the registry (`jobs` table), so a
page reload shows them as they are and a viewer restart marks the ones it interrupted failed, with the
command that resumes them.

Datasets and image folders come only from under the data root (`--data-root`): a path that leaves it
is refused. A job runs on the model it names (one the viewer offers) or the viewer's own.
"""
from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from dataclasses import dataclass
from typing import Any

from coordexp.dataset import check_dataset
from coordexp.runs.registry import Registry

__all__ = ["JobManager", "JobOptions", "JobRejected", "check_dataset", "list_datasets", "list_image_folders",
           "resolve_dataset", "resolve_folder"]

MAX_DATASETS_LISTED = 200
MAX_BATCH_FILES = 200
MAX_FOLDER_IMAGES = 5000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class JobRejected(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JobOptions:
    data_root: str | None = None  # where datasets may come from (None: test runs are off)
    jobs_dir: str | None = None  # default: beside the registry, "jobs/"
    max_running: int = 1
    concurrency: int = 8  # requests in flight for a served model


def _under_root(root: str | None, rel: str, what: str) -> str:
    """The real path `rel` names under `root`; JobRejected(400) for anything that leaves it (`..`,
    an absolute path, a link pointing out)."""
    if not root:
        raise JobRejected(400, f"no data root: start the viewer with --data-root DIR to run {what}s from it")
    if not rel or "\x00" in rel or os.path.isabs(rel):
        raise JobRejected(400, f"{what} {rel!r}: give a path relative to the data root")
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base:
        raise JobRejected(400, f"{what} {rel!r} is outside the data root")
    return path


def resolve_dataset(root: str | None, rel: str) -> str:
    """The dataset file `rel` names under `root`; JobRejected(400) for anything outside it."""
    path = _under_root(root, rel, "dataset")
    if not path.endswith(".jsonl") or not os.path.isfile(path):
        raise JobRejected(404, f"dataset {rel!r}: no such .jsonl file under the data root")
    return path


def resolve_folder(root: str | None, rel: str) -> str:
    """The image folder `rel` names under `root` (`.` is the root itself)."""
    path = _under_root(root, rel, "folder")
    if not os.path.isdir(path):
        raise JobRejected(404, f"folder {rel!r}: no such folder under the data root")
    return path


def _walk(root: str):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield folder, sorted(f for f in files if not f.startswith("."))


def list_datasets(root: str | None) -> list[str]:
    if not root or not os.path.isdir(root):
        return []
    out = []
    for folder, files in _walk(root):
        for f in files:
            if f.endswith(".jsonl"):
                out.append(os.path.relpath(os.path.join(folder, f), root))
                if len(out) >= MAX_DATASETS_LISTED:
                    return out
    return out


def list_image_folders(root: str | None) -> list[dict[str, Any]]:
    """The folders under the data root that hold images, with their image counts."""
    if not root or not os.path.isdir(root):
        return []
    out = []
    for folder, files in _walk(root):
        n = sum(f.lower().endswith(IMAGE_SUFFIXES) for f in files)
        if n:
            out.append({"path": os.path.relpath(folder, root), "images": n})
            if len(out) >= MAX_DATASETS_LISTED:
                break
    return out


def folder_images(folder: str, max_pixels: int) -> list[tuple[str, int, int]]:
    """(path, width, height) of each image directly in `folder`, sorted by name; the sizes come from
    the headers (nothing is decoded). JobRejected names the first file that is not a usable image."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES) or not os.path.isfile(path):
            continue
        if len(out) >= MAX_FOLDER_IMAGES:
            raise JobRejected(413, f"more than {MAX_FOLDER_IMAGES} images in the folder: run it with "
                                   "coordexp-client infer")
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise JobRejected(400, f"{name}: not a readable image ({e})") from None
        if w * h > max_pixels:
            raise JobRejected(413, f"{name}: {w}x{h} is over the limit of {max_pixels} pixels")
        out.append((path, w, h))
    if not out:
        raise JobRejected(400, "no image (" + ", ".join(IMAGE_SUFFIXES) + ") directly in the folder")
    return out


class JobManager:
    """Queue and run the viewer's jobs (see the module docstring); `service` is the viewer's model."""

    def __init__(self, registry_path: str, service: Any, opts: JobOptions):
        self.registry_path, self.service, self.opts = registry_path, service, opts
        self.jobs_dir = os.path.abspath(opts.jobs_dir or os.path.join(os.path.dirname(registry_path), "jobs"))
        self._lock = threading.Lock()
        self._running: dict[int, threading.Event] = {}
        with Registry(registry_path) as reg:
            for j in reg.list_jobs(limit=10_000):
                if j["status"] in ("pending", "running"):
                    reg.update_job(j["id"], status="failed", ended_at=time.time(), error=self._resume_hint(j))

    # ------------------------------------------------------------------ asking
    def _resume_hint(self, job: dict[str, Any]) -> str:
        pred = os.path.join(job.get("job_dir") or os.path.join(self.jobs_dir, str(job["id"])), "predictions.jsonl")
        data = os.path.join(os.path.dirname(pred), "data.jsonl")
        return (f"the viewer stopped while this job was {job['status']}: resume it with coordexp-client infer --resume "
                f"--data {data} --out {pred} (the model's --url or --local), then coordexp-client eval")

    def submit_test(self, dataset: str, limit: int | None, max_new_tokens: int | None, guided: bool,
                    model: str | None = None) -> dict[str, Any]:
        path = resolve_dataset(self.opts.data_root, dataset)
        if limit is not None and limit < 1:
            raise JobRejected(400, "limit must be >= 1")
        check = check_dataset(path, limit)
        if not check["ok"]:
            raise JobRejected(400, f"dataset {dataset!r} cannot run: " + ("; ".join(check["problems"]) or "no record"))
        if not check["labelled"]:
            raise JobRejected(400, f"dataset {dataset!r} has no labelled record: a test run needs labels "
                                   "(start a batch inference job instead)")
        self._need_model()
        spec = {"dataset": dataset, "dataset_path": path, "limit": limit, "max_new_tokens": max_new_tokens,
                "guided": bool(guided), "records": check["valid"], "model": self.service.resolve_model(model)}
        return self._queue("test", spec)

    def submit_folder(self, folder: str, max_new_tokens: int | None, model: str | None = None) -> dict[str, Any]:
        """Batch inference of the images directly in a folder under the data root (read in place)."""
        images = folder_images(resolve_folder(self.opts.data_root, folder), self.service.opts.max_pixels)
        self._need_model()
        model = self.service.resolve_model(model)
        with Registry(self.registry_path) as reg:
            job_id = reg.add_job("batch", {"folder": folder, "max_new_tokens": max_new_tokens,
                                           "records": len(images), "model": model})
            job_dir = os.path.join(self.jobs_dir, str(job_id))
            os.makedirs(job_dir, exist_ok=True)
            with open(os.path.join(job_dir, "data.jsonl"), "w", encoding="utf-8") as f:
                for path, w, h in images:
                    f.write(json.dumps({"images": [path], "width": w, "height": h, "objects": []},
                                       ensure_ascii=False) + "\n")
            reg.update_job(job_id, job_dir=job_dir, progress={"done": 0, "total": len(images)})
            job = reg.get_job(job_id)
        self._pump()
        return job

    def submit_batch(self, files: list[tuple[str, bytes]], max_new_tokens: int | None,
                     model: str | None = None) -> dict[str, Any]:
        if not files:
            raise JobRejected(400, "no image uploaded")
        if len(files) > MAX_BATCH_FILES:
            raise JobRejected(413, f"{len(files)} images: at most {MAX_BATCH_FILES} per batch job")
        checked = [(name, data, self.service.check_upload(data, name)) for name, data in files]
        self._need_model()
        model = self.service.resolve_model(model)
        with Registry(self.registry_path) as reg:
            job_id = reg.add_job("batch", {"images": [n for n, _, _ in checked], "max_new_tokens": max_new_tokens,
                                           "records": len(checked), "model": model})
            job_dir = os.path.join(self.jobs_dir, str(job_id))
            os.makedirs(os.path.join(job_dir, "images"), exist_ok=True)
            with open(os.path.join(job_dir, "data.jsonl"), "w", encoding="utf-8") as f:
                for k, (name, data, (w, h, ext)) in enumerate(checked):
                    path = os.path.join(job_dir, "images", f"{k:04d}{ext}")  # never the client's name as a path
                    with open(path, "wb") as img:
                        img.write(data)
                    f.write(json.dumps({"images": [path], "width": w, "height": h, "objects": [],
                                        "metadata": {"upload": name}}, ensure_ascii=False) + "\n")
            reg.update_job(job_id, job_dir=job_dir, progress={"done": 0, "total": len(checked)})
            job = reg.get_job(job_id)
        self._pump()
        return job

    def _need_model(self) -> None:
        if not self.service.opts.configured:
            from coordexp.ui.infer import UploadRejected

            raise UploadRejected(503, "no model configured: start the viewer with --url HOST:PORT or --local CKPT")

    def _queue(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        with Registry(self.registry_path) as reg:
            job_id = reg.add_job(kind, spec)
            reg.update_job(job_id, job_dir=os.path.join(self.jobs_dir, str(job_id)),
                           progress={"done": 0, "total": spec.get("records")})
            job = reg.get_job(job_id)
        self._pump()
        return job

    def cancel(self, job_id: int) -> dict[str, Any]:
        with self._lock, Registry(self.registry_path) as reg:
            job = reg.get_job(job_id)
            if job["status"] == "pending":
                reg.update_job(job_id, status="cancelled", ended_at=time.time(), error="cancelled before it started")
            elif job["status"] == "running" and job_id in self._running:
                self._running[job_id].set()
            elif job["status"] not in ("pending", "running"):
                raise JobRejected(409, f"job {job_id} is {job['status']}: nothing to cancel")
            return reg.get_job(job_id)

    # ------------------------------------------------------------------ running
    def _pump(self) -> None:
        """Start pending jobs, oldest first, while fewer than max_running run."""
        with self._lock, Registry(self.registry_path) as reg:
            pending = sorted(j["id"] for j in reg.list_jobs(status="pending", limit=10_000))
            while pending and len(self._running) < self.opts.max_running:
                job_id = pending.pop(0)
                stop = threading.Event()
                self._running[job_id] = stop
                reg.update_job(job_id, status="running", started_at=time.time())
                threading.Thread(target=self._run, args=(job_id, stop), name=f"job-{job_id}", daemon=True).start()

    def _run(self, job_id: int, stop: threading.Event) -> None:
        from coordexp.runner import RunInterrupted

        reg = Registry(self.registry_path)
        try:
            job = reg.get_job(job_id)
            run_id = (self._test if job["kind"] == "test" else self._batch)(reg, job, stop)
            reg.update_job(job_id, status="completed", run_id=run_id, ended_at=time.time())
        except RunInterrupted:
            reg.update_job(job_id, status="cancelled", ended_at=time.time(),
                           error="cancelled: the lines so far are kept (coordexp-client infer --resume continues)")
        except Exception as e:  # noqa: BLE001 - the job records its failure, the viewer goes on
            reg.update_job(job_id, status="failed", ended_at=time.time(), error=f"{type(e).__name__}: {e}")
        finally:
            reg.close()
            with self._lock:
                self._running.pop(job_id, None)
            self._pump()

    def _infer(self, reg: Registry, job: dict[str, Any], data: str, stop: threading.Event) -> str:
        """The runner over `data` into the job's folder, progress into the job's row. Returns the predictions."""
        from coordexp.generation import GenerationParams
        from coordexp.runner import run_dataset

        spec, job_dir = job["spec"], job["job_dir"]
        pred = os.path.join(job_dir, "predictions.jsonl")
        engine = self.service.engine(spec.get("model"))
        limit = self.service.opts.max_new_tokens
        params = GenerationParams(max_new_tokens=min(spec.get("max_new_tokens") or limit, limit),
                                  guided=bool(spec.get("guided")))
        total = spec.get("records")
        t0, last = time.perf_counter(), [0.0]

        def progress(done: int, errors: dict[str, int]) -> None:
            now = time.perf_counter()
            if now - last[0] < 0.3 and done != total:
                return
            last[0] = now
            reg.update_job(job["id"], progress={"done": done, "total": total, "errors": sum(errors.values()),
                                                "images_per_s": round(done / max(now - t0, 1e-6), 3)})

        concurrency = self.opts.concurrency if engine.concurrent else 1
        with self.service.exclusive(engine):
            summary = run_dataset(data, pred, engine, params, concurrency=concurrency, progress=False,
                                  on_progress=progress, stop=stop, force=True)
        d = summary.to_dict()
        reg.update_job(job["id"], progress={"done": d["records_written"], "total": total,
                                            "errors": sum(d["errors"].values()), "images_per_s": d["images_per_s"]})
        return pred

    def _test(self, reg: Registry, job: dict[str, Any], stop: threading.Event) -> int:
        from coordexp.dataset import copy_records
        from coordexp.eval import evaluate
        from coordexp.runs.register import RegisterOptions, register_run

        spec, job_dir = job["spec"], job["job_dir"]
        os.makedirs(job_dir, exist_ok=True)
        data = os.path.join(job_dir, "data.jsonl")  # the records run, image paths made absolute
        copy_records(spec["dataset_path"], data, spec.get("limit"))
        pred = self._infer(reg, job, data, stop)
        evaluate(pred, data, os.path.join(job_dir, "eval"), metrics="both", semantic=False, plots=True)
        run_id = register_run(pred, RegisterOptions(registry=self.registry_path, name=f"job {job['id']}: "
                                                    f"{spec['dataset']}"), gt_path=data,
                              eval_dir=os.path.join(job_dir, "eval"), quiet=True)
        if run_id is None:
            raise RuntimeError("the run could not be registered (see the viewer's log)")
        return run_id

    def _batch(self, reg: Registry, job: dict[str, Any], stop: threading.Event) -> int:
        from coordexp.runs.register import RegisterOptions, register_run

        pred = self._infer(reg, job, os.path.join(job["job_dir"], "data.jsonl"), stop)
        what = job["spec"].get("folder") or f"{len(job['spec']['images'])} uploads"
        run_id = register_run(pred, RegisterOptions(registry=self.registry_path, name=f"job {job['id']}: {what}"),
                              quiet=True)
        if run_id is None:
            raise RuntimeError("the run could not be registered (see the viewer's log)")
        return run_id

    # ------------------------------------------------------------------ results
    def download(self, reg: Registry, job_id: int, what: str) -> tuple[bytes | str, str, str]:
        """(content or file path, media type, file name) of a finished job's result."""
        from coordexp.runs.report import export_run

        job = reg.get_job(job_id)
        if job["status"] != "completed" or job["run_id"] is None:
            raise JobRejected(409, f"job {job_id} is {job['status']}: its results are not ready")
        if what == "predictions.jsonl":
            pred = os.path.join(job["job_dir"], "predictions.jsonl")
            return pred, "application/jsonl", f"job{job_id}_predictions.jsonl"
        if what == "coco.json":
            return export_run(reg, job["run_id"], "coco"), "application/json", f"job{job_id}_coco.json"
        if what == "annotated.zip":
            return annotated_zip(reg, job["run_id"]), "application/zip", f"job{job_id}_annotated.zip"
        raise JobRejected(404, f"no result {what!r} (predictions.jsonl, coco.json, annotated.zip)")


def annotated_zip(reg: Registry, run_id: int) -> bytes:
    """Every image of a run with its predictions drawn, as PNGs in a zip."""
    import io

    from coordexp.ui.infer import annotated_png

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for im in reg.all_images(run_id):
            if im["path"] and os.path.isfile(im["path"]):
                z.writestr(f"{im['idx']:04d}_{os.path.splitext(os.path.basename(im['path']))[0]}.png",
                           annotated_png(im["path"], im["pred"]))
    return buf.getvalue()
