"""Input JSONL -> dataset items, each either ready to run or carrying its own error.

Every input line yields exactly one `DatasetItem` (in order), so a run can write exactly one
output line per input line whatever the line holds: bad JSON, a missing field, a missing or
corrupt image, an image larger than allowed, a size that disagrees with the file.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from coordexp.schema import ContractError, ErrorCode, InputRecord, read_jsonl

DEFAULT_MAX_PIXELS = 64_000_000  # refuse larger images before decoding (decompression bombs)


@dataclass
class DatasetItem:
    index: int  # 0-based position among the input lines: the prediction's image_id
    line_no: int  # 1-based line number in the JSONL file, for messages
    images: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    record: InputRecord | None = None
    image_path: str | None = None  # resolved path of the one image
    image_bytes: bytes | None = None  # the file's bytes (what a Triton request carries)
    error: ErrorCode | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, code: ErrorCode, message: str) -> "DatasetItem":
        self.error, self.error_message = code, message
        return self

    def pil_image(self):
        """Decode the image bytes (RGB). Only call on ok items."""
        from PIL import Image

        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


def check_image_bytes(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                      expect_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Validate encoded image bytes without trusting them: returns (width, height).

    Raises ContractError(image_load_failed | image_too_large | size_mismatch). The header is
    read first so a decompression bomb is refused before any pixel is decoded.
    """
    from PIL import Image

    if not data:
        raise ContractError(ErrorCode.IMAGE_LOAD_FAILED, f"{where}: image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ContractError(
                    ErrorCode.IMAGE_TOO_LARGE, f"{where}: image is {w}x{h} = {w * h} pixels, limit is {max_pixels}"
                )
            img.verify()  # structural check; decoding happens where the pixels are needed
    except ContractError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ContractError(ErrorCode.IMAGE_TOO_LARGE, f"{where}: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ContractError(ErrorCode.IMAGE_LOAD_FAILED, f"{where}: cannot decode image ({e})") from None
    if expect_size is not None and (w, h) != tuple(expect_size):
        raise ContractError(
            ErrorCode.SIZE_MISMATCH, f"{where}: record says {expect_size[0]}x{expect_size[1]}, file is {w}x{h}"
        )
    return w, h


def resolve_image(image: str, root: str) -> tuple[str, str | None]:
    """(path, problem) of a record's image. The rule: an absolute path is taken as given; a relative one
    starts at `root` (the JSONL's folder or --image-root) and may not climb out of it with `..`
    (symlinks inside the root are followed: linking an image folder in is the usual way to share one)."""
    if "\x00" in image:
        return "", "the image path contains a NUL character"
    if os.path.isabs(image):
        return image, None
    path = os.path.normpath(os.path.join(root, image))
    if os.path.commonpath([path, os.path.normpath(root)]) != os.path.normpath(root):
        return path, (f"the relative path leaves the image root {root} (resolves to {path}); give an absolute path "
                      "or set --image-root")
    return path, None


def _item_from_value(index: int, line_no: int, value: Any, root: str, max_pixels: int,
                     load_images: bool) -> DatasetItem:
    item = DatasetItem(index=index, line_no=line_no)
    if isinstance(value, Exception):
        return item.fail(value.code if isinstance(value, ContractError) else ErrorCode.INVALID_INPUT, str(value))
    if isinstance(value, dict):  # keep what we can for the output line even if invalid
        imgs = value.get("images")
        item.images = [imgs] if isinstance(imgs, str) else list(imgs) if isinstance(imgs, list) else []
        item.width = value.get("width") if isinstance(value.get("width"), int) else None
        item.height = value.get("height") if isinstance(value.get("height"), int) else None
    try:
        rec = InputRecord.from_dict(value, line_no)
    except ContractError as e:
        return item.fail(e.code, e.message)
    item.record = rec
    if len(rec.images) != 1:
        return item.fail(
            ErrorCode.MULTI_IMAGE_NOT_SUPPORTED, f"line {line_no}: {len(rec.images)} images; inference takes exactly one"
        )
    where = f"line {line_no} ({rec.images[0]})"
    path, problem = resolve_image(rec.images[0], root)
    if problem:
        return item.fail(ErrorCode.IMAGE_LOAD_FAILED, f"{where}: {problem}")
    item.image_path = path
    if not load_images:
        return item
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # the resolved path: a JSONL copied away from its images shows where it looked
        return item.fail(ErrorCode.IMAGE_LOAD_FAILED,
                         f"{where}: cannot read image {os.path.abspath(path)} ({e.strerror or e})")
    try:
        check_image_bytes(data, where, max_pixels, (rec.width, rec.height))
    except ContractError as e:
        return item.fail(e.code, e.message)
    item.image_bytes = data
    return item


def iter_dataset(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, load_images: bool = True,
                 skip: int = 0, image_root: str | None = None) -> Iterator[DatasetItem]:
    """Yield one DatasetItem per input line, in order. `skip` passes over the first lines
    (for --resume) without touching their images. Relative image paths start at `image_root`
    (default: the JSONL's folder)."""
    root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))
    for index, (line_no, value) in enumerate(read_jsonl(path)):
        if index < skip:
            continue
        yield _item_from_value(index, line_no, value, root, max_pixels, load_images)


def count_records(path: str) -> int:
    """Number of input lines that become output lines (for progress bars)."""
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def copy_records(src: str, dst: str, limit: int | None = None) -> int:
    """The first `limit` lines of a dataset into `dst`, each relative image path made absolute (the
    copy lives elsewhere). Lines that are not JSON are copied as they are (the run reports them).
    Returns the lines written."""
    import json

    root = os.path.dirname(os.path.abspath(src))
    n = 0
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            if limit is not None and n >= limit:
                break
            n += 1
            try:
                d = json.loads(line)
            except ValueError:
                out.write(line if line.endswith("\n") else line + "\n")
                continue
            imgs = d.get("images") if isinstance(d, dict) else None
            if isinstance(imgs, list):
                d["images"] = [p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(root, p) for p in imgs]
            out.write(json.dumps(d, ensure_ascii=False) + "\n")
    return n


def check_dataset(path: str, limit: int | None = None) -> dict[str, Any]:
    """What a dataset holds before a run starts: lines, valid records, images found, labelled records;
    the first problems (line and why)."""
    root = os.path.dirname(path)
    counts = {"lines": 0, "valid": 0, "images_found": 0, "labelled": 0, "objects": 0}
    problems: list[str] = []
    for line_no, value in read_jsonl(path):
        if limit is not None and counts["lines"] >= limit:
            break
        counts["lines"] += 1
        try:
            if isinstance(value, Exception):
                raise value
            rec = InputRecord.from_dict(value, line_no)
        except (ContractError, ValueError) as e:
            if len(problems) < 5:
                problems.append(str(getattr(e, "message", e)))
            continue
        counts["valid"] += 1
        img, why = resolve_image(rec.images[0], root)
        if why is None and os.path.isfile(img):
            counts["images_found"] += 1
        elif len(problems) < 5:
            problems.append(f"line {line_no}: image {rec.images[0]!r} not found ({why or img})")
        if rec.objects:
            counts["labelled"] += 1
            counts["objects"] += len(rec.objects)
    return {**counts, "problems": problems, "ok": counts["valid"] > 0 and counts["images_found"] == counts["valid"]}
