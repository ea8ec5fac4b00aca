"""Validate an ONNX export against the PyTorch reference (after optimum's `validate_model_outputs`).

    validate_export(onnx_dir, ckpt, ...) -> report dict      (raises ExportValidationError)

On a few probe inputs (generated images of several sizes, batch 1 and a left-padded batch 2) it
runs the torch checkpoint and the exported graphs (`OnnxParts`) and compares

- every graph output on the same inputs: `vision.image_embeds`, `vision.deepstack` (same pixels),
  `embed.inputs_embeds` (same ids), `decoder.logits` (first-step logits, the decoder fed the torch
  vision features, so it is judged alone) and `pipeline.logits` (all three graphs chained);
- greedy token ids for `steps` steps (stop tokens suppressed, so every row compares `steps` ids).

It raises `ExportValidationError` unless the greedy tokens are identical everywhere and every max
abs difference is within `fail_atol` (0.1: far above float32 noise, so only a broken graph or
other weights reach it; with `strict=True` within `atol`); the message names the first graph
whose outputs differ beyond `atol` and the first diverging token. A graph ONNX Runtime
cannot load, or an export whose recorded checkpoint hash differs from `ckpt`'s weights, fails too.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (160, 96), (112, 208))  # (width, height)
GRAPH_OUTPUTS = ("vision.image_embeds", "vision.deepstack", "embed.inputs_embeds", "decoder.logits",
                 "pipeline.logits")
DEFAULT_ATOL = 1e-3  # reported: every output within it is a numerically faithful export
DEFAULT_FAIL_ATOL = 0.1  # any output further off than this fails even when the greedy tokens agree


class ExportValidationError(AssertionError):
    """The exported graphs do not reproduce the torch reference."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


