"""`coordexp-client parity`: torch reference vs in-process ONNX Runtime vs the served Triton ensemble.

    coordexp-client parity --ckpt CKPT --repo REPO --data in.jsonl [--url HOST:PORT]
        [--batch-sizes 1,4] [--max-new-tokens N] [--sample-seed S]

Runs the same input records through
- the torch reference (the checkpoint through HF `generate`) at every batch size,
- ONNX Runtime in process (the graphs of the repository, `OnnxEngine`) at every batch size,
- the served ensemble (a Triton started from --repo, or the server at --url) with as many requests
  in flight as the batch size, so Triton's dynamic batcher groups them,
and prints one row per engine pair: records compared, exact-match rate of the generated token ids
and of the parsed predictions, and the first divergence (record, token position, the two tokens).
Greedy by default (every pair against the torch reference at the first batch size, plus ONNX vs
served at each batch size). `--sample-seed S` samples at that seed instead: only ONNX Runtime and
the server share the sampler (numpy, one generator per row seeded with S), so only those pairs are
compared; torch samples with its own RNG and cannot match.

All engines use the repository's prompt variant (from its manifest). Exit status: 0 every pair
matches, 1 a mismatch (or a failed request), 2 bad arguments / nothing to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="torch vs onnx vs served: token-exact comparison",
                       description="Run the torch reference, in-process ONNX Runtime and the served Triton ensemble "
                                   "on the same records and compare generated token ids and parsed predictions.")
    p.add_argument("--ckpt", required=True, help="the Hugging Face checkpoint (torch reference)")
    p.add_argument("--repo", required=True, help="the Triton model repository exported from it")
    p.add_argument("--data", required=True, help="input JSONL (CoordExp format)")
    p.add_argument("--url", default=None, help="HOST:PORT of a running Triton (gRPC) serving --repo; default: start "
                                               "one from --repo on free loopback ports")
    p.add_argument("--model", default=None, help="served ensemble name (default: the repository's)")
    p.add_argument("--batch-sizes", default="1,4", help="comma separated (default 1,4)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the repository's limit (whole answers)")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="sample at this seed (ONNX vs served only) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8, help="with --sample-seed (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sample-seed (default 0.95)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the local engines")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    p.set_defaults(func=run)


def _batch_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: expected positive integers, e.g. 1,4")
    return sizes


def _checkpoint_problem(ckpt: str, manifest: dict, repo: str) -> str | None:
    """The repository must have been exported from --ckpt (same weights digest), else nothing compares."""
    from coordexp.checkpoint import checkpoint_digest

    served = ((manifest.get("checkpoint") or {}).get("weights_sha256")) or None
    try:
        ours = checkpoint_digest(ckpt).sha256
    except ValueError as e:
        return str(e)
    if served and served != ours:
        return (f"{repo} was exported from another checkpoint (its manifest names weights {served[:12]}…, {ckpt} has "
                f"{ours[:12]}…): export {ckpt} again or pass the checkpoint it came from")
    return None


def _params(args: argparse.Namespace, manifest: dict):
    """The decoding parameters compared: greedy, or sampling at --sample-seed (ValueError: bad ones)."""
    from coordexp.generation import GenerationParams

    limit = int(manifest.get("max_new_tokens") or 256)
    max_new = args.max_new_tokens or limit  # whole answers: what the served model can give
    if max_new > limit:
        raise ValueError(f"--max-new-tokens {max_new} exceeds the repository's limit of {limit}")
    if args.sample_seed is None:
        return GenerationParams(max_new_tokens=max_new)
    params = GenerationParams(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                              seed=args.sample_seed)
    if params.greedy:
        raise ValueError("--sample-seed needs --temperature > 0")
    return params


def run(args: argparse.Namespace) -> int:
    from coordexp.dataset import iter_dataset
    from coordexp.prompt import PromptSpec
    from coordexp.serving.common import read_manifest
    from coordexp.wire import ENSEMBLE

    try:
        sizes = _batch_sizes(args.batch_sizes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, what in ((args.ckpt, "checkpoint"), (args.repo, "repository")):
        if not os.path.isdir(path):
            print(f"error: {what} folder not found: {path}", file=sys.stderr)
            return 2
    if not os.path.isfile(args.data):
        print(f"error: input dataset not found: {args.data}", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(args.repo)
    except (OSError, ValueError) as e:
        print(f"error: {args.repo} has no readable manifest.json ({e}); is it a CoordExp repository?", file=sys.stderr)
        return 2
    problem = _checkpoint_problem(args.ckpt, manifest, args.repo)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    prompt = PromptSpec.from_dict(manifest.get("prompt"))
    try:
        params = _params(args, manifest)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling, max_new = not params.greedy, params.max_new_tokens
    model = args.model or manifest.get("name") or ENSEMBLE

    all_items = list(iter_dataset(args.data))
    items = [it for it in all_items if it.ok][: args.limit]
    skipped = [it for it in all_items if not it.ok]
    if not items:
        print(f"error: no usable record in {args.data} ({len(skipped)} with errors)", file=sys.stderr)
        return 2
    mode = (f"sampling (temperature {params.temperature}, top_p {params.top_p}, seed {params.seed})" if sampling
            else "greedy")
    what = "whole answers, the repository's limit" if max_new == int(manifest.get("max_new_tokens") or 256) \
        else "answers cut there"
    print(f"parity: {len(items)} records ({len(skipped)} skipped for input errors), {mode}, max_new_tokens "
          f"{max_new} ({what}), batch sizes {sizes}, prompt {prompt.variant}", file=sys.stderr)

    from coordexp.benchmarks.parity import format_table, pair_up, run_engines

    server = None
    url = args.url
    try:
        if not url:
            from coordexp.serving.server import TritonError, start_server

            print(f"  starting Triton from {args.repo} ...", file=sys.stderr)
            try:
                server = start_server(args.repo)
            except TritonError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            url = server.grpc_url
        runs, tokenizer = run_engines(args.ckpt, args.repo, url, model, items, params, prompt, sizes, args.threads)
    finally:
        if server is not None:
            server.stop()
    pairs = pair_up(runs, items, sizes, sampling, tokenizer)
    print(format_table(pairs))
    if sampling:
        print("note: sampling compares ONNX Runtime with the server only (same numpy sampler and seed); torch "
              "samples with its own RNG and cannot match them token for token.")
    ok = all(p.ok for p in pairs)
    print("result: " + ("all pairs match" if ok else "MISMATCH"))
    if args.json_out:
        report = {"ok": ok, "mode": mode, "params": params.to_dict(), "prompt": prompt.to_dict(),
                  "records": len(items), "skipped": len(skipped), "pairs": [p.to_dict() for p in pairs],
                  "seconds": {k: round(r.seconds, 3) for k, r in runs.items()}}
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1
