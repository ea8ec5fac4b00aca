"""`coordexp-client ui`: the web viewer over the run registry (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from coordexp.client.cmd_runs import add_registry_arg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: treat as reachable from outside


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="web viewer: runs, run pages, compare, single-image inference",
                       description="Serve the run registry as web pages and a JSON API under /api/. Binds "
                                   "loopback by default; any other address needs --token (then every API call "
                                   "needs it: Authorization: Bearer TOKEN, or ?token= once in the page URL).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", default=os.environ.get("COORDEXP_UI_TOKEN"),
                   help="shared secret for the API (default: $COORDEXP_UI_TOKEN); required off loopback")
    add_registry_arg(p)
    g = p.add_argument_group("single-image inference (the upload page)")
    g.add_argument("--url", action="append", default=[], help="Triton gRPC HOST:PORT (repeatable)")
    g.add_argument("--model", default="coordexp", help="served model (ensemble) name")
    g.add_argument("--local", help="or a local checkpoint (with --engine)")
    g.add_argument("--engine", choices=["torch", "onnx"], default="torch")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-upload-bytes", type=int, default=20 * 1024 * 1024)
    g.add_argument("--max-upload-pixels", type=int, default=40_000_000)
    j = p.add_argument_group("jobs started from the pages (test runs, batch inference)")
    j.add_argument("--data-root", default=None, metavar="DIR",
                   help="the folder datasets may come from (its *.jsonl; nothing outside it)")
    j.add_argument("--max-jobs", type=int, default=1, help="jobs running at once; the others wait (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not is_loopback(args.host) and not args.token:
        print(f"error: refusing to bind {args.host} (not loopback) without --token", file=sys.stderr)
        return 2
    if args.url and args.local:
        print("error: give either --url or --local for the upload page, not both", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from coordexp.ui.app import UiOptions, create_app
        from coordexp.ui.infer import InferOptions
    except ImportError as e:
        print(f"error: the viewer needs the `ui` extra (pip install -e '.[ui]'): {e}", file=sys.stderr)
        return 2
    infer = InferOptions(urls=tuple(args.url), model=args.model, local=args.local, engine=args.engine,
                         max_new_tokens=args.max_new_tokens, max_bytes=args.max_upload_bytes,
                         max_pixels=args.max_upload_pixels)
    if args.max_jobs < 1:
        print("error: --max-jobs must be >= 1", file=sys.stderr)
        return 2
    if args.data_root and not os.path.isdir(args.data_root):
        print(f"error: --data-root {args.data_root}: no such folder", file=sys.stderr)
        return 2
    from coordexp.ui.jobs import JobOptions

    jobs = JobOptions(data_root=os.path.abspath(args.data_root) if args.data_root else None, max_running=args.max_jobs)
    app = create_app(UiOptions(registry=args.registry, token=args.token, infer=infer, jobs=jobs))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"CoordExp runs viewer on http://{shown}:{args.port}/" + (f"?token={args.token}" if args.token else ""),
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