def probe_images(sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, seed: int = 0) -> list:
    """Deterministic synthetic RGB images (noise background + a few filled shapes), one per size."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        bg = rng.integers(0, 256, size=3)
        arr = np.clip(bg[None, None, :] + rng.normal(0, 24, size=(h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, max(1, w - 8))), int(rng.integers(0, max(1, h - 8)))
            x1, y1 = int(rng.integers(x0 + 4, w + 1)), int(rng.integers(y0 + 4, h + 1))
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=color)
        out.append(im)
    return out


def _maxdiff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _probes(images: list, batch_sizes: Sequence[int]) -> list[tuple[str, list]]:
    probes = []
    for bs in batch_sizes:
        if bs == 1:
            probes += [(f"b1-{im.width}x{im.height}", [im]) for im in images]
        else:
            batch = [images[i % len(images)] for i in range(bs)]
            probes.append((f"b{bs}-" + "+".join(f"{im.width}x{im.height}" for im in batch), batch))
    return probes


def _check_checkpoint(report: dict[str, Any], meta: dict[str, Any], onnx_dir, ckpt) -> None:
    """onnx_meta.json's checkpoint_sha256 must be `ckpt`'s weights."""
    from coordexp.checkpoint import checkpoint_digest

    sha = checkpoint_digest(ckpt).sha256
    report["checkpoint_sha256"] = sha
    report["checkpoint_sha256_match"] = sha == meta.get("checkpoint_sha256")
    if not report["checkpoint_sha256_match"]:
        raise ExportValidationError(
            f"checkpoint mismatch: {os.path.join(str(onnx_dir), 'onnx_meta.json')} records weights sha256 "
            f"{meta.get('checkpoint_sha256')} but {ckpt} has {sha}: the graphs were exported from another "
            "checkpoint (re-export it)", report)


def _open_parts(onnx_dir, threads: int | None, report: dict[str, Any]):
    """OnnxParts with every graph loaded: a graph ONNX Runtime cannot load fails here."""
    from coordexp.engines.onnx_engine import OnnxParts

    parts = OnnxParts(onnx_dir, threads=threads)
    for key in ("vision", "embed", "decoder"):
        try:
            parts.session(key)
        except Exception as e:  # noqa: BLE001 - any loader failure means a broken graph
            raise ExportValidationError(f"{key}.onnx cannot be loaded by ONNX Runtime: {e}", report) from e
    return parts


def _in_onnx(report: dict[str, Any], name: str, fn):
    """fn(), with any ONNX Runtime failure turned into ExportValidationError naming the graph."""
    try:
        return fn()
    except ExportValidationError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportValidationError(f"{name} failed in ONNX Runtime: {type(e).__name__}: {e}", report) from e


def torch_outputs(model, enc: dict[str, Any], spec) -> dict[str, np.ndarray]:
    """The torch reference of every compared graph output, for one encoded probe."""
    import torch

    with torch.inference_mode():
        vo = model.model.get_image_features(enc["pixel_values"].to(model.dtype), enc["image_grid_thw"])
        embeds = torch.cat(list(vo.pooler_output)).float().numpy()
        feats = vo.deepstack_features if spec.deepstack else []
        deep = (torch.stack([torch.cat(list(f)) for f in feats]).float().numpy() if feats
                else np.zeros((0,) + embeds.shape, dtype=np.float32))
        tokens = model.model.language_model.embed_tokens(enc["input_ids"]).float().numpy()
        logits = model(**enc).logits[:, -1, :].float().numpy()
    return {"embeds": embeds, "deep": deep, "tokens": tokens, "logits": logits}


def onnx_outputs(parts, np_enc: dict[str, np.ndarray], ref: dict[str, np.ndarray], report: dict[str, Any]
                 ) -> dict[str, Any]:
    """The same outputs from the graphs: vision, embed, the decoder fed the torch vision features
    (judged alone) and the three graphs chained."""
    embeds, deep = _in_onnx(report, "vision.onnx",
                            lambda: parts.encode_images(np_enc["pixel_values"], np_enc["image_grid_thw"]))
    tokens = _in_onnx(report, "embed.onnx", lambda: parts.embed(np_enc["input_ids"]))
    args = (np_enc["input_ids"], np_enc["attention_mask"], np_enc["image_grid_thw"])
    logits_dec = _in_onnx(report, "decoder.onnx", lambda: parts.prefill_logits(*args, ref["embeds"], ref["deep"]))
    logits = _in_onnx(report, "decoder.onnx", lambda: parts.prefill_logits(*args, embeds, deep))
    return {"embeds": embeds, "deep": deep, "tokens": tokens, "logits_dec": logits_dec, "logits": logits,
            "args": args}


def _mismatches(name: str, t_rows: list[list[int]], o_rows: list[list[int]]) -> tuple[list[str], int]:
    """(first diverging token of every row that differs, ids compared)."""
    out, compared = [], 0
    for r, (a, b) in enumerate(zip(t_rows, o_rows)):
        compared += len(a)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            ta = a[at] if at < len(a) else "<end>"
            tb = b[at] if at < len(b) else "<end>"
            out.append(f"probe {name} row {r}: greedy token {at} is {ta} in torch but {tb} in ONNX")
    return out, compared


def run_probe(name: str, batch: list, reference, parts, spec, params, report: dict[str, Any]) -> dict[str, Any]:
    """One probe: graph outputs and greedy tokens, torch vs ONNX. Returns {diffs, mismatches, compared,
    warning} and appends the probe to the report."""
    enc = reference.processor.encode(batch, reference.prompt)
    np_enc = {k: v.numpy() for k, v in enc.items()}
    t = torch_outputs(reference.model, enc, spec)
    o = onnx_outputs(parts, np_enc, t, report)
    diffs = {
        "vision.image_embeds": _maxdiff(t["embeds"], o["embeds"]),
        "vision.deepstack": _maxdiff(t["deep"], o["deep"]),
        "embed.inputs_embeds": _maxdiff(t["tokens"], o["tokens"]),
        "decoder.logits": _maxdiff(t["logits"], o["logits_dec"]),
        "pipeline.logits": _maxdiff(t["logits"], o["logits"]),
    }
    warning = None
    if t["embeds"].size and not np.any(t["embeds"]):
        warning = (f"probe {name}: the torch vision tower outputs all zeros (image content cannot "
                   "influence this checkpoint; its vision graph is only weakly validated)")
    t_rows, _ = reference.generate_ids(batch, params)
    o_rows = _in_onnx(report, "decoder.onnx", lambda: parts.generate(*o["args"], o["embeds"], o["deep"], params))
    mismatches, compared = _mismatches(name, t_rows, o_rows)
    report["probes"].append({"name": name, "batch": len(batch), "sizes": [[im.width, im.height] for im in batch],
                             "max_abs_diff": diffs, "tokens_match": not mismatches})
    return {"diffs": diffs, "mismatches": mismatches, "compared": compared, "warning": warning}


def failure_message(worst: dict[str, float], mismatches: list[str], compared: int, atol: float, fail_atol: float,
                    too_far: bool) -> str:
    """Names the first graph whose outputs differ beyond `atol`, and the first diverging tokens."""
    over = [k for k in GRAPH_OUTPUTS if worst[k] > atol]
    if over:
        first = over[0]
        where = (f"{first.split('.')[0]}.onnx output '{first.split('.')[1]}' differs from torch by "
                 f"{worst[first]:.3g} (atol {atol:g})")
        if first.startswith("pipeline"):
            where = f"the chained graphs' first-step logits differ from torch by {worst[first]:.3g} (atol {atol:g})"
    else:
        where = f"all graph outputs are within atol {atol:g} (largest {max(worst.values()):.3g}): a near-tie flipped"
    msg = "ONNX export does not match the torch reference: " + where
    if mismatches:
        msg += "; " + "; ".join(mismatches[:3]) + (f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else "")
    elif too_far:
        msg += f" (beyond the failure limit {fail_atol:g}, although the {compared} greedy tokens compared agree)"
    return msg


def _reference(reference, ckpt, prompt, threads):
    if reference is not None:
        return reference
    if ckpt is None:
        raise ValueError("validate_export needs ckpt or reference")
    from coordexp.engines.torch_engine import TorchEngine

    return TorchEngine(str(ckpt), prompt=prompt, threads=threads)


def validate_export(onnx_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None, *, reference: Any = None,
                    images: list | None = None, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                    batch_sizes: Sequence[int] = (1, 2), steps: int = 16, atol: float = DEFAULT_ATOL,
                    fail_atol: float = DEFAULT_FAIL_ATOL, strict: bool = False, threads: int | None = None,
                    prompt=None, check_hash: bool = True, log=None) -> dict[str, Any]:
    """Compare the export in `onnx_dir` with the torch reference; returns the report.

    `reference`: a loaded `TorchEngine` (e.g. with edited weights) instead of loading `ckpt`.
    `check_hash`: compare onnx_meta.json's `checkpoint_sha256` with `ckpt`'s weights first.
    `prompt`: the PromptSpec the repository will serve (default the reference's); recorded as `prompt`.
    """
    from coordexp.export.onnx_export import read_meta
    from coordexp.families import family_spec
    from coordexp.generation import GenerationParams

    log = log or (lambda s: None)
    t0 = time.perf_counter()
    meta = read_meta(onnx_dir)
    report: dict[str, Any] = {"onnx_dir": os.path.abspath(str(onnx_dir)), "atol": atol, "fail_atol": fail_atol,
                              "steps": steps, "reference": "torch", "probes": [], "ok": False}
    reference = _reference(reference, ckpt, prompt, threads)
    ckpt = ckpt if ckpt is not None else getattr(reference, "ckpt", None)
    if check_hash and ckpt is not None:
        _check_checkpoint(report, meta, onnx_dir, ckpt)
    if prompt is not None:
        reference.prompt = prompt
    # the probes are encoded with this prompt: the greedy tokens compared are those of the served prompt
    report["prompt"] = reference.prompt.to_dict()
    parts = _open_parts(onnx_dir, threads, report)
    spec = family_spec(str(meta.get("family", "qwen3_vl")), where=str(onnx_dir))
    params = GenerationParams(max_new_tokens=steps, ignore_eos=True)
    worst = {k: 0.0 for k in GRAPH_OUTPUTS}
    mismatches: list[str] = []
    warnings: list[str] = []
    compared = 0
    for name, batch in _probes(images if images is not None else probe_images(sizes), batch_sizes):
        res = run_probe(name, batch, reference, parts, spec, params, report)
        for k, v in res["diffs"].items():
            worst[k] = max(worst[k], v)
        warnings += [res["warning"]] if res["warning"] else []
        mismatches += res["mismatches"]
        compared += res["compared"]
        log(f"probe {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in res["diffs"].items())
            + ("" if not res["mismatches"] else "  TOKENS DIFFER"))

    report["max_abs_diff"] = worst
    report["warnings"] = sorted(set(w.split(": ", 1)[1] for w in warnings))
    for w in report["warnings"]:
        log(f"warning: {w}")
    report["within_atol"] = all(v <= atol for v in worst.values())
    report["greedy_tokens_match"] = not mismatches
    report["tokens_compared"] = compared
    report["seconds"] = round(time.perf_counter() - t0, 2)
    too_far = any(v > fail_atol for v in worst.values())
    if mismatches or too_far or (strict and not report["within_atol"]):
        report["error"] = failure_message(worst, mismatches, compared, atol, fail_atol, too_far)
        raise ExportValidationError(report["error"], report)
    report["ok"] = True
    return report


def validate_accuracy(onnx_dir: str, ckpt: str, data: str, *, prompt: Any, max_new_tokens: int,
                      threads: int | None = None, limit: int | None = None, log=None) -> dict[str, Any]:
    """Accuracy parity of a reduced-precision export: the torch checkpoint (float32) and the exported
    graphs answer the labelled records of `data` with the served prompt; both are scored and judged
    by `coordexp.runs.equivalence` (a verdict, not token identity). Raises ExportValidationError when
    the export is *different*; an *inconclusive* verdict is returned (the caller says so)."""
    import shutil
    import tempfile

    from coordexp.dataset import check_dataset, copy_records
    from coordexp.engines import load_engine
    from coordexp.generation import GenerationParams
    from coordexp.runner import run_dataset
    from coordexp.runs.equivalence import compare_accuracy, score_run

    log = log or (lambda s: None)
    work = tempfile.mkdtemp(prefix="coordexp-validate-")
    try:
        records = os.path.join(work, "data.jsonl")
        copy_records(data, records, limit)
        check = check_dataset(records)
        if not check["labelled"] or not check["ok"]:
            raise ExportValidationError(f"--validate-data {data}: {check['labelled']} labelled of {check['lines']} "
                                        "records, images found " f"{check['images_found']}: accuracy parity needs "
                                        "labelled records whose images exist")
        params = GenerationParams(max_new_tokens=max_new_tokens)
        scored = []
        t0 = time.perf_counter()
        for kind, path, name in (("torch", ckpt, "torch fp32"), ("onnx", onnx_dir, "onnx export")):
            engine = load_engine(kind, path, prompt=prompt, threads=threads)
            pred = os.path.join(work, kind, "predictions.jsonl")
            os.makedirs(os.path.dirname(pred))
            run_dataset(records, pred, engine, params, progress=False, force=True)
            del engine
            scored.append(score_run(name, pred, records))
        pair = compare_accuracy(scored[0], scored[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"kind": "accuracy", "data": os.path.abspath(data), "records": check["valid"],
              "verdict": pair["verdict"], "why": pair["why"], "images_needed": pair["images_needed"],
              "margin": pair["margin"], "metrics": pair["metrics"], "token_agreement": pair["token_agreement"],
              "prediction_agreement": pair["prediction_agreement"], "image_flips": pair["image_flips"],
              "seconds": round(time.perf_counter() - t0, 2)}
    for m in pair["metrics"]:
        log(f"  {m['name']:26} torch {m['a']:.4f}  export {m['b']:.4f}  delta {m['delta']:+.4f} "
            f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
    log(f"  identical answers {pair['token_agreement']['exact_answers']}/{pair['images']}: {pair['verdict']}")
    if pair["verdict"] == "different":
        raise ExportValidationError(f"accuracy parity on {data}: {pair['why']}", report)
    return report
