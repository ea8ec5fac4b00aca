"""Train the demo checkpoint: a tiny Qwen3-VL that really detects synthetic shapes (CPU or GPU).

    python -m coordexp.train_demo train --out runs/demo_ckpt --steps 1500 --minutes 45
    python -m coordexp.train_demo train --out runs/demo_ckpt --seed 0 --steps 4661 --stop-at 4455 \
        --device cuda --workers 4 --threads 1      # the bundled checkpoint (15 min on one H100)
    python -m coordexp.train_demo eval --ckpt runs/demo_ckpt --data data/demo_val/val.jsonl
    python -m coordexp.train_demo export --ckpt runs/demo_ckpt --out checkpoints/coordexp-demo-shapes --dtype float16

Recipe (docs: /work/shared/notes/demo-training.md): `coordexp.tiny` builds the model (text hidden 256,
4 layers, 4 heads / 2 KV heads, FFN 768, mrope_section [12, 10, 10], tied embeddings; vision hidden
128, 3 layers, 4 heads, FFN 256, patch 8, merge 2, deepstack [0, 1]) from a seeded random init; every
step draws 32 fresh 128x128 images from `coordexp.synthetic`; the inputs are built by
`CoordExpProcessor.encode` (exactly what inference feeds) and the answer is
`format_coordjson(objects, PromptSpec())` + `<|im_end|>`; the causal-LM loss covers only the answer
tokens and `<|im_end|>`. AdamW (lr 3e-3, weight decay 0.01), 50 linear warm-up steps then cosine to
zero, gradient clipping 1.0, bf16 autocast (optional), 2 threads. `--device cuda` trains on a GPU
(deterministic kernels where torch has them, no TF32); `--workers N` builds batches in N processes.

Determinism: the batch of step s is drawn from a generator seeded by (seed, s), the model init by
`seed`, and the schedule depends only on the step and the total step count, so `--steps N` rebuilds a
run exactly (same thread count) and a resumed run continues exactly. `--minutes M` without `--steps`
sets the total from the measured speed: after `--calibrate-steps` steps (inside the warm-up, where the
total does not matter yet) N = M minutes / seconds per step; N is logged and saved, and `--steps N`
then rebuilds that run. `--max-minutes` is a hard cap on training time (evaluation excluded; default
1.5 x `--minutes`). bf16 autocast is off by default: on CPUs without native bf16 it is far slower.

The output folder is a loadable checkpoint (model + processor files) refreshed every
`--ckpt-every-min` minutes, plus `train_state.pt` (optimizer, step, elapsed time) for `--resume`
and `train_log.jsonl` (one line per logged step / evaluation).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from coordexp.prompt import PromptSpec, format_coordjson

DEMO_SIZE: dict[str, Any] = dict(
    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, head_dim=64, text_intermediate=768,
    mrope_section=[12, 10, 10], tie_word_embeddings=True,
    vision_hidden=128, vision_layers=3, vision_heads=4, vision_intermediate=256,
    patch_size=8, merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1],
    init_std=0.02,
)
DEMO_NUM_MERGES = 700
TRAIN_SPLIT = "train-demo"  # the seed stream of the training batches (val uses split "val")
MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json")
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------------ model

def build_init(out_dir: str | Path, seed: int) -> Path:
    """The seeded random demo-size checkpoint (tokenizer, processor files, model) in `out_dir`."""
    from coordexp.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(out_dir, family="qwen3_vl", seed=seed, size="demo", num_merges=DEMO_NUM_MERGES,
                                 **DEMO_SIZE)


def load_model(ckpt: str | Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=getattr(torch, dtype))


def copy_processor_files(src: Path, dst: Path) -> None:
    """Everything of a checkpoint folder except the weights/config and training files."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in MODEL_FILES + (STATE_FILE, LOG_FILE, "README.md") \
                and not p.name.endswith(".safetensors"):
            shutil.copy2(p, dst / p.name)


