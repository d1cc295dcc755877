"""backend.ls_config: which controls get regions and which model class becomes which project label."""
from __future__ import annotations

import json
import pytest

from backend.ls_config import DEFAULT_CLASSES, LabelConfigError, normalise, parse_label_config
from backend.settings import Settings

def model_classes() -> list[str]:
    """The class list a loaded parser reports, from the hub's configuration.json kept in the repo."""
    from backend.engine.config import parse_config
    from testing.random_model import default_config_path

    return list(parse_config(json.loads(default_config_path().read_text())).classes)


def cfg(body: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return f"<View>{image}{body}</View>"


SETTINGS = Settings(score_threshold=0.3, polygon_detail=1.0, min_region_pixels=16)


def test_default_classes_match_the_hub_configuration():
    assert list(DEFAULT_CLASSES) == model_classes()


def test_polygon_and_brush_controls_bound_to_an_image():
    config = cfg('<PolygonLabels name="parts" toName="image"><Label value="Hair"/></PolygonLabels>'
                 '<BrushLabels name="masks" toName="image"><Label value="Face"/></BrushLabels>'
                 '<Choices name="quality" toName="image"><Choice value="ok"/></Choices>'
                 '<Text name="note" value="$note"/>'
                 '<PolygonLabels name="text_poly" toName="note"><Label value="Hair"/></PolygonLabels>',
                 image='<Image name="image" value="$photo"/>')
    specs = parse_label_config(config, SETTINGS, classes=model_classes())
    assert [(s.from_name, s.to_name, s.type) for s in specs] == [
        ("parts", "image", "polygonlabels"), ("masks", "image", "brushlabels")]
    assert specs[0].label_map == {"Hair": "Hair"}
    assert specs[1].label_map == {"Face": "Face"}
    assert all(s.value_key == "photo" for s in specs)


def test_case_and_punctuation_insensitive_names():
    labels = ["Upper-clothes", "left_arm", "Torso skin", "RIGHT SHOE", "hair", "Hat"]
    config = cfg('<PolygonLabels name="p" toName="image">'
                 + "".join(f'<Label value="{v}"/>' for v in labels) + "</PolygonLabels>")
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.label_map == {"UpperClothes": "Upper-clothes", "Left-arm": "left_arm", "Torso-skin": "Torso skin",
                              "Right-shoe": "RIGHT SHOE", "Hair": "hair", "Hat": "Hat"}
    assert normalise("Upper-clothes") == normalise("UpperClothes") == "upperclothes"


def test_exact_name_beats_the_insensitive_match():
    config = cfg('<PolygonLabels name="p" toName="image"><Label value="hair"/><Label value="Hair"/></PolygonLabels>')
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.label_map["Hair"] == "Hair"


def test_predicted_values_map_several_classes_to_one_label():
    config = cfg('<PolygonLabels name="p" toName="image">'
                 '<Label value="Head" predicted_values="Face,Hair, hat"/>'
                 '<Label value="Hair"/>'                         # predicted_values wins over the name
                 '<Label value="Shoes" predicted_values="Left-shoe,Right-shoe"/>'
                 '<Label value="Clothes" predicted_values="UpperClothes,Coat,Dress,Unknown"/>'
                 '</PolygonLabels>')
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.label_map == {"Face": "Head", "Hair": "Head", "Hat": "Head", "Left-shoe": "Shoes",
                              "Right-shoe": "Shoes", "UpperClothes": "Clothes", "Coat": "Clothes",
                              "Dress": "Clothes"}
    assert spec.label_for("Face") == "Head"
    assert spec.label_for("Pants") is None                       # no project label: skipped
    assert spec.label_for("Background") is None
    assert any("unknown" in w for w in spec.warnings)            # the typo is reported, not fatal


def test_alias_is_the_label_label_studio_stores():
    config = cfg('<PolygonLabels name="p" toName="image"><Label value="Hair" alias="H"/></PolygonLabels>')
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.label_map == {"Hair": "H"}


@pytest.mark.parametrize("name", ["Human", "person", "PERSON", "Person"])
def test_human_or_person_label_gets_the_person_instances(name):
    config = cfg(f'<PolygonLabels name="p" toName="image"><Label value="{name}"/><Label value="Face"/></PolygonLabels>')
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.human_label == name
    assert "Human" not in spec.label_map and spec.label_for("Human") == name


def test_predicted_values_can_name_the_person_label():
    config = cfg('<BrushLabels name="b" toName="image"><Label value="Body" predicted_values="Human"/></BrushLabels>')
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.human_label == "Body" and spec.label_map == {}


def test_no_person_label_means_no_person_regions():
    config = cfg('<PolygonLabels name="p" toName="image"><Label value="Face"/></PolygonLabels>')
    (spec,) = parse_label_config(config, SETTINGS, classes=model_classes())
    assert spec.human_label is None


def test_per_control_attributes_override_settings():
    config = cfg('<PolygonLabels name="a" toName="image" model_score_threshold="0.55" model_polygon_detail="2.5"'
                 ' model_min_pixels="40"><Label value="Face"/></PolygonLabels>'
                 '<PolygonLabels name="b" toName="image"><Label value="Face"/></PolygonLabels>')
    settings = Settings(score_threshold=0.4, polygon_detail=0.8, min_region_pixels=9)
    a, b = parse_label_config(config, settings, classes=model_classes())
    assert (a.score_threshold, a.polygon_detail, a.min_pixels) == (0.55, 2.5, 40)
    assert (b.score_threshold, b.polygon_detail, b.min_pixels) == (0.4, 0.8, 9)


@pytest.mark.parametrize("attr, message", [('model_score_threshold="high"', "not a float"),
                                           ('model_polygon_detail="0"', ">= 0.01"),
                                           ('model_min_pixels="-3"', ">= 0")])
def test_bad_attribute_is_a_clear_error(attr, message):
    config = cfg(f'<PolygonLabels name="a" toName="image" {attr}><Label value="Face"/></PolygonLabels>')
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config, SETTINGS, classes=model_classes())


@pytest.mark.parametrize("config", [
    cfg('<RectangleLabels name="r" toName="image"><Label value="Face"/></RectangleLabels>'),
    cfg('<Choices name="c" toName="image"><Choice value="Face"/></Choices>'),
    '<View><Text name="t" value="$t"/><PolygonLabels name="p" toName="t"><Label value="Face"/></PolygonLabels></View>',
])
def test_no_suitable_control_is_a_clear_error(config):
    with pytest.raises(LabelConfigError, match="no <PolygonLabels> or <BrushLabels> bound to an <Image>"):
        parse_label_config(config, SETTINGS, classes=model_classes())


@pytest.mark.parametrize("config", ["", "   ", "<View><Image name="])
def test_empty_or_broken_config_is_a_clear_error(config):
    with pytest.raises(LabelConfigError):
        parse_label_config(config, SETTINGS)


def test_classes_default_to_the_hub_model():
    config = cfg('<PolygonLabels name="p" toName="image"><Label value="Coat"/></PolygonLabels>')
    assert parse_label_config(config, SETTINGS)[0].label_map == {"Coat": "Coat"}
    (custom,) = parse_label_config(config, SETTINGS, classes=["Background", "Coat", "Cape"])
    assert custom.label_map == {"Coat": "Coat"}
    assert custom.label_for("Cape") is None
