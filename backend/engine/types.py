"""The engine's public result types: what every layer above the engine consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Instance:
    """One part or one person found in the image.

    `mask` is a boolean array at the ORIGINAL image size (height, width), after EXIF orientation.
    `person` is the index into `Parsing.humans` of the person this part belongs to, or None when it
    cannot be told (no person instance overlaps the part); it is always None for humans themselves.
    """

    label: str
    class_id: int
    score: float
    mask: np.ndarray
    person: int | None = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class Parsing:
    """Everything the model says about one image: part instances and human instances."""

    width: int
    height: int
    parts: list[Instance] = field(default_factory=list)
    humans: list[Instance] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.parts and not self.humans
