"""The two tests `compare` uses: a paired bootstrap over images and the exact McNemar test.

Paired bootstrap: one resample of image indices (with replacement) is applied to both runs, so
the interval is that of the *difference* on the same images (the runs share the GT). Resamples
are drawn as per-image counts in chunks: memory stays at chunk x images whatever the size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]
# a statistic of per-image arrays under resampling weights: (weights (k, n), arrays) -> (k,)
Statistic = Callable[[np.ndarray, Arrays], np.ndarray]


@dataclass(frozen=True)
class Interval:
    delta: float
    lo: float
    hi: float

    @property
    def verdict(self) -> str:
        if self.lo > 0:
            return "better"
        if self.hi < 0:
            return "worse"
        return "within noise"

    def verdict_of(self, name: str) -> str:
        """The verdict for metric `name` (fewer false positives / negatives is better)."""
        v = self.verdict
        if name in LOWER_IS_BETTER and v != "within noise":
            return "worse" if v == "better" else "better"
        return v


def _micro(key: str) -> Statistic:
    def f(w: np.ndarray, a: Arrays) -> np.ndarray:
        tp, fp, fn = w @ a["tp"], w @ a["fp"], w @ a["fn"]
        with np.errstate(divide="ignore", invalid="ignore"):
            if key == "precision":
                v = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
            elif key == "recall":
                v = np.where(tp + fn > 0, tp / (tp + fn), 1.0)
            else:
                v = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
        return v
    return f


def _mean(key: str) -> Statistic:
    return lambda w, a: (w @ a[key]) / w.sum(axis=1)


def _total(key: str) -> Statistic:
    return lambda w, a: w @ a[key]


# name -> statistic; the names are the flat metric names of metrics.json (CoordExp's too)
STATISTICS: dict[str, Statistic] = {
    "f1ish@0.50_precision_full_micro": _micro("precision"),
    "f1ish@0.50_recall_full_micro": _micro("recall"),
    "f1ish@0.50_f1_full_micro": _micro("f1"),
    "f1ish@0.50_precision_full_macro": _mean("precision"),
    "f1ish@0.50_recall_full_macro": _mean("recall"),
    "f1ish@0.50_f1_full_macro": _mean("f1"),
    "image_accuracy": _mean("right"),
    # counts are per-image sums too (over the resampled images)
    "f1ish@0.50_tp_full": _total("tp"),
    "f1ish@0.50_fp_full": _total("fp"),
    "f1ish@0.50_fn_full": _total("fn"),
}
LOWER_IS_BETTER = frozenset({"f1ish@0.50_fp_full", "f1ish@0.50_fn_full"})
# the short table `compare` shows by default (--all: every metric)
HEADLINE = ("f1ish@0.50_f1_full_micro", "f1ish@0.50_precision_full_micro", "f1ish@0.50_recall_full_micro",
            "image_accuracy", "bbox_AP", "bbox_AP50")


def paired_bootstrap(a: Arrays, b: Arrays, stats: Mapping[str, Statistic], n_boot: int = 1000, seed: int = 0,
                     chunk: int = 64) -> dict[str, Interval]:
    """Per statistic: B - A on all images, and the 2.5/97.5 percentiles of B - A over `n_boot`
    paired resamples (numpy Generator seeded with `seed`: the same call gives the same interval)."""
    n = len(next(iter(a.values())))
    if n == 0:
        raise ValueError("no images to compare")
    rng = np.random.default_rng(seed)
    ones = np.ones((1, n))
    deltas: dict[str, list[np.ndarray]] = {k: [] for k in stats}
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        # k resamples of n indices -> per-image counts (bincount: linear, unlike multinomial over n classes)
        idx = rng.integers(0, n, size=(k, n)) + (np.arange(k) * n)[:, None]
        w = np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)
        for name, f in stats.items():
            deltas[name].append(f(w, b) - f(w, a))
        done += k
    out = {}
    for name, f in stats.items():
        d = np.concatenate(deltas[name])
        lo, hi = np.percentile(d, [2.5, 97.5])
        out[name] = Interval(float(f(ones, b)[0] - f(ones, a)[0]), float(lo), float(hi))
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b (only A right) and c (only B right):
    2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1; 1.0 when there is no discordant pair."""
    n = b + c
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0); C(n, k + 1) = C(n, k) * (n - k) / (k + 1), exact in integers
    for k in range(min(b, c)):
        term = term * (n - k) // (k + 1)
        tail += term
    return min(1.0, 2 * tail / (1 << n))  # exact integers: no float underflow for large n