def save_checkpoint(model, src_dir: Path, out: Path, state: dict[str, Any] | None = None,
                    dtype: str | None = None) -> None:
    """Write model + processor files (+ train state) to `out` atomically (tmp folder, then rename)."""
    import torch

    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    to_save = model
    if dtype is not None and dtype != "float32":
        import copy

        to_save = copy.deepcopy(model).to(getattr(torch, dtype))
    to_save.save_pretrained(tmp, safe_serialization=True)
    copy_processor_files(src_dir, tmp)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    if out.exists() and (out / LOG_FILE).exists():
        shutil.copy2(out / LOG_FILE, tmp / LOG_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ data

def make_batch(processor, spec: PromptSpec, images: Sequence[Any], objects: Sequence[Sequence[dict]]):
    """Training inputs: `processor.encode(images, spec)` (the inference prompt, left padded) followed by
    the answer tokens and `<|im_end|>`, right padded. `labels` are -100 except on answer + im_end."""
    import torch

    enc = processor.encode(list(images), spec)
    tok = processor.tokenizer
    answers = [format_coordjson(objs, spec) for objs in objects]
    ans_ids = [tok(a, add_special_tokens=False)["input_ids"] + [processor.im_end_token_id] for a in answers]
    n, p = enc["input_ids"].shape
    a = max(len(x) for x in ans_ids)
    input_ids = torch.full((n, p + a), processor.pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, p + a), dtype=torch.long)
    labels = torch.full((n, p + a), -100, dtype=torch.long)
    input_ids[:, :p] = enc["input_ids"]
    attention[:, :p] = enc["attention_mask"]
    for i, ids in enumerate(ans_ids):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, p:p + len(ids)] = t
        attention[i, p:p + len(ids)] = 1
        labels[i, p:p + len(ids)] = t
    mm = torch.zeros_like(input_ids)
    mm[:, :p] = enc["mm_token_type_ids"]
    return {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm,
            "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"], "labels": labels}


def draw_batch(seed: int, step: int, batch_size: int, image_size: int):
    from coordexp.synthetic import record_rng, sample

    rng = record_rng(seed, TRAIN_SPLIT, step)
    images, objects = [], []
    for _ in range(batch_size):
        im, objs = sample(rng, image_size)
        images.append(im)
        objects.append(objs)
    return images, objects


class StepBatches:
    """Map-style dataset of training batches by step number, so a DataLoader's worker processes can
    build them ahead of the accelerator (the batch depends only on (seed, step): same data either way)."""

    def __init__(self, processor, spec: PromptSpec, seed: int, start: int, stop: int, batch_size: int,
                 image_size: int):
        self.processor, self.spec, self.seed = processor, spec, seed
        self.start, self.stop, self.batch_size, self.image_size = start, stop, batch_size, image_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int):
        images, objects = draw_batch(self.seed, self.start + i, self.batch_size, self.image_size)
        return make_batch(self.processor, self.spec, images, objects)


def batches(processor, spec: PromptSpec, args, start: int, stop: int):
    """Batches for steps start..stop-1 in order: built inline (`--workers 0`) or by worker processes."""
    data = StepBatches(processor, spec, args.seed, start, stop, args.batch_size, args.image_size)
    if args.workers <= 0:
        return (data[i] for i in range(len(data)))
    import torch

    return iter(torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers,
                                            prefetch_factor=4, persistent_workers=False))


def prefix_length(batch) -> int:
    """Length of the prompt prefix shared by every row (the tokens before the first image token), or 0
    when the rows differ there (padding, different prompts)."""
    ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    first = (mm[0] != 0).nonzero()
    if first.numel() == 0:
        return 0
    p = int(first[0])
    if not bool((ids[:, :p] == ids[:1, :p]).all()) or not bool(mask[:, :p].all()):
        return 0
    return p


