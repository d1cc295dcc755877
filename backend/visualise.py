"""Coloured overlays, class-index label maps and the legend: pure functions of a `Parsing`.

One fixed colour per class (`PALETTE`) so that an overlay reads the same in the batch CLI, the HTTP API and the demo
page. The first seven part colours are Okabe-Ito's colour-blind-safe set, given to the largest and most common parts
(clothes, hair, face, pants); the other twelve were chosen greedily from an sRGB grid to maximise the smallest
CIELAB distance to all colours already chosen, under normal vision and simulated protanopia, deuteranopia and
tritanopia (Machado 2009). Smallest pairwise distance (CIE76 dE): 26 normal, 17 protan, 15 deutan: every pair
stays distinguishable side by side, though with 19 classes not every pair can be told apart from memory under CVD.
Background is transparent: it is never painted. Human instances are drawn as outlines, not fills.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from backend.engine.types import Instance, Parsing

RGB = tuple[int, int, int]

BACKGROUND = "Background"
HUMAN = "Human"
OUTLINE_COLOR: RGB = (255, 255, 255)
# Dark halo under the white outline so it reads on bright photos too.
OUTLINE_HALO: RGB = (20, 20, 20)

PALETTE: dict[str, RGB] = {
    "Hat": (221, 0, 68),
    "Hair": (0, 114, 178),
    "Glove": (119, 34, 187),
    "Sunglasses": (102, 0, 255),
    "UpperClothes": (213, 94, 0),
    "Dress": (204, 121, 167),
    "Coat": (0, 158, 115),
    "Socks": (85, 85, 34),
    "Pants": (86, 180, 233),
    "Torso-skin": (102, 238, 238),
    "Scarf": (153, 17, 119),
    "Skirt": (230, 159, 0),
    "Face": (240, 228, 66),
    "Left-arm": (102, 238, 102),
    "Right-arm": (119, 119, 255),
    "Left-leg": (204, 221, 153),
    "Right-leg": (238, 170, 170),
    "Left-shoe": (119, 187, 85),
    "Right-shoe": (153, 51, 85),
    HUMAN: OUTLINE_COLOR,
}


def color_of(label: str) -> RGB:
    """The class's fixed colour; a model with classes outside the CIHP set still gets a stable colour per name."""
    if label in PALETTE:
        return PALETTE[label]
    digest = hashlib.sha256(label.encode("utf-8")).digest()
    # Keep generated colours mid-bright so they show over dark and light photos alike.
    return (64 + digest[0] % 160, 64 + digest[1] % 160, 64 + digest[2] % 160)


def hex_color(rgb: RGB) -> str:
    return "#%02x%02x%02x" % rgb


@dataclass(frozen=True)
class LegendEntry:
    label: str
    class_id: int
    color: RGB
    kind: str  # "fill" for parts, "outline" for Human

    @property
    def hex(self) -> str:
        return hex_color(self.color)


def legend(classes: Sequence[str]) -> list[LegendEntry]:
    """One entry per class the overlay can show, in the model's class order; Background has none."""
    return [
        LegendEntry(label, class_id, color_of(label), "outline" if label == HUMAN else "fill")
        for class_id, label in enumerate(classes)
        if label != BACKGROUND
    ]


def _paint_order(parts: Iterable[Instance]) -> list[Instance]:
    # Largest first, so every smaller part is painted after (on top of) the larger ones it overlaps.
    return sorted(parts, key=lambda p: (-p.area, p.class_id))


def _check_size(parsing: Parsing, shape: tuple[int, ...]) -> None:
    if shape[:2] != (parsing.height, parsing.width):
        raise ValueError(f"image is {shape[1]}x{shape[0]} but the parsing is {parsing.width}x{parsing.height}")


def _oriented_rgb(image: Image.Image, parsing: Parsing) -> np.ndarray:
    """The photo as the parsing saw it: RGB, EXIF orientation applied when that is what makes the sizes agree."""
    if image.size != (parsing.width, parsing.height):
        image = ImageOps.exif_transpose(image)
    rgb = np.asarray(image.convert("RGB"))
    _check_size(parsing, rgb.shape)
    return rgb


def color_layer(parsing: Parsing) -> tuple[np.ndarray, np.ndarray]:
    """(colours HxWx3 uint8, painted HxW bool): every part filled with its class colour, small parts on top."""
    colors = np.zeros((parsing.height, parsing.width, 3), np.uint8)
    painted = np.zeros((parsing.height, parsing.width), bool)
    for part in _paint_order(parsing.parts):
        _check_size(parsing, part.mask.shape)
        colors[part.mask] = color_of(part.label)
        painted |= part.mask
    return colors, painted


