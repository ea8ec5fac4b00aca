"""The one checkpoint digest: what names a checkpoint's weights everywhere.

`onnx_meta.json` (`checkpoint_sha256`), the served `manifest.json` (`checkpoint.weights_sha256`) and
every prediction run's `summary.json` (`checkpoint_sha256`) carry the same value, computed here:

- one weights file: its sha256 (what `sha256sum model.safetensors` prints);
- several (shards): the sha256 of the sorted lines `"<file name> <sha256>\\n"`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def checkpoint_error(ckpt: str | os.PathLike) -> str | None:
    """A clear sentence when `ckpt` is not a loadable checkpoint folder, else None."""
    if not os.path.isdir(ckpt):
        return f"checkpoint folder not found: {ckpt}"
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        return f"{ckpt} is not a Hugging Face checkpoint (no config.json)"
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file, read in chunks (weights can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(ckpt: str | os.PathLike) -> list[Path]:
    """The weights files of a checkpoint folder, sorted by name (training-args pickles excluded)."""
    folder = Path(ckpt)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.startswith("training_args"))


@dataclass(frozen=True)
class CheckpointDigest:
    path: str  # absolute checkpoint folder
    sha256: str
    files: dict[str, str] = field(default_factory=dict)  # weights file name -> sha256

    def to_manifest(self) -> dict[str, Any]:
        """The `checkpoint` entry of a repository manifest."""
        return {"path": self.path, "weights_sha256": self.sha256, "weight_files": dict(self.files)}


_DIGESTS: dict[tuple, "CheckpointDigest"] = {}  # (folder, its weights' names, sizes, mtimes) -> digest


def checkpoint_digest(ckpt: str | os.PathLike) -> CheckpointDigest:
    """Digest of a checkpoint folder's weights; ValueError when it has none. Computed once per process
    for unchanged files (an export asks several times; the weights of a 2B model are 8 GB)."""
    paths = weight_files(ckpt)
    stats = [p.stat() for p in paths]
    key = (str(Path(ckpt).resolve()), tuple((p.name, st.st_size, st.st_mtime_ns) for p, st in zip(paths, stats)))
    known = _DIGESTS.get(key)
    if known is not None:
        return known
    files = {p.name: sha256_file(p) for p in paths}
    if not files:
        raise ValueError(f"{ckpt}: no weights file (*.safetensors / *.bin)")
    if len(files) == 1:
        sha = next(iter(files.values()))
    else:
        sha = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    digest = CheckpointDigest(path=key[0], sha256=sha, files=files)
    _DIGESTS[key] = digest
    return digest
