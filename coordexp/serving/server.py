"""Start and stop a real Triton Inference Server on loopback (`coordexp-server`).

A `tritonserver` on PATH (the official container) is preferred; otherwise the one that the
`nvidia-pytriton` wheel carries (server 2.51 with the Python backend and a stub per Python
version) is used, with a private backend folder holding the stub for the running Python.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any

from coordexp.serving.markers import _marker_path
from coordexp.serving.triton_install import TritonError, _prepare_backend_dir, find_triton, free_port

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequested(BaseException):
    """A stop signal arrived (SIGINT/SIGTERM/SIGHUP); a BaseException so it unwinds any wait."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The child gets SIGKILL when its parent dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def repository_problem(repo: str) -> str | None:
    """Why `repo` is not a model repository Triton can serve (None: it looks like one)."""
    if not os.path.isdir(repo):
        return f"model repository not found: {repo}"
    models = [e for e in sorted(os.listdir(repo)) if os.path.isfile(os.path.join(repo, e, "config.pbtxt"))]
    if models:
        return None
    hint = ""
    if os.path.isfile(os.path.join(repo, "config.json")):
        hint = (f" (it looks like a checkpoint: export it first with python export/build_engine.py --ckpt {repo}"
                " and serve the repository that prints)")
    return f"{repo} is not a Triton model repository: no model folder with a config.pbtxt{hint}"


def _model_errors(log_text: str) -> list[str]:
    """Triton's own lines about models that failed, most specific first."""
    lines = []
    for line in log_text.splitlines():
        if "NVML" in line or "DCGM" in line:  # CPU-only machines: warnings, not the cause
            continue
        if re.search(r"failed to load|UNAVAILABLE|Traceback|Error|error:", line):
            lines.append(line.strip())
    return lines[-15:]


