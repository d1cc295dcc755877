"""backend.ls_results: Parsing -> Label Studio regions and validated predictions (hand-made Parsings)."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from label_studio_sdk.label_interface import LabelInterface

from backend import geometry as G
from backend.engine.types import Instance, Parsing
from backend.ls_config import parse_label_config
from backend.ls_results import (InvalidPredictionError, brush_rle, make_prediction, parsing_to_results,
                                validate_prediction)
from backend.settings import Settings

W, H = 320, 240
SETTINGS = Settings(score_threshold=0.3, polygon_detail=1.0, min_region_pixels=16)


def ellipse(cx, cy, a, b, w=W, h=H):
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (cx, cy), (a, b), 0, 0, 360, 1, -1)
    return m.astype(bool)


def person_parsing() -> Parsing:
    body = ellipse(160, 130, 60, 105)
    face = ellipse(160, 45, 18, 22)
    hair = ellipse(160, 28, 24, 12) & ~face
    shoes = ellipse(130, 228, 14, 8) | ellipse(190, 228, 14, 8)           # one instance, two pieces
    coat = ellipse(160, 130, 55, 50)
    coat[120:135, 140:185] = False                                         # an arm across it: a hole
    faint = ellipse(60, 60, 10, 10)
    speck = np.zeros((H, W), bool)
    speck[5:7, 5:7] = True
    return Parsing(W, H, parts=[
        Instance("Face", 13, 0.91, face, 0),
        Instance("Hair", 2, 0.82, hair, 0),
        Instance("Left-shoe", 18, 0.66, shoes, 0),
        Instance("Coat", 7, 0.77, coat, None),
        Instance("Hat", 1, 0.12, faint, 0),                                # below the threshold
        Instance("Pants", 9, 0.95, ellipse(160, 190, 30, 20), 0),          # no project label
        Instance("Glove", 3, 0.9, speck, 0),                               # a speck
    ], humans=[Instance("Human", 20, 0.97, body, None)])


POLY_CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="parts" toName="image">
  <Label value="face"/><Label value="Hair"/><Label value="Shoes" predicted_values="Left-shoe,Right-shoe"/>
  <Label value="Upper-clothes" predicted_values="UpperClothes,Coat"/><Label value="Hat"/><Label value="Glove"/>
  <Label value="Person"/>
</PolygonLabels></View>"""

BRUSH_CONFIG = """<View><Image name="img" value="$image"/>
<BrushLabels name="masks" toName="img"><Label value="Face"/><Label value="Hair"/><Label value="Human"/></BrushLabels>
</View>"""

