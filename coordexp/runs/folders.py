"""`runs import RUN_DIR`: which kind of run folder it is, and its importer."""
from __future__ import annotations

import os

from .coordexp_import import import_coordexp_dir
from .importers import ImportError_, import_our_dir
from .registry import ImageRow, RunRecord


def is_coordexp_dir(run_dir: str) -> bool:
    """CoordExp's folders hold gt_vs_pred.jsonl and no predictions.jsonl (our pipeline writes both)."""
    return (os.path.isfile(os.path.join(run_dir, "gt_vs_pred.jsonl"))
            and not os.path.isfile(os.path.join(run_dir, "predictions.jsonl")))


def import_run_dir(run_dir: str, gt_path: str | None = None, name: str | None = None
                   ) -> tuple[RunRecord, list[ImageRow]]:
    """A run folder of either origin -> (RunRecord, ImageRows), nothing registered yet."""
    if not os.path.isdir(run_dir):
        raise ImportError_(f"{run_dir}: not a folder")
    if is_coordexp_dir(run_dir):
        return import_coordexp_dir(run_dir, name=name)
    return import_our_dir(run_dir, gt_path=gt_path, name=name)
