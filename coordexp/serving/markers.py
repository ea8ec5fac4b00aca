"""Which coordexp-server serves a model repository: each running server leaves a marker file in the
repository it serves (Triton ignores files at the repository root; tests/test_server_lifecycle.py checks
it with a real tritonserver), read by the exporter, which refuses to replace a served repository."""
from __future__ import annotations

import glob
import json
import os
from typing import Any

# While a server runs, a marker `<repo>/.coordexp-server-<tritonserver pid>.json` says who serves the
# repository (the exporter refuses to overwrite it). Triton ignores files at the repository root (it
# loads folders only; tests/test_server_lifecycle.py checks it with a real tritonserver).
MARKER_PREFIX = ".coordexp-server-"


def _marker_path(repo: str, pid: int) -> str:
    return os.path.join(repo, f"{MARKER_PREFIX}{pid}.json")


def _serves(pid: int, repo: str) -> bool:
    """Whether process `pid` is a live tritonserver of `repo` (a recycled pid is not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and os.path.basename(cmd[0]).startswith(b"tritonserver") and any(
        a.startswith(b"--model-repository=") and os.path.realpath(a.split(b"=", 1)[1].decode(errors="replace"))
        == os.path.realpath(repo) for a in cmd)


def live_servers(repo: str) -> list[dict[str, Any]]:
    """The servers whose marker is in `repo` and who still serve it (a marker left by a killed server,
    or copied along with the folder, is ignored)."""
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(repo), f"{MARKER_PREFIX}*.json"))):
        try:
            with open(path, "r", encoding="utf-8") as f:
                m = json.load(f)
            pid = int(m["tritonserver_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.realpath(str(m.get("repo", ""))) == os.path.realpath(repo) and _serves(pid, repo):
            out.append({**m, "marker": path})
    return out


def describe_server(m: dict[str, Any]) -> str:
    """One marker, for a message: who, where, since when."""
    ports = ", ".join(f"{k} {m['host']}:{v}" for k, v in (("grpc", m.get("grpc_port")), ("http", m.get("http_port")))
                      if v)
    return f"pid {m.get('pid')} (tritonserver pid {m.get('tritonserver_pid')}; {ports}; since {m.get('started')})"
