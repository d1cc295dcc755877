"""Interactive pre-annotation end to end: a REAL Label Studio 1.23.2, our real backend (python _wsgi.py, random-weight
M2FP, Redis cache), the backend connected as interactive, prompts sent through Label Studio's own
`/api/ml/<id>/interactive-annotating` (what the editor calls when a smart-tool region is finished), and the real
editor in headless Chromium.

Click coordinates come from the engine's own parsing of the same image bytes (the `parser` fixture), so a click
lands inside a known person's mask.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from backend.engine.types import Parsing
from backend.images import decode_image
from backend.ls_config import parse_label_config
from backend.ls_results import parsing_to_results
from backend.prompts import CLICK_RADIUS, RECT_MIN_COVER, Selection
from backend.settings import Settings
from testing.label_studio import (LabelStudioServer, connect_ml_backend, create_project, import_uploads,
                                  interactive_annotating, predictions_of)

CIHP_PARTS = ["Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants",
              "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg",
              "Left-shoe", "Right-shoe"]
REDIS_DB = 6
PROMPT_PARTS = ["Hair", "Face", "UpperClothes", "Dress", "Pants", "Left-leg", "Hat"]

INTERACTIVE_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true" strokeWidth="3">
    <Label value="Person" background="#d33"/>
""" + "\n".join(f'    <Label value="{name}"/>' for name in PROMPT_PARTS) + """
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true" smartOnly="true">
    <Label value="People" predicted_values="Human"/>
  </RectangleLabels>
  <PolygonLabels name="parts" toName="image" strokeWidth="2" opacity="0.4">
""" + "\n".join(f'    <Label value="{name}"/>' for name in CIHP_PARTS + ["Human"]) + """
  </PolygonLabels>
</View>"""


@dataclass
class Scene:
    """One task in an interactive project, with what the engine sees in its image."""

    ls: LabelStudioServer
    backend: object
    project: int
    task: int
    ml_id: int
    parsing: Parsing
    person: int                     # the person the tests click on
    click: tuple[float, float]      # percent, inside that person's mask only
    nowhere: tuple[float, float]    # percent, far from every person
    image_path: Path


def _percent(row: int, col: int, parsing: Parsing) -> tuple[float, float]:
    """Centre of pixel (row, col) in percent of the image (Label Studio's frame)."""
    return (col + 0.5) / parsing.width * 100.0, (row + 0.5) / parsing.height * 100.0


def _deepest(mask: np.ndarray) -> tuple[int, int, float]:
    """The pixel of `mask` farthest from its border: (row, col, distance)."""
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(row), int(col), float(dist[row, col])


def _parts_of(parsing: Parsing, person: int) -> list[int]:
    return [i for i, p in enumerate(parsing.parts) if p.person == person]


