"""backend.prompts: Label Studio interactive context -> the prompted people/parts of a (hand-made) Parsing."""
from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.engine.types import Instance, Parsing
from backend.ls_config import parse_label_config
from backend.ls_results import brush_rle, build_prediction, parsing_to_results
from backend.prompts import (BoxPrompt, PointPrompt, PromptError, Target, box_mask, is_interactive, person_at,
                             read_prompts, select)
from backend.settings import Settings

W, H = 200, 100
SETTINGS = Settings(score_threshold=0.3, polygon_detail=1.0, min_region_pixels=4)


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def two_people() -> Parsing:
    """Person 0 at x 10-60, person 1 at x 120-180; an ownerless hair between them."""
    return Parsing(W, H, humans=[
        Instance("Human", 20, 0.9, rect(10, 5, 60, 95)),
        Instance("Human", 20, 0.8, rect(120, 5, 180, 95)),
    ], parts=[
        Instance("Hair", 2, 0.9, rect(15, 5, 55, 15), 0),           # 0
        Instance("Face", 13, 0.9, rect(20, 15, 50, 35), 0),         # 1
        Instance("Hair", 2, 0.8, rect(125, 5, 175, 15), 1),         # 2
        Instance("Face", 13, 0.8, rect(130, 15, 170, 35), 1),       # 3
        Instance("UpperClothes", 5, 0.7, rect(120, 35, 180, 70), 1),  # 4
        Instance("Hair", 2, 0.6, rect(80, 40, 95, 60), None),      # 5: nobody's
    ])


CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="parts" toName="image">
  <Label value="Hair"/><Label value="Face"/><Label value="Clothes" predicted_values="UpperClothes,Coat"/>
  <Label value="Person"/>
</PolygonLabels>
<KeyPointLabels name="click" toName="image" smart="true">
  <Label value="Person"/><Label value="Hair"/><Label value="head" predicted_values="Hair,Face"/><Label value="Click"/>