class TritonServer:
    """A tritonserver process on loopback; use as a context manager or call start()/stop()."""

    def __init__(self, repo: str, grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None, host: str = "127.0.0.1", log_path: str | None = None,
                 verbose: bool = False, ready_timeout: float = 300.0, extra_args: list[str] | None = None,
                 prefer_path: bool = True):
        problem = repository_problem(repo)
        if problem:
            raise TritonError(problem)
        self.repo = os.path.abspath(repo)
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        # None: a free port (a fixed default collides with a second server); 0: metrics off
        self.metrics_port = free_port(host) if metrics_port is None else metrics_port
        self.verbose = verbose
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args or [])
        self.install = find_triton(prefer_path)
        self._workdir = tempfile.mkdtemp(prefix="coordexp-triton-")
        self.log_path = log_path or os.path.join(self._workdir, "tritonserver.log")
        self.proc: subprocess.Popen | None = None
        self.models: list[str] = []

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        # Explicit model control with every model loaded at start: the same models as Triton's default
        # mode, and the ensembles can be unloaded alone, which is how `drain` lets in-flight requests finish
        control = [] if any(a.startswith("--model-control-mode") for a in self.extra_args) else \
            ["--model-control-mode=explicit", "--load-model=*"]
        cmd = [self.install.binary, f"--model-repository={self.repo}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               *([f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"] if self.metrics_port
                 else ["--allow-metrics=false"]),
               "--exit-timeout-secs=30", "--strict-readiness=true", *control]
        if self.verbose:
            cmd.append("--log-verbose=1")
        return cmd + self.extra_args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The Python-backend stub runs the `python3` first on PATH: make it this interpreter's
        # environment so models import numpy, onnxruntime and coordexp from here.
        bindir = os.path.dirname(sys.executable)
        scripts = sysconfig.get_path("scripts")
        env["PATH"] = os.pathsep.join([bindir, scripts, env.get("PATH", "")])
        # The stub links `libpython3.X.so` by soname: without this interpreter's LIBDIR first, the
        # loader may take the system's libpython (another patch release), and then stdlib
        # extension modules of this interpreter fail with undefined symbols (seen: _ssl).
        libdirs = [d for d in [sysconfig.get_config_var("LIBDIR")] if d and os.path.isdir(d)]
        libdirs += self.install.lib_dirs
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        env.setdefault("OMP_NUM_THREADS", "1")  # each model instance is one process; oversubscription hurts
        return env

    def log_text(self) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def ports(self) -> dict[str, int]:
        """The ports this server binds, by the flag that sets them."""
        out = {"--grpc-port": self.grpc_port, "--http-port": self.http_port}
        if self.metrics_port:
            out["--metrics-port"] = self.metrics_port
        return out

    def _check_ports(self) -> None:
        taken = [f"{port} ({flag})" for flag, port in self.ports().items() if port_in_use(self.host, port)]
        if taken:
            raise TritonError(f"port {', '.join(taken)} already in use on {self.host} (another server?): "
                              "pass a free port with that flag, or 0 for any free one")

    def start(self) -> "TritonServer":
        self._check_ports()
        cmd = self.command()
        backend_dir = _prepare_backend_dir(self.install, self._workdir)
        if backend_dir:
            cmd.insert(2, f"--backend-directory={backend_dir}")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self._write_marker()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.ready_timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise TritonError(f"tritonserver exited with code {self.proc.returncode} before it was ready "
                                      f"(log: {self.log_path}): {self.exit_reason()}")
                try:
                    ready = client.is_server_ready()
                except Exception:
                    ready = False
                if ready and self.proc.poll() is None:  # ours answered, not another server on the port
                    self._check_models(client)
                    return
                time.sleep(0.25)
        finally:
            client.close()
        msgs = _model_errors(self.log_text())
        raise TritonError(f"tritonserver not ready after {self.ready_timeout:.0f}s (log: {self.log_path})"
                          + ("\n  " + "\n  ".join(msgs) if msgs else ""))

    def _check_models(self, client: Any) -> None:
        index = client.get_model_repository_index(as_json=True).get("models", [])
        ready = [m.get("name") for m in index if m.get("state") == "READY"]
        if not ready:
            raise TritonError(f"tritonserver started but serves no model from {self.repo} (log: {self.log_path})")
        self.models = ready

    def exit_reason(self) -> str:
        """Why the process ended, from Triton's log (the port clash, a model failure, ...)."""
        text = self.log_text()
        clash = re.search(r"Socket '([^']+)' already in use|Address already in use", text)
        if clash:
            return f"a port was already in use ({clash.group(0)}); pick free ports with --grpc-port/--http-port/--metrics-port"
        msgs = _model_errors(text) or text.splitlines()[-5:]
        return "; ".join(msgs)

    def _write_marker(self) -> None:
        """Say in the repository that it is being served (best effort: a read-only repository has none)."""
        marker = {"pid": os.getpid(), "tritonserver_pid": self.proc.pid, "repo": self.repo, "host": self.host,
                  "grpc_port": self.grpc_port, "http_port": self.http_port, "metrics_port": self.metrics_port or None,
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  # models never reload from disk: explicit control loads them once, at start
                  "model_control_mode": next((a.split("=", 1)[1] for a in self.command()
                                              if a.startswith("--model-control-mode=")), "none")}
        try:
            with open(_marker_path(self.repo, self.proc.pid), "w", encoding="utf-8") as f:
                json.dump(marker, f, indent=2)
        except OSError:
            pass

    def _remove_marker(self) -> None:
        try:
            os.remove(_marker_path(self.repo, self.proc.pid))
        except OSError:
            pass

    def drain(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop taking requests and let the ones in flight finish (up to `timeout` s): the ensembles are
        unloaded; Triton refuses new requests to them at once (NOT_FOUND: a client retries another
        replica) and completes the unload when their in-flight requests are done. (A plain SIGTERM
        fails them: an ensemble's in-flight request needs new step requests, which a stopping server
        refuses.) Returns {"ensembles", "seconds", "drained"}."""
        import asyncio

        t0 = time.monotonic()
        if self.proc is None or self.proc.poll() is not None:
            return {"ensembles": [], "seconds": 0.0, "drained": True}
        return asyncio.run(self._drain(timeout, t0))

    async def _drain(self, timeout: float, t0: float) -> dict[str, Any]:
        import asyncio

        from coordexp.engines.triton.connect import new_client

        client = new_client(self.grpc_url)
        try:
            index = (await client.get_model_repository_index(as_json=True, client_timeout=5)).get("models", [])
            ensembles = []
            for m in index:
                if m.get("state") != "READY":
                    continue
                cfg = (await client.get_model_config(m["name"], as_json=True, client_timeout=5)).get("config", {})
                if cfg.get("platform") == "ensemble":
                    ensembles.append(m["name"])
            for name in ensembles:
                await client.unload_model(name, client_timeout=5)
            while time.monotonic() - t0 < timeout:
                index = (await client.get_model_repository_index(as_json=True, client_timeout=5)).get("models", [])
                busy = [m["name"] for m in index if m["name"] in ensembles and m.get("state") != "UNAVAILABLE"]
                if not busy:
                    return {"ensembles": ensembles, "seconds": round(time.monotonic() - t0, 3), "drained": True}
                await asyncio.sleep(0.1)
            return {"ensembles": ensembles, "seconds": round(time.monotonic() - t0, 3), "drained": False}
        except Exception as e:  # noqa: BLE001 - a server that cannot be drained is stopped anyway
            return {"ensembles": [], "seconds": round(time.monotonic() - t0, 3), "drained": False,
                    "error": f"{type(e).__name__}: {e}"}
        finally:
            await client.close()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group (model stubs included)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:  # stubs left behind by a killed server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = self.proc.returncode
        self._remove_marker()
        shutil.rmtree(os.path.join(self._workdir, "backends"), ignore_errors=True)
        return rc

    def kill(self) -> None:
        """Hard kill (for fault-injection tests): no graceful shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(repo: str, **kwargs: Any) -> TritonServer:
    """A started `TritonServer` for `repo` (stop it with `.stop()`); waits up to 300 s for ready."""
    kwargs.setdefault("ready_timeout", 300.0)
    return TritonServer(repo, **kwargs).start()


def _raise_stop(signum: int, frame: Any) -> None:
    raise StopRequested(signum)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coordexp-server", description="Serve a CoordExp model repository with "
                                "Triton Inference Server (gRPC, HTTP) and an OpenAI-compatible API, on loopback "
                                "until Ctrl-C / SIGTERM / SIGHUP.")
    p.add_argument("--repo", required=True, help="Triton model repository (from export/build_engine.py)")
    p.add_argument("--grpc-port", type=int, default=8001, help="0: a free port")
    p.add_argument("--http-port", type=int, default=8000, help="0: a free port")
    p.add_argument("--metrics-port", type=int, default=None, help="default: a free port; 0: metrics off")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--log", default=None, help="write Triton's log here")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    o = p.add_argument_group("OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models)")
    o.add_argument("--openai-port", type=int, default=9000, help="its port (default 9000; 0: a free port)")
    o.add_argument("--no-openai", dest="openai", action="store_false", help="do not serve the OpenAI API")
    o.add_argument("--openai-host", default=None, help="its bind address (default: --host); any other than "
                   "loopback needs --api-key")
    o.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="another name the model answers to (repeatable; e.g. the checkpoint path a CoordExp "
                        "config sends as `model`); the ensemble's own name always works")
    o.add_argument("--api-key", default=os.environ.get("COORDEXP_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $COORDEXP_API_KEY; none on loopback)")
    o.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                   help="image_url hosts the API may fetch http(s) images from (default none: data: URLs only)")
    o.add_argument("--max-request-mb", type=int, default=48, help="largest request body (default 48 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: seconds the requests in flight may take to finish while new ones are "
                        "refused (Kubernetes: keep terminationGracePeriodSeconds above it); 0: stop at once")
    return p


