"""Accuracy parity: is a candidate engine's accuracy that of the reference, within a margin?

Token parity (`parity` without `--accuracy`) holds for fp32 exports; bf16, quantized weights,
TensorRT-LLM or another server are not bit-identical, so the question becomes one of metrics with
their uncertainty. Both prediction artifacts are scored by our evaluator against the same GT, then:

- diagnostics: the exact-answer rate, where answers first diverge, and how often the parsed
  predictions agree;
- the primary metrics (F1 @ 0.5 full with exact labels, AP50, AP): deltas with paired bootstrap 95 %
  intervals over images (`coordexp.runs.stats.paired_bootstrap`, the one `compare` uses: the same
  seed gives the same resamples) and the exact McNemar test on image flips. AP is not a per-image
  sum, so each resample re-accumulates COCO's precision/recall from the per-image matches
  pycocotools made once (`WeightedCocoAP`): duplicated images weigh more, exactly as a COCO eval of
  the resampled image list would count them;
- a verdict: *equivalent* when every primary interval lies inside +-margin and there are images
  enough; *different* when an interval lies wholly outside it; else *inconclusive*, with the number
  of images that would settle it.

Images enough: a paired bootstrap over images whose answers agree has no spread at all, so 3
identical answers would give an interval of width 0. Equivalence therefore also needs the exact
(Clopper-Pearson) one-sided 95 % upper bound on the rate of images whose parsed predictions differ
to be at most `max_diff_rate` (default 0.25): what the sample cannot see is bounded. With no
difference observed that takes 11 images; 3 identical images stay inconclusive.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .stats import STATISTICS, mcnemar_exact, paired_bootstrap

PRIMARY = ("f1ish@0.50_f1_full_micro", "bbox_AP50", "bbox_AP")
EXIT_EQUIVALENT, EXIT_DIFFERENT, EXIT_INCONCLUSIVE = 0, 1, 3


@dataclass(frozen=True)
class ParityOptions:
    margin: float = 0.02  # absolute, on every primary metric
    max_diff_rate: float = 0.25  # bound on the rate of images whose predictions differ (see the docstring)
    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95


class WeightedCocoAP:
    """COCO bbox AP and AP50 ("all" areas, 100 detections) of a resampled image list.

    pycocotools' `evaluate()` matches detections to GT per image and category once; `accumulate()`
    then sorts a category's detections by score (stable: ties keep image order) and walks the
    precision/recall curve. A resample given as per-image counts is the image list with each image
    repeated in place; its walk is rebuilt from the stored matches, so the result is exactly the AP
    COCO gives for that list (ties included), at a fraction of a new evaluation's cost."""

    def __init__(self, coco_gt: dict[str, Any], coco_dets: list[dict[str, Any]]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self.n = len(coco_gt["images"])
        self._last: tuple[Any, tuple[np.ndarray, np.ndarray]] | None = None
        position = {im["id"]: k for k, im in enumerate(coco_gt["images"])}
        with contextlib.redirect_stdout(io.StringIO()):
            cgt = COCO()
            cgt.dataset = {**coco_gt, "annotations": [dict(a) for a in coco_gt["annotations"]]}
            cgt.createIndex()
            if coco_dets:
                cdt = cgt.loadRes([dict(d) for d in coco_dets])
            else:
                cdt = COCO()
                cdt.dataset = {"images": list(coco_gt["images"]), "categories": list(coco_gt["categories"]),
                               "annotations": []}
                cdt.createIndex()
            E = COCOeval(cgt, cdt, "bbox")
            E.evaluate()
        p = E.params
        if [position[i] for i in p.imgIds] != sorted(position[i] for i in p.imgIds):
            raise ValueError("COCO image ids must follow the image order")  # pycocotools walks sorted ids
        self.iou_thrs, self.rec_thrs = np.asarray(p.iouThrs), np.asarray(p.recThrs)
        self.t50 = int(np.argmin(np.abs(self.iou_thrs - 0.5)))
        n_img, n_area, max_det = len(p.imgIds), len(p.areaRng), p.maxDets[-1]
        n_t = len(self.iou_thrs)
        # per category: GT per image; detections in image order with their image's start and count
        self.categories: list[dict[str, np.ndarray]] = []
        for k in range(len(p.catIds)):
            evs = [e for e in E.evalImgs[k * n_area * n_img: k * n_area * n_img + n_img] if e is not None]
            if not evs:
                continue
            gt = np.zeros(self.n)
            start, count = np.zeros(self.n, dtype=np.int64), np.zeros(self.n, dtype=np.int64)
            scores, tps, fps, at = [], [], [], 0
            for e in evs:
                i = position[e["image_id"]]
                gt[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                sc = np.asarray(e["dtScores"][:max_det], dtype=np.float64)
                m = np.asarray(e["dtMatches"]).reshape(n_t, -1)[:, :max_det].astype(bool)
                ig = np.asarray(e["dtIgnore"]).reshape(n_t, -1)[:, :max_det].astype(bool)
                start[i], count[i] = at, len(sc)
                at += len(sc)
                scores.append(sc)
                tps.append(m & ~ig)
                fps.append(~m & ~ig)
            self.categories.append({"gt": gt, "start": start, "count": count, "scores": np.concatenate(scores),
                                    "tps": np.concatenate(tps, axis=1).astype(np.float64),
                                    "fps": np.concatenate(fps, axis=1).astype(np.float64)})

    def _walk(self, c: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray | None:
        """(T, R) interpolated precision of one category on one resample; None: no GT in it."""
        npig = float(w @ c["gt"])
        if npig <= 0:
            return None
        reps = w.astype(np.int64)
        images = np.repeat(np.arange(self.n), reps)  # the resampled list, copies in place
        counts = c["count"][images]
        total = int(counts.sum())
        q = np.zeros((len(self.iou_thrs), len(self.rec_thrs)))
        if total == 0:
            return q
        # the detection indices of those images, in list order (ranges concatenated without a loop)
        offsets = np.repeat(c["start"][images] - np.cumsum(counts) + counts, counts) + np.arange(total)
        idx = offsets[np.argsort(-c["scores"][offsets], kind="mergesort")]
        tp = np.cumsum(c["tps"][:, idx], axis=1)
        fp = np.cumsum(c["fps"][:, idx], axis=1)
        rc = tp / npig
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.flip(np.maximum.accumulate(np.flip(pr, axis=1), axis=1), axis=1)  # the interpolated envelope
        for t in range(len(self.iou_thrs)):
            pos = np.searchsorted(rc[t], self.rec_thrs, side="left")
            ok = pos < total
            q[t, ok] = pr[t, pos[ok]]
        return q

    def precision(self, w: np.ndarray) -> np.ndarray:
        """(k resamples, T thresholds, R recall points, K categories); -1 where a category has no GT."""
        out = -np.ones((w.shape[0], len(self.iou_thrs), len(self.rec_thrs), len(self.categories)))
        for r in range(w.shape[0]):
            for k, c in enumerate(self.categories):
                q = self._walk(c, w[r])
                if q is not None:
                    out[r, :, :, k] = q
        return out

    @staticmethod
    def _mean(prec: np.ndarray) -> np.ndarray:
        valid = prec > -1
        total = np.where(valid, prec, 0.0).reshape(prec.shape[0], -1).sum(axis=1)
        count = valid.reshape(prec.shape[0], -1).sum(axis=1)
        return np.where(count > 0, total / np.maximum(count, 1), -1.0)

    def ap(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(AP, AP50) per resample (the last weights' answer is kept: AP and AP50 share one walk)."""
        key = (w.shape, w.tobytes())
        if self._last is None or self._last[0] != key:
            prec = self.precision(w)
            self._last = (key, (self._mean(prec), self._mean(prec[:, self.t50: self.t50 + 1])))
        return self._last[1]


def _ap_statistic(which: int):
    def f(w: np.ndarray, a: Any) -> np.ndarray:
        return a["coco"].ap(w)[which]
    return f


# the statistics accuracy parity draws intervals for: compare's per-image ones, and AP / AP50
PARITY_STATISTICS = {**STATISTICS, "bbox_AP": _ap_statistic(0), "bbox_AP50": _ap_statistic(1)}


@dataclass
class ScoredRun:
    """One engine's predictions, scored against the GT by our evaluator."""

    name: str
    pred_path: str
    metrics: dict[str, Any]
    arrays: dict[str, Any]  # per image: tp, fp, fn, precision, recall, f1, right; "coco": WeightedCocoAP
    images: list[str]  # the GT images, in order (both runs must hold the same)
    answers: list[str | None]  # raw_output per image
    predictions: list[str]  # the parsed predictions per image, canonical JSON
    extra: dict[str, Any] = field(default_factory=dict)


def score_run(name: str, pred_path: str, gt_path: str) -> ScoredRun:
    """Evaluate `pred_path` against `gt_path` (exact labels, no embedding model) and keep what the
    intervals need per image."""
    import json

    from coordexp.eval import evaluate
    from coordexp.eval.upstream import flat_metrics

    details: dict[str, Any] = {}
    m = evaluate(pred_path, gt_path, None, metrics="both", semantic=False, details=details)
    pairs, results = details["f1_pairs"], details["f1_results"][0.5]
    rows = []
    for r in results:
        c = r.counts("exact")
        s = r.scores("exact")["full"]
        rows.append({"tp": c["tp_full"], "fp": c["fp_full"], "fn": c["fn_full"], **s})
    arrays: dict[str, Any] = {k: np.asarray([float(x[k]) for x in rows]) for k in ("tp", "fp", "fn", "precision",
                                                                                    "recall", "f1")}
    arrays["right"] = (arrays["f1"] >= 1.0 - 1e-12).astype(np.float64)
    arrays["coco"] = WeightedCocoAP(details["coco_gt"], details["coco_dets"])
    raw = _raw_outputs(pred_path)
    answers = [raw.get(p.image_id) for p in pairs]
    predictions = [json.dumps([[o.desc, [round(v, 3) for v in o.bbox]] for o in p.preds]) for p in pairs]
    return ScoredRun(name=name, pred_path=pred_path, metrics=flat_metrics(m), arrays=arrays,
                     images=[p.images[0] if p.images else str(p.image_id) for p in pairs], answers=answers,
                     predictions=predictions, extra={"truncated": m["truncated"]["answers"],
                                                     "errors": sum((m.get("errors") or {}).values())})


def _raw_outputs(pred_path: str) -> dict[int, str | None]:
    """image_id -> the model's text, from the prediction lines (their order when they carry no id)."""
    import json

    out: dict[int, str | None] = {}
    with open(pred_path, encoding="utf-8") as f:
        for k, line in enumerate(f):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict):
                iid = d.get("image_id", k)
                out[int(iid) if isinstance(iid, int) else k] = d.get("raw_output")
    return out


def upper_bound(d: int, n: int, confidence: float = 0.95) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound on a rate seen d times in n: the p at which
    P(X <= d | n, p) = 1 - confidence (bisection on the binomial tail, exact integers)."""
    if n <= 0:
        return 1.0
    if d >= n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = d / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(math.comb(n, i) * mid ** i * (1 - mid) ** (n - i) for i in range(d + 1))
        lo, hi = (mid, hi) if cdf > alpha else (lo, mid)
    return hi


def images_for_bound(d: int, n: int, rate: float, confidence: float = 0.95, limit: int = 100_000) -> int | None:
    """The fewest images with the same share of differing ones whose bound is <= `rate` (None: none)."""
    share = d / n if n else 0.0
    if share >= rate:
        return None
    m = max(n, 1)
    while m <= limit:
        if upper_bound(round(share * m), m, confidence) <= rate:
            return m
        m = max(m + 1, int(m * 1.1))
    return None


def _first_divergence(a: str | None, b: str | None, tokenize) -> int | None:
    if a is None or b is None or a == b:
        return None
    ta, tb = (tokenize(a), tokenize(b)) if tokenize else (list(a), list(b))
    return next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))


def _token_agreement(ref: ScoredRun, cand: ScoredRun, tokenize) -> dict[str, Any]:
    n = len(ref.answers)
    same = sum(a == b and a is not None for a, b in zip(ref.answers, cand.answers))
    firsts = [f for f in (_first_divergence(a, b, tokenize) for a, b in zip(ref.answers, cand.answers))
              if f is not None]
    hist: dict[str, int] = {}
    for f in firsts:  # bins: where in the answer the engines part ways
        key = "0-7" if f < 8 else "8-31" if f < 32 else "32-127" if f < 128 else "128+"
        hist[key] = hist.get(key, 0) + 1
    return {"unit": "tokens" if tokenize else "characters", "exact_answers": same, "images": n,
            "exact_answer_rate": same / n if n else None,
            "first_divergence": {"median": float(np.median(firsts)) if firsts else None,
                                 "min": min(firsts) if firsts else None, "histogram": hist}}


def compare_accuracy(ref: ScoredRun, cand: ScoredRun, opts: ParityOptions = ParityOptions(),
                     tokenize=None) -> dict[str, Any]:
    """The report of one (reference, candidate) pair: diagnostics, primary metric intervals, verdict."""
    if ref.images != cand.images:
        k = next((i for i, (x, y) in enumerate(zip(ref.images, cand.images)) if x != y),
                 min(len(ref.images), len(cand.images)))
        raise ValueError(f"{ref.name} and {cand.name} do not hold the same images in the same order "
                         f"({len(ref.images)} vs {len(cand.images)}; first difference at position {k})")
    n = len(ref.images)
    if n == 0:
        raise ValueError("no images to compare")
    iv = paired_bootstrap(ref.arrays, cand.arrays, {k: PARITY_STATISTICS[k] for k in PRIMARY},
                          n_boot=opts.bootstrap, seed=opts.seed)
    metrics = []
    for name in PRIMARY:
        a, b = ref.metrics.get(name), cand.metrics.get(name)
        i = iv[name]
        inside = -opts.margin <= i.lo and i.hi <= opts.margin
        outside = i.lo > opts.margin or i.hi < -opts.margin
        metrics.append({"name": name, "a": a, "b": b, "delta": i.delta, "ci95": [i.lo, i.hi],
                        "within_margin": inside, "outside_margin": outside})
    differ = sum(x != y for x, y in zip(ref.predictions, cand.predictions))
    bound = upper_bound(differ, n, opts.confidence)
    ra, rb = ref.arrays["right"] > 0, cand.arrays["right"] > 0
    only_a, only_b = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
    verdict, why, needed = _verdict(metrics, differ, n, bound, opts)
    return {"reference": ref.name, "candidate": cand.name, "images": n, "verdict": verdict, "why": why,
            "images_needed": needed, "margin": opts.margin, "metrics": metrics,
            "token_agreement": _token_agreement(ref, cand, tokenize),
            "prediction_agreement": {"same": n - differ, "differ": differ, "rate": (n - differ) / n,
                                     "differ_rate_upper95": bound, "max_diff_rate": opts.max_diff_rate},
            "image_flips": {"only_reference_right": only_a, "only_candidate_right": only_b,
                            "mcnemar_p": mcnemar_exact(only_a, only_b)},
            "bootstrap": {"resamples": opts.bootstrap, "seed": opts.seed}}


def _verdict(metrics: list[dict[str, Any]], differ: int, n: int, bound: float, opts: ParityOptions
             ) -> tuple[str, str, int | None]:
    out = [m["name"] for m in metrics if m["outside_margin"]]
    if out:
        return "different", f"{', '.join(out)}: the 95 % interval lies outside +-{opts.margin}", None
    wide = [m for m in metrics if not m["within_margin"]]
    needed: int | None = None
    if wide:
        counts = []
        for m in wide:  # intervals narrow as 1/sqrt(n): the images that would bring this one inside
            lo, hi = m["ci95"]
            half, room = (hi - lo) / 2, opts.margin - abs(m["delta"])
            counts.append(math.ceil(n * (half / room) ** 2) if room > 0 else None)
        needed = None if any(c is None for c in counts) else max(counts)
        return ("inconclusive", f"{', '.join(m['name'] for m in wide)}: the 95 % interval crosses +-{opts.margin}"
                + ("" if needed else " (its delta is at the margin itself)"), needed)
    if bound > opts.max_diff_rate:
        needed = images_for_bound(differ, n, opts.max_diff_rate, opts.confidence)
        return ("inconclusive", f"too few images: {differ} of {n} answers differ, and at 95 % up to "
                f"{bound:.0%} of images could (more than {opts.max_diff_rate:.0%})", needed)
    return "equivalent", f"every primary delta's 95 % interval lies inside +-{opts.margin}", None


def exit_code(pairs: Sequence[dict[str, Any]]) -> int:
    """0 every candidate equivalent, 1 one is different, 3 otherwise (inconclusive)."""
    verdicts = {p["verdict"] for p in pairs}
    if "different" in verdicts:
        return EXIT_DIFFERENT
    return EXIT_EQUIVALENT if verdicts == {"equivalent"} else EXIT_INCONCLUSIVE


def format_report(pairs: Sequence[dict[str, Any]]) -> str:
    lines = []
    for p in pairs:
        ta, pa = p["token_agreement"], p["prediction_agreement"]
        lines.append(f"{p['candidate']} vs {p['reference']} on {p['images']} images: {p['verdict'].upper()} "
                     f"({p['why']})" + (f"; about {p['images_needed']} images would settle it"
                                        if p.get("images_needed") else ""))
        lines.append(f"  identical answers {ta['exact_answers']}/{ta['images']}, parsed predictions identical "
                     f"{pa['same']}/{p['images']} (differing rate <= {pa['differ_rate_upper95']:.3f} at 95 %)"
                     + (f", first divergence median {ta['first_divergence']['median']:.0f} {ta['unit']}"
                        if ta["first_divergence"]["median"] is not None else ""))
        lines.append(f"  {'metric':28} {'reference':>9} {'candidate':>9} {'delta':>8}  95 % interval")
        for m in p["metrics"]:
            a = "-" if m["a"] is None else f"{m['a']:.4f}"
            b = "-" if m["b"] is None else f"{m['b']:.4f}"
            lines.append(f"  {m['name']:28} {a:>9} {b:>9} {m['delta']:+8.4f}  "
                         f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
        f = p["image_flips"]
        lines.append(f"  images right only in the reference {f['only_reference_right']}, only in the candidate "
                     f"{f['only_candidate_right']} (exact McNemar p = {f['mcnemar_p']:.3g})")
    return "\n".join(lines)