BOTH_CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="parts" toName="image"><Label value="Face"/><Label value="Hair"/></PolygonLabels>
<BrushLabels name="masks" toName="image" model_score_threshold="0.85"><Label value="Face"/><Label value="Hair"/></BrushLabels>
</View>"""


def results_for(config, parsing=None, **kw):
    parsing = parsing or person_parsing()
    return parsing_to_results(parsing, parse_label_config(config, SETTINGS), **kw)


def test_polygon_regions_labels_and_required_fields():
    results = results_for(POLY_CONFIG)
    labels = [r["value"]["polygonlabels"][0] for r in results]
    # Person first (drawn below), then parts largest first; the shoes instance gives two regions.
    assert labels == ["Person", "Upper-clothes", "face", "Shoes", "Shoes", "Hair"]
    parts = person_parsing().parts
    assert parts[3].area > parts[0].area > parts[2].area > parts[1].area     # coat > face > shoes > hair
    for r in results:
        assert r["from_name"] == "parts" and r["to_name"] == "image" and r["type"] == "polygonlabels"
        assert (r["original_width"], r["original_height"], r["image_rotation"]) == (W, H, 0)
        assert r["value"]["closed"] is True
        pts = np.array(r["value"]["points"])
        assert pts.shape[1] == 2 and len(pts) >= 3 and pts.min() >= 0 and pts.max() <= 100
        assert all(round(v, 3) == v for v in pts.ravel())
    assert len({r["id"] for r in results}) == len(results)
    assert {r["score"] for r in results} == {0.97, 0.77, 0.82, 0.91, 0.66}


def test_polygons_are_faithful_to_the_masks_in_percent():
    parsing = person_parsing()
    results = results_for(POLY_CONFIG, parsing)
    by_label: dict[str, np.ndarray] = {}
    for r in results:
        ring = G.from_percent(r["value"]["points"], W, H)
        label = r["value"]["polygonlabels"][0]
        by_label[label] = by_label.get(label, np.zeros((H, W), bool)) | G.rasterise(ring, W, H)
    masks = {"Person": parsing.humans[0].mask, "face": parsing.parts[0].mask, "Hair": parsing.parts[1].mask,
             "Shoes": parsing.parts[2].mask, "Upper-clothes": parsing.parts[3].mask}
    for label, mask in masks.items():
        assert G.iou(by_label[label], mask) >= 0.95, label
    # The arm's hole in the coat stays a hole.
    assert not by_label["Upper-clothes"][127, 160]


def test_person_index_rides_in_meta():
    results = results_for(POLY_CONFIG)
    meta = {r["value"]["polygonlabels"][0]: r.get("meta") for r in results}
    assert meta["Person"] == {"person": 0} and meta["face"] == {"person": 0}
    assert meta["Upper-clothes"] is None                    # a part no person could be told for


def test_ids_are_stable():
    assert [r["id"] for r in results_for(POLY_CONFIG)] == [r["id"] for r in results_for(POLY_CONFIG)]
    assert results_for(BRUSH_CONFIG) == results_for(BRUSH_CONFIG)


def test_thresholds_and_min_pixels():
    labels = lambda rs: sorted(r["value"]["polygonlabels"][0] for r in rs)  # noqa: E731
    assert "Hat" not in labels(results_for(POLY_CONFIG))                     # 0.12 < 0.3
    assert "Glove" not in labels(results_for(POLY_CONFIG))                   # 4 pixels < 16
    assert "Glove" in labels(results_for(POLY_CONFIG, min_pixels=1))
    strict = POLY_CONFIG.replace('toName="image">', 'toName="image" model_score_threshold="0.8">')
    assert labels(results_for(strict)) == ["Hair", "Person", "face"]


def test_brush_regions_are_lossless_and_one_per_instance():
    parsing = person_parsing()
    results = results_for(BRUSH_CONFIG, parsing)
    assert [r["value"]["brushlabels"][0] for r in results] == ["Human", "Face", "Hair"]
    masks = {"Human": parsing.humans[0].mask, "Face": parsing.parts[0].mask, "Hair": parsing.parts[1].mask}
    for r in results:
        assert r["type"] == "brushlabels" and r["from_name"] == "masks" and r["to_name"] == "img"
        assert r["value"]["format"] == "rle"
        decoded = decode_rle(r["value"]["rle"]).reshape(H, W, 4)
        assert np.array_equal(decoded[..., 3] == 255, masks[r["value"]["brushlabels"][0]])
        assert set(np.unique(decoded)) <= {0, 255}


@pytest.mark.parametrize("shape, fill", [((1080, 1920), "ellipse"), ((7, 5), "random"), ((1, 70000), "runs"),
                                         ((4, 4), "empty"), ((300, 300), "full")])
def test_brush_rle_is_byte_identical_to_the_sdk(shape, fill):
    rng = np.random.default_rng(1)
    if fill == "ellipse":
        mask = ellipse(900, 500, 300, 420, w=shape[1], h=shape[0])
    elif fill == "random":
        mask = rng.random(shape) < 0.5
    elif fill == "runs":                                   # runs of 4x length 1..2**17: every size class
        mask = np.zeros(shape, bool)
        mask[0, 10:11] = mask[0, 20:22] = mask[0, 30:34] = mask[0, 40:105] = True
        mask[0, 200:16584] = mask[0, 20000:36385] = True
    else:
        mask = np.full(shape, fill == "full")
    assert brush_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)


def test_several_controls_in_one_config():
    results = results_for(BOTH_CONFIG)
    kinds = [(r["from_name"], r["value"].get("polygonlabels", r["value"].get("brushlabels"))[0]) for r in results]
    assert ("parts", "Face") in kinds and ("parts", "Hair") in kinds
    assert ("masks", "Face") in kinds and ("masks", "Hair") not in kinds   # 0.82 < 0.85 on that control
    assert len({r["id"] for r in results}) == len(results)


@pytest.mark.parametrize("config", [POLY_CONFIG, BRUSH_CONFIG, BOTH_CONFIG])
def test_prediction_validates_with_the_sdk(config):
    controls = parse_label_config(config, SETTINGS)
    prediction = make_prediction(person_parsing(), controls, "m2fp-test-1", config)
    assert set(prediction) == {"result", "score", "model_version"}
    assert prediction["model_version"] == "m2fp-test-1"
    assert LabelInterface(config).validate_prediction(prediction, return_errors=True) == []
    scores = [r["score"] for r in prediction["result"]]
    assert prediction["score"] == pytest.approx(np.mean(scores), abs=1e-4)
    assert 0 < prediction["score"] <= 1


def test_empty_parsing_gives_an_empty_valid_prediction():
    controls = parse_label_config(POLY_CONFIG, SETTINGS)
    prediction = make_prediction(Parsing(W, H), controls, "v1", POLY_CONFIG)
    assert prediction == {"result": [], "score": 0.0, "model_version": "v1"}


def test_an_invalid_prediction_raises():
    controls = parse_label_config(POLY_CONFIG, SETTINGS)
    # A control spec that disagrees with the config it is validated against: our bug, loudly.
    broken = [dataclasses.replace(controls[0], label_map={"Face": "NotInConfig"})]
    with pytest.raises(InvalidPredictionError, match="NotInConfig"):
        make_prediction(person_parsing(), broken, "v1", POLY_CONFIG)
    other_control = [dataclasses.replace(controls[0], from_name="nope")]
    with pytest.raises(InvalidPredictionError, match="nope"):
        make_prediction(person_parsing(), other_control, "v1", POLY_CONFIG)


def test_own_checks_catch_what_the_sdk_lets_through():
    region = {"id": "a", "from_name": "parts", "to_name": "image", "type": "polygonlabels", "score": 0.5,
              "value": {"points": [[-1, 0], [10, 0], [10, 10]], "polygonlabels": ["Hair"], "closed": True}}
    assert LabelInterface(POLY_CONFIG).validate_prediction({"result": [region]}, return_errors=True) == []
    errors = validate_prediction({"result": [region, dict(region)]}, POLY_CONFIG)
    assert any("outside [0, 100]" in e for e in errors) and any("unique" in e for e in errors)
    two_points = dict(region, id="b", value=dict(region["value"], points=[[1, 1], [2, 2]]))
    assert any(">= 3" in e for e in validate_prediction({"result": [two_points]}, POLY_CONFIG))


def test_mask_of_the_wrong_size_is_refused():
    parsing = person_parsing()
    small = Parsing(W // 2, H // 2, parts=parsing.parts[:1])
    with pytest.raises(ValueError, match="original size"):
        parsing_to_results(small, parse_label_config(POLY_CONFIG, SETTINGS))


@pytest.fixture(scope="module")
def real_parsing(parser, sample_images) -> Parsing:
    """The engine's own output (random-weight model, shaped for varied output) on a 640x480 photo."""
    from PIL import Image

    return parser(Image.open(sample_images[0]))


