"""Jobs started from the viewer (issue 29): test runs of a dataset under the data root and batch
inference of uploads, run in the background through the library the CLI uses, with their status kept
in the registry. API tests on the local demo engine; the browser test drives a real served model.

Set COORDEXP_SCREENSHOTS=DIR to save screenshots of the pages there (docs/img/ holds the README's)."""
from __future__ import annotations

import io
import json
import os
import time
import zipfile

import pytest

pytest.importorskip("fastapi")

from runs_fixtures import DEMO_CKPT, DEMO_GT, Viewer, multipart_files, request  # noqa: E402

from conftest import DEMO_MAX_NEW, REPO_ROOT  # noqa: E402

DATA_ROOT = os.path.join(REPO_ROOT, "data")


def _viewer(tmp_path, *, urls=(), max_running=1, data_root=DATA_ROOT):
    from coordexp.ui.app import UiOptions
    from coordexp.ui.infer import InferOptions
    from coordexp.ui.jobs import JobOptions

    infer = (InferOptions(urls=tuple(urls), max_new_tokens=DEMO_MAX_NEW) if urls else
             InferOptions(local=DEMO_CKPT, engine="torch", max_new_tokens=DEMO_MAX_NEW))
    return Viewer(UiOptions(registry=str(tmp_path / "r.sqlite"), infer=infer,
                            jobs=JobOptions(data_root=data_root, max_running=max_running)))


