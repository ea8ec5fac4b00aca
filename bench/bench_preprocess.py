"""Preprocessing benchmark: encoded image bytes -> pixel values, images/s per core, and what the fast
path and JPEG draft decoding do to the generated tokens.

    python bench/bench_preprocess.py [--reps 7] [--val data/demo_val/val.jsonl] [--records 50]
        [--onnx runs/demo/model_repository/llm/1/onnx] [--max-new-tokens 160] [--json OUT.json]

1. Speed. Synthetic photograph-like JPEGs (gradients + noise, quality 90) at 640x480, 1920x1080
   and 4032x3024, through each path, JPEG decoding included (the served `preprocess` receives
   bytes):
   - `hf`: `Image.open(...).convert("RGB")` + the Hugging Face image processor our processor wraps
     (`Qwen2VLImageProcessorPil`); `hf_torchvision`: its torchvision ("fast") variant, only when
     torchvision is installed;
   - `ours`: `CoordExpProcessor.load_image` + `coordexp.image_prep` (bit-identical values);
   - `ours_draft`: the same with JPEG draft decoding (`load_image(draft=True)`);
   - `decode_resize`: only the full JPEG decode + the PIL resize, the floor of any path whose
     pixels are identical (both are the same libjpeg / PIL calls HF's path makes);
   - `step_hf`, `step_ours` (demo settings): the whole served `preprocess` step
     (`Preprocessor.encode`: bytes check, decode, pixels, prompt tokens) without / with the fast path.
   Three image-processor settings: `demo` (the demo checkpoint's: what the served demo runs, a
   65,536-pixel budget), `qwen3_vl` and `qwen2_5_vl` (the released checkpoints' settings: patch
   16 / 14, budgets of 16.8 M / 12.8 M pixels, so large images are barely resized). numpy /
   BLAS / ONNX Runtime threads are pinned to 1 and each call is timed in CPU time of this process
   (`time.process_time`), so the figures are images/s per core and robust on a shared machine;
   repetitions interleave all paths; the median is reported.
2. Identity. Over the demo validation set (`--records` images) and every synthetic image above:
   `ours` pixel values == `hf` (`identical_pixels`, `max_abs_pixel_diff`), and greedy tokens of
   the demo ONNX export (`OnnxEngine`) with the fast path == with the HF processor
   (`identical_tokens`).
3. Draft decoding. The demo images are small PNGs (draft does not apply), so the demo
   validation images are upscaled to 1024x1024, 1920x1080 and 4032x3024 and saved as JPEG
   (quality 90); for each, the pixel difference of draft vs full decode, and the share of
   records whose greedy tokens are identical (draft margin 2, the default, and margin 1).

`--json OUT.json` writes `images_per_s_ratio_1080p` (ours / hf at 1920x1080 with the served demo
settings, same run), `images_per_s_ratio_1080p_by_settings`, `images_per_s_ratio_1080p_draft`,
`identical_tokens`, `identical_pixels`, `max_abs_pixel_diff`, `draft` and the full table.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # per core: before numpy is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CKPT = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")
DEMO_ONNX = os.path.join(REPO_ROOT, "runs", "demo", "model_repository", "llm", "1", "onnx")
DEMO_VAL = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")
SIZES = [(640, 480), (1920, 1080), (4032, 3024)]
DRAFT_SIZES = [(1024, 1024), (1920, 1080), (4032, 3024)]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photograph-like JPEG: smooth colour gradients, a few soft blobs, sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    img = np.stack([200 * u + 30, 180 * v + 40, 120 * (1 - u) * v + 60], -1)
    for _ in range(6):
        cx, cy, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
        blob = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-90, 90, 3)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def settings() -> dict[str, Any]:
    from transformers import Qwen2VLImageProcessorPil

    return {
        "demo": Qwen2VLImageProcessorPil.from_pretrained(DEMO_CKPT),
        "qwen3_vl": Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                             min_pixels=65536, max_pixels=16777216),
        "qwen2_5_vl": Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                               min_pixels=3136, max_pixels=12845056),
    }


def torchvision_variant(ip) -> Any | None:
    """The HF torchvision image processor with the same settings, when torchvision is installed."""
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor
    except ImportError:
        return None
    return Qwen2VLImageProcessor(**{k: getattr(ip, k) for k in (
        "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")}, size=dict(ip.size))


def paths_for(proc, tv) -> dict[str, Callable[[bytes], Any]]:
    """name -> bytes -> pixel_values, for one processor (the HF ones first)."""
    from PIL import Image

    ip, plan = proc.image_processor, proc.image_plan

    def hf(data: bytes):
        return ip(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors=None)["pixel_values"]

    out: dict[str, Callable[[bytes], Any]] = {"hf": hf}
    if tv is not None:
        out["hf_torchvision"] = lambda data: tv(Image.open(io.BytesIO(data)).convert("RGB"),
                                                return_tensors="np")["pixel_values"]
    out["ours"] = lambda data: plan([proc.load_image(data)])[0]
    out["ours_draft"] = lambda data: plan([proc.load_image(data, draft=True)])[0]
    # the part no identical path can skip: the full JPEG decode and the same PIL resize
    out["decode_resize"] = lambda data: plan.resized(proc.load_image(data))
    return out


def step_paths(proc) -> dict[str, Callable[[bytes], Any]]:
    """The whole served `preprocess` step (bytes check, decode, pixels, prompt tokens), with the
    HF image processor and with the fast path."""
    from coordexp.processor import CoordExpProcessor
    from coordexp.prompt import PromptSpec
    from coordexp.serving.preprocess import Preprocessor

    slow = CoordExpProcessor(proc.tokenizer, proc.image_processor, chat_template=proc.chat_template)
    slow.image_plan = None
    hf, ours = Preprocessor(slow, PromptSpec()), Preprocessor(proc, PromptSpec())
    return {"step_hf": lambda data: hf.encode([data]), "step_ours": lambda data: ours.encode([data])}


def speed(procs: dict[str, Any], reps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Interleaved repetitions: per rep, every size x setting x path once (path order rotated)."""
    images = {size: photo_jpeg(*size, seed=i) for i, size in enumerate(SIZES)}
    table = {(s, name): {**paths_for(p, torchvision_variant(p.image_processor)),
                         **(step_paths(p) if name == "demo" else {})}
             for s in SIZES for name, p in procs.items()}
    times: dict[tuple, list[float]] = {}
    check: dict[str, Any] = {"identical_pixels": True, "max_abs_pixel_diff": 0.0}
    for (size, name), paths in table.items():  # warm-up, and the identity of the fast path's output
        for path in paths.values():
            path(images[size])
        ref = np.asarray(paths["hf"](images[size]))
        ours = paths["ours"](images[size])
        check["identical_pixels"] &= bool(ref.shape == ours.shape and np.array_equal(ref, ours))
        check["max_abs_pixel_diff"] = max(check["max_abs_pixel_diff"], float(np.abs(ref - ours).max()))
    for rep in range(reps):
        for (size, name), paths in table.items():
            order = list(paths)
            order = order[rep % len(order):] + order[:rep % len(order)]
            for path in order:
                t0 = time.process_time()
                paths[path](images[size])
                times.setdefault((size, name, path), []).append(time.process_time() - t0)
    rows = []
    for (size, name, path), ts in times.items():
        med = statistics.median(ts)
        rows.append({"size": f"{size[0]}x{size[1]}", "settings": name, "path": path, "median_ms": med * 1e3,
                     "images_per_s": 1.0 / med, "reps": len(ts)})
    return rows, check


