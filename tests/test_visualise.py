"""Overlay, palette, legend and label maps: pure functions, tested on hand-made parsings."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend import visualise
from backend.engine.types import Instance, Parsing

# The model's classes, as the hub's configuration.json lists them (20 CIHP labels incl. Background, then Human).
CIHP_CLASSES = [
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants",
    "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe",
    "Right-shoe", "Human",
]


def _classes() -> list[str]:
    return list(CIHP_CLASSES)


W, H = 200, 160


def _box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")


def _parsing() -> Parsing:
    coat = Instance("UpperClothes", 5, 0.9, _box(40, 30, 160, 140), person=0)
    face = Instance("Face", 13, 0.8, _box(90, 60, 100, 70), person=0)  # 100 px inside the 13,200 px coat
    human = Instance("Human", 20, 0.95, _box(30, 20, 170, 150))
    # The large part comes last on purpose: drawing in list order would hide the face.
    return Parsing(W, H, parts=[face, coat], humans=[human])


def test_palette_covers_every_class_with_distinct_colours() -> None:
    classes = _classes()
    assert "Background" in classes and "Human" in classes
    parts = [c for c in classes if c not in ("Background", "Human")]
    assert len(parts) == 20 - 1  # 20 CIHP labels incl. background
    missing = [c for c in classes if c != "Background" and c not in visualise.PALETTE]
    assert missing == []
    colours = [visualise.PALETTE[c] for c in parts]
    assert len(set(colours)) == len(colours)
    # Distinct enough to tell apart: no two part colours closer than 40 in RGB space (the chosen set's minimum is 57).
    arr = np.array(colours, float)
    dist = np.linalg.norm(arr[:, None] - arr[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 40
    assert visualise.OUTLINE_COLOR not in colours


def test_colour_of_unknown_class_is_stable_and_not_background() -> None:
    assert visualise.color_of("Tail") == visualise.color_of("Tail")
    assert visualise.color_of("Tail") != visualise.color_of("Wing")
    assert visualise.color_of("Hair") == visualise.PALETTE["Hair"]


def test_legend_lists_parts_as_fills_and_human_as_outline() -> None:
    classes = _classes()
    entries = visualise.legend(classes)
    assert [e.label for e in entries] == [c for c in classes if c != "Background"]
    assert {e.kind for e in entries if e.label != "Human"} == {"fill"}
    assert [e.kind for e in entries if e.label == "Human"] == ["outline"]
    assert entries[0].class_id == classes.index(entries[0].label)
    assert entries[1].hex == visualise.hex_color(visualise.PALETTE[entries[1].label])
    image = visualise.render_legend(entries)
    assert image.height >= 20 * len(entries)


def test_small_part_stays_visible_over_a_large_one() -> None:
    photo = _photo()
    out = np.asarray(visualise.overlay(photo, _parsing(), alpha=1.0, outline=False))
    assert out.shape == (H, W, 3)
    assert (out[60:70, 90:100] == visualise.PALETTE["Face"]).all()
    assert (out[35:55, 45:80] == visualise.PALETTE["UpperClothes"]).all()
    # Background untouched: transparent.
    assert (out[:25] == np.asarray(photo)[:25]).all()


def test_alpha_zero_is_the_photo_and_alpha_blends_linearly() -> None:
    photo = _photo(1)
    parsing = _parsing()
    same = visualise.overlay(photo, parsing, alpha=0.0, outline=False)
    assert np.array_equal(np.asarray(same), np.asarray(photo))
    half = np.asarray(visualise.overlay(photo, parsing, alpha=0.5, outline=False)).astype(int)
    expected = (np.asarray(photo)[100, 50].astype(float) + np.array(visualise.PALETTE["UpperClothes"])) / 2
    assert np.abs(half[100, 50] - expected).max() <= 1
    with pytest.raises(ValueError):
        visualise.overlay(photo, parsing, alpha=1.5)


def test_outline_draws_each_person_in_white() -> None:
    photo = Image.new("RGB", (W, H), (0, 0, 0))
    parsing = _parsing()
    plain = np.asarray(visualise.overlay(photo, parsing, alpha=0.5, outline=False))
    outlined = np.asarray(visualise.overlay(photo, parsing, alpha=0.5, outline=True))
    changed = (plain != outlined).any(-1)
    # The human box's right edge is at x = 169: its outline is drawn there, the interior is left alone.
    assert changed[80:120, 168:171].any()
    assert not changed[80:120, 110:150].any()
    assert (outlined == 255).all(-1).sum() > 100
    # No humans, no outline and no error.
    empty = Parsing(W, H, parts=parsing.parts, humans=[])
    assert np.array_equal(np.asarray(visualise.overlay(photo, empty, outline=True)),
                          np.asarray(visualise.overlay(photo, empty, outline=False)))


def test_overlay_of_an_empty_parsing_is_the_photo() -> None:
    photo = _photo(2)
    out = visualise.overlay(photo, Parsing(W, H), alpha=0.7, outline=True)
    assert np.array_equal(np.asarray(out), np.asarray(photo))


def test_overlay_takes_any_mode_and_applies_exif_orientation_when_sizes_disagree() -> None:
    parsing = _parsing()
    gray = _photo().convert("L")
    assert visualise.overlay(gray, parsing).mode == "RGB"
    # A portrait JPEG stored sideways: the parsing is at the oriented size (W x H).
    stored = _photo().transpose(Image.Transpose.ROTATE_90)  # H x W on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif)
    sideways = Image.open(io.BytesIO(buf.getvalue()))
    assert sideways.size == (H, W)
    assert visualise.overlay(sideways, parsing).size == (W, H)
    with pytest.raises(ValueError, match="parsing is 200x160"):
        visualise.overlay(Image.new("RGB", (50, 50)), parsing)


def test_label_map_values() -> None:
    classes = _classes()
    parsing = _parsing()
    labels = visualise.label_map(parsing, classes)
    assert labels.dtype == np.uint8 and labels.shape == (H, W)
    assert labels[65, 95] == classes.index("Face")
    assert labels[100, 50] == classes.index("UpperClothes")
    assert labels[5, 5] == 0
    assert set(np.unique(labels)) == {0, classes.index("Face"), classes.index("UpperClothes")}
    assert (labels == classes.index("Face")).sum() == 100

    image = visualise.label_map_image(parsing, classes)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    reread = Image.open(io.BytesIO(buf.getvalue()))
    assert reread.mode == "P"
    assert np.array_equal(np.asarray(reread), labels)
    palette = reread.getpalette()
    face = classes.index("Face")
    assert tuple(palette[3 * face:3 * face + 3]) == visualise.PALETTE["Face"]

    with pytest.raises(ValueError, match="Tail"):
        visualise.label_map(Parsing(W, H, parts=[Instance("Tail", 3, 0.5, _box(0, 0, 5, 5))]), classes)
