"""Group (Stage-A) benchmark: the upstream tool's way vs one image at a time vs the served run.

    python bench/bench_group.py [--ckpt CKPT --repo REPO | (default: tiny checkpoint, exported here)]
        [--url HOST:PORT] [--groups 8] [--max-new-tokens 32] [--threads 2] [--concurrency 8] [--json out.json]

One generated mission of `--groups` groups (3-12 synthetic images each), the same mission prompt
for every config, a FIXED output length (`ignore_eos`: exactly --max-new-tokens tokens per image):

  hf@1           HF `generate` (TorchEngine), one image at a time
  hf-group@8     HF `generate`, batches of up to 8 images within one group (upstream `--batch_size 8`)
  served@cN      `coordexp-client group`'s own path (`run_group_missions` + `ServedBackend`): every
                 image of every group spread over the server, N requests in flight, records written

Reported: images/s and groups/s per config, then served@cN vs hf-group@8 and vs hf@1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import prepare  # noqa: E402  (the tiny checkpoint + its export, shared with that bench)


def hf_rows(ckpt: str, prompt: Any, groups: list, params: Any, threads: int) -> list[dict[str, Any]]:
    """hf@1 and hf-group@8 on the same engine: the upstream tool's two settings."""
    import io

    from PIL import Image

    from coordexp.engines.torch_engine import TorchEngine
    from coordexp.group.backends import load_image

    engine = TorchEngine(ckpt, prompt=prompt, threads=threads)
    decoded = [[Image.open(io.BytesIO(load_image(p))).convert("RGB") for p in g.images] for g in groups]
    engine.generate_batch(decoded[0][:2], params)  # warm-up
    rows = []
    for name, batch in (("hf@1", 1), ("hf-group@8", 8)):
        t0, n, tokens = time.perf_counter(), 0, 0
        for images in decoded:  # a group at a time, batches never cross groups (the upstream tool)
            for i in range(0, len(images), batch):
                out = engine.generate_batch(images[i:i + batch], params)
                n, tokens = n + len(out), tokens + sum(len(r.token_ids) for r in out)
        rows.append(row(name, n, len(groups), tokens, time.perf_counter() - t0))
        print(fmt(rows[-1]), file=sys.stderr)
    return rows


def served_row(url: str, root: str, out: str, params: Any, concurrency: int, n_groups: int) -> dict[str, Any]:
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.group.backends import ServedBackend
    from coordexp.group.run import GroupRunOptions, run_group_missions

    with TritonEngine.connect([url], ClientOptions(timeout=300.0)) as engine:
        backend = ServedBackend(engine, params, concurrency)
        warm = GroupRunOptions(input_dir=root, output_dir=out + "-warmup", progress=False, pass_groups=1, seed=0)
        run_group_missions(warm, backend)
        t0 = time.perf_counter()
        result = run_group_missions(GroupRunOptions(input_dir=root, output_dir=out, progress=False), backend)
        wall = time.perf_counter() - t0
    (m,) = result["missions"].values()
    if not m["accounted"] or m["lines_errors"]:
        raise RuntimeError(f"served run: {m['lines_errors']} groups in the errors file, see {out}")
    tokens = m["images"] * params.max_new_tokens  # ignore_eos: exactly that many per image
    return row(f"served@c{concurrency}", m["images"], n_groups, tokens, wall)


def row(name: str, images: int, groups: int, tokens: int, wall: float) -> dict[str, Any]:
    return {"config": name, "images": images, "groups": groups, "tokens": tokens, "seconds": round(wall, 3),
            "images_per_s": images / wall, "groups_per_s": groups / wall}


def fmt(r: dict[str, Any]) -> str:
    return (f"{r['config']:<12} {r['images']:>4} images  {r['seconds']:8.2f} s  {r['images_per_s']:7.2f} images/s"
            f"  {r['groups_per_s']:6.2f} groups/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="HF checkpoint (default: build the tiny one)")
    p.add_argument("--repo", default=None, help="Triton repository exported from --ckpt (default: export here)")
    p.add_argument("--url", default=None, help="HOST:PORT of a running Triton serving --repo (default: start one)")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of HF generate")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from coordexp.generation import GenerationParams
    from coordexp.group.discover import discover
    from coordexp.group.profiles import load_profile
    from coordexp.fixtures.group_tree import MISSION_A, build_bench_tree
    from coordexp.prompt import PromptSpec
    from coordexp.serving.common import read_manifest

    workdir = tempfile.mkdtemp(prefix="coordexp-bench-group-")
    ckpt, repo = prepare(args, workdir)
    prompt = PromptSpec.from_dict(read_manifest(repo).get("prompt"))
    # the served model gets the mission's whole instruction as its user text: HF gets the same prompt
    prompt = dataclasses.replace(prompt, user_text=load_profile().for_mission(MISSION_A).served_user_text())
    params = GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    root = os.path.join(workdir, "missions")
    n_images = build_bench_tree(root, args.groups)
    groups = discover(root)[0].groups
    rows = hf_rows(ckpt, prompt, groups, params, args.threads)
    server, url = None, args.url
    try:
        if not url:
            from coordexp.serving.server import start_server

            server = start_server(repo)
            url = server.grpc_url
        rows.append(served_row(url, root, os.path.join(workdir, "out"), params, args.concurrency, len(groups)))
        print(fmt(rows[-1]), file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    by = {r["config"]: r for r in rows}
    served = by[f"served@c{args.concurrency}"]
    ratios = {f"{served['config']} vs hf-group@8": served["images_per_s"] / by["hf-group@8"]["images_per_s"],
              f"{served['config']} vs hf@1": served["images_per_s"] / by["hf@1"]["images_per_s"],
              "hf-group@8 vs hf@1": by["hf-group@8"]["images_per_s"] / by["hf@1"]["images_per_s"]}
    print(f"\nCoordExp group benchmark: {len(groups)} groups, {n_images} images, {args.max_new_tokens} generated "
          f"tokens each (ignore_eos), {os.cpu_count()} CPUs, {platform.machine()}")
    for r in rows:
        print(fmt(r))
    print()
    for k, v in ratios.items():
        print(f"{k:<28} {v:6.2f}x images/s")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "ratios": ratios, "params": params.to_dict(), "ckpt": ckpt, "repo": repo}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
