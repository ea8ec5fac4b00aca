"""Every engine path against the PyTorch reference on the demo val set, greedy, token for token.

    python bench/check_engines_agree.py [--ckpt checkpoints/coordexp-demo-shapes] [--data data/demo_val/val.jsonl]
        [--workdir /tmp/coordexp-engines-agree] [--max-new-tokens 160] [--json OUT.json]

Exports the checkpoint twice (ONNX; `--backend torch` on CPU in fp32, in flight), then compares with
HF `generate` (the reference), unguided and guided: in-process ONNX Runtime at batch 8, and each
repository served by Triton, unary and streamed, at concurrency 4. Prints one line per path
("50/50 identical"); exit 1 when any answer differs. Issue 26's "no behaviour change" check.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def served(url: str, images: list[bytes], params, model: str) -> list[list[int]]:
    from coordexp.engines.triton import ClientOptions, TritonEngine

    opts = ClientOptions(model=model, timeout=300.0, retries=0, max_in_flight=4)
    with TritonEngine.connect([url], opts) as engine:
        return [list(r.token_ids) for r in engine.generate_batch(images, params)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=os.path.join(ROOT, "checkpoints/coordexp-demo-shapes"))
    p.add_argument("--data", default=os.path.join(ROOT, "data/demo_val/val.jsonl"))
    p.add_argument("--workdir", default="/tmp/coordexp-engines-agree")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    from PIL import Image

    from coordexp import wire
    from coordexp.engines import load_engine
    from coordexp.export.build_engine import main as build
    from coordexp.generation import GenerationParams
    from coordexp.serving.server import start_server

    folder = os.path.dirname(a.data)
    records = [json.loads(line) for line in open(a.data, encoding="utf-8") if line.strip()]
    raw = [open(os.path.join(folder, r["images"][0]), "rb").read() for r in records]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in raw]
    modes = {g: GenerationParams(max_new_tokens=a.max_new_tokens, guided=g) for g in (False, True)}
    out: dict[str, list[list[int]]] = {}
    ref = load_engine("torch", a.ckpt, device="cpu", dtype="float32")
    for g, params in modes.items():
        out[f"reference guided={g}"] = [ref.generate_batch([im], params)[0].token_ids for im in pil]
    repos = {"onnx": os.path.join(a.workdir, "onnx_repo"), "torch": os.path.join(a.workdir, "torch_repo")}
    common = ["--ckpt", a.ckpt, "--max-new-tokens", str(a.max_new_tokens), "--force"]
    if build([*common, "--repo", repos["onnx"]]) or build([*common, "--repo", repos["torch"], "--backend", "torch",
                                                           "--device", "cpu", "--dtype", "fp32"]):
        return 2
    onnx = load_engine("onnx", repos["onnx"], threads=2)
    for g, params in modes.items():
        out[f"onnx in-process b8 guided={g}"] = [list(r.token_ids) for i in range(0, len(pil), 8)
                                                 for r in onnx.generate_batch(pil[i:i + 8], params)]
    for backend, repo in repos.items():
        srv = start_server(repo, extra_args=["--exit-timeout-secs=90"])
        try:
            for g, params in modes.items():
                out[f"{backend} served unary c4 guided={g}"] = served(srv.grpc_url, raw, params, wire.ENSEMBLE)
                out[f"{backend} served stream c4 guided={g}"] = served(srv.grpc_url, raw, params,
                                                                       wire.stream_ensemble_name(wire.ENSEMBLE))
        finally:
            srv.stop(timeout=100)
    report, bad = {}, 0
    for key, rows in out.items():
        want = out["reference guided=" + key.rsplit("=", 1)[1]]
        same = sum(x == y for x, y in zip(rows, want))
        report[key] = {"identical": same, "records": len(want), "tokens": sum(map(len, rows))}
        bad += same != len(want)
        print(f"{key:<36} {same}/{len(want)} identical to the reference, {report[key]['tokens']} tokens")
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
