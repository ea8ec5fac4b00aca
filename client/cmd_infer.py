"""`coordexp-client infer`: run a JSONL dataset through a model, write predictions.jsonl + summary.json."""
from __future__ import annotations

import argparse
import json
import os
import sys

from typing import Any, Sequence

from coordexp.client.cmd_runs import add_register_args, register_options
from coordexp.client.options import (add_decoding_args, add_local_engine_args, add_openai_args, add_prompt_args,
                                     local_engine, openai_engine, params_from_args, prompt_overrides)
from coordexp.dataset import DEFAULT_MAX_PIXELS
from coordexp.generation import GenerationParams

# Exit codes: 0 done (lines may carry their own errors), 2 nothing was run (wrong URL, model unknown
# or not ready, incompatible interface, bad arguments), 3 the servers went away mid-run.
EXIT_RUN_FAILED = 1  # most lines failed on input or engine errors (e.g. images not found)
EXIT_PREFLIGHT = 2
EXIT_SERVERS_GONE = 3
EXIT_INTERRUPTED = 130
FAILED_SHARE_LIMIT = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="run a JSONL dataset and write predictions.jsonl",
                       description="Run an input JSONL (CoordExp format) through a local engine (--local CKPT "
                                   "--engine torch|onnx), Triton servers (--url, repeatable) or an OpenAI-compatible "
                                   "server (--openai-url: ours or a peer's, e.g. vLLM). Writes exactly one "
                                   "prediction line per input line, in order, and summary.json beside it.")
    p.add_argument("--data", required=True, help="input JSONL (image paths relative to its folder)")
    p.add_argument("--out", required=True, help="predictions.jsonl to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --out")
    p.add_argument("--force", action="store_true",
                   help="replace the earlier run in --out (its evaluation is archived as eval.replaced-<time>)")
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print the run's summary as JSON on stdout (default: one line)")
    p.add_argument("--batch-size", type=int, default=1, help="local engines: images per generate call")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--image-root", default=None,
                   help="folder relative image paths start from (default: the JSONL's folder)")
    p.add_argument("--no-progress", action="store_true")
    add_local_engine_args(p)
    s = p.add_argument_group("Triton servers")
    s.add_argument("--url", action="append", default=[],
                   help="HOST:PORT of a Triton gRPC endpoint; repeat for several; dns:///NAME:PORT: every address "
                        "behind the name (a Kubernetes headless Service), resolved again every --resolve-interval s")
    s.add_argument("--resolve-interval", type=float, default=30.0,
                   help="seconds between resolutions of dns:/// URLs (new replicas join, removed ones leave)")
    s.add_argument("--model", default="coordexp", help="served model (ensemble) name")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    s.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    s.add_argument("--retries", type=int, default=5)
    s.add_argument("--wait-for-server", type=float, default=60.0,
                   help="seconds to wait for a server that went away before failing")
    add_openai_args(p)
    add_decoding_args(p)
    add_prompt_args(p)
    add_register_args(p)
    p.set_defaults(func=run_and_register)


def run_and_register(args: argparse.Namespace) -> int:
    """`run`, then record the finished run in the registry as an inference job (unless --no-register,
    or the run changed nothing: a resumed run that was complete already)."""
    rc = run(args)
    if rc == 0 and not _UNCHANGED.pop(os.path.abspath(args.out), False):
        from coordexp.runs.register import register_run

        register_run(args.out, register_options(args), gt_path=args.data)
    return rc


_UNCHANGED: dict[str, bool] = {}  # outputs a run left as they were (nothing to register again)


