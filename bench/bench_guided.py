"""Guided decoding benchmark: how often answers parse without repair, without and with guidance,
and what the mask costs per token.

    python bench/bench_guided.py [--demo-ckpt checkpoints/coordexp-demo-shapes] [--images 16]
        [--tiny-max-new-tokens 64] [--demo-max-new-tokens 40] [--threads 1] [--json out.json]

In one run, with the PyTorch reference engine (the ONNX engines use the same mask code):

1. tiny random checkpoint (`coordexp.fixtures.tiny.build_tiny_checkpoint`, built here): the share of
   outputs that parse without repair (`ParseResult.error is None` and no repairs), unguided vs
   guided, over --images noise images x (greedy + sampling at temperature 1.0 with 3 seeds);
2. the demo checkpoint (trained on synthetic shapes), greedy on synthetic validation images, at a
   deliberately short --demo-max-new-tokens (answers are cut) and at --demo-full-tokens (room to
   finish): the same share, the mean number of predictions, and how many guided answers were
   closed early; skipped with a note when the checkpoint is not there;
3. the cost of the mask in ms per generated token: time inside the guided processor (grammar
   mask + budget planner + duplicate check + applying it) per masked row-step, and the decode
   time per token unguided vs guided; plus applying a mask to a Qwen-size vocabulary (151,936),
   the part of the cost that grows with the vocabulary. Times are CPU time of this process
   (`time.process_time`, robust on a shared machine) with wall clock alongside.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEMO = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")


def noise_images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(128, 128), (160, 96), (96, 160), (100, 100)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 4][1], sizes[i % 4][0], 3), dtype=np.uint8))
            for i in range(n)]


def shapes_images(n: int, seed: int = 12345):
    from coordexp.fixtures.synthetic import record_rng, sample

    return [sample(record_rng(seed, "val", i), 128)[0] for i in range(n)]


def run(engine, images, params, batch: int = 4) -> dict[str, Any]:
    """Generate for all images; parse; count clean answers, preds, closed-early rows, mask time."""
    from coordexp.parser import parse_model_output

    clean = n = preds = closed = tokens = 0
    ids: list[list[int]] = []
    mask_s = mask_cpu = 0.0
    mask_steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        results = engine.generate_batch(images[i:i + batch], params)
        guided = getattr(engine, "guided", None)
        if guided is not None:
            mask_s += guided.state.mask_s
            mask_cpu += guided.state.mask_cpu_s
            mask_steps += guided.state.masked_steps
        for r in results:
            p = parse_model_output(r.text)
            n += 1
            clean += int(p.error is None and not p.repairs)
            preds += len(p.preds)
            closed += int(bool(r.extra.get("guided_closed_early")))
            tokens += len(r.token_ids)
            ids.append(list(r.token_ids))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": n, "clean": clean, "clean_share": clean / n if n else 0.0, "mean_preds": preds / n if n else 0.0,
            "closed_early": closed, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "mask_s": mask_s,
            "mask_cpu_s": mask_cpu, "mask_steps": mask_steps,
            "ids": ids}


def sweep(engine, images, max_new: int, settings: Sequence[tuple[float, int]], guided: bool) -> dict[str, Any]:
    from coordexp.generation import GenerationParams

    parts = [run(engine, images, GenerationParams(max_new_tokens=max_new, temperature=t, seed=s, guided=guided))
             for t, s in settings]
    total = {k: sum(p[k] for p in parts) for k in ("n", "clean", "closed_early", "tokens", "wall_s", "cpu_s",
                                                     "mask_s", "mask_cpu_s", "mask_steps")}
    total["clean_share"] = total["clean"] / total["n"]
    total["mean_preds"] = sum(p["mean_preds"] * p["n"] for p in parts) / total["n"]
    per_tok = 1000 / max(1, total["tokens"])
    total["wall_ms_per_token"], total["cpu_ms_per_token"] = total["wall_s"] * per_tok, total["cpu_s"] * per_tok
    per_step = 1000 / max(1, total["mask_steps"])
    total["mask_wall_ms_per_token"] = total["mask_s"] * per_step if total["mask_steps"] else None
    total["mask_cpu_ms_per_token"] = total["mask_cpu_s"] * per_step if total["mask_steps"] else None
    total["ids"] = [row for p in parts for row in p["ids"]]
    return total


def same_share(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Share of answers that are token for token the same in both runs."""
    return sum(x == y for x, y in zip(a["ids"], b["ids"])) / max(1, len(a["ids"]))