def test_real_engine_output_becomes_valid_faithful_regions(parser, real_parsing):
    classes = list(parser.classes)
    labels = "".join(f'<Label value="{c}"/>' for c in classes if c != "Background")
    config = (f'<View><Image name="image" value="$image"/><PolygonLabels name="parts" toName="image" '
              f'model_score_threshold="0">{labels}</PolygonLabels><BrushLabels name="masks" toName="image" '
              f'model_score_threshold="0">{labels}</BrushLabels></View>')
    controls = parse_label_config(config, SETTINGS, classes=classes)
    prediction = make_prediction(real_parsing, controls, parser.version, config)
    assert real_parsing.parts and prediction["result"]
    w, h = real_parsing.width, real_parsing.height
    polys = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    instances = real_parsing.humans + real_parsing.parts
    assert len(brushes) == sum(1 for i in instances if i.area >= SETTINGS.min_region_pixels)
    ious = []
    for kind, idx, inst in [("h", i, x) for i, x in enumerate(real_parsing.humans)] + \
                           [("p", i, x) for i, x in enumerate(real_parsing.parts)]:
        mine = [r for r in polys if r["id"].startswith(f"c0_{kind}{idx}_")]
        drawn = np.zeros((h, w), bool)
        for r in mine:
            assert r["value"]["polygonlabels"] == [inst.label]
            drawn |= G.rasterise(G.from_percent(r["value"]["points"], w, h), w, h)
        if inst.area >= 200:
            ious.append(G.iou(drawn, inst.mask))
    assert ious and np.median(ious) >= 0.97
