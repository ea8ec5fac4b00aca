"""`coordexp-client group`: mission folders of image groups -> `<mission>_stage_a.jsonl` (one
validated record per group), `<mission>_stage_a.errors.jsonl` and summary.json.

A thin adapter: arguments -> `GroupRunOptions` + a backend (served or local), then
`coordexp.group.run.run_group_missions`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from coordexp.dataset import DEFAULT_MAX_PIXELS
from coordexp.generation import GenerationParams

EXIT_BAD_INPUT = 2  # nothing was run: bad arguments, folders, profile, resume file, server pre-flight
EXIT_SERVERS_GONE = 3
DEFAULT_MAX_NEW_TOKENS = 256


def register(sub: argparse._SubParsersAction) -> None:
    from coordexp.group.profiles import DEFAULT_PROFILE, available_profiles

    p = sub.add_parser("group", help="Stage-A: one record per image group of mission folders",
                       description="Summarise (or detect in) every image of every group under "
                                   "INPUT_DIR/<mission>/{审核通过|审核不通过}/<group>/, on Triton servers (--url, "
                                   "repeatable) or a local checkpoint (--local), and write one record per group.")
    p.add_argument("--input-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--mission", default=None, help="only this mission folder (default: all, by name)")
    p.add_argument("--task", choices=("summary", "detect"), default="summary",
                   help="summary: free text per image (default); detect: CoordJSON preds per image")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"prompt profile: a packaged name ({', '.join(available_profiles())}) or a YAML file")
    p.add_argument("--legacy-keys", action="store_true", help="write 图片_N keys and a timestamp (the older shape)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (either shape)")
    p.add_argument("--force", action="store_true", help="replace the records of an earlier run in --output-dir")
    p.add_argument("--pass-groups", type=int, default=None, help="sample at most N pass groups per mission")
    p.add_argument("--fail-groups", type=int, default=None, help="sample at most N fail groups per mission")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42, as the upstream tool)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--no-progress", action="store_true")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS} locally; a server's export default remotely")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--repetition-penalty", type=float, default=None,
                   help="default: 1.0 locally; a server's export default remotely")
    d.add_argument("--decode-seed", type=int, default=0, help="seed for sampled decoding")
    s = p.add_argument_group("Triton servers")
    s.add_argument("--url", action="append", default=[], help="HOST:PORT of a Triton gRPC endpoint; repeat for several")
    s.add_argument("--model", default="coordexp", help="served model (ensemble) name")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight over all servers")
    s.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    s.add_argument("--retries", type=int, default=5)
    s.add_argument("--wait-for-server", type=float, default=60.0)
    lo = p.add_argument_group("local model (instead of a server)")
    lo.add_argument("--local", metavar="CKPT", help="a checkpoint folder (torch) or an ONNX export (--engine onnx)")
    lo.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    lo.add_argument("--device", default="cpu")
    lo.add_argument("--threads", type=int, default=None)
    lo.add_argument("--batch-size", type=int, default=8, help="images per generate call (across groups)")
    lo.add_argument("--prompt-layout", choices=("full", "served"), default="full",
                    help="full: the profile's system + user text (default); served: as a served model gets it")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _options(args: argparse.Namespace) -> Any:
    from coordexp.group.run import GroupRunOptions

    return GroupRunOptions(input_dir=args.input_dir, output_dir=args.output_dir, mission=args.mission,
                           task=args.task, profile=args.profile, legacy_keys=args.legacy_keys, resume=args.resume,
                           force=args.force,
                           pass_groups=args.pass_groups, fail_groups=args.fail_groups, seed=args.seed,
                           progress=False if args.no_progress else None, prompt_layout=args.prompt_layout)


def _params(args: argparse.Namespace) -> GenerationParams:
    return GenerationParams(max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                            temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty or 1.0, seed=args.decode_seed)


def run(args: argparse.Namespace) -> int:
    if bool(args.local) == bool(args.url):
        return _fail("give either --local CKPT or --url HOST:PORT (one of them)")
    if args.concurrency < 1 or args.batch_size < 1:
        return _fail("--concurrency and --batch-size must be >= 1")
    try:
        opts, params = _options(args), _params(args)
    except ValueError as e:
        return _fail(str(e))
    if args.url:
        return _run_served(args, opts, params)
    from coordexp.engines import load_engine
    from coordexp.group.backends import LocalBackend

    try:
        engine = load_engine(args.engine, args.local, device=args.device, threads=args.threads)
    except (FileNotFoundError, OSError, ValueError) as e:
        return _fail(f"cannot load {args.engine} engine from {args.local}: {e}")
    return _run(opts, LocalBackend(engine, params, args.batch_size, args.max_pixels))


def _run_served(args: argparse.Namespace, opts: Any, params: GenerationParams) -> int:
    from coordexp import wire
    from coordexp.engines.triton import ClientOptions, PreflightError, TritonEngine
    from coordexp.group.backends import ServedBackend

    client = ClientOptions(model=args.model, timeout=args.timeout, retries=args.retries,
                           wait_for_server=args.wait_for_server)
    try:
        engine = TritonEngine.connect(args.url, client)
    except PreflightError as e:
        return _fail(str(e))
    with engine:
        params = engine.fit_params(params, args.max_new_tokens is not None, args.repetition_penalty is not None)
        problems = engine.problems(params)
        if opts.task == "summary" and wire.TEXT_INPUT not in engine.iface.inputs:
            problems.append(f"--task summary: the served model has no {wire.TEXT_INPUT!r} input for the mission prompt")
        if problems:
            return _fail("; ".join(problems))
        return _run(opts, ServedBackend(engine, params, args.concurrency, args.max_pixels))


def _run(opts: Any, backend: Any) -> int:
    from coordexp.group.profiles import ProfileError
    from coordexp.group.records import RecordError
    from coordexp.group.run import run_group_missions

    try:
        result = run_group_missions(opts, backend)
    except (FileNotFoundError, FileExistsError, ProfileError, RecordError) as e:
        return _fail(str(e))
    missions = result["missions"]
    for name, m in missions.items():
        print(json.dumps({"mission": name, **{k: m[k] for k in ("status", "groups_in", "lines_main", "lines_errors",
                                                                 "accounted", "images", "images_per_s")},
                          "empty_groups": len(m["empty_groups"]), "unknown_paths": len(m["unknown_paths"])},
                         ensure_ascii=False), file=sys.stderr)
        for path in m["unknown_paths"]:
            print(f"note: skipped {path} (not a label folder, group folder or image)", file=sys.stderr)
    print(f"summary: {result['summary_path']}", file=sys.stderr)
    if any(m["status"] == "interrupted" for m in missions.values()):
        print("interrupted: the records so far are written; run the same command with --resume to continue",
              file=sys.stderr)
        return 130
    if any(m["status"] != "complete" for m in missions.values()):
        failure = next(m["failure"] for m in missions.values() if m["status"] != "complete")
        print(f"error: {failure}; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_SERVERS_GONE
    return 0