def _outline_width(width: int, height: int) -> int:
    return max(2, round(min(width, height) / 320))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow built without FreeType: the fixed bitmap font still works
        return ImageFont.load_default()


def _draw_outlines(rgb: np.ndarray, humans: Sequence[Instance]) -> Image.Image:
    h, w = rgb.shape[:2]
    width = _outline_width(w, h)
    canvas = np.ascontiguousarray(rgb)
    contours_per_person = []
    for human in humans:
        contours, _ = cv2.findContours(human.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours_per_person.append(contours)
        cv2.drawContours(canvas, contours, -1, OUTLINE_HALO, width + 2, lineType=cv2.LINE_8)
    for contours in contours_per_person:
        cv2.drawContours(canvas, contours, -1, OUTLINE_COLOR, width, lineType=cv2.LINE_8)
    out = Image.fromarray(canvas)
    # The person index printed at each outline's top-left corner matches `person` in the API and the parts list.
    draw = ImageDraw.Draw(out)
    font = _font(max(10, width * 7))
    for index, human in enumerate(humans):
        ys, xs = np.nonzero(human.mask)
        if xs.size == 0:
            continue
        text = f"#{index}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, width)
        x = int(xs.min())
        y = max(0, int(ys.min()) - (bottom - top) - 2 * pad)
        draw.rectangle((x, y, x + right - left + 2 * pad, y + bottom - top + 2 * pad), fill=OUTLINE_HALO)
        draw.text((x + pad - left, y + pad - top), text, fill=OUTLINE_COLOR, font=font)
    return out


def overlay(image: Image.Image, parsing: Parsing, alpha: float = 0.5, outline: bool = True) -> Image.Image:
    """The photo with every part blended in its class colour (alpha 0 = photo, 1 = flat colours) and, when
    `outline`, each person's contour in white with its person index. Returns a new RGB image at the parsing's size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    photo = _oriented_rgb(image, parsing)
    colors, painted = color_layer(parsing)
    out = photo.copy()
    if alpha > 0 and painted.any():
        blended = photo[painted].astype(np.float32) * (1.0 - alpha) + colors[painted].astype(np.float32) * alpha
        out[painted] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline and parsing.humans:
        return _draw_outlines(out, parsing.humans)
    return Image.fromarray(out)


def label_map(parsing: Parsing, classes: Sequence[str]) -> np.ndarray:
    """HxW uint8 of class indices into `classes` (0 where no part, i.e. Background), for training masks.
    Overlaps resolve like the overlay: the smaller part wins. Human instances are not written."""
    if len(classes) > 256:
        raise ValueError(f"{len(classes)} classes do not fit a uint8 label map")
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((parsing.height, parsing.width), np.uint8)
    for part in _paint_order(parsing.parts):
        if part.label not in index:
            raise ValueError(f"part label {part.label!r} is not one of the classes {list(classes)}")
        _check_size(parsing, part.mask.shape)
        out[part.mask] = index[part.label]
    return out


def label_map_image(parsing: Parsing, classes: Sequence[str]) -> Image.Image:
    """The label map as a palette ("P") PNG-ready image: pixel values are class indices, viewers show the colours."""
    image = Image.frombytes("P", (parsing.width, parsing.height), label_map(parsing, classes).tobytes())
    flat: list[int] = []
    for i in range(256):
        flat.extend((0, 0, 0) if i >= len(classes) or classes[i] == BACKGROUND else color_of(classes[i]))
    image.putpalette(flat)
    return image


def render_legend(entries: Sequence[LegendEntry], row_height: int = 22, width: int = 180) -> Image.Image:
    """A small legend image (swatch + name per row), for overlays saved to disk by the batch CLI."""
    image = Image.new("RGB", (width, max(1, row_height * len(entries)) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(max(10, row_height - 8))
    swatch = row_height - 8
    for row, entry in enumerate(entries):
        y = 4 + row * row_height
        box = (6, y + 2, 6 + swatch, y + 2 + swatch)
        if entry.kind == "outline":
            draw.rectangle(box, fill=(200, 200, 200), outline=OUTLINE_HALO, width=2)
        else:
            draw.rectangle(box, fill=entry.color, outline=(60, 60, 60))
        draw.text((14 + swatch, y + 2), entry.label, fill=(0, 0, 0), font=font)
    return image
