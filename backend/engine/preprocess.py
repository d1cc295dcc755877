"""Image -> the network's input, exactly as modelscope's ImageHumanParsingPipeline + M2FP.forward prepare it.

EXIF orientation, RGB; resize so the short side is `min_size` and the long side at most `max_size`
(rounded like the pipeline's `_get_preprocess_shape`) with PIL's bilinear filter (what torchvision's
`T.Resize` runs on a PIL image); `ToTensor() * 255` (kept literally: x/255*255 is not always x in float32);
normalise; pad bottom/right with zeros to a multiple of `size_divisibility` AFTER normalising.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import InputError

ImageInput = Union[Image.Image, np.ndarray, bytes, bytearray, str, Path]


class InvalidImageError(InputError, ValueError):
    """The input cannot be read as an image."""

    reason = "decode"


@dataclass(frozen=True)
class Prepared:
    tensor: torch.Tensor          # (1, 3, Hp, Wp) float32, normalised and padded
    resized: tuple[int, int]      # (h, w) of the resized image inside the padded tensor
    original: tuple[int, int]     # (H, W) of the image after EXIF orientation


def load_rgb(image: ImageInput) -> Image.Image:
    """Any supported input -> an RGB PIL image with EXIF orientation applied."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise InvalidImageError(f"array image must be HxWx3 RGB (or HxW / HxWx4), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise InvalidImageError(f"array image must be uint8, got {arr.dtype}")
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), mode="RGB")
    if isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(bytes(image))
        what = f"{len(image)} bytes"
    elif isinstance(image, (str, Path)):
        source = Path(image)
        what = str(image)
    elif isinstance(image, Image.Image):
        pil = image
        source = None
        what = "PIL image"
    else:
        raise InvalidImageError(f"unsupported image type {type(image).__name__}")
    try:
        if source is not None:
            pil = Image.open(source)
            pil.load()
        pil = ImageOps.exif_transpose(pil)
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"cannot read image ({what}): {exc}") from exc
    if pil.width < 1 or pil.height < 1:
        raise InvalidImageError(f"image has no pixels ({pil.width}x{pil.height})")
    return pil


def resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """The pipeline's (new_h, new_w) for an (h, w) image, rounding included."""
    size = short * 1.0
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, scale * w
    else:
        new_h, new_w = scale * h, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    # A 3000x1 strip would round its short side to 0 pixels: keep at least one.
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def prepare(pil: Image.Image, *, min_size: int, max_size: int, size_divisibility: int,
            mean: tuple[float, ...], std: tuple[float, ...]) -> Prepared:
    """RGB PIL image (EXIF already applied) -> normalised, padded (1, 3, Hp, Wp) tensor."""
    w, h = pil.size
    new_h, new_w = resized_shape(h, w, min_size, max_size)
    resized = pil if (new_w, new_h) == (w, h) else pil.resize((new_w, new_h), Image.BILINEAR)
    arr = np.asarray(resized, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    x = x.div_(255).mul_(255)
    x = x.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))
    if size_divisibility > 1:
        hp = (new_h + size_divisibility - 1) // size_divisibility * size_divisibility
        wp = (new_w + size_divisibility - 1) // size_divisibility * size_divisibility
        x = F.pad(x, [0, wp - new_w, 0, hp - new_h], value=0.0)
    return Prepared(tensor=x.unsqueeze(0).contiguous(), resized=(new_h, new_w), original=(h, w))
