"""The viewer's JSON API and its security rules, on a real uvicorn bound to a free loopback port."""
from __future__ import annotations

import io
import json
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from coordexp.runs.folders import import_run_dir  # noqa: E402
from coordexp.runs.registry import Registry  # noqa: E402

from runs_fixtures import DEMO_CKPT, DEMO_GT, Viewer, drop_last_every, evaluate_dir, multipart, request, write_predictions  # noqa: E402,E501


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[str, int, int]:
    base = tmp_path_factory.mktemp("ui")
    path = str(base / "r.sqlite")
    ids = []
    with Registry(path) as reg:
        for name, damage in (("a", None), ("b", drop_last_every(5))):
            d = str(base / name)
            write_predictions(d, damage)
            evaluate_dir(d, plots=name == "a")
            run, rows = import_run_dir(d)
            ids.append(reg.add_run(run, rows))
    return path, ids[0], ids[1]


@pytest.fixture(scope="module")
def viewer(registry):
    from coordexp.ui.app import UiOptions
    from coordexp.ui.infer import InferOptions

    with Viewer(UiOptions(registry=registry[0], compare_bootstrap=200, infer=InferOptions(max_pixels=1_000_000))) as v:
        yield v


def test_health_runs_and_filters(viewer, registry):
    _, a, b = registry
    h = viewer.json("/api/health")
    assert h["status"] == "ok" and h["runs"] == 2 and h["schema_version"] >= 2
    assert [r["id"] for r in viewer.json("/api/runs")["items"]] == [b, a]
    assert viewer.json("/api/runs?kind=infer")["items"] == []
    assert [r["id"] for r in viewer.json("/api/runs?checkpoint=/ckpt/a")["items"]] == [a]
    assert viewer.json("/api/runs?since=4102444800")["items"] == []  # 2100-01-01
    r = viewer.json(f"/api/runs/{a}")
    assert r["primary_metric_name"] == "bbox_AP" and r["has_pr_curve"] and "orange triangle" in r["classes"]
    assert viewer.get(f"/api/runs/{a}/pr_curve.png")[1][:4] == b"\x89PNG"
    code, body, _ = viewer.get("/api/runs/999")
    assert code == 404 and b"no run with id 999" in body


def test_images_are_paged_sorted_worst_first_and_filtered(viewer, registry):
    _, a, b = registry
    page = viewer.json(f"/api/runs/{b}/images?per_page=7&sort=worst")
    assert page["total"] == 50 and len(page["items"]) == 7
    f1 = [im["f1"] for im in page["items"]]
    assert f1 == sorted(f1) and f1[0] < 1.0
    missed = viewer.json(f"/api/runs/{b}/images?outcome=fn&per_page=100")
    assert sorted(im["idx"] for im in missed["items"]) == list(range(0, 50, 5))
    p2 = viewer.json(f"/api/runs/{b}/images?sort=index&page=2&per_page=20")
    assert [im["idx"] for im in p2["items"]] == list(range(20, 40))
    cls = viewer.json(f"/api/runs/{a}/images?cls=orange%20triangle&per_page=500")
    assert 0 < cls["total"] < 50
    for im in cls["items"][:3]:
        full = viewer.json(f"/api/runs/{a}/images/{im['idx']}")
        assert "orange triangle" in {o["desc"] for o in full["gt"] + full["pred"]}
    assert viewer.get(f"/api/runs/{a}/images?sort=random")[0] == 400
    assert viewer.get(f"/api/runs/{a}/images?per_page=100000")[0] == 400


def test_images_are_served_by_registered_id_only(viewer, registry):
    _, a, _ = registry
    code, body, headers = viewer.get(f"/api/runs/{a}/images/3/file")
    assert code == 200 and body[:4] == b"\x89PNG"
    with open(os.path.join(os.path.dirname(DEMO_GT), "images", "val_00003.png"), "rb") as f:
        assert body == f.read()
    assert viewer.get(f"/api/runs/{a}/images/50/file")[0] == 404
    for evil in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "-1%20OR%201=1"):
        code, body, _ = viewer.get(f"/api/runs/{a}/images/{evil}/file")
        assert code in (400, 404) and b"root:" not in body
    for evil in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/../app.py"):
        code, body, _ = viewer.get(evil)
        assert code in (400, 404) and b"root:" not in body and b"import" not in body