@pytest.fixture(scope="module")
def scene(label_studio: LabelStudioServer, backend_server, model_dir: Path, redis_server, parser,
          sample_images: list[Path]) -> Scene:
    redis_server.flushdb(REDIS_DB)          # a database of our own: "the first click pays one inference"
    backend = backend_server(env={"M2FP_MODEL": str(model_dir), "REDIS_URL": redis_server.url_for(REDIS_DB),
                                  "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})
    image_path = sample_images[0]
    parsing = parser(decode_image(image_path.read_bytes(), Settings().image_max_pixels))
    assert len(parsing.humans) >= 2, "the shaped random model should find several people"
    union = np.zeros((parsing.height, parsing.width), bool)
    for human in parsing.humans:
        union |= human.mask

    def exclusive(i: int) -> np.ndarray:
        others = np.zeros_like(union)
        for j, h in enumerate(parsing.humans):
            if j != i:
                others |= h.mask
        return parsing.humans[i].mask & ~others

    # The person with the most parts (ties: the largest area only they cover), clicked where only they are.
    person = max(range(len(parsing.humans)),
                 key=lambda i: (len(_parts_of(parsing, i)), int(exclusive(i).sum())))
    row, col, depth = _deepest(exclusive(person))
    assert depth >= 2, "no pixel belongs to that person alone"
    far_row, far_col, far = _deepest(~union)
    assert far > CLICK_RADIUS * max(parsing.width, parsing.height) + 2, "every pixel is near someone"

    ls = label_studio
    project = create_project(ls, INTERACTIVE_CONFIG, title="interactive")
    # Settings -> Annotation -> "Use predictions to prelabel tasks" off: otherwise opening a task without
    # predictions makes Label Studio ask the backend for the FULL pre-label and the editor starts with everyone.
    ls.api("PATCH", f"/api/projects/{project}/", json={"show_collab_predictions": False})
    (task,) = import_uploads(ls, project, [image_path])
    ml_id = connect_ml_backend(ls, project, backend.url, interactive=True)
    return Scene(ls, backend, project, task, ml_id, parsing, person, _percent(row, col, parsing),
                 _percent(far_row, far_col, parsing), image_path)


def _keypoint(x: float, y: float, label: str = "Person", positive: bool = True, rid: str = "kp1") -> dict:
    """A smart keypoint region exactly as the editor serializes it (KeyPointRegion.serialize, dynamic)."""
    return {"id": rid, "type": "keypointlabels", "from_name": "click", "to_name": "image", "origin": "manual",
            "original_width": 640, "original_height": 480, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label], "labels": [label]}}


def _expected(scene: Scene, humans: set[int], parts: set[int]) -> set[tuple[str, int]]:
    controls = parse_label_config(INTERACTIVE_CONFIG, Settings())
    results = parsing_to_results(scene.parsing, controls, selection=Selection(frozenset(humans), frozenset(parts)))
    return _labels_and_persons(results)


def _labels_and_persons(regions: list[dict]) -> set[tuple[str, int | None]]:
    # a part no person overlaps has no meta.person
    return {(r["value"]["polygonlabels"][0], r.get("meta", {}).get("person")) for r in regions}


def _metrics(scene: Scene) -> dict:
    return requests.get(scene.backend.url + "/metrics", timeout=30).json()


def test_click_returns_only_that_persons_parts(scene: Scene) -> None:
    before = _metrics(scene)["inferences"]
    answer = interactive_annotating(scene.ls, scene.ml_id, scene.task, [_keypoint(*scene.click)])
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]
    assert regions, "no region for the clicked person"
    p = scene.person
    assert {r["meta"]["person"] for r in regions} == {p}
    assert {r["type"] for r in regions} == {"polygonlabels"}          # the keypoint itself is not echoed
    assert all(r["from_name"] == "parts" and 0.0 < r["score"] <= 1.0 for r in regions)
    assert _labels_and_persons(regions) == _expected(scene, {p}, set(_parts_of(scene.parsing, p)))
    assert ("Human", p) in _labels_and_persons(regions)
    # The full parse would have given everyone: the click really narrowed it.
    everyone = _expected(scene, set(range(len(scene.parsing.humans))), set(range(len(scene.parsing.parts))))
    assert len({person for _, person in everyone} - {None}) > 1
    # The first click paid one inference; a second click on the same image comes from the cache.
    assert _metrics(scene)["inferences"] == before + 1
    again = interactive_annotating(scene.ls, scene.ml_id, scene.task, [_keypoint(*scene.click, rid="kp2")])
    assert _labels_and_persons(again["data"]["result"]) == _labels_and_persons(regions)
    assert _metrics(scene)["inferences"] == before + 1
    # Interactive answers are suggestions for the editor: Label Studio stores no prediction for them.
    assert predictions_of(scene.ls, scene.task) == []


def test_part_click_returns_only_that_part(scene: Scene) -> None:
    p = scene.person
    mine = [scene.parsing.parts[i] for i in _parts_of(scene.parsing, p)]
    candidates = [part for part in mine if part.label in PROMPT_PARTS and part.score >= Settings().score_threshold]
    assert candidates, "the clicked person has no part the prompt control can ask for"
    wanted = max(candidates, key=lambda part: part.area).label
    answer = interactive_annotating(scene.ls, scene.ml_id, scene.task, [_keypoint(*scene.click, label=wanted)])
    regions = answer["data"]["result"]
    assert regions and _labels_and_persons(regions) == {(wanted, p)}


