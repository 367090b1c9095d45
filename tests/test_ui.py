"""The search page in a real headless Chromium, against the real Seldon server; and its server's rules."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from imgsim.serve import client
from imgsim.serve.page import UiConfig, create_app
from support.servers import free_port, start_server
from tests.bundles import pipeline_bundle

pytestmark = pytest.mark.slow
OUTPUTS = Path(__file__).resolve().parents[1] / "build" / "test-screenshots"


@pytest.fixture(scope="module")
def seldon(pipeline_run, tmp_path_factory):
    bundle = pipeline_bundle(pipeline_run, tmp_path_factory.mktemp("ui") / "bundle")
    srv = start_server({"IMGSIM_MODEL_URI": str(bundle)}, tmp_path_factory.mktemp("ui-logs") / "server.log")
    yield srv
    srv.stop()


def _serve(cfg: UiConfig):
    server = make_server("127.0.0.1", free_port(), create_app(cfg), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture(scope="module")
def ui(seldon, pipeline_run):
    server, url = _serve(UiConfig(url=seldon.rest, gallery_root=str(pipeline_run["root"])))
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path, chromium = shutil.which("chromedriver"), shutil.which("chromium")
    if not driver_path or not chromium:
        pytest.fail("chromium and chromium-driver are needed for the browser tests: scripts/setup.sh installs them "
                    "with apt-get (Debian packages chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.implicitly_wait(0)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, predicate, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def _cards(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def _upload(driver, path: Path, k: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "k")).select_by_visible_text(str(k))
    driver.find_element(By.ID, "file").send_keys(str(path))


def test_upload_shows_the_neighbours_imgsim_query_gets_then_more_like_this(browser, ui, seldon, pipeline_run):
    from selenium.webdriver.common.by import By

    image = pipeline_run["root"] / "circle" / "000.png"
    browser.get(ui)
    _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    _upload(browser, image, 5)
    _wait(browser, lambda d: len(_cards(d)) == 5)
    shown = [int(card.get_attribute("data-id")) for card in _cards(browser)]
    expected = [n["id"] for n in client.query_rest(seldon.rest, image.read_bytes(), 5)["results"][0]["neighbours"]]
    assert shown == expected
    first = _cards(browser)[0]
    assert "score" in first.text and first.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") != "0"
    assert "model" in browser.find_element(By.ID, "version").text
    browser.save_screenshot(str(OUTPUTS / "search.png"))
    clicked = int(_cards(browser)[2].get_attribute("data-id"))
    _cards(browser)[2].click()
    _wait(browser, lambda d: "more like" in d.find_element(By.ID, "query-title").text and _cards(d)
          and int(_cards(d)[0].get_attribute("data-id")) == clicked)  # an image is its own nearest neighbour
    by_id = requests.post(f"{seldon.rest}/api/v1.0/predictions", json={"jsonData": {"id": clicked, "k": 5}},
                          timeout=30).json()["jsonData"]["results"][0]["neighbours"]
    assert [int(c.get_attribute("data-id")) for c in _cards(browser)] == [n["id"] for n in by_id]
    browser.save_screenshot(str(OUTPUTS / "more-like-this.png"))


def test_a_transparent_query_is_shown_on_white_as_the_model_sees_it(browser, ui, tmp_path):
    import io

    from PIL import Image, ImageDraw
    from selenium.webdriver.common.by import By

    silhouette = Image.new("RGBA", (96, 96), (0, 0, 0, 0))  # a black shape on a transparent background
    ImageDraw.Draw(silhouette).ellipse((24, 24, 72, 72), fill=(0, 0, 0, 255))
    path = tmp_path / "silhouette.png"
    silhouette.save(path)
    browser.get(ui)
    _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    _upload(browser, path, 5)
    _wait(browser, lambda d: len(_cards(d)) == 5)
    tile = Image.open(io.BytesIO(browser.find_element(By.ID, "query-img").screenshot_as_png)).convert("RGB")
    w, h = tile.size
    assert min(tile.getpixel((w // 6, h // 6))) > 240, "the transparent corner is not white"  # (was black)
    assert max(tile.getpixel((w // 2, h // 2))) < 20, "the shape itself is not drawn"
    for card in _cards(browser):  # thumbnails are letterboxed in white, not black
        assert browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor",
                                      card.find_element(By.TAG_NAME, "img")) == "rgb(255, 255, 255)"


def test_only_labels_filters_search_and_more_like_this_and_an_unknown_label_is_said(browser, ui, seldon, pipeline_run):
    from selenium.webdriver.common.by import By

    image = pipeline_run["root"] / "circle" / "000.png"
    browser.get(ui)
    _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    browser.find_element(By.ID, "labels").send_keys("square, stripes")
    _upload(browser, image, 5)
    _wait(browser, lambda d: len(_cards(d)) == 5)
    tags = {"labels": ["square", "stripes"]}
    expected = client.query_rest(seldon.rest, image.read_bytes(), 5, tags)["results"][0]["neighbours"]
    assert [int(c.get_attribute("data-id")) for c in _cards(browser)] == [n["id"] for n in expected]
    assert {n["label"] for n in expected} <= {"square", "stripes"}
    clicked = int(_cards(browser)[1].get_attribute("data-id"))
    _cards(browser)[1].click()
    _wait(browser, lambda d: "more like" in d.find_element(By.ID, "query-title").text and _cards(d)
          and int(_cards(d)[0].get_attribute("data-id")) == clicked)
    by_id = requests.post(f"{seldon.rest}/api/v1.0/predictions", timeout=30,
                          json={"jsonData": {"id": clicked, "k": 5, **tags}}).json()["jsonData"]["results"][0]
    assert [int(c.get_attribute("data-id")) for c in _cards(browser)] == [n["id"] for n in by_id["neighbours"]]
    browser.find_element(By.ID, "labels").clear()
    browser.find_element(By.ID, "labels").send_keys("hexagon")
    _upload(browser, pipeline_run["root"] / "circle" / "001.png", 5)  # another file: the same one fires no change
    message = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#message.error").text)
    assert "unknown label(s) ['hexagon']" in message


def test_a_non_image_shows_the_server_s_message(browser, ui, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    browser.get(ui)
    _upload(browser, bad, 5)
    message = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#message.error").text)
    assert "not an image" in message and not _cards(browser)
    browser.save_screenshot(str(OUTPUTS / "bad-file.png"))


def test_a_server_that_is_down_is_said_so(browser, pipeline_run, tmp_path):
    from selenium.webdriver.common.by import By

    server, url = _serve(UiConfig(url=f"http://127.0.0.1:{free_port()}", gallery_root=str(pipeline_run["root"])))
    try:
        browser.get(url)
        _wait(browser, lambda d: "cannot be reached" in d.find_element(By.ID, "status").text)
        _upload(browser, pipeline_run["root"] / "circle" / "001.png", 5)
        assert "cannot be reached" in _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#message.error").text)
    finally:
        server.shutdown()


def test_thumbnails_come_only_from_the_gallery_root(ui, pipeline_run):
    ok = requests.get(f"{ui}/thumb/circle/000.png", timeout=10)
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "image/png"
    (pipeline_run["root"].parent / "ui-outside.txt").write_text("CONTENT-FROM-OUTSIDE")
    for path in ("../ui-outside.txt", "..%2Fui-outside.txt", "stripes/outside.png", "circle/nope.png",
                 "%2Fetc%2Fpasswd"):  # stripes/outside.png: a symlink out of the root
        response = requests.get(f"{ui}/thumb/{path}", timeout=10)
        assert 400 <= response.status_code < 500 and "CONTENT-FROM-OUTSIDE" not in response.text, path
        assert response.headers["Content-Type"] == "application/json"


def test_the_page_loads_nothing_from_elsewhere(ui):
    page = requests.get(ui, timeout=10).text
    script = requests.get(f"{ui}/static/app.js", timeout=10).text
    style = requests.get(f"{ui}/static/style.css", timeout=10).text
    for text in (page, script, style):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