def demo_records(path: str, n: int) -> list[bytes]:
    from coordexp.dataset import iter_dataset

    out = [item.image_bytes for item in iter_dataset(path) if item.ok]
    return out[:n]


def upscaled_jpeg(data: bytes, size: tuple[int, int], quality: int = 90) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB").resize(size, resample=Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def tokens(engine, images, params, batch: int = 8) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(images), batch):
        out += [r.token_ids for r in engine.generate_batch(images[i:i + batch], params)]
    return out


def token_checks(onnx_dir: str, records: list[bytes], max_new_tokens: int) -> dict[str, Any]:
    """Greedy tokens of the demo ONNX export: fast path vs HF on the demo val set; draft vs full
    decode on upscaled JPEG versions of the same images."""
    from coordexp.engines.onnx_engine import OnnxEngine
    from coordexp.generation import GenerationParams
    from coordexp.image_prep import decode_image

    engine = OnnxEngine(onnx_dir, threads=1)
    proc = engine.processor
    plan = proc.image_plan
    if plan is None:
        raise SystemExit(f"{onnx_dir}: its image processor has no fast path; nothing to compare")
    params = GenerationParams(max_new_tokens=max_new_tokens)
    pil = [proc.load_image(d) for d in records]
    fast = tokens(engine, pil, params)
    pixels_equal, max_diff = True, 0.0
    for im in pil:
        ours = plan([im])[0]
        ref = np.asarray(proc.image_processor(im, return_tensors=None)["pixel_values"])
        pixels_equal &= bool(np.array_equal(ours, ref))
        max_diff = max(max_diff, float(np.abs(ours - ref).max()))
    proc.image_plan = None  # the same engine through the HF image processor
    try:
        slow = tokens(engine, pil, params)
    finally:
        proc.image_plan = plan
    res: dict[str, Any] = {"records": len(records), "identical_tokens": fast == slow,
                           "identical_pixels": pixels_equal, "max_abs_pixel_diff": max_diff,
                           "answer_tokens_mean": float(np.mean([len(t) for t in fast])), "draft": {}}
    for size in DRAFT_SIZES:
        jpegs = [upscaled_jpeg(d, size) for d in records]
        full = [proc.load_image(j) for j in jpegs]
        full_tokens = tokens(engine, full, params)
        entry: dict[str, Any] = {}
        for margin in (2, 1):
            drafted = [decode_image(j, proc.processing_size, draft=True, resample=plan.resample, draft_margin=margin)
                       for j in jpegs]
            diffs = [np.abs(plan([a])[0] - plan([b])[0]) for a, b in zip(full, drafted)]
            draft_tokens = tokens(engine, drafted, params)
            same = [a == b for a, b in zip(full_tokens, draft_tokens)]
            entry[f"margin_{margin}"] = {
                "decoded_at": "x".join(map(str, _drafted_size(jpegs[0], proc, margin))),
                "max_abs_pixel_diff": float(max(d.max() for d in diffs)),
                "mean_abs_pixel_diff": float(np.mean([d.mean() for d in diffs])),
                "identical_token_records": int(sum(same)), "records": len(same),
                "identical_tokens": all(same)}
        res["draft"][f"{size[0]}x{size[1]}"] = entry
    return res