def run(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.local, args.url, args.openai_url))) != 1:
        print("error: give one of --local CKPT, --url HOST:PORT or --openai-url URL", file=sys.stderr)
        return 2
    if not os.path.isfile(args.data):
        print(f"error: input dataset not found: {args.data}", file=sys.stderr)
        return 2
    if args.resume and not os.path.exists(args.out):
        print(f"note: --resume: {args.out} does not exist yet; starting from the beginning", file=sys.stderr)
    try:
        params = params_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.openai_url:
        if args.concurrency < 1:
            print("error: --concurrency must be >= 1", file=sys.stderr)
            return EXIT_PREFLIGHT
        return infer_served(lambda: openai_engine(args), args.data, args.out, params, concurrency=args.concurrency,
                            resume=args.resume, max_pixels=args.max_pixels, image_root=args.image_root,
                            progress=False if args.no_progress else None,
                            explicit_max_new_tokens=args.max_new_tokens is not None,
                            explicit_repetition_penalty=args.repetition_penalty is not None, force=args.force,
                            json_out=args.json_out)
    if args.url:
        from coordexp.engines.triton import ClientOptions

        if args.concurrency < 1:
            print("error: --concurrency must be >= 1", file=sys.stderr)
            return EXIT_PREFLIGHT
        return infer_remote(args.url, args.data, args.out, params,
                            ClientOptions(model=args.model, timeout=args.timeout, retries=args.retries,
                                          wait_for_server=args.wait_for_server,
                                          resolve_interval=args.resolve_interval),
                            concurrency=args.concurrency, resume=args.resume, max_pixels=args.max_pixels,
                            image_root=args.image_root,
                            progress=False if args.no_progress else None, user_text=args.user_text,
                            prompt_overrides=prompt_overrides(args),
                            explicit_max_new_tokens=args.max_new_tokens is not None,
                            explicit_repetition_penalty=args.repetition_penalty is not None, force=args.force,
                            json_out=args.json_out)
    from coordexp.run_output import OutputWriteError
    from coordexp.runner import RunInterrupted, run_dataset

    try:
        engine = local_engine(args)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: cannot load {args.engine} engine from {args.local}: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_dataset(args.data, args.out, engine, params, batch_size=args.batch_size, resume=args.resume,
                              max_pixels=args.max_pixels, progress=False if args.no_progress else None,
                              image_root=args.image_root, force=args.force)
    except ValueError as e:  # e.g. an --out that cannot be resumed, or holds an earlier run
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        summary = e.summary
    except OutputWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return report(summary.to_dict(), args.out, json_out=args.json_out)


SUMMARY_KEYS = ("status", "records_written", "records_total", "errors", "finish_reasons", "seconds", "images_per_s",
                "images_generated", "tokens_per_s", "retries", "out")


def result_line(d: dict[str, Any], out: str) -> str:
    """One line saying how a complete run went (stdout)."""
    errs = ", ".join(f"{k} {v}" for k, v in sorted((d.get("errors") or {}).items())) or "none"
    fin = d.get("finish_reasons") or {}
    return (f"wrote {d['records_written']} of {d['records_total']} lines to {out} in {d.get('seconds', 0):.1f} s: "
            f"{d.get('images_per_s', 0):.2f} images/s; errors: {errs}; answers: {fin.get('stop', 0)} complete, "
            f"{fin.get('length', 0)} cut at the token limit")


def truncation_warning(d: dict[str, Any]) -> str | None:
    """The warning for answers the token limit cut (None: none were)."""
    fin = d.get("finish_reasons") or {}
    cut, answered = fin.get("length", 0), fin.get("stop", 0) + fin.get("length", 0)
    if not cut:
        return None
    limit = (d.get("params") or {}).get("max_new_tokens")
    return (f"warning: {cut} of {answered} answers hit the token limit (max_new_tokens {limit}) and were cut: their "
            "last objects are missing; raise --max-new-tokens (up to the served limit, set at export)")


