"""The search page at ``/`` in a real headless Chromium (selenium): API key flow, text and image searches.

One Serve application (tiny models, the 20-candidate index of tests/test_serve.py, a reranker, an API key)
and one browser are shared by the module; the tests run in order, as one user session. Skipped when
selenium, chromium or chromedriver is missing. ``UNIME_PAGE_SCREENSHOT=docs/search-page.png`` saves the
screenshot of the results there (for the README) instead of a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.conftest import make_png
from tests.serve.test_serve import built_index, running_app  # noqa: F401  (built_index: a module fixture, reused)

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("UNIME_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("UNIME_CHROMEDRIVER", "/usr/bin/chromedriver")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

APP_NAME = "unime-page-test"
KEY_ENV = "UNIME_TEST_PAGE_KEY"
WAIT_S = 60


@pytest.fixture(scope="module")
def server(ray_local, tiny_models, built_index):  # noqa: F811
    config = {"ingress": {"num_cpus": 0},
              "embedder": {"num_cpus": 0, "dtype": "float32", "batch_wait_timeout_s": 0.01},
              "index": {"num_cpus": 0, "partitions": 2},
              # the tiny reranker records no validation: served on purpose
              "reranker": {"num_cpus": 0, "dtype": "float32", "require_validation": False}}
    with running_app(APP_NAME, KEY_ENV, config, built_index["index"], tiny_models["qwen2_5_vl"]) as app:
        yield app


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    # a 1280x800 viewport (--window-size sets the window, the browser's own bars included)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    driver.set_page_load_timeout(WAIT_S)
    driver.get(server["url"] + "/")
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------ helpers
def el(driver, id_):
    return driver.find_element(By.ID, id_)


def wait_for(driver, what, message: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(what, message)


def run_search(driver) -> list:
    """Click Search; wait for the results (or an error); returns the result cards."""
    driver.execute_script("document.getElementById('results').replaceChildren();"
                          "document.getElementById('status').textContent = '';")
    el(driver, "search-btn").click()
    wait_for(driver, lambda d: "results" in el(d, "status").text or el(d, "error").is_displayed()
             or el(d, "key-form").is_displayed(), "no results, error or key prompt")
    assert not el(driver, "error").is_displayed(), el(driver, "error").text
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def set_top_k(driver, k: int) -> None:
    box = el(driver, "top-k")
    box.clear()
    box.send_keys(str(k))


def check_cards(cards, k: int, reranked: bool) -> None:
    assert len(cards) == k
    for i, card in enumerate(cards, start=1):
        assert re.match(rf"#{i} · cand-\d\d", card.find_element(By.CLASS_NAME, "id").text)
        assert re.fullmatch(r"embedder -?\d\.\d{4}", card.find_element(By.CLASS_NAME, "score").text)
        assert card.find_element(By.CLASS_NAME, "text").text.startswith("a photo of a")
        rr = card.find_elements(By.CLASS_NAME, "rerank-score")
        assert bool(rr) == reranked
        if reranked:
            assert re.match(r"reranker \d\.\d{4}", rr[0].text)


def set_rerank(driver, on: bool) -> None:
    if el(driver, "rerank").is_selected() != on:
        el(driver, "rerank").click()


def enter_key(driver, key: str) -> None:
    box = el(driver, "api-key")
    box.clear()
    box.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()


# ------------------------------------------------------------------------------------------ tests
def test_page_is_public_static_and_self_contained(server):
    page = requests.get(server["url"] + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "the page must not load external assets"
    for asset in re.findall(r"""(?:src|href)="(static/[^"]+)""", page.text):
        assert requests.get(f"{server['url']}/{asset}", timeout=10).status_code == 200, asset
    assert requests.head(server["url"] + "/", timeout=10).status_code == 200
    # the API itself still needs the key; unknown paths are not served by the page
    assert requests.get(server["url"] + "/v1/info", timeout=10).status_code == 401
    assert requests.get(server["url"] + "/static/nothing.js", timeout=10).status_code == 401


def test_bad_key_then_right_key_runs_the_search(browser, server):
    d = browser
    # no key yet: /v1/info answers 401 and the page asks for one
    wait_for(d, lambda d: el(d, "key-form").is_displayed(), "the page did not ask for a key")
    assert "API key missing or wrong" in el(d, "key-message").text
    # a search without a key: refused (401), the prompt stays, the search waits for a key
    el(d, "q-text").send_keys("a photo of a red car")
    set_top_k(d, 5)
    d.execute_script("document.getElementById('status').textContent = 'pending';")
    el(d, "search-btn").click()
    wait_for(d, lambda d: el(d, "status").text == "" and el(d, "search-btn").is_enabled(), "search not refused")
    assert el(d, "key-form").is_displayed() and not d.find_elements(By.CSS_SELECTOR, "#results .card")
    # a wrong key: refused with the message, the prompt comes back (its input cleared)
    enter_key(d, "not-the-key")
    wait_for(d, lambda d: el(d, "key-form").is_displayed() and el(d, "api-key").get_attribute("value") == "",
             "a wrong key was not refused")
    assert el(d, "key-message").is_displayed() and "API key missing or wrong" in el(d, "key-message").text
    assert "API key needed" in el(d, "server-info").text
    # the right key: the prompt goes away and the pending search runs
    enter_key(d, server["key"])
    wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == 5, "no results")
    assert not el(d, "key-form").is_displayed() and not el(d, "error").is_displayed()
    check_cards(d.find_elements(By.CSS_SELECTOR, "#results .card"), 5, reranked=False)
    assert re.search(r"5 results · server \d+ ms \(embed \d+, search \d+\) · round trip \d+ ms",
                     el(d, "status").text)
    assert d.execute_script("return sessionStorage.getItem('unime-api-key')") == server["key"]
    assert "20 candidates" in el(d, "server-info").text and el(d, "change-key").is_displayed()


def test_text_search_with_rerank(browser):
    d = browser
    d.refresh()   # the key is kept for the session: no prompt, the reranker toggle shows
    wait_for(d, lambda d: el(d, "rerank-label").is_displayed(), "no rerank toggle")
    assert not el(d, "key-form").is_displayed()
    el(d, "q-text").send_keys("a photo of a small dog")
    set_top_k(d, 4)
    set_rerank(d, True)
    cards = run_search(d)
    check_cards(cards, 4, reranked=True)
    assert re.search(r"4 results, reranked · server \d+ ms \(embed \d+, search \d+, rerank \d+\)",
                     el(d, "status").text)


def test_image_search_shows_thumbnails(browser, built_index, tmp_path):
    d = browser
    query = tmp_path / "query.png"
    query.write_bytes(make_png(48, 40, seed=7))
    set_rerank(d, False)
    el(d, "q-text").clear()
    el(d, "q-image").send_keys(str(query))
    wait_for(d, lambda d: el(d, "drop-preview").is_displayed(), "no preview of the query image")
    assert el(d, "drop-hint").text == "query.png"
    set_top_k(d, 20)
    cards = run_search(d)
    check_cards(cards, 20, reranked=False)
    with_image = {r["id"] for r in built_index["rows"] if r["image"] or r["image_path"]}
    for card in cards:
        cid = card.find_element(By.CLASS_NAME, "id").text.split(" · ")[1]
        imgs = card.find_elements(By.CSS_SELECTOR, ".thumb img")
        assert bool(imgs) == (cid in with_image), cid
        if imgs:   # decoded by the browser
            assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", imgs[0]) > 0
    # the same image, reranked: the README screenshot
    set_top_k(d, 10)
    set_rerank(d, True)
    check_cards(run_search(d), 10, reranked=True)
    shot = Path(os.environ.get("UNIME_PAGE_SCREENSHOT") or tmp_path / "search-page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    assert d.save_screenshot(str(shot))
    with Image.open(shot) as im:   # 256 colours: a third of the size, looks the same
        assert im.size == (1280, 800)
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            shot, optimize=True)
    assert shot.stat().st_size < 300_000


def test_no_browser_errors_but_the_expected_401s(browser):
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("401" in m for m in severe), severe