def apply_cost_at(vocab: int, reps: int = 200) -> dict[str, float]:
    """ms to apply one row's bitmask to float32 logits of `vocab` as `GuidedBatch.mask` does
    (unpack + np.copyto where), next to xgrammar's own CPU kernel, and to list the allowed ids
    (what the planner adds on its tight steps)."""
    import torch
    import xgrammar as xgr

    logits = torch.randn(1, vocab)
    arr = logits.numpy()
    bm = xgr.allocate_token_bitmask(1, vocab)
    bm[0, : bm.shape[1] // 2] = 0

    def ours() -> None:
        bits = np.unpackbits(bm[0].numpy().view(np.uint8), bitorder="little")[:vocab].view(bool)
        np.copyto(arr[0], -np.inf, where=~bits)
    def timed(fn) -> tuple[float, float]:
        fn()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            fn()
        return 1000 * (time.perf_counter() - t0) / reps, 1000 * (time.process_time() - c0) / reps

    apply_ms, apply_cpu = timed(ours)
    xgr_ms, xgr_cpu = timed(lambda: xgr.apply_token_bitmask_inplace(logits, bm))
    unpack_ms, unpack_cpu = timed(
        lambda: np.flatnonzero(np.unpackbits(bm[0].numpy().view(np.uint8), bitorder="little")[:vocab]))
    return {"vocab": vocab, "apply_ms": apply_ms, "apply_cpu_ms": apply_cpu, "xgrammar_kernel_cpu_ms": xgr_cpu,
            "unpack_ms": unpack_ms, "unpack_cpu_ms": unpack_cpu}


def fmt_share(r: dict[str, Any]) -> str:
    return f"{100 * r['clean_share']:5.1f}% ({r['clean']}/{r['n']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-ckpt", default=DEFAULT_DEMO)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--tiny-max-new-tokens", type=int, default=64)
    ap.add_argument("--demo-max-new-tokens", type=int, default=40, help="deliberately short: answers get cut")
    ap.add_argument("--demo-full-tokens", type=int, default=160, help="room to finish (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        print("xgrammar is not installed: pip install --no-deps 'xgrammar>=0.2.8,<0.3' 'apache-tvm-ffi>=0.1.11'")
        return 2
    import torch
    import transformers

    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    report: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__,
                              "transformers": transformers.__version__, "images": args.images}
    settings = [(0.0, 0), (1.0, 0), (1.0, 1), (1.0, 2)]
    print(f"# guided decoding bench (torch reference engine, {args.threads} thread(s), {args.images} images)")

    # 1. tiny random checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny")
        build_tiny_checkpoint(ckpt, family="qwen3_vl", seed=0)
        engine = TorchEngine(ckpt, threads=args.threads)
        imgs = noise_images(args.images)
        tiny = {"off": sweep(engine, imgs, args.tiny_max_new_tokens, settings, False),
                "on": sweep(engine, imgs, args.tiny_max_new_tokens, settings, True)}
    report["tiny"] = {"max_new_tokens": args.tiny_max_new_tokens, "decoding": "greedy + T=1.0 seeds 0,1,2", **tiny}
    print(f"\n## 1. tiny random checkpoint, max_new_tokens={args.tiny_max_new_tokens}, greedy + sampling T=1.0 x3")
    print(f"parse without repair   unguided {fmt_share(tiny['off'])}   guided {fmt_share(tiny['on'])}")
    print(f"mean preds             unguided {tiny['off']['mean_preds']:.2f}   guided {tiny['on']['mean_preds']:.2f}")
    print(f"closed early (guided)  {tiny['on']['closed_early']}/{tiny['on']['n']}")

    # 2. demo checkpoint
    demo: dict[str, Any] = {"checkpoint": args.demo_ckpt}
    print(f"\n## 2. demo checkpoint {args.demo_ckpt}")
    if not os.path.isfile(os.path.join(args.demo_ckpt, "config.json")):
        demo["skipped"] = "checkpoint not found"
        print("   not found: skipped (train it: python -m coordexp.demo.train ..., see coordexp/demo/train.py)")
    else:
        engine = TorchEngine(args.demo_ckpt, threads=args.threads)
        imgs = shapes_images(args.images)
        budgets = [args.demo_max_new_tokens] + ([args.demo_full_tokens] if args.demo_full_tokens else [])
        for budget in budgets:
            res = {"off": sweep(engine, imgs, budget, [(0.0, 0)], False),
                   "on": sweep(engine, imgs, budget, [(0.0, 0)], True)}
            demo[str(budget)] = res
            print(f"max_new_tokens={budget:<4} parse without repair   unguided {fmt_share(res['off'])}   "
                  f"guided {fmt_share(res['on'])}   mean preds {res['off']['mean_preds']:.2f} -> "
                  f"{res['on']['mean_preds']:.2f}   closed early {res['on']['closed_early']}/{res['on']['n']}")
            res["same_as_unguided"] = same_share(res["off"], res["on"])
            print(f"{'':20} guided answer identical to the unguided one: {100 * res['same_as_unguided']:.1f}%")
            print(f"{'':20} decode CPU ms/token unguided {res['off']['cpu_ms_per_token']:.2f}   guided "
                  f"{res['on']['cpu_ms_per_token']:.2f} (of which the mask {res['on']['mask_cpu_ms_per_token']:.3f})"
                  f"   wall ms/token {res['off']['wall_ms_per_token']:.2f} / {res['on']['wall_ms_per_token']:.2f}")
    report["demo"] = demo

    # 3. cost of the mask
    masks = [tiny["on"]] + [demo[k]["on"] for k in demo if isinstance(demo[k], dict) and "on" in demo[k]]
    steps = sum(m["mask_steps"] for m in masks)
    mask_cpu = 1000 * sum(m["mask_cpu_s"] for m in masks) / max(1, steps)
    mask_wall = 1000 * sum(m["mask_s"] for m in masks) / max(1, steps)
    big = apply_cost_at(151_936)
    report["cost"] = {"mask_cpu_ms_per_token": mask_cpu, "mask_wall_ms_per_token": mask_wall,
                      "masked_row_steps": steps, "qwen_vocab_apply": big}
    print("\n## 3. cost of the mask (grammar + budget planner + duplicate check + applying it)")
    print(f"vocab {len(engine.processor.tokenizer)}: {mask_cpu:.3f} ms CPU per token ({mask_wall:.3f} ms wall), "
          f"{steps} masked row-steps")
    print(f"Qwen3-VL vocabulary ({big['vocab']}): applying one row's mask {big['apply_cpu_ms']:.3f} ms CPU "
          f"({big['apply_ms']:.3f} wall; xgrammar's CPU kernel {big['xgrammar_kernel_cpu_ms']:.3f}), listing the "
          f"allowed ids for the planner (last steps only) {big['unpack_cpu_ms']:.3f} ms CPU")
    for part in [tiny] + [v for v in demo.values() if isinstance(v, dict)]:
        for r in part.values():
            if isinstance(r, dict):
                r.pop("ids", None)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
