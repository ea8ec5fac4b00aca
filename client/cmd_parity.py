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

Accuracy parity (engines that are not bit-identical: bf16, quantized, another server):

    coordexp-client parity --accuracy --data labelled.jsonl [--ckpt CKPT | --reference SPEC]
        [--repo REPO | --url HOST:PORT | --candidate SPEC ...] [--margin 0.02] [--json OUT.json]

runs the reference (default: the torch checkpoint, fp32) and each candidate (default: the ONNX
export in --repo, or the server at --url) on the labelled records, scores each with our evaluator
and reports per pair the deltas of F1 @ 0.5 (full, exact labels), AP50 and AP with paired bootstrap
95 % intervals, image flips (exact McNemar), token and prediction agreement, and a verdict:
equivalent / different / inconclusive (coordexp/runs/equivalence.py). Specs: a prediction .jsonl,
torch:CKPT[,dtype=bf16][,device=cuda], onnx:PATH, triton:HOST:PORT[,model=M], openai:URL[,model=M]
(coordexp/benchmarks/accuracy.py). Exit status: 0 equivalent, 1 different, 3 inconclusive, 2 bad
arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="torch vs onnx vs served: token-exact comparison, or accuracy parity",
                       description="Run the torch reference, in-process ONNX Runtime and the served Triton ensemble "
                                   "on the same records and compare generated token ids and parsed predictions; "
                                   "with --accuracy, compare their metrics with intervals instead.")
    p.add_argument("--ckpt", default=None, help="the Hugging Face checkpoint (torch reference)")
    p.add_argument("--repo", default=None, help="the Triton model repository exported from it")
    p.add_argument("--data", required=True, help="input JSONL (CoordExp format; labelled for --accuracy)")
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
    a = p.add_argument_group("accuracy parity (--accuracy)")
    a.add_argument("--accuracy", action="store_true",
                   help="compare metrics with intervals (for engines that are not bit-identical) instead of tokens")
    a.add_argument("--reference", default=None, metavar="SPEC", help="the reference engine (default torch:--ckpt)")
    a.add_argument("--candidate", action="append", default=[], metavar="SPEC",
                   help="a candidate engine; repeat for several (default onnx:--repo, or triton:--url)")
    a.add_argument("--margin", type=float, default=0.02,
                   help="equivalent when every primary delta's 95%% interval lies inside +-margin (default 0.02)")
    a.add_argument("--max-diff-rate", type=float, default=0.25,
                   help="and the 95%% upper bound on the rate of images whose predictions differ is at most this "
                        "(default 0.25: 11 identical images at least)")
    a.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    a.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0; compare uses the same)")
    a.add_argument("--out", default=None, help="folder for the engines' predictions (default: a new temporary one)")
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
    if args.accuracy:
        return run_accuracy(args)
    if not args.ckpt or not args.repo:
        print("error: token parity needs --ckpt and --repo (or use --accuracy with engine specs)", file=sys.stderr)
        return 2
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


def run_accuracy(args: argparse.Namespace) -> int:
    """`parity --accuracy`: a thin adapter over coordexp.benchmarks.accuracy + coordexp.runs.equivalence."""
    import tempfile

    from coordexp.benchmarks.accuracy import EngineSpec, SpecError, run_spec
    from coordexp.dataset import check_dataset, copy_records
    from coordexp.runs.equivalence import ParityOptions, compare_accuracy, exit_code, format_report, score_run

    if not os.path.isfile(args.data):
        print(f"error: input dataset not found: {args.data}", file=sys.stderr)
        return 2
    if not 0 < args.margin < 1 or not 0 < args.max_diff_rate < 1 or args.bootstrap < 100:
        print("error: --margin and --max-diff-rate must lie in (0, 1), --bootstrap >= 100", file=sys.stderr)
        return 2
    try:
        ref_text = args.reference or (f"torch:{args.ckpt}" if args.ckpt else None)
        cand_texts = args.candidate or ([f"onnx:{args.repo}"] if args.repo else []) + \
            ([f"triton:{args.url}" + (f",model={args.model}" if args.model else "")] if args.url else [])
        if not ref_text or not cand_texts:
            raise SpecError("give a reference (--ckpt or --reference SPEC) and a candidate (--repo, --url or "
                            "--candidate SPEC)")
        ref = EngineSpec.parse(ref_text)
        cands = [EngineSpec.parse(t) for t in cand_texts]
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or tempfile.mkdtemp(prefix="coordexp-parity-")
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data.jsonl")
    copy_records(args.data, data, args.limit)
    check = check_dataset(data)
    if not check["labelled"]:
        print(f"error: {args.data} has no labelled record (accuracy parity needs GT objects)", file=sys.stderr)
        return 2
    print(f"accuracy parity: {check['valid']} records ({check['labelled']} labelled) into {out}", file=sys.stderr)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    names: list[str] = []
    scored = []
    try:
        for k, spec in enumerate([ref] + cands):
            name = spec.name if spec.name not in names else f"{spec.name}#{k}"
            names.append(name)
            pred = run_spec(spec, data, os.path.join(out, f"{k}_{spec.kind}"), args.max_new_tokens, log=log)
            scored.append(score_run(name, pred, data))
    except (SpecError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenize = _tokenizer(args.ckpt or (ref.target if ref.kind == "torch" else None))
    opts = ParityOptions(margin=args.margin, max_diff_rate=args.max_diff_rate, bootstrap=args.bootstrap,
                         seed=args.seed)
    pairs = [compare_accuracy(scored[0], c, opts, tokenize) for c in scored[1:]]
    print(format_report(pairs))
    code = exit_code(pairs)
    if args.json_out:
        report = {"schema_version": "coordexp.accuracy_parity.v1", "data": os.path.abspath(args.data),
                  "records": check["valid"], "out": os.path.abspath(out), "options": opts.__dict__,
                  "engines": [{"name": s.name, "predictions": os.path.abspath(s.pred_path), "metrics":
                               {k: s.metrics.get(k) for k in ("f1ish@0.50_f1_full_micro", "bbox_AP50", "bbox_AP")}}
                              for s in scored],
                  "pairs": pairs, "exit_code": code}
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return code


def _tokenizer(ckpt: str | None):
    """The checkpoint's tokenizer as text -> ids (first divergence in tokens), or None (in characters)."""
    if not ckpt or not os.path.isdir(ckpt):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError):
        return None
    return lambda text: tok.encode(text, add_special_tokens=False)
