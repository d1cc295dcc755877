"""The demo page in a real headless Chromium (Debian's chromium + chromedriver) against the real served backend
(`python _wsgi.py`, the Label Studio ML backend with the page and API mounted), plus the upload limit as that
served app applies it: to the page's API, not to Label Studio's /predict."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from testing.browser import headless_chromium, upload_and_wait

BROWSER_DB = 7  # this module's Redis database (see testing/redis_server.py)
MAX_UPLOAD = 3_000_000


@pytest.fixture(scope="module")
def served(backend_server, model_dir: Path, redis_server):
    redis_server.flushdb(BROWSER_DB)
    server = backend_server(env={
        "M2FP_MODEL": str(model_dir),
        "REDIS_URL": redis_server.url_for(BROWSER_DB),
        "REDIS_TIMEOUT": "5",
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    })
    yield server
    server.stop()


@pytest.fixture(scope="module")
def driver():
    with headless_chromium(1280, 900) as d:
        yield d


def _severe_console_messages(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_page_rejects_a_text_file_then_shows_an_overlay_legend_and_parts(served, driver, parser,
                                                                         sample_images: list[Path],
                                                                         tmp_path: Path) -> None:
    driver.get(f"{served.url}/demo")
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#legend li"))
    legend = [li.get_attribute("data-label") for li in driver.find_elements(By.CSS_SELECTOR, "#legend li")]
    assert legend == [c for c in parser.classes if c != "Background"]
    assert parser.version in driver.find_element(By.ID, "model").text

    # A bad upload shows the server's message and leaves the page usable.
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a photo\n")
    driver.find_element(By.ID, "file").send_keys(str(text_file))
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 60).until(lambda d: "error" in status.get_attribute("class"))
    assert "not an image" in status.text
    assert driver.find_element(By.ID, "result").get_attribute("hidden") is not None
    console = _severe_console_messages(driver)
    assert console and all("400" in message for message in console), console

    photo = next(p for p in sample_images if p.name.startswith("portrait_480x800"))
    upload_and_wait(driver, None, photo, timeout=600)
    size = driver.execute_script(
        "const i = document.getElementById('overlay'); return [i.naturalWidth, i.naturalHeight];")
    assert size == list(Image.open(photo).size)
    assert driver.find_element(By.ID, "status").get_attribute("class") == ""

    rows = driver.find_elements(By.CSS_SELECTOR, "#parts tbody tr")
    assert rows, "the parts list shows the parts found"
    labels = set()
    for row in rows:
        label, person, score, area = (td.text.strip() for td in row.find_elements(By.TAG_NAME, "td"))
        labels.add(label)
        assert label in parser.classes
        assert person == "–" or person.startswith("#")
        assert 0.0 <= float(score) <= 1.0
        assert int(area.replace(",", "")) > 0
    humans = driver.find_elements(By.CSS_SELECTOR, "#humans tbody tr")
    present = {li.get_attribute("data-label") for li in driver.find_elements(By.CSS_SELECTOR, "#legend li.present")}
    assert present == labels | ({"Human"} if humans else set())
    assert _severe_console_messages(driver) == []


def test_served_upload_limit_applies_to_the_api_only(served) -> None:
    big = bytes(MAX_UPLOAD + 1)
    response = requests.post(f"{served.url}/api/parse", files={"file": ("big.jpg", big)}, timeout=60)
    assert response.status_code == 413 and response.json()["error"] == "upload_too_large"
    # Label Studio's /predict on the same app is not limited by MAX_UPLOAD_BYTES: a large request body (here a
    # task whose image is not an image) is read and answered, that task getting no prediction.
    task = {"id": 1, "data": {"image": "data:image/png;base64,AAAA", "padding": "x" * (MAX_UPLOAD + 1)}}
    payload = {"tasks": [task],
               "label_config": '<View><Image name="image" value="$image"/>'
                               '<PolygonLabels name="parts" toName="image"><Label value="Face"/></PolygonLabels></View>'}
    response = requests.post(f"{served.url}/predict", json=payload, timeout=60)
    assert response.status_code == 200, response.text[:500]
    # The server keeps serving the page afterwards.
    assert requests.get(f"{served.url}/demo", timeout=10).status_code == 200