</KeyPointLabels>
<RectangleLabels name="box" toName="image" smart="true"><Label value="Person"/><Label value="hair"/></RectangleLabels>
<BrushLabels name="stroke" toName="image" smart="true"><Label value="Person"/></BrushLabels>
</View>"""


def point(x_px: float, y_px: float, label: str = "Person", positive: bool = True, **extra) -> dict:
    region = {"id": f"k{x_px}-{y_px}", "type": "keypointlabels", "from_name": "click", "to_name": "image",
              "original_width": W, "original_height": H, "image_rotation": 0, "is_positive": positive,
              "value": {"x": x_px / W * 100, "y": y_px / H * 100, "width": 0.5, "keypointlabels": [label],
                        "labels": [label]}}
    region.update(extra)
    return region


def box(x0: float, y0: float, x1: float, y1: float, label: str = "Person") -> dict:
    return {"id": "r", "type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": x0 / W * 100, "y": y0 / H * 100, "width": (x1 - x0) / W * 100,
                      "height": (y1 - y0) / H * 100, "rotation": 0, "rectanglelabels": [label]}}


def selection_of(*regions: dict):
    prompts = read_prompts({"result": list(regions)}, CONFIG)
    return select(two_people(), prompts.items)


def test_positive_click_selects_the_person_and_all_their_parts() -> None:
    s = selection_of(point(140, 50))
    assert s.humans == {1} and s.parts == {2, 3, 4}
    s = selection_of(point(30, 80))
    assert s.humans == {0} and s.parts == {0, 1}


def test_click_next_to_a_person_selects_the_nearest_within_the_radius_only() -> None:
    # 2 px right of person 0 (radius: 1.5% of 200 px = 3 px)
    assert selection_of(point(61.5, 50)).humans == {0}
    far = selection_of(point(100, 50))
    assert far.empty and "nobody" in far.notes[0]


def test_part_label_returns_only_that_part_of_that_person() -> None:
    s = selection_of(point(150, 60, label="Hair"))            # clicked on person 1's clothes, asked for hair
    assert s.humans == frozenset() and s.parts == {2}
    s = selection_of(point(30, 50, label="head"))              # predicted_values: several classes
    assert s.parts == {0, 1}
    # a Hair click on nobody's hair: that part itself
    assert selection_of(point(85, 50, label="Hair")).parts == {5}


def test_label_for_no_class_or_person_means_whole_person() -> None:
    assert selection_of(point(30, 50, label="Click")).humans == {0}
    assert selection_of(point(30, 50, label="Person")).parts == {0, 1}


def test_negative_click_removes_a_person() -> None:
    s = selection_of(point(30, 50), point(150, 50), point(150, 80, positive=False))
    assert s.humans == {0} and s.parts == {0, 1}
    # only negatives: everyone else (the ownerless part stays)
    s = selection_of(point(30, 50, positive=False))
    assert s.humans == {1} and s.parts == {2, 3, 4, 5}


def test_rectangle_selects_people_it_mostly_covers() -> None:
    assert selection_of(box(0, 0, 200, 100)).humans == {0, 1}
    assert selection_of(box(100, 0, 200, 60)).humans == {1}       # 55 of 90 rows of person 1: 61%
    assert selection_of(box(0, 0, 100, 40)).empty                 # 35 of 90 rows of person 0: 39%
    s = selection_of(box(0, 0, 200, 20, label="hair"))           # part-labelled box: the hair inside, anyone's
    assert s.parts == {0, 2} and not s.humans


def test_brush_stroke_selects_the_people_it_paints() -> None:
    stroke = rect(130, 40, 135, 60) | rect(58, 40, 70, 42)        # mostly on person 1
    region = {"id": "b", "type": "brushlabels", "from_name": "stroke", "to_name": "image",
              "value": {"format": "rle", "rle": brush_rle(stroke), "brushlabels": ["Person"]}}
    assert selection_of(region).humans == {1}
    bad = {**region, "value": {"format": "rle", "rle": brush_rle(np.ones((10, 10), bool)), "brushlabels": []}}
    with pytest.raises(PromptError, match="100 pixels"):
        selection_of(bad)


def test_results_keep_person_indices_and_scores_and_validate() -> None:
    controls = parse_label_config(CONFIG, SETTINGS)
    assert [c.from_name for c in controls] == ["parts", "stroke"]
    polygons = [c for c in controls if c.type == "polygonlabels"]
    results = parsing_to_results(two_people(), polygons, selection=selection_of(point(150, 50)))
    assert {r["meta"]["person"] for r in results} == {1}
    assert sorted(r["value"]["polygonlabels"][0] for r in results) == ["Clothes", "Face", "Hair", "Person"]
    assert all(0 < r["score"] <= 1 for r in results)
    assert build_prediction(results, "v", CONFIG)["result"] == results
    # the prompt control is never an output control: no keypoint/rectangle comes back
    assert {r["type"] for r in results} == {"polygonlabels"}


def test_reading_prompts() -> None:
    assert not is_interactive(None) and not is_interactive({"result": []}) and is_interactive({"result": [{}]})
    prompts = read_prompts({"result": [point(10, 10, positive=False), box(0, 0, 10, 10, label="hair"),
                                       {"type": "textarea", "value": {"text": ["x"]}}]}, CONFIG)
    p, b = prompts.items
    assert isinstance(p, PointPrompt) and not p.positive and p.target == Target()
    assert isinstance(b, BoxPrompt) and b.target == Target(frozenset({"Hair"}))
    assert prompts.ignored == ("textarea",)
    # a keypoint without is_positive (an API client) is positive; plain KeyPoint (no labels) = whole person
    bare = {"type": "keypoint", "value": {"x": 15, "y": 50}}
    assert read_prompts({"result": [bare]}, CONFIG).items[0] == PointPrompt(15, 50)
    assert prompts.for_image("image") == prompts.items and prompts.for_image("other") == ()


@pytest.mark.parametrize("result, message", [
    ([{"type": "keypointlabels", "value": {"x": "a", "y": 1}}], "value.x must be a number"),
    ([{"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": None, "height": 2}}], "value.width"),
    ([{"type": "keypointlabels"}], "no 'value' object"),
    ([{"type": "rectangle", "value": {"x": 1, "y": 1, "width": 2, "height": 2, "rotation": "90"}}], "value.rotation"),
    ([{"type": "brushlabels", "value": {"rle": "abc"}}], "value.rle"),
    ([{"type": "choices", "value": {"choices": ["a"]}}], "no keypoint, rectangle or brush prompt"),
    (["not a region"], "region objects"),
])
def test_bad_prompts_get_a_specific_error(result, message) -> None:
    with pytest.raises(PromptError, match=message) as info:
        read_prompts({"result": result}, CONFIG)
    assert info.value.reason == "bad_prompt"


def test_person_at_and_box_mask_frames() -> None:
    parsing = two_people()
    # pixel column c spans [c, c+1] in percent * W / 100: x = 10.0 px is the first column of person 0
    assert person_at(parsing, 10.0 / W * 100, 50) == 0
    assert person_at(parsing, 9.99 / W * 100, 50, radius=0) is None
    m = box_mask(BoxPrompt(10 / W * 100, 5 / H * 100, 50 / W * 100, 90 / H * 100), W, H)
    assert (m == parsing.humans[0].mask).all()
    rotated = box_mask(BoxPrompt(50, 10, 10, 20, rotation=90), W, H)
    # 90 degrees clockwise around the top-left corner: the box now extends to the left of x = 100 px
    assert rotated[:, :100].any() and not rotated[:, 101:].any()
    assert LabelInterface(CONFIG)   # the test config itself is valid for Label Studio