def _api_options(args: argparse.Namespace, server: "TritonServer") -> Any:
    from coordexp.dataset import DEFAULT_MAX_PIXELS
    from coordexp.serving.common import PROCESSOR_SUBDIR, read_manifest
    from coordexp.serving.openai_api.app import ApiOptions
    from coordexp.serving.openai_api.messages import ImageLimits
    from coordexp.serving.preprocess import MAX_IMAGE_BYTES

    try:
        manifest = read_manifest(server.repo)
    except (OSError, ValueError):
        return None  # not a CoordExp repository (no manifest): nothing for the API to serve
    ensemble = (manifest.get("models") or {}).get("ensemble") or "coordexp"
    if ensemble not in server.models:
        return None
    proc = os.path.join(server.repo, (manifest.get("layout") or {}).get("processor_dir") or PROCESSOR_SUBDIR)
    return ApiOptions(grpc_url=server.grpc_url, ensemble=ensemble, aliases=tuple(args.served_model_name),
                      api_key=args.api_key or None, processor_dir=proc if os.path.isdir(proc) else None,
                      max_request_bytes=args.max_request_mb << 20,
                      image=ImageLimits(max_bytes=MAX_IMAGE_BYTES, max_pixels=DEFAULT_MAX_PIXELS,
                                        allowed_hosts=tuple(h.lower() for h in args.allow_image_host)))


