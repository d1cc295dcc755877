"""Label Studio brush RLE -> a bool mask.

A brush region stores the RGBA bitmap of the whole image (original_width x original_height x 4 bytes) run-length
encoded; the alpha channel is the mask. Decoding goes through the SDK's own decoder
(`label_studio_sdk.converter.brush.decode_rle`), the one Label Studio's converter uses.
"""
from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

# Alpha at or above this is painted: the backend writes 0/255; a hand stroke's soft edge counts from half opacity.
ALPHA_THRESHOLD = 128


class BrushError(ValueError):
    """The RLE does not decode to a mask of the expected size."""


def decode_brush(rle: list[int], width: int, height: int) -> np.ndarray:
    """Bool (height, width) mask of a brush region's RLE; BrushError if it is not a width x height bitmap."""
    if not isinstance(rle, (list, tuple)) or not rle:
        raise BrushError("brush region has no RLE data")
    try:
        flat = decode_rle(list(rle))
    except Exception as exc:  # the SDK's bit reader fails with IndexError/ValueError on truncated data
        raise BrushError(f"brush RLE does not decode: {type(exc).__name__}: {exc}") from None
    if flat.size != width * height * 4:
        raise BrushError(f"brush RLE holds {flat.size} values, a {width}x{height} RGBA bitmap needs "
                         f"{width * height * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] >= ALPHA_THRESHOLD