def _drafted_size(jpeg: bytes, proc, margin: int) -> tuple[int, int]:
    """The size draft mode decodes this JPEG at (before the final resize)."""
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg))
    target = proc.processing_size(*img.size)
    want = (target[0] * margin, target[1] * margin)
    if want[0] > img.size[0] // 2 or want[1] > img.size[1] // 2:
        return img.size
    img.draft("RGB", want)
    return img.size


def print_table(rows: list[dict[str, Any]]) -> None:
    paths = list(dict.fromkeys(r["path"] for r in rows))
    cell = {(r["size"], r["settings"], r["path"]): r["images_per_s"] for r in rows}
    head = f"{'size':>10} {'settings':>10} " + " ".join(f"{p:>13}" for p in paths) + \
        f" {'ours/hf':>8} {'draft/hf':>8} {'floor/hf':>8}"
    print("images/s per core (median CPU time per image, JPEG decoding included)")
    print(head)
    print("-" * len(head))
    for size, name in dict.fromkeys((r["size"], r["settings"]) for r in rows):
        vals = [cell.get((size, name, p)) for p in paths]
        hf = cell[(size, name, "hf")]
        print(f"{size:>10} {name:>10} " + " ".join(f"{v:13.1f}" if v else f"{'-':>13}" for v in vals) +
              "".join(f" {cell[(size, name, p)] / hf:8.2f}" for p in ("ours", "ours_draft", "decode_resize")))
    print("floor = decode_resize: the full JPEG decode + PIL resize every identical path has to run")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--val", default=DEMO_VAL)
    ap.add_argument("--records", type=int, default=50)
    ap.add_argument("--onnx", default=DEMO_ONNX)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--skip-tokens", action="store_true", help="speed only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, REPO_ROOT)
    from coordexp.processor import CoordExpProcessor

    base = CoordExpProcessor.from_pretrained(DEMO_CKPT)
    procs = {name: CoordExpProcessor(base.tokenizer, ip, chat_template=base.chat_template)
             for name, ip in settings().items()}
    rows, check = speed(procs, args.reps)
    print_table(rows)

    def ratio(size: str, name: str, path: str) -> float:
        cell = {(r["size"], r["settings"], r["path"]): r["images_per_s"] for r in rows}
        return cell[(size, name, path)] / cell[(size, name, "hf")]

    out: dict[str, Any] = {
        "images_per_s_ratio_1080p": ratio("1920x1080", "demo", "ours"),
        "images_per_s_ratio_1080p_by_settings": {n: ratio("1920x1080", n, "ours") for n in procs},
        "images_per_s_ratio_1080p_draft": {n: ratio("1920x1080", n, "ours_draft") for n in procs},
        "images_per_s_ratio_1080p_floor": {n: ratio("1920x1080", n, "decode_resize") for n in procs},
        "images_per_s_ratio_1080p_served_step": ratio("1920x1080", "demo", "step_ours") / ratio(
            "1920x1080", "demo", "step_hf"),
        "identical_pixels": check["identical_pixels"], "max_abs_pixel_diff": check["max_abs_pixel_diff"],
        "per_core": "threads pinned to 1, CPU time of the process", "table": rows,
    }
    print(f"\nimages/s ratio at 1920x1080, ours / hf: {out['images_per_s_ratio_1080p']:.2f} (demo settings); "
          + ", ".join(f"{n} {v:.2f}" for n, v in out["images_per_s_ratio_1080p_by_settings"].items())
          + "; with draft: " + ", ".join(f"{n} {v:.2f}" for n, v in out["images_per_s_ratio_1080p_draft"].items()))
    if not args.skip_tokens:
        tok = token_checks(args.onnx, demo_records(args.val, args.records), args.max_new_tokens)
        out["identical_tokens"] = tok["identical_tokens"]
        out["identical_pixels"] = out["identical_pixels"] and tok["identical_pixels"]
        out["max_abs_pixel_diff"] = max(out["max_abs_pixel_diff"], tok["max_abs_pixel_diff"])
        out["tokens"] = {k: v for k, v in tok.items() if k != "draft"}
        out["draft"] = tok["draft"]
        print(f"\ndemo val ({tok['records']} records, ONNX export, greedy): identical tokens fast vs HF: "
              f"{tok['identical_tokens']}; identical pixels: {out['identical_pixels']} "
              f"(max |diff| {out['max_abs_pixel_diff']:g})")
        print(f"{'draft, upscaled JPEG':>22} {'margin':>6} {'decoded at':>11} {'max|dpx|':>9} {'mean|dpx|':>9} "
              f"{'same tokens':>12}")
        for size, entry in tok["draft"].items():
            for margin, e in entry.items():
                print(f"{size:>22} {margin[-1]:>6} {e['decoded_at']:>11} {e['max_abs_pixel_diff']:9.4f} "
                      f"{e['mean_abs_pixel_diff']:9.4f} {e['identical_token_records']:>6}/{e['records']:<5}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
