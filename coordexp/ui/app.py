"""The web viewer: a JSON API under /api/ and four static pages (no build step, no templates).

Security: images are served only by (run id, image index) from paths the registry holds, never
from a client-supplied path; with a token every /api/ call needs `Authorization: Bearer TOKEN`
(or `?token=` for <img> sources); pages fill every value in with textContent (no HTML from data).
"""
from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from coordexp.runs.query import ImageQuery, error_codes, page_images
from coordexp.runs.registry import Registry, RegistryError, SCHEMA_VERSION

from .infer import InferOptions, InferService, UploadRejected, annotated_png
from .jobs import JobManager, JobOptions, JobRejected, check_dataset, list_datasets, list_image_folders, resolve_dataset

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGES = {"/": "runs.html", "/run": "run.html", "/compare": "compare.html", "/infer": "infer.html",
         "/jobs": "jobs.html"}


@dataclass(frozen=True)
class UiOptions:
    registry: str | None = None
    token: str | None = None
    infer: InferOptions = field(default_factory=InferOptions)
    jobs: JobOptions = field(default_factory=JobOptions)
    compare_bootstrap: int = 1000


class _Registries(threading.local):
    """One sqlite connection per server thread (FastAPI runs sync endpoints in a thread pool)."""

    def __init__(self, path: str):
        self.path = path

    def get(self) -> Registry:
        reg = getattr(self, "reg", None)
        if reg is None:
            reg = self.reg = Registry(self.path)
        return reg


