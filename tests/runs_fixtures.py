"""Real run folders for the registry / compare / viewer tests: predictions derived from the bundled
demo val set (its GT, deliberately damaged), scored by the real `coordexp.eval`, and a real viewer on
a free loopback port (uvicorn in a thread)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_GT = os.path.join(REPO_ROOT, "data", "demo_val", "val.jsonl")
DEMO_CKPT = os.path.join(REPO_ROOT, "checkpoints", "coordexp-demo-shapes")


def gt_lines(path: str = DEMO_GT) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_predictions(run_dir: str, damage=None, gt: str = DEMO_GT, n: int | None = None) -> str:
    """predictions.jsonl = the GT boxes as predictions (perfect), then `damage(i, objs) -> objs` per image."""
    os.makedirs(run_dir, exist_ok=True)
    out = os.path.join(run_dir, "predictions.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for i, d in enumerate(gt_lines(gt)[:n]):
            objs = [{"type": "bbox_2d", "points": list(o["bbox_2d"]), "desc": o["desc"], "score": 1.0}
                    for o in d["objects"]]
            if damage:
                objs = damage(i, objs)
            f.write(json.dumps({"image_id": i, "images": d["images"], "width": d["width"], "height": d["height"],
                                "coord_mode": "norm1000", "preds": objs, "raw_output": "", "engine": "test",
                                "latency_ms": 10.0 + i}) + "\n")
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"schema_version": "coordexp.v1", "status": "complete", "images_per_s": 5.0, "data": gt,
                   "engine": {"engine": "test", "checkpoint": "/ckpt/" + os.path.basename(run_dir)},
                   "params": {"max_new_tokens": 64}, "prompt": {"variant": "v1"}, "checkpoint_sha256": "ab" * 32}, f)
    return out


def evaluate_dir(run_dir: str, gt: str = DEMO_GT, plots: bool = False) -> str:
    from coordexp.eval.pipeline import evaluate

    out = os.path.join(run_dir, "eval")
    evaluate(os.path.join(run_dir, "predictions.jsonl"), gt, out, semantic=False, plots=plots)
    return out


def drop_last_every(k: int):
    """Damage: every k-th image loses its last prediction (a missed object)."""
    return lambda i, objs: objs[:-1] if i % k == 0 and objs else objs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Viewer:
    """The real app under a real uvicorn on 127.0.0.1:<free port>, in a background thread."""

    def __init__(self, opts):
        import uvicorn

        from coordexp.ui.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(create_app(opts), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Viewer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("viewer did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
        return request(self.url + path, headers=headers)

    def json(self, path: str, headers: dict | None = None):
        code, body, _ = self.get(path, headers)
        assert code == 200, (path, code, body[:300])
        return json.loads(body)


def request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None
            ) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def multipart(field: str, filename: str, data: bytes, ctype: str = "application/octet-stream") -> tuple[bytes, dict]:
    return multipart_files([(field, filename, data)], ctype)


def multipart_files(parts: list[tuple[str, str, bytes]], ctype: str = "application/octet-stream"
                    ) -> tuple[bytes, dict]:
    """A multipart/form-data body of several (field, filename, data) files."""
    b = "----coordexptest" + os.urandom(6).hex()
    body = b"".join((f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                     f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n" for field, filename, data in parts)
    return body + f"--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}


def chromium_driver(chromium: str, driver: str):
    """A headless Chromium (Debian's, with its chromedriver) driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service(driver), options=o)
    d.set_script_timeout(30)
    return d
