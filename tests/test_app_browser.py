"""The web app in a real browser: headless Chromium driven by Selenium (Debian's chromium and chromium-driver).

Opens the page, uploads a photo, waits for the before/after comparison, takes a screenshot (written to the
test's tmp folder), checks that the comparison shows the images, that the download is the full-size result,
that a bad file gets a message on the page, and that the page asked nothing of any host but the app's own.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_server import AppServer, app_server
from lfpv_fast.io.imageio import read_image

pytest.importorskip("gradio", reason="the app needs the [app] extra (pip install -e '.[dev]' includes it)")
pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -e '.[dev]' includes it)")

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if found is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the browser test needs headless Chromium: {' and '.join(MISSING) or 'nothing'} not found on PATH "
           "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
WAIT_S = 90


def open_browser(width: int = 1280, height: int = 960):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def upload_and_enhance(driver, url: str, image: Path) -> list:
    """Open the page, upload `image`, press Enhance; returns the comparison's <img> elements once loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#uploads input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys(str(image))
    wait.until(lambda d: image.stem in d.find_element(By.ID, "uploads").text)
    driver.find_element(By.ID, "enhance-button").click()

    def loaded(d):
        images = d.find_elements(By.CSS_SELECTOR, "#comparison img")
        ok = len(images) == 2 and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                       img) for img in images)
        return images if ok else False

    return wait.until(loaded)


def write_photo(path: Path, h: int = 96, w: int = 128) -> Path:
    """A dark picture with some structure (so that the screenshot shows something)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([0.10 + 0.08 * np.sin(9 * xx + c) * np.cos(7 * yy - 2 * c) for c in range(3)], axis=2)
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory: pytest.TempPathFactory) -> AppServer:
    with app_server(tmp_path_factory.mktemp("app")) as running:
        yield running


def test_page_enhances_an_upload_and_offers_the_download(browser_server: AppServer, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = write_photo(tmp_path / "dark.png")
    driver = open_browser()
    try:
        images = upload_and_enhance(driver, browser_server.url, photo)
        sizes = [driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
                 for img in images]
        assert sizes == [[128, 96], [128, 96]]
        assert "whole image" in driver.find_element(By.ID, "report").text
        info = driver.find_element(By.ID, "model-info").text
        assert "final_weights.pth" in info and "cpu" in info and "float32" in info
        screenshot = tmp_path / "app.png"
        driver.save_screenshot(str(screenshot))

        # The comparison is painted: its region of the screenshot is not blank.
        comparison = driver.find_element(By.ID, "comparison")
        ratio = driver.execute_script("return window.devicePixelRatio")
        box = {k: v * ratio for k, v in comparison.rect.items()}
        with Image.open(screenshot) as shot:
            region = np.asarray(shot.convert("RGB").crop(
                (box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"])), dtype=np.float32)
        assert region.size > 0 and region.std() > 5

        # The download is the full-size result.
        link = driver.find_element(By.CSS_SELECTOR, "#downloads a[download]")
        assert link.get_attribute("download") == "dark_enhanced.png"
        download = tmp_path / "downloaded.png"
        with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
            download.write_bytes(response.read())
        assert read_image(download).size == (96, 128)

        # A bad file: a message on the page, and the page still works afterwards.
        garbage = tmp_path / "garbage.png"
        garbage.write_bytes(b"not an image at all")
        driver.get(browser_server.url)
        wait = WebDriverWait(driver, WAIT_S)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#uploads input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys(str(garbage))
        wait.until(lambda d: "garbage" in d.find_element(By.ID, "uploads").text)
        driver.find_element(By.ID, "enhance-button").click()
        wait.until(lambda d: "garbage.png: could not read image" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(tmp_path / "app_error.png"))
        assert len(upload_and_enhance(driver, browser_server.url, photo)) == 2

        # Offline: every request of the page went to the app itself (fonts and scripts included).
        origin = browser_server.url.rstrip("/")
        requested = [json.loads(entry["message"])["message"]["params"]["request"]["url"]
                     for entry in driver.get_log("performance")
                     if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"]
        assert any(url.startswith(origin + "/assets/") for url in requested)
        outside = [url for url in requested if not url.startswith((origin + "/", "data:", "blob:"))]
        assert outside == []
    finally:
        driver.quit()
    assert "Traceback" not in browser_server.log_text(), browser_server.log_text()
