"""Run the OpenAI API (uvicorn) in a background thread of `coordexp-server`, and stop it."""
from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

from coordexp.serving.openai_api.app import ApiOptions, build_app

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ApiServerError(RuntimeError):
    """The API could not start (its message says why)."""


class ApiServer:
    def __init__(self, opts: ApiOptions, host: str = "127.0.0.1", port: int = 9000, log_level: str = "warning"):
        if host not in LOOPBACK and not opts.api_key:
            raise ApiServerError(f"the OpenAI API binds {host} (not loopback): give it a key with --api-key KEY "
                                 "(or COORDEXP_API_KEY); clients send Authorization: Bearer KEY")
        self.opts, self.host, self.port, self.log_level = opts, host, port, log_level
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> "ApiServer":
        import uvicorn

        config = uvicorn.Config(build_app(self.opts), host=self.host, port=self.port, log_level=self.log_level,
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)

        def run() -> None:
            try:
                self.server.run()
            except BaseException as e:  # noqa: BLE001 - reported by start()
                self.error = e

        self.thread = threading.Thread(target=run, name="openai-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started and self._healthy():
                return self
            if not self.thread.is_alive():
                raise ApiServerError(f"the OpenAI API did not start on {self.host}:{self.port}: "
                                     f"{self.error or 'see the log above (port in use? Triton model missing?)'}")
            time.sleep(0.1)
        self.stop()
        raise ApiServerError(f"the OpenAI API did not answer on {self.url} within {timeout:.0f}s")

    def _healthy(self) -> bool:
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            with urllib.request.urlopen(f"http://{host}:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def begin_drain(self) -> None:
        """Draining: /health answers 503 (a load balancer stops sending), requests already in flight go on."""
        app = getattr(getattr(self.server, "config", None), "app", None)
        if app is not None and hasattr(app, "state"):
            app.state.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive() and self.server is not None:
                self.server.force_exit = True
                self.thread.join(2.0)