def causal_lm_loss(model, batch, shared_prefix: bool = True):
    """The standard causal-LM loss (mean cross-entropy over the tokens whose label is not -100).

    With `shared_prefix`, the prompt prefix that every row shares (system prompt up to the image) runs
    once with batch 1 and its keys/values are broadcast to the batch: with causal attention this gives
    the same loss and gradients as `model(**batch).loss` at about half the text compute (the prompt is
    longer than image + answer). Logits are computed only where a label follows."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    labels = batch["labels"]
    p = prefix_length(batch) if shared_prefix else 0
    if p == 0:
        return model(**batch).loss
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos, _ = inner.get_rope_index(ids, batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=mask)
    cache = DynamicCache(config=model.config)
    inner.language_model(input_ids=ids[:1, :p], attention_mask=mask[:1, :p], position_ids=pos[:, :1, :p],
                         past_key_values=cache)
    b = ids.shape[0]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(b, -1, -1, -1)
        layer.values = layer.values.expand(b, -1, -1, -1)
    out = inner(input_ids=ids[:, p:], attention_mask=mask, position_ids=pos[:, :, p:], past_key_values=cache,
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=batch["mm_token_type_ids"][:, p:])
    hidden = out.last_hidden_state  # (b, L - p, H)
    lab = labels[:, p:]
    first = int((lab != -100).any(0).nonzero()[0])  # first labelled column
    h = hidden[:, first - 1:-1]
    tgt = lab[:, first:]
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------------------------------ schedule

def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 over `progress` in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


# ------------------------------------------------------------------------------------------------ evaluation

def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ap_at(gts: Sequence[Sequence[tuple[str, list[float]]]], preds: Sequence[Sequence[tuple[str, list[float]]]],
          thr: float = 0.5) -> dict[str, Any]:
    """Class-aware COCO-style AP at one IoU threshold, every score 1.0 (ranking = image order, then
    generation order, as COCO's stable sort gives), 101-point interpolation, mean over GT classes.
    Boxes in pixels [x1, y1, x2, y2]. Also returns the mean IoU of the matched pairs."""
    import numpy as np

    cats = sorted({d for img in gts for d, _ in img})
    aps: dict[str, float] = {}
    ious: list[float] = []
    for c in cats:
        npos = sum(1 for img in gts for d, _ in img if d == c)
        tps: list[int] = []
        for gi, img in enumerate(gts):
            g = [b for d, b in img if d == c]
            used = [False] * len(g)
            for d, pb in preds[gi]:
                if d != c:
                    continue
                best, bj = thr, -1
                for j, gb in enumerate(g):
                    if used[j]:
                        continue
                    iou = _box_iou(pb, gb)
                    if iou >= best:
                        best, bj = iou, j
                if bj >= 0:
                    used[bj] = True
                    ious.append(best)
                    tps.append(1)
                else:
                    tps.append(0)
        if not tps:
            aps[c] = 0.0
            continue
        tp = np.cumsum(tps)
        fp = np.cumsum([1 - t for t in tps])
        rc = tp / npos
        pr = tp / np.maximum(tp + fp, 1e-12)
        for i in range(len(pr) - 2, -1, -1):
            pr[i] = max(pr[i], pr[i + 1])
        rec_thr = np.linspace(0, 1, 101)
        idx = np.searchsorted(rc, rec_thr, side="left")
        aps[c] = float(np.mean([pr[i] if i < len(pr) else 0.0 for i in idx]))
    return {"ap": float(np.mean(list(aps.values()))) if aps else 0.0, "per_class": aps,
            "mean_iou": float(np.mean(ious)) if ious else 0.0, "matched": len(ious)}


def evaluate(model, processor, data: str, spec: PromptSpec = PromptSpec(), max_new_tokens: int = 160,
             batch_size: int = 25, limit: int | None = None, predictions_out: str | None = None) -> dict[str, Any]:
    """Greedy generation on an input JSONL; parse with the shared parser; AP50, parse rates, counts.

    `parse_rate_strict`: outputs that parse with no repair at all (and no dropped object);
    `parse_rate`: outputs the parser recovers without an error. Optionally writes `predictions.jsonl`."""
    import torch
    from PIL import Image

    from coordexp.grid import bbox_of, to_pixels
    from coordexp.parser import parse_model_output
    from coordexp.schema import InputRecord, PredictionRecord, read_jsonl

    root = os.path.dirname(os.path.abspath(data))
    records = []
    for i, d in read_jsonl(data):
        if isinstance(d, Exception):
            raise d
        records.append(InputRecord.from_dict(d, i))
    if limit:
        records = records[:limit]
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
    ap50 = ap_at(gts, preds, 0.5)
    n = max(len(records), 1)
    if predictions_out:
        os.makedirs(os.path.dirname(os.path.abspath(predictions_out)), exist_ok=True)
        with open(predictions_out, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    return {
        "images": len(records), "ap50": round(ap50["ap"], 4), "mean_iou_matched": round(ap50["mean_iou"], 4),
        "parse_rate": round(ok / n, 4), "parse_rate_strict": round(strict / n, 4),
        "truncated": truncated, "count_exact": round(exact_count / n, 4),
        "max_new_tokens": max_new_tokens, "max_generated_tokens": max(n_new) if n_new else 0,
        "gt_objects": sum(len(g) for g in gts), "pred_objects": sum(len(p) for p in preds),
        "eval_seconds": round(elapsed, 1), "examples": texts[:2],
    }


# ------------------------------------------------------------------------------------------------ training

def train(args) -> int:
    import numpy as np
    import torch

    from coordexp.processor import CoordExpProcessor

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # same seed + same GPU model -> same run: deterministic kernels, no TF32
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    init_dir = out.with_name(out.name + ".init")
    spec = PromptSpec()
    resume = args.resume and (out / STATE_FILE).is_file()
    if resume:
        src = out
        log(f"resuming from {out}")
    else:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            log(f"{out} exists; pass --resume to continue it or --overwrite to start again")
            return 2
        log(f"building the seeded init checkpoint in {init_dir}")
        build_init(init_dir, args.seed)
        src = init_dir
    processor = CoordExpProcessor.from_pretrained(src)
    torch.manual_seed(args.seed)
    model = load_model(src).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    step, elapsed, total = 0, 0.0, args.steps
    if resume:
        st = torch.load(out / STATE_FILE, weights_only=False, map_location=device)
        opt.load_state_dict(st["optimizer"])
        step, elapsed = st["step"], st["elapsed"]
        total = args.steps or st.get("total") or 0
        torch.set_rng_state(st["torch_rng"].cpu())
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_FILE).write_text("", encoding="utf-8")
    if not total and not args.minutes:
        log("give --steps and/or --minutes")
        return 2
    cap = args.max_minutes * 60.0 if args.max_minutes else (1.5 * args.minutes * 60.0 if args.minutes else None)
    calib = min(args.calibrate_steps, args.warmup)
    log(f"model {n_params / 1e6:.2f} M params; batch {args.batch_size} x {args.image_size}px; lr {args.lr}; "
        f"steps {total or 'from speed'}; target {args.minutes or '-'} min; cap {cap / 60 if cap else '-'} min; "
        f"amp {args.amp}; shared prefix {args.shared_prefix}; threads {torch.get_num_threads()}; "
        f"device {device}; workers {args.workers}")

    def jlog_write(line: str) -> None:  # reopened per line: the folder is swapped at every checkpoint
        with open(out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(line)
    plain_args = {k: v for k, v in vars(args).items() if k != "func"}

    def state() -> dict[str, Any]:
        return {"optimizer": opt.state_dict(), "step": step, "elapsed": elapsed, "total": total,
                "torch_rng": torch.get_rng_state(), "args": plain_args}

    def do_eval(tag: str) -> dict[str, Any]:
        m = evaluate(model, processor, args.val, spec, max_new_tokens=args.eval_max_new_tokens,
                     limit=args.eval_limit)
        rec = {"event": "eval", "tag": tag, "step": step, "train_minutes": round(elapsed / 60, 2), **m}
        jlog_write(json.dumps(rec) + "\n")
        log(f"eval step {step} ({elapsed / 60:.1f} min): AP50 {m['ap50']:.3f} parse {m['parse_rate']:.2f} "
            f"strict {m['parse_rate_strict']:.2f} count {m['count_exact']:.2f} mIoU {m['mean_iou_matched']:.3f} "
            f"({m['eval_seconds']:.0f} s) | {m['examples'][0][:160]}")
        return rec

    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else None
    feed = None  # the batch iterator, started at the first step
    last_ckpt = elapsed
    last_eval = elapsed
    losses: list[float] = []
    step_times: list[float] = []
    t_log = time.perf_counter()
    while True:
        if total and step >= total:
            break
        if args.stop_at and step >= args.stop_at:
            log(f"stopping at step {step} of {total} (--stop-at)")
            break
        if cap and elapsed >= cap:
            log(f"hard time cap reached at step {step} of {total}")
            break
        if not total and step >= calib:
            # speed from the steps after the first few (start-up), projected to the target minutes
            per_step = float(np.median(step_times[min(5, len(step_times) - 1):]))
            total = max(args.warmup + 1, int((args.minutes * 60.0 - elapsed) / per_step) + step)
            log(f"calibrated: {per_step:.2f} s/step -> {total} steps for {args.minutes} min "
                f"(rebuild with --steps {total})")
            jlog_write(json.dumps({"event": "calibrated", "step": step, "s_per_step": round(per_step, 3),
                                   "total_steps": total}) + "\n")
        t0 = time.perf_counter()
        if feed is None:  # open-ended while the total is still being calibrated; batches depend only on the step
            feed = batches(processor, spec, args, step, args.stop_at or total or step + 10 ** 9)
        batch = next(feed)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        progress = (step - args.warmup) / max(total - args.warmup, 1) if total else 0.0
        lr = args.lr * lr_factor(step, args.warmup, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        if amp is not None:
            with amp:
                loss = causal_lm_loss(model, batch, args.shared_prefix)
        else:
            loss = causal_lm_loss(model, batch, args.shared_prefix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        step_times.append(time.perf_counter() - t0)
        elapsed += step_times[-1]
        losses.append(loss.item())  # also the sync point: step_times are real on an accelerator
        if step % args.log_every == 0 or step == 1:
            dt = (time.perf_counter() - t_log) / (args.log_every if step > 1 else 1)
            t_log = time.perf_counter()
            rec = {"event": "train", "step": step, "loss": round(float(np.mean(losses)), 4), "lr": lr,
                   "grad_norm": round(float(gnorm), 3), "s_per_step": round(dt, 3),
                   "train_minutes": round(elapsed / 60, 2)}
            jlog_write(json.dumps(rec) + "\n")
            log(f"step {step} loss {rec['loss']:.4f} lr {lr:.2e} gnorm {rec['grad_norm']:.2f} "
                f"{dt:.2f} s/step {elapsed / 60:.1f} min")
            losses = []
        if args.ckpt_every_min and elapsed - last_ckpt >= args.ckpt_every_min * 60:
            save_checkpoint(model, src, out, state())
            last_ckpt = elapsed
            log(f"checkpoint at step {step}")
        if args.eval_every_min and elapsed - last_eval >= args.eval_every_min * 60:
            do_eval("periodic")
            last_eval = elapsed
    save_checkpoint(model, src, out, state())
    log(f"saved {out} at step {step} ({elapsed / 60:.1f} training minutes)")
    if args.val and args.final_eval:
        do_eval("final")
    with open(out / "training.json", "w", encoding="utf-8") as f:
        json.dump({"steps": step, "total_steps": total, "train_minutes": round(elapsed / 60, 2), "params": n_params,
                   "rebuild": rebuild_command(args, total, step),
                   "args": plain_args, "demo_size": DEMO_SIZE, "num_merges": DEMO_NUM_MERGES}, f, indent=2)
    return 0


def rebuild_command(args, total: int, step: int) -> str:
    """The command that redoes this run step for step (the speed-calibrated total made explicit; a run
    cut by the time cap becomes --stop-at)."""
    parts = ["python -m coordexp.train_demo train --out OUT", f"--seed {args.seed}", f"--steps {total}"]
    if step < total:
        parts.append(f"--stop-at {step}")
    defaults = {"batch_size": 32, "image_size": 128, "lr": 3e-3, "weight_decay": 0.01, "warmup": 50,
                "grad_clip": 1.0, "amp": "none", "threads": 2, "device": "cpu"}
    for k, d in defaults.items():
        v = getattr(args, k)
        if v != d:
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def cmd_eval(args) -> int:
    import torch

    from coordexp.processor import CoordExpProcessor

    torch.set_num_threads(args.threads)
    processor = CoordExpProcessor.from_pretrained(args.ckpt)
    model = load_model(args.ckpt, args.dtype).to(args.device)
    m = evaluate(model, processor, args.data, PromptSpec(), max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, limit=args.limit, predictions_out=args.predictions)
    m["ckpt"] = args.ckpt
    m["dtype"] = args.dtype
    print(json.dumps(m, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(m, f, indent=2)
    return 0


def cmd_export(args) -> int:
    """Copy a trained checkpoint (weights cast to --dtype) without the training files."""
    src = Path(args.ckpt)
    out = Path(args.out)
    model = load_model(src)
    save_checkpoint(model, src, out, None, dtype=args.dtype)
    if args.dtype != "float32" and args.compute_dtype:
        # stored in half precision, computed in float32: a plain from_pretrained (dtype "auto") then
        # upcasts instead of running float16/bfloat16 matmuls on a CPU.
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["dtype"] = args.compute_dtype
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in ("training.json",):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(f"wrote {out} ({args.dtype}, {size / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordexp.train_demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train (or --resume) the demo checkpoint")
    t.add_argument("--out", default="runs/demo_ckpt")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=0, help="total steps (the cosine runs over them)")
    t.add_argument("--minutes", type=float, default=0.0,
                   help="target training minutes: without --steps, the total is set from the measured speed")
    t.add_argument("--max-minutes", type=float, default=0.0,
                   help="hard cap on training minutes (default 1.5 x --minutes; none without --minutes)")
    t.add_argument("--stop-at", type=int, default=0,
                   help="stop after this step (the schedule still runs over --steps): redoes a run cut by the cap")
    t.add_argument("--calibrate-steps", type=int, default=20, help="steps timed before fixing the total")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--image-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--amp", choices=("bf16", "none"), default="none",
                   help="bf16 autocast: faster only on CPUs with native bf16 (AVX512-BF16/AMX); far slower here")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    t.add_argument("--workers", type=int, default=0,
                   help="processes that build batches ahead (0: inline; the data is the same either way)")
    t.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="run the shared prompt prefix per row (same loss, about 2x slower)")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--ckpt-every-min", type=float, default=5.0)
    t.add_argument("--eval-every-min", type=float, default=0.0, help="0: no periodic evaluation")
    t.add_argument("--val", default="data/demo_val/val.jsonl")
    t.add_argument("--eval-limit", type=int, default=50)
    t.add_argument("--eval-max-new-tokens", type=int, default=160)
    t.add_argument("--no-final-eval", dest="final_eval", action="store_false")
    t.add_argument("--resume", action="store_true", help="continue --out from its train_state.pt")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=train)

    e = sub.add_parser("eval", help="greedy AP50 / parse rate of a checkpoint on an input JSONL")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", default="data/demo_val/val.jsonl")
    e.add_argument("--max-new-tokens", type=int, default=160)
    e.add_argument("--batch-size", type=int, default=25)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--device", default="cpu")
    e.add_argument("--predictions", default=None, help="also write predictions.jsonl here")
    e.add_argument("--json", default=None, help="also write the metrics here")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="copy a trained checkpoint, weights cast to --dtype")
    x.add_argument("--ckpt", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--dtype", default="float16", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the stored weights (float16 keeps greedy outputs closest to float32)")
    x.add_argument("--compute-dtype", default="float32",
                   help="dtype written to config.json, i.e. what dtype='auto' loads as ('' keeps --dtype)")
    x.set_defaults(func=cmd_export)

    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