def test_negative_click_and_rectangle(scene: Scene) -> None:
    parsing = scene.parsing
    # A box over the whole image covers everyone; a negative click on our person takes them out.
    box = {"id": "box1", "type": "rectanglelabels", "from_name": "box", "to_name": "image",
           "value": {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0, "rectanglelabels": ["People"]}}
    answer = interactive_annotating(scene.ls, scene.ml_id, scene.task,
                                    [box, _keypoint(*scene.click, positive=False, rid="neg")])
    persons = {r["meta"]["person"] for r in answer["data"]["result"]}
    assert scene.person not in persons and persons, persons
    # A box around one person's bounding box: exactly the people it mostly covers.
    rows = np.flatnonzero(parsing.humans[scene.person].mask.any(axis=1))
    cols = np.flatnonzero(parsing.humans[scene.person].mask.any(axis=0))
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    inside = np.zeros((parsing.height, parsing.width), bool)
    inside[y0:y1, x0:x1] = True
    covered = {i for i, h in enumerate(parsing.humans) if (h.mask & inside).sum() >= RECT_MIN_COVER * h.mask.sum()}
    box["value"].update(x=x0 / parsing.width * 100, y=y0 / parsing.height * 100,
                        width=(x1 - x0) / parsing.width * 100, height=(y1 - y0) / parsing.height * 100)
    answer = interactive_annotating(scene.ls, scene.ml_id, scene.task, [box])
    assert scene.person in covered
    assert {r["meta"]["person"] for r in answer["data"]["result"]} == covered


def test_click_on_nobody_gives_an_empty_answer_and_a_log_line(scene: Scene) -> None:
    answer = interactive_annotating(scene.ls, scene.ml_id, scene.task, [_keypoint(*scene.nowhere, rid="void")])
    assert answer["data"]["result"] == [] and "errors" not in answer
    assert re.search(rf"task {scene.task}: interactive prompt on image hits nobody", scene.backend.log_text())
    # A prompt the backend cannot read: that task gets no prediction, the log says why.
    bad = _keypoint(*scene.click, rid="bad")
    bad["value"]["x"] = "left"
    answer = interactive_annotating(scene.ls, scene.ml_id, scene.task, [bad])
    assert answer["data"] == []
    assert "(bad_prompt): prompt 0 (keypointlabels, id 'bad'): value.x must be a number" in scene.backend.log_text()


# ------------------------------------------------------------------------------------------- the real editor

# The README's picture is this test's screenshot: UPDATE_DOC_IMAGES=1 writes it there (else only to tmp).
DOC_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "interactive.png"

# The editor's own store: the data manager puts itself on `window`; its `lsf` wrapper holds the annotation.
REGIONS_JS = """
const a = window.dataManager && window.dataManager.lsf && window.dataManager.lsf.currentAnnotation;
if (!a) return null;
const all = Array.from(a.regionStore.regions).concat(Array.from(a.suggestions ? a.suggestions.values() : []));
return all.map(r => ({type: r.type, label: (r.labelName || (r.labeling && r.labeling.selectedLabels || [])
         .map(l => l.value)[0] || null), person: r.meta && r.meta.person !== undefined ? r.meta.person : null,
         suggestion: !!r.fromSuggestion || (a.suggestions && a.suggestions.has && a.suggestions.has(r.id))}));
"""

# Where the image is drawn: the Konva stage (sized to the image at the editor's zoom), once the image loaded.
IMAGE_BOX_JS = """
const img = document.querySelector('img[alt="image"]');
const stage = document.querySelector('.konvajs-content');
if (!img || !img.naturalWidth || !stage) return null;
const r = stage.getBoundingClientRect();
return {left: r.left, top: r.top, width: r.width, height: r.height, natural: img.naturalWidth};
"""

