"""The demo training's quick evaluation: greedy generation on an input JSONL, the shared parser, and
AP / matched IoU from `coordexp.eval` (its COCO evaluation and COCO's own assignment), parse rates.

Every prediction scores 1.0, so the ranking is image order, then generation order (COCO's stable sort).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from coordexp.prompt import PromptSpec

Boxes = Sequence[Sequence[tuple[str, list[float]]]]  # per image: (desc, pixel [x1, y1, x2, y2])


def _pairs(gts: Boxes, preds: Boxes) -> list:
    """eval's per-image pairs (image size unused by box metrics)."""
    from coordexp.eval.io import EvalObject, ImagePair

    def objs(img):
        return [EvalObject(desc=d, type="bbox_2d", points=[float(v) for v in b], index=k)
                for k, (d, b) in enumerate(img)]

    return [ImagePair(image_id=i, images=[], width=1, height=1, gts=objs(g), preds=objs(p))
            for i, (g, p) in enumerate(zip(gts, preds))]


def _matched_ious(pairs: Sequence, cats: Sequence[str], thr: float) -> list[float]:
    """IoUs of the pairs COCO AP counts as true positives (per category and image, predictions in
    rank order: eval's `rank_match`)."""
    from coordexp.eval.matching import box_iou, boxes_array, rank_match

    out: list[float] = []
    for c in cats:
        for p in pairs:
            g = [o for o in p.gts if o.desc == c]
            d = [o for o in p.preds if o.desc == c]
            out += [v for _, _, v in rank_match(box_iou(boxes_array(d), boxes_array(g)), thr)]
    return out


def ap_at(gts: Boxes, preds: Boxes, thr: float = 0.5) -> dict[str, Any]:
    """Class-aware COCO AP at one of COCO's IoU thresholds (0.5, 0.55, ..., 0.95), computed by
    `coordexp.eval`'s COCO evaluation; categories are the GT descs (predictions of other descs are
    dropped). Also the mean IoU of the matched (true-positive) pairs and their number."""
    import numpy as np

    from coordexp.eval.coco import build_coco_dets, build_coco_gt, run_cocoeval

    pairs = _pairs(gts, preds)
    cats = sorted({o.desc for p in pairs for o in p.gts})
    ious = _matched_ious(pairs, cats, thr)
    aps: dict[str, float] = {}
    if cats:
        dets = build_coco_dets(pairs, {c: c for c in cats}, cats)  # exact descs; other descs are dropped
        res = run_cocoeval(build_coco_gt(pairs, cats), dets, "bbox")
        t = np.nonzero(np.isclose(res.iou_thrs, thr))[0]
        if t.size == 0:
            raise ValueError(f"IoU threshold {thr} is not one of COCO's {res.iou_thrs.tolist()}")
        prec = res.precision[int(t[0]), :, :, 0, -1]  # [recall thresholds, categories], area all, 100 dets
        aps = {c: max(float(prec[:, k].mean()), 0.0) for k, c in enumerate(cats)}
    return {"ap": float(np.mean(list(aps.values()))) if aps else 0.0, "per_class": aps,
            "mean_iou": float(np.mean(ious)) if ious else 0.0, "matched": len(ious)}


def _generate(model, processor, root: str, records: Sequence, spec: PromptSpec, max_new_tokens: int,
              batch_size: int) -> tuple[list[str], list[int], float]:
    """Greedy answers (texts), their token counts and the seconds it took; the model's mode is kept."""
    import torch
    from PIL import Image

    was_training = model.training
    model.eval()
    texts: list[str] = []
    n_new: list[int] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            images = [Image.open(os.path.join(root, r.images[0])).convert("RGB") for r in chunk]
            enc = processor.encode(images, spec)
            enc = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=processor.stop_token_ids, pad_token_id=processor.pad_token_id)
            gen = out[:, enc["input_ids"].shape[1]:]
            for row in gen.cpu():
                texts.append(processor.decode(row))
                n_new.append(len(processor.trim(row)))
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    return texts, n_new, elapsed


def _score(records: Sequence, texts: Sequence[str], predictions_out: str | None) -> dict[str, Any]:
    """Parse every answer; pixel boxes of GT and predictions, parse counts; optionally predictions.jsonl."""
    from coordexp.grid import bbox_of, to_pixels
    from coordexp.parser import parse_model_output
    from coordexp.schema import PredictionRecord

    gts, preds, lines = [], [], []
    ok = strict = exact_count = truncated = 0
    for i, (rec, text) in enumerate(zip(records, texts)):
        res = parse_model_output(text, coord_mode="norm1000")
        ok += res.error is None
        strict += res.error is None and not res.repairs and not res.num_dropped
        truncated += bool(getattr(res, "truncated", False))
        exact_count += len(res.preds) == len(rec.objects)
        gts.append([(o.desc, bbox_of(to_pixels(o.points, rec.width, rec.height))) for o in rec.objects])
        preds.append([(p.desc, bbox_of(to_pixels(p.points, rec.width, rec.height))) for p in res.preds])
        if predictions_out:
            lines.append(PredictionRecord(image_id=i, images=rec.images, width=rec.width, height=rec.height,
                                          raw_output=text, preds=res.preds,
                                          error=str(res.error) if res.error else None,
                                          error_message=res.error_message, repairs=res.repairs).to_json())
    if predictions_out:
        os.makedirs(os.path.dirname(os.path.abspath(predictions_out)), exist_ok=True)
        with open(predictions_out, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    return {"gts": gts, "preds": preds, "ok": ok, "strict": strict, "exact_count": exact_count,
            "truncated": truncated}


def evaluate(model, processor, data: str, spec: PromptSpec = PromptSpec(), max_new_tokens: int = 160,
             batch_size: int = 25, limit: int | None = None, predictions_out: str | None = None) -> dict[str, Any]:
    """Greedy generation on an input JSONL; parse with the shared parser; AP50, parse rates, counts.

    `parse_rate_strict`: outputs that parse with no repair at all (and no dropped object);
    `parse_rate`: outputs the parser recovers without an error. Optionally writes `predictions.jsonl`."""
    from coordexp.schema import InputRecord, read_jsonl

    root = os.path.dirname(os.path.abspath(data))
    records = []
    for i, d in read_jsonl(data):
        if isinstance(d, Exception):
            raise d
        records.append(InputRecord.from_dict(d, i))
    if limit:
        records = records[:limit]
    texts, n_new, elapsed = _generate(model, processor, root, records, spec, max_new_tokens, batch_size)
    s = _score(records, texts, predictions_out)
    gts, preds = s["gts"], s["preds"]
    ap50 = ap_at(gts, preds, 0.5)
    n = max(len(records), 1)
    return {
        "images": len(records), "ap50": round(ap50["ap"], 4), "mean_iou_matched": round(ap50["mean_iou"], 4),
        "parse_rate": round(s["ok"] / n, 4), "parse_rate_strict": round(s["strict"] / n, 4),
        "truncated": s["truncated"], "count_exact": round(s["exact_count"] / n, 4),
        "max_new_tokens": max_new_tokens, "max_generated_tokens": max(n_new) if n_new else 0,
        "gt_objects": sum(len(g) for g in gts), "pred_objects": sum(len(p) for p in preds),
        "eval_seconds": round(elapsed, 1), "examples": texts[:2],
    }
