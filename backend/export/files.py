"""Writing images and label maps to disk (the only module of the export that writes pixels)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.visualise import color_of

JPEG_QUALITY = 95
_ORIENTATION = 0x0112


def image_suffix() -> str:
    return ".jpg"


def save_image(data: bytes, image: Image.Image, path: Path) -> None:
    """The training image, oriented as Label Studio shows it (EXIF applied): a JPEG without rotation is copied
    byte for byte; anything else (PNG, WebP, a rotated JPEG) is written as a JPEG at quality JPEG_QUALITY."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        raw = Image.open(io.BytesIO(data))
        copy = raw.format == "JPEG" and raw.getexif().get(_ORIENTATION, 1) == 1 and raw.size == image.size
    except Exception:  # decoding already succeeded once; any doubt here just means re-encoding
        copy = False
    if copy:
        _atomic_bytes(path, data)
    else:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        _atomic_bytes(path, buf.getvalue())


def save_index_png(array: np.ndarray, path: Path) -> None:
    """A label map as a grayscale PNG: 8-bit when it fits, else 16-bit (values read back unchanged by PIL,
    OpenCV's IMREAD_UNCHANGED and imageio)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(array)
    image = Image.fromarray(a.astype(np.uint8), mode="L") if a.max(initial=0) <= 255 \
        else Image.fromarray(a.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    _atomic_bytes(path, buf.getvalue())


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(path, text.encode())


def write_class_files(folder: Path, classes: tuple[str, ...]) -> None:
    """classes.txt (`index name`), classes.json (index, name, colour) and palette.txt (`R G B` per index, the
    colours of backend/visualise.py, background black) next to the maps."""
    colours = [(0, 0, 0)] + [tuple(color_of(name)) for name in classes[1:]]
    write_text(folder / "classes.txt", "".join(f"{i} {name}\n" for i, name in enumerate(classes)))
    write_json(folder / "classes.json", [{"index": i, "name": n, "color": list(c)}
                                         for i, (n, c) in enumerate(zip(classes, colours))])
    write_text(folder / "palette.txt", "".join(f"{r} {g} {b}\n" for r, g, b in colours))


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
