"""Single images through a model: served (`ServerPool`, `concurrency` requests in flight over every
server, Triton's dynamic batcher batches them) or a local engine (`generate_batch`, `batch_size`
images per call, across group boundaries). Both report each image through `on_done(job, answer)`,
in any order; `run.GroupWriter` puts groups back in order.
"""
from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from coordexp.dataset import DEFAULT_MAX_PIXELS, check_image_bytes
from coordexp.generation import GenerationParams
from coordexp.schema import ContractError, ErrorCode

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageJob:
    group: int  # index of the group in the run's order
    index: int  # 0-based position of the image in its group
    path: str


@dataclass
class ImageAnswer:
    raw: str = ""
    error: str | None = None  # a per-image error code (records.UNREADABLE, ...) or None
    message: str | None = None


OnDone = Callable[[ImageJob, ImageAnswer], None]


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes, checked before any pixel is decoded (ContractError: unreadable / too
    large). A photo with an EXIF rotation is turned upright and re-encoded as PNG, as the upstream
    tool does, because the served preprocess step decodes the bytes as they are."""
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ContractError(ErrorCode.IMAGE_LOAD_FAILED, f"{path}: cannot read image ({e.strerror or e})") from None
    check_image_bytes(data, path, max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
        if img.getexif().get(EXIF_ORIENTATION, 1) in (1, 0):
            return data
        buf = io.BytesIO()
        ImageOps.exif_transpose(img).convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    except Exception as e:  # verify() passed but the pixels do not decode: a truncated file
        raise ContractError(ErrorCode.IMAGE_LOAD_FAILED, f"{path}: cannot decode image ({e})") from None


def _failed_load(e: ContractError) -> ImageAnswer:
    return ImageAnswer(error=getattr(e.code, "value", str(e.code)), message=e.message)


class ServedBackend:
    """Images as single requests on a `TritonEngine`'s pool, `concurrency` in flight."""

    kind = "served"

    def __init__(self, engine: Any, params: GenerationParams, concurrency: int = 8,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.engine, self.params, self.concurrency, self.max_pixels = engine, params, concurrency, max_pixels

    def describe(self) -> dict[str, Any]:
        return {**self.engine.describe(), "concurrency": self.concurrency}

    def run(self, jobs: Iterable[ImageJob], user_text: str | None, on_done: OnDone) -> None:
        """Raises AllServersDown (an EngineUnavailable) when no server is left."""
        self.engine.run(self._run_all(jobs, user_text, on_done))

    async def _one(self, job: ImageJob, user_text: str | None, on_done: OnDone) -> None:
        loop = asyncio.get_running_loop()
        try:  # file reads and header checks off the event loop: requests keep flowing meanwhile
            data = await loop.run_in_executor(None, load_image, job.path, self.max_pixels)
        except ContractError as e:
            on_done(job, _failed_load(e))
            return
        gen, _facts = await self.engine.pool.generate(data, self.params, user_text)
        if gen.error:
            on_done(job, ImageAnswer(raw=gen.text, error="generation_failed", message=gen.error))
        else:
            on_done(job, ImageAnswer(raw=gen.text))

    async def _run_all(self, jobs: Iterable[ImageJob], user_text: str | None, on_done: OnDone) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        failures: list[BaseException] = []  # AllServersDown (or a bug): the run stops

        async def gated(job: ImageJob) -> None:
            try:
                await self._one(job, user_text, on_done)
            except Exception as e:
                failures.append(e)
            finally:
                gate.release()

        try:
            for job in jobs:  # read lazily: at most `concurrency` images are in memory at once
                await gate.acquire()
                if failures:
                    break
                t = asyncio.create_task(gated(job))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failures:
            raise failures[0]


def _chunks(jobs: Iterable[ImageJob], size: int) -> Iterator[list[ImageJob]]:
    chunk: list[ImageJob] = []
    for job in jobs:
        chunk.append(job)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class LocalBackend:
    """A local engine (torch reference, ONNX Runtime): `batch_size` images per `generate_batch`."""

    kind = "local"

    def __init__(self, engine: Any, params: GenerationParams, batch_size: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.engine, self.params, self.batch_size, self.max_pixels = engine, params, batch_size, max_pixels
        self.base_prompt = engine.prompt  # the checkpoint's own prompt: detect mode, and the system text

    def describe(self) -> dict[str, Any]:
        return {**self.engine.describe(), "batch_size": self.batch_size}

    def run(self, jobs: Iterable[ImageJob], prompt: Any, on_done: OnDone) -> None:
        """`prompt`: the PromptSpec for these jobs (its system text, user text and layout go with
        every call over the engine's own prompt)."""
        from PIL import Image

        from coordexp.generation import RequestPrompt

        parts = (RequestPrompt(user_text=prompt.user_text, system_text=prompt.system_text, layout=prompt.layout)
                 if prompt is not None else None)
        for chunk in _chunks(jobs, self.batch_size):
            ready, images = [], []
            for job in chunk:
                try:
                    images.append(Image.open(io.BytesIO(load_image(job.path, self.max_pixels))).convert("RGB"))
                    ready.append(job)
                except ContractError as e:
                    on_done(job, _failed_load(e))
            if not ready:
                continue
            try:
                results = self.engine.generate_batch(images, self.params, parts)
            except Exception as e:  # the whole call failed: each of its images says so
                for job in ready:
                    on_done(job, ImageAnswer(error="generation_failed", message=f"{type(e).__name__}: {e}"))
                continue
            for job, gen in zip(ready, results):
                on_done(job, ImageAnswer(raw=gen.text, error="generation_failed" if gen.error else None,
                                         message=gen.error))