def create_app(opts: UiOptions) -> FastAPI:
    path = Registry(opts.registry).path  # create / migrate once, up front
    regs = _Registries(path)
    service = InferService(opts.infer, path)
    jobs = JobManager(path, service, opts.jobs)
    app = FastAPI(title="CoordExp runs", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")

    @app.middleware("http")
    async def token_check(request: Request, call_next):
        if opts.token and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), opts.token.encode()):
                return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        # e.g. an image "id" that is a path: 400, never a file lookup
        return JSONResponse({"detail": "bad request: " + "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())}, status_code=400)

    @app.exception_handler(RegistryError)
    async def not_found(_request: Request, exc: RegistryError):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(JobRejected)
    @app.exception_handler(UploadRejected)
    async def rejected(_request: Request, exc: JobRejected | UploadRejected):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    for route, page in PAGES.items():
        app.add_api_route(route, _page(page), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _api_runs(app, regs)
    _api_images(app, regs)
    _api_compare_infer(app, regs, service, opts)
    _api_jobs(app, regs, service, jobs, opts)
    return app


def _page(name: str):
    def page() -> FileResponse:
        return FileResponse(os.path.join(STATIC, name), media_type="text/html")
    return page


def _api_runs(app: FastAPI, regs: _Registries) -> None:
    @app.get("/api/health")
    def health() -> dict[str, Any]:
        reg = regs.get()
        n = reg.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        return {"status": "ok", "registry": reg.path, "schema_version": SCHEMA_VERSION, "runs": n}

    @app.get("/api/runs")
    def runs(kind: str | None = None, status: str | None = None, checkpoint: str | None = None,
             dataset: str | None = None, since: float | None = None, until: float | None = None,
             limit: int = Query(200, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        items = regs.get().list_runs(kind=kind, status=status, checkpoint=checkpoint, dataset=dataset, since=since,
                                     until=until, limit=limit, offset=offset)
        return {"items": items, "limit": limit, "offset": offset}

    @app.get("/api/runs/{run_id}")
    def run(run_id: int) -> dict[str, Any]:
        reg = regs.get()
        r = reg.get_run(run_id)
        r["classes"] = reg.classes(run_id)
        r["error_codes"] = error_codes(reg, run_id)
        r["has_pr_curve"] = _pr_curve(r) is not None
        return r

    @app.delete("/api/runs/{run_id}")
    def delete(run_id: int) -> dict[str, Any]:
        regs.get().delete_run(run_id)
        return {"deleted": run_id}

    @app.get("/api/runs/{run_id}/pr_curve.png")
    def pr_curve(run_id: int) -> FileResponse:
        p = _pr_curve(regs.get().get_run(run_id))
        if p is None:
            raise HTTPException(404, f"run {run_id} has no PR curve")
        return FileResponse(p, media_type="image/png")


def _pr_curve(run: dict[str, Any]) -> str | None:
    # only the registered run folder's own eval output: never a path from the request
    if not run.get("run_dir"):
        return None
    p = os.path.join(run["run_dir"], "eval", "pr_curve.png")
    return p if os.path.isfile(p) else None


def _api_images(app: FastAPI, regs: _Registries) -> None:
    @app.get("/api/runs/{run_id}/images")
    def images(run_id: int, page: int = Query(1, ge=1), per_page: int = Query(50, ge=1, le=500),
               sort: str = "worst", cls: str | None = None, error: str | None = None,
               outcome: str | None = None) -> dict[str, Any]:
        q = ImageQuery(page=page, per_page=per_page, sort=sort, cls=cls or None, error=error or None,
                       outcome=outcome or None)
        try:
            q.check()
        except RegistryError as e:
            raise HTTPException(400, str(e)) from None
        return page_images(regs.get(), run_id, q)

    @app.get("/api/runs/{run_id}/images/{idx}")
    def image(run_id: int, idx: int) -> dict[str, Any]:
        return regs.get().image(run_id, idx)

    @app.get("/api/runs/{run_id}/images/{idx}/file")
    def image_file(run_id: int, idx: int) -> FileResponse:
        p = regs.get().image(run_id, idx)["path"]
        if not p or not os.path.isfile(p):
            raise HTTPException(404, f"run {run_id} image {idx}: file not on disk")
        return FileResponse(p)


def _api_compare_infer(app: FastAPI, regs: _Registries, service: InferService, opts: UiOptions) -> None:
    from coordexp.runs.compare import CompareError, CompareOptions, compare_runs

    @app.get("/api/compare")
    def compare(a: int, b: int, seed: int = 0, right_f1: float = 1.0) -> dict[str, Any]:
        try:
            return compare_runs(regs.get(), [a, b], CompareOptions(bootstrap=opts.compare_bootstrap, seed=seed,
                                                                   right_f1=right_f1))
        except CompareError as e:
            raise HTTPException(400, str(e)) from None

    @app.get("/api/infer")
    def infer_info() -> dict[str, Any]:
        return {**service.describe(), "max_bytes": opts.infer.max_bytes, "max_pixels": opts.infer.max_pixels}

    @app.get("/api/model")
    def model(name: str | None = None) -> dict[str, Any]:
        """A model (default: the viewer's) as a table: name, backend, where, checkpoint digest, limits."""
        try:
            return service.model_facts(service.resolve_model(name))
        except UploadRejected as e:
            raise HTTPException(e.status, str(e)) from None

    @app.get("/api/models")
    def models() -> dict[str, Any]:
        """The models a job may pick: the served CoordExp ensembles, or the local checkpoint."""
        return {"items": service.models(), "default": service.models()[0] if service.opts.configured else None}

    @app.post("/api/infer")
    async def infer(file: UploadFile = File(...)) -> dict[str, Any]:
        data = await file.read(opts.infer.max_bytes + 1)  # never more than the limit + 1 byte in memory
        try:
            import anyio

            name = file.filename or "upload"
            # the worker thread takes its own connection (sqlite connections stay in their thread)
            return await anyio.to_thread.run_sync(lambda: service.run(regs.get(), data, name))
        except UploadRejected as e:
            raise HTTPException(e.status, str(e)) from None

    @app.get("/api/infer/{run_id}/annotated.png")
    def annotated(run_id: int) -> Response:
        reg = regs.get()
        run = reg.get_run(run_id)
        im = reg.image(run_id, 0)
        if run["kind"] != "infer" or not im["path"] or not os.path.isfile(im["path"]):
            raise HTTPException(404, f"run {run_id} has no uploaded image")
        return Response(annotated_png(im["path"], im["pred"]), media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="coordexp_{run_id}.png"'})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> RedirectResponse:
        return RedirectResponse("/static/favicon.svg")


class TestJob(BaseModel):
    """POST /api/jobs: a test run of a dataset under the data root."""

    dataset: str
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    guided: bool = False
    model: str | None = None  # one of /api/models; default: the viewer's


class FolderJob(BaseModel):
    """POST /api/jobs/folder: batch inference of the images in a folder under the data root."""

    folder: str
    max_new_tokens: int | None = Field(None, ge=1)
    model: str | None = None


def _api_jobs(app: FastAPI, regs: _Registries, service: InferService, jobs: JobManager, opts: UiOptions) -> None:
    @app.get("/api/datasets")
    def datasets() -> dict[str, Any]:
        return {"root": opts.jobs.data_root, "items": list_datasets(opts.jobs.data_root),
                "folders": list_image_folders(opts.jobs.data_root)}

    @app.get("/api/datasets/check")
    def dataset_check(path: str, limit: int | None = Query(None, ge=1)) -> dict[str, Any]:
        return {"dataset": path, **check_dataset(resolve_dataset(opts.jobs.data_root, path), limit)}

    @app.get("/api/jobs")
    def job_list(status: str | None = None) -> dict[str, Any]:
        return {"items": [_public(j) for j in regs.get().list_jobs(status=status)],
                "max_running": opts.jobs.max_running}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        return _public(regs.get().get_job(job_id))

    @app.post("/api/jobs")
    def start_test(body: TestJob) -> dict[str, Any]:
        return _public(jobs.submit_test(body.dataset, body.limit, body.max_new_tokens, body.guided, body.model))

    @app.post("/api/jobs/folder")
    def start_folder(body: FolderJob) -> dict[str, Any]:
        return _public(jobs.submit_folder(body.folder, body.max_new_tokens, body.model))

    @app.post("/api/jobs/batch")
    async def start_batch(files: list[UploadFile] = File(...), max_new_tokens: int | None = Query(None, ge=1),
                          model: str | None = None) -> dict[str, Any]:
        import anyio

        got = []
        for f in files:
            data = await f.read(opts.infer.max_bytes + 1)  # never more than the limit + 1 byte in memory
            got.append((f.filename or "upload", data))
        return _public(await anyio.to_thread.run_sync(lambda: jobs.submit_batch(got, max_new_tokens, model)))

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: int) -> dict[str, Any]:
        return _public(jobs.cancel(job_id))

    @app.get("/api/jobs/{job_id}/download/{what}")
    def download(job_id: int, what: str) -> Response:
        content, media, name = jobs.download(regs.get(), job_id, what)
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        if what == "predictions.jsonl":
            return FileResponse(content, media_type=media, headers=headers)
        return Response(content, media_type=media, headers=headers)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the pages see it: the dataset by its name under the data root (its resolved path left out)."""
    spec = {k: v for k, v in job["spec"].items() if k != "dataset_path"}
    return {**{k: v for k, v in job.items() if k not in ("spec", "job_dir")}, "spec": spec}