def _post_json(v, path: str, body: dict) -> tuple[int, dict]:
    code, raw, _ = request(v.url + path, "POST", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return code, json.loads(raw)


def _wait_job(v, job_id: int, statuses=("completed", "failed", "cancelled"), timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = v.json(f"/api/jobs/{job_id}")
        if j["status"] in statuses:
            return j
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {j['status']}")


def _eval_metrics(job_dir: str) -> dict:
    """What `coordexp-client eval` says of the job's own predictions (the same GT records)."""
    from coordexp.eval import evaluate
    from coordexp.runs.importers import flat_metrics

    m = evaluate(os.path.join(job_dir, "predictions.jsonl"), os.path.join(job_dir, "data.jsonl"), None,
                 metrics="both", semantic=False)
    return flat_metrics(m)


def test_a_test_run_from_the_api_is_the_cli_run(tmp_path):
    with _viewer(tmp_path) as v:
        check = v.json("/api/datasets/check?path=demo_val/val.jsonl&limit=6")
        assert (check["lines"], check["valid"], check["images_found"], check["labelled"]) == (6, 6, 6, 6)
        code, job = _post_json(v, "/api/jobs", {"dataset": "demo_val/val.jsonl", "limit": 6})
        assert code == 200 and job["status"] in ("pending", "running") and "dataset_path" not in job["spec"]
        job = _wait_job(v, job["id"])
        assert job["status"] == "completed", job
        assert job["progress"]["done"] == job["progress"]["total"] == 6 and job["progress"]["images_per_s"] > 0
        run = v.json(f"/api/runs/{job['run_id']}")
        assert run["kind"] == "test" and run["num_images"] == 6
        from coordexp.runs.registry import Registry

        with Registry(str(tmp_path / "r.sqlite")) as reg:
            job_dir = reg.get_job(job["id"])["job_dir"]
        cli = _eval_metrics(job_dir)
        for k in ("bbox_AP", "bbox_AP50", "f1ish@0.50_f1_full_micro"):
            assert run["metrics"][k] == pytest.approx(cli[k], abs=1e-12), k
        code, body, _ = request(v.url + f"/api/runs/{job['run_id']}/images/0/file")  # the viewer shows its images
        assert code == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_batch_job_of_three_uploads_and_its_downloads(tmp_path):
    with _viewer(tmp_path) as v:
        images = [open(os.path.join(DATA_ROOT, "demo_val", "images", f"val_0000{k}.png"), "rb").read() for k in range(3)]
        body, headers = multipart_files([("files", f"shot{k}.png", data) for k, data in enumerate(images)], "image/png")
        code, raw, _ = request(v.url + "/api/jobs/batch", "POST", body, headers)
        assert code == 200, raw
        job = _wait_job(v, json.loads(raw)["id"])
        assert job["status"] == "completed" and job["spec"]["images"] == ["shot0.png", "shot1.png", "shot2.png"]
        code, preds, _ = request(v.url + f"/api/jobs/{job['id']}/download/predictions.jsonl")
        lines = [json.loads(x) for x in preds.decode().splitlines()]
        assert code == 200 and len(lines) == 3 and all(x["preds"] for x in lines)
        coco = json.loads(request(v.url + f"/api/jobs/{job['id']}/download/coco.json")[1])
        assert len(coco["images"]) == 3 and len(coco["detections"]) == sum(len(x["preds"]) for x in lines)
        z = zipfile.ZipFile(io.BytesIO(request(v.url + f"/api/jobs/{job['id']}/download/annotated.zip")[1]))
        assert len(z.namelist()) == 3 and all(z.read(n)[:8] == b"\x89PNG\r\n\x1a\n" for n in z.namelist())
        assert v.json(f"/api/runs/{job['run_id']}")["kind"] == "infer"


def test_a_batch_job_of_a_folder_under_the_data_root_on_a_chosen_model(tmp_path):
    import shutil

    root = tmp_path / "data"
    (root / "shots").mkdir(parents=True)
    for k in range(3):
        shutil.copy(os.path.join(DATA_ROOT, "demo_val", "images", f"val_0000{k}.png"), root / "shots" / f"s{k}.png")
    (root / "shots" / "notes.txt").write_text("not an image")  # not an image suffix: left alone
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_bytes(b"not a png")
    with _viewer(tmp_path, data_root=str(root)) as v:
        models = v.json("/api/models")
        assert models["items"] == [os.path.basename(DEMO_CKPT)] == [models["default"]]
        assert v.json("/api/model?name=" + models["default"])["checkpoint_sha256"]
        assert request(v.url + "/api/model?name=nope")[0] == 400
        folders = {f["path"]: f["images"] for f in v.json("/api/datasets")["folders"]}
        assert folders == {"shots": 3, "broken": 1}
        code, body = _post_json(v, "/api/jobs/folder", {"folder": "shots", "model": "nope"})
        assert code == 400 and "not offered" in body["detail"]
        code, body = _post_json(v, "/api/jobs/folder", {"folder": "broken"})
        assert code == 400 and "x.png: not a readable image" in body["detail"]
        code, body = _post_json(v, "/api/jobs/folder", {"folder": "../"})
        assert code == 400 and "outside the data root" in body["detail"]
        code, job = _post_json(v, "/api/jobs/folder", {"folder": "shots", "model": models["default"]})
        assert code == 200, job
        job = _wait_job(v, job["id"])
        assert job["status"] == "completed" and job["spec"]["model"] == models["default"], job
        lines = [json.loads(x) for x in request(v.url + f"/api/jobs/{job['id']}/download/predictions.jsonl")[1]
                 .decode().splitlines()]
        assert [os.path.basename(x["images"][0]) for x in lines] == ["s0.png", "s1.png", "s2.png"]
        from PIL import Image

        assert all(x["preds"] and (x["width"], x["height"]) == Image.open(x["images"][0]).size for x in lines), lines


def test_queue_cancel_and_a_restart(tmp_path):
    from coordexp.runs.registry import Registry

    with _viewer(tmp_path, max_running=1) as v:
        code, first = _post_json(v, "/api/jobs", {"dataset": "demo_val/val.jsonl"})  # 50 records: a while
        code2, second = _post_json(v, "/api/jobs", {"dataset": "demo_val/val.jsonl", "limit": 2})
        assert code == code2 == 200
        _wait_job(v, first["id"], ("running",))
        assert v.json(f"/api/jobs/{second['id']}")["status"] == "pending"  # at most one at once: queued
        assert _post_json(v, f"/api/jobs/{second['id']}/cancel", {})[1]["status"] == "cancelled"
        _post_json(v, f"/api/jobs/{first['id']}/cancel", {})
        j = _wait_job(v, first["id"])
        assert j["status"] == "cancelled" and j["progress"]["done"] < 50
        assert _post_json(v, f"/api/jobs/{first['id']}/cancel", {})[0] == 409  # over already
    with Registry(str(tmp_path / "r.sqlite")) as reg:  # a job the viewer was running when it stopped
        stuck = reg.add_job("test", {"dataset": "demo_val/val.jsonl"})
        reg.update_job(stuck, status="running", job_dir=str(tmp_path / "jobs" / str(stuck)))
    with _viewer(tmp_path) as v:
        j = v.json(f"/api/jobs/{stuck}")
        assert j["status"] == "failed" and "coordexp-client infer --resume" in j["error"]


@pytest.mark.parametrize("path", ["../README.md", "../../etc/passwd", "/etc/passwd", "demo_val/../../README.md",
                                  "sample/images"])
def test_datasets_stay_inside_the_data_root(tmp_path, path):
    with _viewer(tmp_path) as v:
        code, raw, _ = request(v.url + "/api/datasets/check?path=" + path)
        assert code in (400, 404), raw
        code, body = _post_json(v, "/api/jobs", {"dataset": path})
        assert code in (400, 404) and ("outside the data root" in body["detail"] or "no such" in body["detail"]
                                       or "relative" in body["detail"])
        assert v.json("/api/jobs")["items"] == []


def test_a_link_out_of_the_data_root_is_refused(tmp_path):
    from coordexp.ui.jobs import JobRejected, resolve_dataset

    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside)
    with pytest.raises(JobRejected, match="outside the data root"):
        resolve_dataset(str(root), "link.jsonl")


# ============================================================================ in the browser
def _browser():
    import shutil

    from runs_fixtures import chromium_driver

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        if os.environ.get("COORDEXP_REQUIRE_BROWSER"):
            raise RuntimeError("COORDEXP_REQUIRE_BROWSER is set but chromium / chromedriver are missing")
        pytest.skip("chromium + chromium-driver not installed (make browser)")
    return chromium_driver(chromium, driver)


def _shot(d, name: str) -> None:
    out = os.environ.get("COORDEXP_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        d.save_screenshot(os.path.join(out, name))


@pytest.mark.slow
@pytest.mark.triton
def test_in_the_browser_test_run_batch_cancel_and_traversal(demo_server, tmp_path):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, srv = demo_server
    d = _browser()
    try:
        with _viewer(tmp_path, urls=(srv.grpc_url,)) as v:
            # from the run list: "New test run" -> pick the dataset -> Start (two clicks and a choice)
            d.get(v.url + "/")
            d.find_element(By.ID, "newrun").click()
            WebDriverWait(d, 30).until(lambda x: x.find_elements(By.CSS_SELECTOR, "#model-table tr"))
            assert "coordexp" in d.find_element(By.ID, "model-table").text  # a table, not a JSON blob
            WebDriverWait(d, 30).until(lambda x: x.find_elements(By.CSS_SELECTOR, "#model-select option"))
            assert [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model-select option")] == [
                "coordexp"]  # the served ensembles (the streaming twin is the same export)
            Select(d.find_element(By.ID, "dataset")).select_by_value("demo_val/val.jsonl")
            WebDriverWait(d, 30).until(lambda x: "labelled" in x.find_element(By.ID, "check").text)
            assert "50 lines, 50 valid, 50 images found, 50 labelled" in d.find_element(By.ID, "check").text
            d.find_element(By.NAME, "limit").send_keys("12")
            d.find_element(By.ID, "start").click()
            WebDriverWait(d, 30).until(lambda x: x.find_elements(By.CSS_SELECTOR, "#jobs-table progress.job-progress"))
            _shot(d, "ui_jobs.png")
            WebDriverWait(d, 600).until(lambda x: "/run?id=" in x.current_url)  # it lands on its run page
            run_id = int(d.current_url.split("id=")[1].split("&")[0])
            WebDriverWait(d, 30).until(lambda x: x.find_elements(By.CSS_SELECTOR, "#metric-table tr"))
            shown = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
                     for r in d.find_elements(By.CSS_SELECTOR, "#metric-table tbody tr")}
            (job,) = [j for j in v.json("/api/jobs")["items"] if j["run_id"] == run_id]
            from coordexp.runs.registry import Registry

            with Registry(str(tmp_path / "r.sqlite")) as reg:
                cli = _eval_metrics(reg.get_job(job["id"])["job_dir"])
            assert float(shown["bbox_AP"]) == pytest.approx(cli["bbox_AP"], abs=5e-5)
            assert float(shown["f1ish@0.50_f1_full_micro"]) == pytest.approx(cli["f1ish@0.50_f1_full_micro"], abs=5e-5)
            # a batch job of three uploads, with its downloads
            d.get(v.url + "/jobs")
            files = [os.path.join(os.path.dirname(DEMO_GT), "images", f"val_0000{k}.png") for k in range(3)]
            d.find_element(By.ID, "files").send_keys("\n".join(files))
            d.find_element(By.ID, "startbatch").click()
            WebDriverWait(d, 300).until(lambda x: x.find_elements(
                By.CSS_SELECTOR, '#jobs-table tr[data-status="completed"] a.dl'))
            assert [a.text for a in d.find_elements(By.CSS_SELECTOR, "#jobs-table a.dl")][:3] == [
                "predictions.jsonl", "coco.json", "annotated.zip"]
            # cancel a running job
            d.find_element(By.NAME, "limit").clear()
            d.find_element(By.ID, "start").click()
            WebDriverWait(d, 60).until(lambda x: x.find_elements(By.CSS_SELECTOR, '#jobs-table tr[data-status="running"] button.cancel'))
            d.find_element(By.CSS_SELECTOR, '#jobs-table tr[data-status="running"] button.cancel').click()
            WebDriverWait(d, 120).until(lambda x: x.find_elements(By.CSS_SELECTOR, '#jobs-table tr[data-status="cancelled"]'))
            # a traversal attempt from the page is refused with the reason
            msg = d.execute_async_script(
                "const done = arguments[0]; api('/api/datasets/check?path=' + encodeURIComponent('../README.md'))"
                ".then(() => done('accepted')).catch(e => done(String(e.message)));")
            assert "outside the data root" in msg
            # the upload page: the model as a table, no empty canvas before an image
            d.get(v.url + "/infer")
            WebDriverWait(d, 30).until(lambda x: x.find_elements(By.CSS_SELECTOR, "#model-table tr"))
            assert not d.find_element(By.ID, "view").is_displayed()
    finally:
        d.quit()
