"""Train the demo checkpoint: a tiny Qwen3-VL that really detects synthetic shapes (CPU or GPU).

    python -m coordexp.demo.train train --out runs/demo_ckpt --steps 1500 --minutes 45
    python -m coordexp.demo.train train --out runs/demo_ckpt --seed 0 --steps 4661 --stop-at 4455 \
        --device cuda --workers 4 --threads 1      # the bundled checkpoint (15 min on one H100)
    python -m coordexp.demo.train eval --ckpt runs/demo_ckpt --data data/demo_val/val.jsonl
    python -m coordexp.demo.train export --ckpt runs/demo_ckpt --out checkpoints/coordexp-demo-shapes --dtype float16

Recipe (docs: /work/shared/notes/demo-training.md): `coordexp.fixtures.tiny` builds the model (text hidden 256,
4 layers, 4 heads / 2 KV heads, FFN 768, mrope_section [12, 10, 10], tied embeddings; vision hidden
128, 3 layers, 4 heads, FFN 256, patch 8, merge 2, deepstack [0, 1]) from a seeded random init; every
step draws 32 fresh 128x128 images from `coordexp.fixtures.synthetic`; the inputs are built by
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

Parts: `train_data` (batches, loss, schedule), `train_eval` (the quick evaluation: AP via
`coordexp.eval`); this module holds checkpoint I/O, the training loop and the CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from coordexp.demo.train_data import (  # re-exported (see __all__)
    TRAIN_SPLIT,
    StepBatches,
    batches,
    causal_lm_loss,
    draw_batch,
    lr_factor,
    make_batch,
    prefix_length,
)
from coordexp.demo.train_eval import ap_at, evaluate  # re-exported
from coordexp.prompt import PromptSpec

__all__ = [
    "DEMO_NUM_MERGES", "DEMO_SIZE", "LOG_FILE", "MODEL_FILES", "STATE_FILE", "TRAIN_SPLIT", "StepBatches", "Trainer",
    "ap_at", "batches", "build_init", "causal_lm_loss", "cmd_eval", "cmd_export", "copy_processor_files",
    "draw_batch", "evaluate", "load_model", "lr_factor", "main", "make_batch", "prefix_length", "rebuild_command",
    "save_checkpoint", "train",
]

DEMO_SIZE: dict[str, Any] = dict(
    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, head_dim=64, text_intermediate=768,
    mrope_section=[12, 10, 10], tie_word_embeddings=True,
    vision_hidden=128, vision_layers=3, vision_heads=4, vision_intermediate=256,
    patch_size=8, merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1],
    init_std=0.02,
)
DEMO_NUM_MERGES = 700
MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json")
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------------ model

def build_init(out_dir: str | Path, seed: int) -> Path:
    """The seeded random demo-size checkpoint (tokenizer, processor files, model) in `out_dir`."""
    from coordexp.fixtures.tiny import build_tiny_checkpoint

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


# ------------------------------------------------------------------------------------------------ training

def _setup_torch(args):
    """Threads and the device; on CUDA deterministic kernels and no TF32. Returns the torch device."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # same seed + same GPU model -> same run: deterministic kernels, no TF32
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


