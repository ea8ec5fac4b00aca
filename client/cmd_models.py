"""`coordexp-client models --url HOST:PORT`: what a Triton server holds.

One row per model of the server's repository: name, version, state (READY, UNAVAILABLE, ...)
and the reason Triton gives for a model that is not ready; for our ensembles (models whose
config carries the export manifest) also the checkpoint, its weights hash, the export date, the
prompt variant and the library versions of the export. `--json` prints the same as JSON:
`{"servers": [{"url", "server", "models": [...]}]}`.
Exit status: 0, or 2 when the server cannot be reached.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models a Triton server holds, their readiness and export manifest",
                       description="List the models of a Triton server with their state and, for CoordExp "
                                   "ensembles, the export manifest (checkpoint, hash, export date, versions, "
                                   "prompt variant).")
    p.add_argument("--url", action="append", required=True,
                   help="HOST:PORT of a Triton gRPC endpoint; repeat for several")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.set_defaults(func=run)


def _short(v: Any, n: int) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def format_server(info: dict[str, Any]) -> str:
    srv = info["server"]
    lines = [f"{info['url']}  ({srv.get('name') or 'triton'} {srv.get('version') or ''})".rstrip()]
    table = [("model", "version", "state", "details")]
    for m in info["models"]:
        if m["state"] != "READY":
            details = m.get("reason") or ""
        elif "manifest" in m:
            kind = "streaming CoordExp ensemble" if m.get("streams") else "CoordExp ensemble"
            details = f"{kind}, prompt {m['manifest'].get('prompt_variant')}"
        else:
            details = m.get("platform") or ""
        table.append((m["name"], m["version"] or "-", m["state"], _short(details, 90)))
    widths = [max(len(r[c]) for r in table) for c in range(4)]
    for r in table:
        lines.append("  " + "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(r)).rstrip())
    shared: dict[str, tuple[list[str], dict[str, Any]]] = {}  # one block per export: the unary and the
    for m in info["models"]:                                   # streaming ensemble share their manifest
        if m.get("manifest"):
            key = json.dumps(m["manifest"], sort_keys=True, default=str)
            shared.setdefault(key, ([], m["manifest"]))[0].append(m["name"])
    for names, man in shared.values():
        lines.append(f"  manifest of {', '.join(names)}:")
        versions = man.get("versions") or {}
        vtext = ", ".join(f"{k} {v}" for k, v in versions.items() if v) if isinstance(versions, dict) else versions
        for key, val in (("checkpoint", man.get("checkpoint")), ("hash", man.get("hash")),
                         ("export date", man.get("export_date")), ("prompt variant", man.get("prompt_variant")),
                         ("backend", man.get("backend")), ("max new tokens", man.get("max_new_tokens")),
                         ("versions", vtext)):
            lines.append(f"    {key + ':':16}{val if val is not None else '-'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from coordexp.engines.triton.inventory import server_models
    from coordexp.engines.triton.connect import normalise_url

    async def collect():
        return [await server_models(normalise_url(u), args.timeout) for u in args.url]

    try:
        infos = asyncio.run(collect())
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"servers": infos}, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_server(i) for i in infos))
    return 0