def main(argv: list[str] | None = None) -> int:
    from coordexp.serving.openai_api.runner import LOOPBACK, ApiServer, ApiServerError

    args = build_parser().parse_args(argv)
    api_host = args.openai_host or args.host
    if args.openai:
        if api_host not in LOOPBACK and not args.api_key:
            print(f"error: the OpenAI API would bind {api_host} (not loopback) without a key: pass --api-key KEY "
                  "(or set COORDEXP_API_KEY), or --no-openai", file=sys.stderr)
            return 2
        if args.openai_port == 0:
            args.openai_port = free_port(api_host)
        elif port_in_use(api_host, args.openai_port):
            print(f"error: port {args.openai_port} (--openai-port) already in use on {api_host} (another server?): "
                  "pass a free port with that flag, 0 for any free one, or --no-openai", file=sys.stderr)
            return 2
    # Handlers first: a stop signal during start-up (model loading can take minutes) must stop
    # tritonserver too, not leave it running with its ports.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stop)
    server = api = None
    try:
        server = TritonServer(args.repo, args.grpc_port, args.http_port, args.metrics_port, host=args.host,
                              log_path=args.log, verbose=args.verbose, ready_timeout=args.ready_timeout)
        print(f"starting tritonserver ({server.install.source}) on {args.host} ...", file=sys.stderr)
        server.start()
        openai = ""
        api_opts = _api_options(args, server) if args.openai else None
        if api_opts is not None:
            api = ApiServer(api_opts, api_host, args.openai_port).start()
            openai = f"  openai {api.url}"
        elif args.openai:
            print(f"note: {server.repo} has no CoordExp ensemble (manifest.json): the OpenAI API is off",
                  file=sys.stderr)
        print(f"ready: grpc {server.grpc_url}  http {server.http_url}{openai}  models {', '.join(server.models)}  "
              f"log {server.log_path}", file=sys.stderr)
        while server.proc.poll() is None:
            time.sleep(0.5)
        print(f"error: tritonserver exited with code {server.proc.returncode}: {server.exit_reason()} "
              f"(log: {server.log_path})", file=sys.stderr)
        _stop(api, server)
        return 1
    except (TritonError, ApiServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        _stop(api, server)
        return 2
    except StopRequested as e:
        ready = bool(server and server.models)
        for sig in STOP_SIGNALS:  # a second signal must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        if ready and args.drain_timeout > 0:
            print(f"{e}: draining (new requests refused, in-flight ones finish, up to {args.drain_timeout:g} s) ...",
                  file=sys.stderr)
        else:
            print(f"{e}: stopping tritonserver ...", file=sys.stderr)
        rc = _stop(api, server, args.drain_timeout if ready else 0.0)
        print(f"stopped (exit code {rc})", file=sys.stderr)
        return 0 if ready else 128 + e.signum


def _stop(api: Any, server: "TritonServer | None", drain_timeout: float = 0.0) -> int | None:
    """Drain (the API stops taking connections while Triton lets in-flight requests finish), then
    stop the API, then Triton."""
    if api is not None:
        api.begin_drain()
    if server is not None and drain_timeout > 0:
        d = server.drain(drain_timeout)
        if d["ensembles"]:
            print(f"drained {', '.join(d['ensembles'])} in {d['seconds']:.1f} s"
                  + ("" if d["drained"] else " (timed out: requests still in flight fail)"), file=sys.stderr)
    if api is not None:
        api.stop()
    return server.stop() if server is not None else None


if __name__ == "__main__":
    sys.exit(main())