def report(d: dict[str, Any], out: str, keys: Sequence[str] = SUMMARY_KEYS, json_out: bool = False) -> int:
    """Print how a run ended and return its exit code: complete, interrupted (Ctrl-C), stopped early
    (servers gone) or complete but failed on most lines. The result goes to stdout (one line, or the
    summary's `keys` as JSON with `json_out`); warnings and errors to stderr."""
    done = f"wrote {d['records_written']} of {d['records_total']} lines to {out}"
    if d.get("unchanged"):
        _UNCHANGED[os.path.abspath(out)] = True
        print(f"nothing to do: {out} is complete ({d['records_written']} lines); its summary is unchanged")
        return 0
    if d["status"] == "interrupted":
        print(f"interrupted: {done}; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    if d["status"] != "complete":
        print(f"error: {d.get('failure')}; {done}; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_SERVERS_GONE
    print(json.dumps({k: d[k] for k in keys if k in d}) if json_out else result_line(d, out), flush=True)
    warn = truncation_warning(d)
    if warn:
        print(warn, file=sys.stderr)
    if d.get("failed_share", 0) > FAILED_SHARE_LIMIT:
        top = max(d["errors"].items(), key=lambda kv: kv[1])
        hint = " (are the images where the JSONL says? --image-root sets where relative paths start)" \
            if top[0] == "image_load_failed" else ""
        print(f"error: {d['failed_share']:.0%} of the lines failed, most with {top[0]} ({top[1]}){hint}; "
              f"see the error_message of the lines in {out}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def infer_remote(urls: Sequence[str], data: str, out: str, params: GenerationParams, client: Any, *,
                 concurrency: int = 8, resume: bool = False, max_pixels: int | None = None,
                 image_root: str | None = None, progress: bool | None = None, user_text: str | None = None,
                 prompt_overrides: dict[str, Any] | None = None, explicit_max_new_tokens: bool = True,
                 explicit_repetition_penalty: bool = True, force: bool = False, json_out: bool = False) -> int:
    """`infer --url ...` (and the pipeline's triton engine): pre-flight, then the one dataset loop
    (`coordexp.runner.run_dataset`) on a `TritonEngine`; `client` is a `ClientOptions`. Returns the
    exit code."""
    from coordexp.engines.triton import TritonEngine

    return infer_served(lambda: TritonEngine.connect(urls, client, user_text=user_text), data, out, params,
                        concurrency=concurrency, resume=resume, max_pixels=max_pixels, image_root=image_root,
                        progress=progress, prompt_overrides=prompt_overrides,
                        explicit_max_new_tokens=explicit_max_new_tokens,
                        explicit_repetition_penalty=explicit_repetition_penalty, force=force, json_out=json_out)


def infer_served(connect: Any, data: str, out: str, params: GenerationParams, *, concurrency: int = 8,
                 resume: bool = False, max_pixels: int | None = None, image_root: str | None = None,
                 progress: bool | None = None, prompt_overrides: dict[str, Any] | None = None,
                 explicit_max_new_tokens: bool = True, explicit_repetition_penalty: bool = True,
                 force: bool = False, json_out: bool = False) -> int:
    """A served engine (`connect()`: a TritonEngine or an OpenAIEngine; its pre-flight error is exit 2),
    its defaults and limits applied, then the one dataset loop. Returns the exit code."""
    from coordexp.engines.openai_client import OpenAIServerError
    from coordexp.engines.triton import PreflightError
    from coordexp.run_output import OutputWriteError
    from coordexp.runner import RunInterrupted, run_dataset

    try:
        engine = connect()
    except (PreflightError, OpenAIServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PREFLIGHT
    with engine:
        params = engine.fit_params(params, explicit_max_new_tokens, explicit_repetition_penalty)
        problems = engine.problems(params, prompt_overrides)
        if problems:
            print("error: " + "; ".join(problems), file=sys.stderr)
            return EXIT_PREFLIGHT
        try:
            summary = run_dataset(data, out, engine, params, resume=resume, max_pixels=max_pixels,
                                  progress=progress, concurrency=concurrency, image_root=image_root, force=force)
        except ValueError as e:  # e.g. an --out that cannot be resumed
            print(f"error: {e}", file=sys.stderr)
            return EXIT_PREFLIGHT
        except RunInterrupted as e:
            summary = e.summary
        except OutputWriteError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_RUN_FAILED
    return report(summary.to_dict(), out, json_out=json_out)
