"""Single-image inference for the web viewer: a checked upload -> a model -> a registered inference job.

The upload is refused before decoding when it is too many bytes or (decompression-bomb guard,
the client's own `coordexp.dataset.check_image_bytes`) too many pixels. It is stored under the
viewer's own upload folder with a generated name: the client's file name is never used as a path.
"""
from __future__ import annotations

import io
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from coordexp.runs.registry import ImageRow, Registry, RunRecord

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}


@dataclass(frozen=True)
class InferOptions:
    urls: tuple[str, ...] = ()  # Triton gRPC endpoints
    model: str = "coordexp"
    local: str | None = None  # or a local checkpoint
    engine: str = "torch"  # torch | onnx (with `local`)
    max_new_tokens: int = 256
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    upload_dir: str | None = None  # default: beside the registry, "uploads/"

    @property
    def configured(self) -> bool:
        return bool(self.urls or self.local)


class UploadRejected(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InferService:
    """Loads the model once (lazily, on the first upload); one request at a time runs on it."""

    def __init__(self, opts: InferOptions, registry_path: str):
        self.opts = opts
        self.upload_dir = os.path.abspath(opts.upload_dir or os.path.join(os.path.dirname(registry_path), "uploads"))
        self._engines: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._served: tuple[float, list[str]] | None = None

    def models(self) -> list[str]:
        """The models a job may pick: the ready CoordExp ensembles of the first reachable server (the
        viewer's --model first), or the --local checkpoint's name."""
        if self.opts.local and not self.opts.urls:
            return [os.path.basename(os.path.abspath(self.opts.local))]
        if not self.opts.urls:
            return []
        if self._served is None or time.monotonic() - self._served[0] > 15:
            import asyncio

            from coordexp.engines.triton.inventory import coordexp_models, server_models
            from coordexp.engines.triton.connect import normalise_url

            names: list[str] = []
            for url in self.opts.urls:
                try:
                    names = coordexp_models(asyncio.run(server_models(normalise_url(url), timeout=5.0)))
                    break
                except ConnectionError:
                    continue
            self._served = (time.monotonic(), names)
        names = self._served[1]
        return [self.opts.model] + [n for n in names if n != self.opts.model]

    def resolve_model(self, model: str | None) -> str:
        """The model a request names (None: the viewer's own); UploadRejected(400) for one not offered."""
        default = self.models()[0] if self.opts.local and not self.opts.urls else self.opts.model
        if model in (None, "", default):
            return default
        offered = self.models()
        if model not in offered:
            raise UploadRejected(400, f"model {model!r} is not offered here ({', '.join(offered) or 'none'})")
        return model

    def describe(self, model: str | None = None) -> dict[str, Any]:
        if self.opts.urls:
            return {"backend": "triton", "urls": list(self.opts.urls), "model": model or self.opts.model}
        if self.opts.local:
            return {"backend": self.opts.engine, "checkpoint": os.path.abspath(self.opts.local)}
        return {"backend": None}

    def model_facts(self, model: str | None = None) -> dict[str, Any]:
        """The model as the pages show it (a table, not a blob): name, backend, where, checkpoint
        digest, token limit, prompt; the model is loaded (connected) to say so."""
        d = self.describe(model)
        if d["backend"] is None:
            return {"configured": False}
        facts: dict[str, Any] = {"configured": True, "backend": d["backend"],
                                 "where": ", ".join(d["urls"]) if "urls" in d else d.get("checkpoint"),
                                 "name": d["model"] if self.opts.urls else os.path.basename(d["checkpoint"]),
                                 "max_new_tokens": self.opts.max_new_tokens}
        try:
            engine = self.engine(model)
        except Exception as e:  # noqa: BLE001 - the page says the model is not reachable
            return {**facts, "error": f"{type(e).__name__}: {e}"}
        facts["checkpoint_sha256"] = engine.checkpoint_sha256()
        facts["prompt_variant"] = engine.prompt.variant
        manifest = getattr(engine, "manifest", None) or {}
        if manifest.get("max_new_tokens"):
            facts["served_limit"] = manifest["max_new_tokens"]
            facts["max_new_tokens"] = min(self.opts.max_new_tokens, manifest["max_new_tokens"])
        if (manifest.get("checkpoint") or {}).get("path"):
            facts["checkpoint"] = manifest["checkpoint"]["path"]
        elif not self.opts.urls:
            facts["checkpoint"] = d.get("checkpoint")  # a local engine is its checkpoint
        return facts

    def engine(self, model: str | None = None):
        """The engine of `model` (default: the viewer's), loaded (connected) once."""
        name = self.resolve_model(model)
        with self._lock:
            return self._load(name)

    def exclusive(self, engine: Any):
        """Hold the model for a whole job when it runs one call at a time (a local engine); a served
        one takes concurrent calls and is not held."""
        import contextlib

        return contextlib.nullcontext() if engine.concurrent else self._lock

    def _load(self, name: str):
        if name not in self._engines:
            if self.opts.urls:
                from coordexp.engines.triton import ClientOptions, TritonEngine

                self._engines[name] = TritonEngine.connect(list(self.opts.urls), ClientOptions(model=name))
            else:
                from coordexp.engines import load_engine

                self._engines[name] = load_engine(self.opts.engine, self.opts.local)
        return self._engines[name]

    def check_upload(self, data: bytes, filename: str) -> tuple[int, int, str]:
        from coordexp.dataset import check_image_bytes
        from coordexp.schema import ContractError, ErrorCode
        from PIL import Image

        if len(data) > self.opts.max_bytes:
            raise UploadRejected(413, f"{filename}: {len(data)} bytes is over the limit of {self.opts.max_bytes}")
        try:
            w, h = check_image_bytes(data, filename, max_pixels=self.opts.max_pixels)
            fmt = Image.open(io.BytesIO(data)).format
        except ContractError as e:
            raise UploadRejected(413 if e.code == ErrorCode.IMAGE_TOO_LARGE else 400, str(e)) from None
        if fmt not in FORMATS:
            raise UploadRejected(400, f"{filename}: image format {fmt} is not accepted ({', '.join(FORMATS)})")
        return w, h, FORMATS[fmt]

    def run(self, reg: Registry, data: bytes, filename: str) -> dict[str, Any]:
        """Check, store, infer, register; returns the job (run id, preds in pixels, timings)."""
        t0 = time.perf_counter()
        w, h, ext = self.check_upload(data, filename)
        if not self.opts.configured:
            raise UploadRejected(503, "no model configured: start the viewer with --url HOST:PORT or --local CKPT")
        os.makedirs(self.upload_dir, exist_ok=True)
        path = os.path.join(self.upload_dir, uuid.uuid4().hex + ext)
        with open(path, "wb") as f:
            f.write(data)
        t_check = time.perf_counter()
        run = RunRecord(kind="infer", name=os.path.basename(filename)[:120] or "upload", status="running",
                        started_at=time.time(), run_dir=None, **self._facts())
        run_id = reg.add_run(run)
        try:
            with self._lock:
                engine = self._load(self.resolve_model(None))
                t_load = time.perf_counter()
                from coordexp.generation import GenerationParams

                img = data if engine.takes_encoded else _pil(data)
                gen = engine.generate_batch([img], GenerationParams(max_new_tokens=self.opts.max_new_tokens))[0]
            t_gen = time.perf_counter()
            preds, error = _parse(gen.text, w, h, engine.prompt.bbox_format)
        except Exception as e:  # noqa: BLE001 - the job records the failure; the page shows it
            reg.update_run(run_id, status="failed", error=f"{type(e).__name__}: {e}", completed_at=time.time())
            raise UploadRejected(502, f"inference failed: {type(e).__name__}: {e}") from None
        t_end = time.perf_counter()
        timings = {"check_ms": 1e3 * (t_check - t0), "load_ms": 1e3 * (t_load - t_check),
                   "generate_ms": 1e3 * (t_gen - t_load), "parse_ms": 1e3 * (t_end - t_gen),
                   "total_ms": 1e3 * (t_end - t0)}
        row = ImageRow(idx=0, path=path, width=w, height=h, pred=preds, error=error, latency_ms=timings["generate_ms"])
        from coordexp.runs.registry import _insert_images

        reg._write(lambda db: _insert_images(db, run_id, [row]))
        reg.update_run(run_id, status="completed", completed_at=time.time(), num_images=1, timings=timings,
                       p50_ms=timings["generate_ms"], p95_ms=timings["generate_ms"])
        return {"run_id": run_id, "width": w, "height": h, "preds": preds, "error": error, "text": gen.text,
                "timings": timings}

    def _facts(self) -> dict[str, Any]:
        d = self.describe()
        return {"backend": d["backend"], "engine": d["backend"], "server": ",".join(self.opts.urls) or None,
                "served_model": self.opts.model if self.opts.urls else None, "checkpoint_path": d.get("checkpoint"),
                "params": {"max_new_tokens": self.opts.max_new_tokens}}


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _parse(text: str, w: int, h: int, bbox_format: str = "xyxy") -> tuple[list[dict[str, Any]], str | None]:
    from coordexp.eval.io import points_to_pixels
    from coordexp.grid import bbox_of
    from coordexp.parser import parse_model_output

    res = parse_model_output(text, width=w, height=h, bbox_format=bbox_format)
    preds = []
    for k, o in enumerate(res.preds):
        px = points_to_pixels(list(o.points), w, h, "norm1000")
        box = px if o.type == "bbox_2d" else bbox_of(px)
        preds.append({"desc": o.desc, "bbox": [round(v, 2) for v in box], "index": k, "match": None, "iou": None,
                      "score": o.score})
    return preds, (res.error.value if res.error is not None else None)


def annotated_png(path: str, preds: list[dict[str, Any]]) -> bytes:
    """The uploaded image with its predicted boxes and labels drawn (the download)."""
    from PIL import Image, ImageDraw

    im = Image.open(path).convert("RGB")
    d = ImageDraw.Draw(im)
    lw = max(2, round(min(im.size) / 200))
    for o in preds:
        x1, y1, x2, y2 = o["bbox"]
        d.rectangle([x1, y1, x2, y2], outline=(230, 40, 40), width=lw)
        d.text((x1 + 2, max(0, y1 - 12)), str(o.get("desc", "")), fill=(230, 40, 40))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
