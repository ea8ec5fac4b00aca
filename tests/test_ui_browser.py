"""The viewer in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): what a
person would see on the run list, a run page, the compare page and the upload page.

Set COORDEXP_SCREENSHOTS=DIR to save a screenshot of each page there (docs/img/ holds the README's).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")

from coordexp.runs.folders import import_run_dir  # noqa: E402
from coordexp.runs.registry import Registry  # noqa: E402

from runs_fixtures import DEMO_CKPT, DEMO_GT, Viewer, drop_last_every, evaluate_dir, write_predictions  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(DRIVER)
if not HAVE_BROWSER and os.environ.get("COORDEXP_REQUIRE_BROWSER"):
    raise RuntimeError("COORDEXP_REQUIRE_BROWSER is set but chromium / chromedriver are missing (make browser)")
pytestmark = pytest.mark.skipif(not HAVE_BROWSER, reason="chromium + chromium-driver not installed (make browser)")
EVIL = '<img src=x onerror="document.title=\'pwned\'">'


def _evil_damage(i, objs):
    """Run B: every 5th image misses its last object; image 1's first desc is markup (must show as text)."""
    objs = drop_last_every(5)(i, objs)
    if i == 1 and objs:
        objs[0] = dict(objs[0], desc=EVIL)
    return objs


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from coordexp.ui.app import UiOptions
    from coordexp.ui.infer import InferOptions

    base = tmp_path_factory.mktemp("browser")
    reg = str(base / "r.sqlite")
    ids = []
    with Registry(reg) as r:
        for name, damage in (("demo-checkpoint", None), ("demo-checkpoint-damaged", _evil_damage)):
            d = str(base / name)
            write_predictions(d, damage)
            evaluate_dir(d, plots=True)
            run, rows = import_run_dir(d)
            ids.append(r.add_run(run, rows))
    opts = UiOptions(registry=reg, compare_bootstrap=300,
                     infer=InferOptions(local=DEMO_CKPT, engine="torch", max_new_tokens=96, upload_dir=str(base / "up")))
    with Viewer(opts) as v:
        yield v, ids


@pytest.fixture(scope="module")
def browser():
    from runs_fixtures import chromium_driver

    d = chromium_driver(CHROMIUM, DRIVER)
    yield d
    d.quit()


def _wait(d, css: str, n: int = 1, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, timeout).until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, css)) >= n)
    return d.find_elements(By.CSS_SELECTOR, css)


def _drawn(d, canvas_id: str, timeout: float = 60) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, timeout).until(
        lambda drv: drv.execute_script(f"return document.getElementById('{canvas_id}').dataset.drawn"))
    return json.loads(d.execute_script(f"return document.getElementById('{canvas_id}').dataset.drawn"))


def _shot(d, name: str) -> None:
    out = os.environ.get("COORDEXP_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        d.save_screenshot(os.path.join(out, name))


def test_run_list_shows_the_runs(site, browser):
    v, (a, b) = site
    browser.get(v.url + "/")
    rows = _wait(browser, "#runs tbody tr", 2)
    assert [r.get_attribute("data-run") for r in rows] == [str(b), str(a)]
    assert "demo-checkpoint-damaged" in rows[0].text and "bbox_AP" in rows[0].text
    _shot(browser, "ui_runs.png")


def test_run_page_draws_matches_and_misses_and_escapes_descs(site, browser):
    from selenium.webdriver.common.by import By

    v, (a, b) = site
    browser.get(f"{v.url}/run?id={b}")
    rows = _wait(browser, "#image-table tbody tr", 25)
    f1 = [float(r.find_elements(By.TAG_NAME, "td")[5].text) for r in rows]
    assert f1 == sorted(f1) and f1[0] < 1  # worst first
    assert _drawn(browser, "view")  # the first row's image is shown
    # an image with both a match and a miss: click its row, then check what was drawn
    page = v.json(f"/api/runs/{b}/images?per_page=25&sort=worst")["items"]
    idx = next(im["idx"] for im in page if im["tp"] and im["fn"])
    browser.execute_script("document.getElementById('view').dataset.drawn = ''")
    browser.find_element(By.CSS_SELECTOR, f'#image-table tr[data-idx="{idx}"]').click()
    counts = _drawn(browser, "view")
    assert counts["missed"] >= 1 and counts["match"] >= 1 and browser.find_element(By.ID, "caption").text.startswith(f"#{idx} ")
    # a drawn green box: sample the canvas in the middle of the first matched prediction's top edge
    im = v.json(f"/api/runs/{b}/images/{idx}")
    assert browser.find_elements(By.CSS_SELECTOR, "#metric-table tr") and browser.find_element(By.CSS_SELECTOR, "#pr img")
    _shot(browser, "ui_run.png")
    # the markup desc of image 1 is shown as text, never run
    browser.find_element(By.CSS_SELECTOR, '#image-table tr[data-idx="1"]').click()
    _wait(browser, "#object-table tbody tr")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: EVIL in d.find_element(By.ID, "objects").text)
    assert browser.title != "pwned" and not browser.find_elements(By.CSS_SELECTOR, "#objects img")


def test_compare_page_shows_deltas_flips_and_the_three_views(site, browser):
    from selenium.webdriver.common.by import By

    v, (a, b) = site
    browser.get(f"{v.url}/compare?a={a}&b={b}")
    row = _wait(browser, '#delta-table tr[data-metric="image_accuracy"]')[0]
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    # B broke images 0, 5, ..., 45 (a missed object) and 1 (a wrong label): 11 of 50
    assert cells[1:4] == ["1.0000", "0.7800", "-0.2200"] and cells[5] == "worse"
    flips = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#flip-table td")]
    assert flips[:4] == ["39", "11", "0", "0"]
    buttons = _wait(browser, "button.flip", 11)
    assert [x.text for x in buttons] == ["#0", "#1"] + [f"#{i}" for i in range(5, 50, 5)]
    buttons[1].click()
    assert _drawn(browser, "v-b")["missed"] >= 1 and _drawn(browser, "v-gt")["gt"] >= 1
    _shot(browser, "ui_compare.png")


@pytest.mark.skipif(not os.path.isdir(DEMO_CKPT), reason="the demo checkpoint is not in this checkout")
def test_upload_page_runs_an_image_and_lists_it(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    v, _ = site
    browser.get(v.url + "/infer")
    browser.find_element(By.ID, "file").send_keys(os.path.join(os.path.dirname(DEMO_GT), "images", "val_00002.png"))
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "inference")))
    assert browser.find_element(By.ID, "status").text.startswith("done")
    assert _wait(browser, "#pred-table tbody tr") and _drawn(browser, "view")["pred"] >= 1
    assert _wait(browser, "#timing-table tbody tr", 5) and browser.find_element(By.ID, "dl").get_attribute("href")
    assert _wait(browser, "#history-table tbody tr")[0].text.count("completed") == 1
    _shot(browser, "ui_infer.png")
