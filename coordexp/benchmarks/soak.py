"""Load and soak: many requests at high concurrency against one or more servers, every answer compared
with the sequential answer for the same input (greedy decoding is deterministic), and the servers'
memory (RSS of tritonserver and its model stubs) sampled as it runs.

`bench/bench_soak.py` runs it for minutes; `tests/test_load.py` for about one.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence


def process_tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            pass
    return total


@dataclass
class SoakResult:
    requests: int = 0
    errors: int = 0
    mismatches: int = 0  # answers that differ from the sequential answer for the same input
    seconds: float = 0.0
    first_error: str | None = None
    rss_mb: list[float] = field(default_factory=list)  # summed over the servers, one sample per round

    @property
    def rss_growth_mb(self) -> float:
        """Growth after the first round (the warm-up) to the largest later sample."""
        return round(max(self.rss_mb[1:]) - self.rss_mb[0], 1) if len(self.rss_mb) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "mismatches": self.mismatches,
                "seconds": round(self.seconds, 2), "requests_per_s": round(self.requests / self.seconds, 2)
                if self.seconds else 0.0, "first_error": self.first_error, "rss_mb": self.rss_mb,
                "rss_growth_mb": self.rss_growth_mb}


def sequential_answers(engine: Any, images: Sequence[bytes], params: Any) -> list[list[int]]:
    """The token ids of each image asked alone, one request at a time."""
    return [engine.generate_batch([im], params)[0].token_ids for im in images]


def soak(engine: Any, images: Sequence[bytes], params: Any, reference: Sequence[list[int]], rounds: int,
         round_size: int, server_pids: Sequence[int] = (), deadline_s: float | None = None) -> SoakResult:
    """`rounds` x `round_size` requests (image k % len(images)) through `engine` (a TritonEngine whose
    `max_in_flight` is the concurrency); RSS sampled after every round; stops early at `deadline_s`."""
    res = SoakResult()
    t0 = time.perf_counter()
    for r in range(rounds):
        batch = [images[(r * round_size + k) % len(images)] for k in range(round_size)]
        want = [reference[(r * round_size + k) % len(images)] for k in range(round_size)]
        for got, ids in zip(engine.generate_batch(batch, params), want):
            res.requests += 1
            if got.error:
                res.errors += 1
                res.first_error = res.first_error or got.error
            elif list(got.token_ids) != list(ids):
                res.mismatches += 1
        res.rss_mb.append(round(sum(process_tree_rss(p) for p in server_pids) / 2**20, 1))
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            break
    res.seconds = time.perf_counter() - t0
    return res
