"""Paged, filtered image queries over the registry (what the run page and `/api/runs/{id}/images` use).

Every query is bounded (LIMIT) and walks an index: (run_id, f1, idx, tp, fp, fn) for worst-first,
the primary key for input order, (run_id, class, idx) for a class filter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .registry import Registry, RegistryError, _image_dict

SORTS = {"worst": "i.f1 ASC, i.idx ASC", "best": "i.f1 DESC, i.idx ASC", "index": "i.idx ASC"}
OUTCOMES = {"tp": "i.tp > 0", "fp": "i.fp > 0", "fn": "i.fn > 0", "error": "i.error IS NOT NULL",
            "perfect": "i.fp = 0 AND i.fn = 0"}
MAX_PER_PAGE = 500


@dataclass(frozen=True)
class ImageQuery:
    page: int = 1
    per_page: int = 50
    sort: str = "worst"
    cls: str | None = None  # a desc (GT or predicted) the image must hold
    error: str | None = None  # an error code the prediction line carries
    outcome: str | None = None  # one of OUTCOMES

    def check(self) -> None:
        if self.sort not in SORTS:
            raise RegistryError(f"sort must be one of {sorted(SORTS)}, got {self.sort!r}")
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise RegistryError(f"outcome must be one of {sorted(OUTCOMES)}, got {self.outcome!r}")
        if self.page < 1 or not 1 <= self.per_page <= MAX_PER_PAGE:
            raise RegistryError(f"page must be >= 1 and per_page in 1..{MAX_PER_PAGE}")


def page_images(reg: Registry, run_id: int, q: ImageQuery, with_objects: bool = False) -> dict[str, Any]:
    """{total, page, per_page, items}: items without the GT/pred lists unless `with_objects`."""
    q.check()
    reg.get_run(run_id)
    frm = "images i"
    where, args = ["i.run_id = ?"], [int(run_id)]
    if q.cls:
        frm += " JOIN image_classes c ON c.run_id = i.run_id AND c.idx = i.idx AND c.class = ?"
        args.insert(0, q.cls)
    if q.error:
        where.append("i.error = ?")
        args.append(q.error)
    if q.outcome:
        where.append(OUTCOMES[q.outcome])
    w = " AND ".join(where)
    total = reg.db.execute(f"SELECT COUNT(*) FROM {frm} WHERE {w}", args).fetchone()[0]
    cols = "i.*" if with_objects else ("i.run_id, i.idx, i.path, i.width, i.height, i.tp, i.fp, i.fn, i.precision, "
                                       "i.recall, i.f1, i.error, i.latency_ms")
    # page over the index first (idx only), then fetch the page's rows: OFFSET then skips index
    # entries, not the large rows
    page = f"SELECT i.idx FROM {frm} WHERE {w} ORDER BY {SORTS[q.sort]} LIMIT ? OFFSET ?"
    rows = reg.db.execute(f"SELECT {cols} FROM images i JOIN ({page}) p ON i.idx = p.idx WHERE i.run_id = ? "
                          f"ORDER BY {SORTS[q.sort]}", [*args, q.per_page, (q.page - 1) * q.per_page, int(run_id)]
                          ).fetchall()
    items = [_image_dict(r) if with_objects else dict(r) for r in rows]
    return {"total": int(total), "page": q.page, "per_page": q.per_page, "sort": q.sort, "items": items}


def error_codes(reg: Registry, run_id: int) -> dict[str, int]:
    return {r[0]: r[1] for r in reg.db.execute(
        "SELECT error, COUNT(*) FROM images WHERE run_id = ? AND error IS NOT NULL GROUP BY error", (int(run_id),))}