class Trainer:
    """One training run: the model, optimizer and counters (step, elapsed seconds, total steps)."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.out = Path(args.out)
        self.spec = PromptSpec()
        self.step, self.elapsed, self.total = 0, 0.0, args.steps
        self.plain_args = {k: v for k, v in vars(args).items() if k != "func"}

    def open(self) -> int:
        """Build (or resume) the checkpoint, model and optimizer; 0 when ready, else the exit code."""
        import torch

        from coordexp.processor import CoordExpProcessor

        args, out = self.args, self.out
        init_dir = out.with_name(out.name + ".init")
        resume = args.resume and (out / STATE_FILE).is_file()
        if resume:
            self.src = out
            log(f"resuming from {out}")
        else:
            if out.exists() and any(out.iterdir()) and not args.overwrite:
                log(f"{out} exists; pass --resume to continue it or --overwrite to start again")
                return 2
            log(f"building the seeded init checkpoint in {init_dir}")
            build_init(init_dir, args.seed)
            self.src = init_dir
        self.processor = CoordExpProcessor.from_pretrained(self.src)
        torch.manual_seed(args.seed)
        self.model = load_model(self.src).to(self.device)
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
        if resume:
            st = torch.load(out / STATE_FILE, weights_only=False, map_location=self.device)
            self.opt.load_state_dict(st["optimizer"])
            self.step, self.elapsed = st["step"], st["elapsed"]
            self.total = args.steps or st.get("total") or 0
            torch.set_rng_state(st["torch_rng"].cpu())
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / LOG_FILE).write_text("", encoding="utf-8")
        if not self.total and not args.minutes:
            log("give --steps and/or --minutes")
            return 2
        return 0

    def jlog_write(self, line: str) -> None:  # reopened per line: the folder is swapped at every checkpoint
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(line)

    def state(self) -> dict[str, Any]:
        import torch

        return {"optimizer": self.opt.state_dict(), "step": self.step, "elapsed": self.elapsed, "total": self.total,
                "torch_rng": torch.get_rng_state(), "args": self.plain_args}

    def do_eval(self, tag: str) -> dict[str, Any]:
        args = self.args
        m = evaluate(self.model, self.processor, args.val, self.spec, max_new_tokens=args.eval_max_new_tokens,
                     limit=args.eval_limit)
        rec = {"event": "eval", "tag": tag, "step": self.step, "train_minutes": round(self.elapsed / 60, 2), **m}
        self.jlog_write(json.dumps(rec) + "\n")
        log(f"eval step {self.step} ({self.elapsed / 60:.1f} min): AP50 {m['ap50']:.3f} parse {m['parse_rate']:.2f} "
            f"strict {m['parse_rate_strict']:.2f} count {m['count_exact']:.2f} mIoU {m['mean_iou_matched']:.3f} "
            f"({m['eval_seconds']:.0f} s) | {m['examples'][0][:160]}")
        return rec

    def _stop(self, cap: float | None) -> bool:
        args, step, total = self.args, self.step, self.total
        if total and step >= total:
            return True
        if args.stop_at and step >= args.stop_at:
            log(f"stopping at step {step} of {total} (--stop-at)")
            return True
        if cap and self.elapsed >= cap:
            log(f"hard time cap reached at step {step} of {total}")
            return True
        return False

    def _calibrate(self, step_times: list[float]) -> None:
        """Fix the total from the measured speed (the steps after the first few), for the target minutes."""
        import numpy as np

        args = self.args
        per_step = float(np.median(step_times[min(5, len(step_times) - 1):]))
        self.total = max(args.warmup + 1, int((args.minutes * 60.0 - self.elapsed) / per_step) + self.step)
        log(f"calibrated: {per_step:.2f} s/step -> {self.total} steps for {args.minutes} min "
            f"(rebuild with --steps {self.total})")
        self.jlog_write(json.dumps({"event": "calibrated", "step": self.step, "s_per_step": round(per_step, 3),
                                    "total_steps": self.total}) + "\n")

    def _optimize(self, batch, amp):
        """One optimizer step on `batch` at the scheduled learning rate; returns (lr, loss, grad norm)."""
        import torch

        args = self.args
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        progress = (self.step - args.warmup) / max(self.total - args.warmup, 1) if self.total else 0.0
        lr = args.lr * lr_factor(self.step, args.warmup, progress)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if amp is not None:
            with amp:
                loss = causal_lm_loss(self.model, batch, args.shared_prefix)
        else:
            loss = causal_lm_loss(self.model, batch, args.shared_prefix)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.opt.step()
        self.step += 1
        return lr, loss, gnorm

    def _log_train(self, losses: list[float], lr: float, gnorm, dt: float) -> None:
        import numpy as np

        rec = {"event": "train", "step": self.step, "loss": round(float(np.mean(losses)), 4), "lr": lr,
               "grad_norm": round(float(gnorm), 3), "s_per_step": round(dt, 3),
               "train_minutes": round(self.elapsed / 60, 2)}
        self.jlog_write(json.dumps(rec) + "\n")
        log(f"step {self.step} loss {rec['loss']:.4f} lr {lr:.2e} gnorm {rec['grad_norm']:.2f} "
            f"{dt:.2f} s/step {self.elapsed / 60:.1f} min")

    def run(self) -> int:
        """The training loop, then the final checkpoint, evaluation and training.json."""
        import torch

        args = self.args
        cap = args.max_minutes * 60.0 if args.max_minutes else (1.5 * args.minutes * 60.0 if args.minutes else None)
        calib = min(args.calibrate_steps, args.warmup)
        log(f"model {self.n_params / 1e6:.2f} M params; batch {args.batch_size} x {args.image_size}px; "
            f"lr {args.lr}; steps {self.total or 'from speed'}; target {args.minutes or '-'} min; "
            f"cap {cap / 60 if cap else '-'} min; amp {args.amp}; shared prefix {args.shared_prefix}; "
            f"threads {torch.get_num_threads()}; device {self.device}; workers {args.workers}")
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if args.amp == "bf16" else None
        feed = None  # the batch iterator, started at the first step
        last_ckpt = last_eval = self.elapsed
        losses: list[float] = []
        step_times: list[float] = []
        t_log = time.perf_counter()
        while not self._stop(cap):
            if not self.total and self.step >= calib:
                self._calibrate(step_times)
            t0 = time.perf_counter()
            if feed is None:  # open-ended while the total is still being calibrated; batches depend only on the step
                feed = batches(self.processor, self.spec, args, self.step,
                               args.stop_at or self.total or self.step + 10 ** 9)
            lr, loss, gnorm = self._optimize(next(feed), amp)
            step_times.append(time.perf_counter() - t0)
            self.elapsed += step_times[-1]
            losses.append(loss.item())  # also the sync point: step_times are real on an accelerator
            if self.step % args.log_every == 0 or self.step == 1:
                dt = (time.perf_counter() - t_log) / (args.log_every if self.step > 1 else 1)
                t_log = time.perf_counter()
                self._log_train(losses, lr, gnorm, dt)
                losses = []
            if args.ckpt_every_min and self.elapsed - last_ckpt >= args.ckpt_every_min * 60:
                save_checkpoint(self.model, self.src, self.out, self.state())
                last_ckpt = self.elapsed
                log(f"checkpoint at step {self.step}")
            if args.eval_every_min and self.elapsed - last_eval >= args.eval_every_min * 60:
                self.do_eval("periodic")
                last_eval = self.elapsed
        return self.finish()

    def finish(self) -> int:
        args, out = self.args, self.out
        save_checkpoint(self.model, self.src, out, self.state())
        log(f"saved {out} at step {self.step} ({self.elapsed / 60:.1f} training minutes)")
        if args.val and args.final_eval:
            self.do_eval("final")
        with open(out / "training.json", "w", encoding="utf-8") as f:
            json.dump({"steps": self.step, "total_steps": self.total, "train_minutes": round(self.elapsed / 60, 2),
                       "params": self.n_params, "rebuild": rebuild_command(args, self.total, self.step),
                       "args": self.plain_args, "demo_size": DEMO_SIZE, "num_merges": DEMO_NUM_MERGES}, f, indent=2)
        return 0


def train(args) -> int:
    trainer = Trainer(args, _setup_torch(args))
    return trainer.open() or trainer.run()


def rebuild_command(args, total: int, step: int) -> str:
    """The command that redoes this run step for step (the speed-calibrated total made explicit; a run
    cut by the time cap becomes --stop-at)."""
    parts = ["python -m coordexp.demo.train train --out OUT", f"--seed {args.seed}", f"--steps {total}"]
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
    p = argparse.ArgumentParser(prog="python -m coordexp.demo.train", description=__doc__.split("\n\n")[0])
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
