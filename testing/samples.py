"""Sample image bytes for benchmarks and tests (the images themselves come from testing.random_model)."""
from __future__ import annotations

import io

from PIL import Image


def jpeg_variant(image: Image.Image, n: int) -> bytes:
    """Same pixels, different bytes (a JPEG comment): a cache miss of identical cost."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, comment=f"variant {n}".encode())
    return buf.getvalue()