SWITCH_ON_JS = """
const root = arguments[0];
const input = root.matches('input') ? root : root.querySelector('input');
if (input && !input.checked) input.click();
if (!input) root.click();
"""

SMART_TOOL_JS = """
const tool = document.querySelector('.lsf-tool[aria-label="' + arguments[0] + '"]');
if (!tool) return null;
tool.click();
return tool.className;
"""

CLICK_LABEL_JS = """
const want = arguments[0];
for (const el of document.querySelectorAll('.lsf-label')) {
  const text = el.querySelector('.lsf-label__text');
  if (text && text.textContent.trim() === want) { el.click(); return el.className; }
}
return null;
"""


def test_smart_keypoint_in_the_real_editor(scene: Scene, tmp_path: Path) -> None:
    """Log in, open the task, switch Auto-Annotation on, pick the keypoint label and click one person: that
    person's parts appear in the editor as regions (the backend answered through Label Studio)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from testing.browser import headless_chromium
    from tools.screenshot_label_studio import save_compact

    ls = scene.ls
    with headless_chromium(1400, 950, extra_flags=("--hide-scrollbars",)) as driver:
        driver.set_page_load_timeout(180)
        wait = WebDriverWait(driver, 180)
        driver.get(f"{ls.url}/user/login/")
        wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(ls.username)
        driver.find_element(By.NAME, "password").send_keys(ls.password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda d: "/user/login" not in d.current_url)
        driver.get(f"{ls.url}/projects/{scene.project}/data?task={scene.task}")
        wait.until(lambda d: d.execute_script(IMAGE_BOX_JS))
        assert driver.execute_script(REGIONS_JS) == []          # nothing before the click

        # Auto-Annotation: the editor's switch (shown because the backend is connected as interactive), and
        # Auto-Accept so the answer lands as regions of the annotation.
        toggle = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, '[data-testid="bottombar-auto-annotation-toggle"]')))
        driver.execute_script(SWITCH_ON_JS, toggle)
        accept = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, '[data-testid="bottombar-auto-accept-toggle"]')))
        driver.execute_script(SWITCH_ON_JS, accept)
        assert driver.execute_script("return window.dataManager.lsf.lsf.autoAnnotation") is True

        assert driver.execute_script(CLICK_LABEL_JS, "Person"), "no 'Person' label button in the editor"
        # The smart tools sit under the toolbar's Auto-Detect button; pick the keypoint one.
        assert "active" in (driver.execute_script(SMART_TOOL_JS, "key-point-tool") or ""), "no smart keypoint tool"
        box = driver.execute_script(IMAGE_BOX_JS)
        x = box["left"] + scene.click[0] / 100.0 * box["width"]
        y = box["top"] + scene.click[1] / 100.0 * box["height"]
        actions = ActionBuilder(driver)
        actions.pointer_action.move_to_location(int(round(x)), int(round(y))).click()
        actions.perform()

        def answered(d):
            regions = d.execute_script(REGIONS_JS) or []
            return regions if any(r["type"] == "polygonregion" for r in regions) else False

        regions = WebDriverWait(driver, 120).until(answered)
        ActionChains(driver).pause(3).perform()     # let Konva draw them for the screenshot
        screenshot = DOC_SCREENSHOT if os.environ.get("UPDATE_DOC_IMAGES") == "1" else tmp_path / "interactive.png"
        save_compact(driver.get_screenshot_as_png(), screenshot)
        regions = driver.execute_script(REGIONS_JS)

    polygons = [r for r in regions if r["type"] == "polygonregion"]
    assert {r["type"] for r in regions} <= {"polygonregion", "keypointregion"}
    assert {r["person"] for r in polygons} == {scene.person}
    expected = _expected(scene, {scene.person}, set(_parts_of(scene.parsing, scene.person)))
    assert {(r["label"], r["person"]) for r in polygons} == expected
    assert 0 < screenshot.stat().st_size < 300_000