def test_compare_api_gives_the_cli_numbers(viewer, registry):
    _, a, b = registry
    rep = viewer.json(f"/api/compare?a={a}&b={b}")
    fl = rep["comparisons"][0]["image_flips"]
    assert (fl["only_a"], fl["only_b"]) == (10, 0)
    code, body, _ = viewer.get(f"/api/compare?a={a}&b=12345")
    assert code == 400 and b"no run with id 12345" in body


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_are_limited_and_checked_before_any_model(viewer, tmp_path):
    body, hdr = multipart("file", "ok.png", _png(8, 8))
    code, out, _ = request(viewer.url + "/api/infer", "POST", body, hdr)
    assert code == 503 and b"no model configured" in out  # a valid image, but this viewer has no model
    body, hdr = multipart("file", "bomb.png", _png(2000, 1000, "1"))  # 2 Mpx > this viewer's 1 Mpx
    code, out, _ = request(viewer.url + "/api/infer", "POST", body, hdr)
    assert code == 413 and b"bomb.png" in out
    body, hdr = multipart("file", "notes.txt", b"not an image at all")
    code, out, _ = request(viewer.url + "/api/infer", "POST", body, hdr)
    assert code == 400 and b"notes.txt" in out
    body, hdr = multipart("file", "big.png", b"\x89PNG" + b"\0" * (20 * 1024 * 1024 + 10))
    code, out, _ = request(viewer.url + "/api/infer", "POST", body, hdr)
    assert code == 413 and b"over the limit" in out


def test_a_non_loopback_bind_needs_a_token(capsys):
    from coordexp.client.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to bind 0.0.0.0 (not loopback) without --token" in capsys.readouterr().err


def test_with_a_token_every_api_call_needs_it(registry):
    from coordexp.ui.app import UiOptions

    with Viewer(UiOptions(registry=registry[0], token="s3cret")) as v:
        assert v.get("/api/health")[0] == 401
        assert v.get("/api/runs", {"Authorization": "Bearer wrong"})[0] == 401
        assert v.json("/api/health", {"Authorization": "Bearer s3cret"})["status"] == "ok"
        assert v.get(f"/api/runs/{registry[1]}/images/0/file?token=s3cret")[0] == 200
        assert v.get("/")[0] == 200  # the page itself holds no data; it sends the token it was given


@pytest.mark.skipif(not os.path.isdir(DEMO_CKPT), reason="the demo checkpoint is not in this checkout")
def test_an_upload_runs_on_a_local_checkpoint_and_lands_in_the_history(tmp_path):
    from coordexp.ui.app import UiOptions
    from coordexp.ui.infer import InferOptions

    reg = str(tmp_path / "r.sqlite")
    uploads = tmp_path / "uploads"
    opts = UiOptions(registry=reg, infer=InferOptions(local=DEMO_CKPT, engine="torch", max_new_tokens=96,
                                                      upload_dir=str(uploads)))
    with open(os.path.join(os.path.dirname(DEMO_GT), "images", "val_00000.png"), "rb") as f:
        img = f.read()
    with Viewer(opts) as v:
        body, hdr = multipart("file", "../../escape.png", img, "image/png")
        code, out, _ = request(v.url + "/api/infer", "POST", body, hdr)
        assert code == 200, out[:300]
        job = json.loads(out)
        assert job["preds"] and {"orange triangle", "yellow rectangle"} & {p["desc"] for p in job["preds"]}
        assert job["timings"]["generate_ms"] > 0 and job["width"] == 128
        stored = os.listdir(uploads)
        assert len(stored) == 1 and stored[0].endswith(".png") and "escape" not in stored[0]
        assert not (tmp_path.parent / "escape.png").exists()
        hist = v.json("/api/runs?kind=infer")["items"]
        assert [(r["id"], r["status"], r["name"]) for r in hist] == [(job["run_id"], "completed", "escape.png")]
        code, png, headers = v.get(f"/api/infer/{job['run_id']}/annotated.png")
        assert code == 200 and png[:4] == b"\x89PNG" and "attachment" in headers.get("content-disposition", "")
        assert v.get(f"/api/runs/{job['run_id']}", )[0] == 200
        assert request(v.url + f"/api/runs/{job['run_id']}", "DELETE")[0] == 200
        assert v.json("/api/runs?kind=infer")["items"] == []


def test_the_ui_command_serves_the_registry(registry, tmp_path):
    """`coordexp-client ui` as a user starts it: its own process, loopback, a free port."""
    import subprocess
    import sys
    import time

    from runs_fixtures import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "coordexp.client.cli", "ui", "--port", str(port), "--registry",
                             registry[0]], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        code = body = None
        while True:
            try:
                code, body, _ = request(f"http://127.0.0.1:{port}/api/health")
            except OSError:  # not listening yet
                pass
            if code == 200 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert code == 200 and json.loads(body)["runs"] == 2
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"CoordExp runs viewer on http://127.0.0.1:{port}/" in err
