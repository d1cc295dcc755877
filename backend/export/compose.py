"""Part and person regions of one image -> the training maps: class per pixel, person per pixel, part instances.

Persons. Regions labelled as persons that carry the same `meta.person` are one person (the backend writes one
polygon per connected piece, all with the person's index); a person region without `meta.person` (drawn by hand)
is a person of its own. Output person ids are 1..N: persons with a `meta.person` first in that index's order,
then hand-drawn ones in result order, then persons known only from their parts' `meta.person` (their own region
was deleted).

Which person a part belongs to:
  1. its `meta.person`, when it has one (also when that person's own region was deleted: the part keeps it);
  2. else the person whose region covers most of the part's pixels (ties: the lower person id);
  3. else, when the image has exactly one person, that person; else none (person id 0, COCO `person_id` null).

Overlaps. Each pixel takes one class: parts are painted largest first, so where two overlap the smaller one
wins (a hand on a coat stays a hand, whatever the order the regions were drawn in); equal areas: the later
region in the result list wins, as it is drawn on top in the editor. The pixel's person is the winning part's.
Pixels only a person region covers stay background (0 in every map), as in CIHP.

Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from backend.export.raster import Patch
from backend.export.regions import Region


@dataclass(frozen=True)
class Person:
    id: int                     # 1..N in this image
    meta: int | None            # the `meta.person` it came from, None for a hand-drawn one
    patch: Patch | None         # union of its person regions; None when none is left


@dataclass(frozen=True)
class PartInstance:
    """One (person, class) pair present in the image: an Instance_ids value and one COCO annotation."""

    id: int                     # 1..K, the value in the instance map
    class_index: int
    person: int                 # 1..N, or 0 for a part no person claims


@dataclass(frozen=True)
class Composition:
    width: int
    height: int
    category: np.ndarray        # (H, W) uint8 class index
    human: np.ndarray           # (H, W) uint8/uint16 person id
    instance: np.ndarray        # (H, W) uint8/uint16 part-instance id
    instances: tuple[PartInstance, ...]
    persons: tuple[Person, ...]
    part_persons: tuple[int, ...]   # person id (0 = none) of each part region, in input order


def _union(patches: Sequence[Patch]) -> Patch:
    top = min(p.top for p in patches)
    left = min(p.left for p in patches)
    bottom = max(p.top + p.mask.shape[0] for p in patches)
    right = max(p.left + p.mask.shape[1] for p in patches)
    mask = np.zeros((bottom - top, right - left), dtype=bool)
    for p in patches:
        h, w = p.mask.shape
        mask[p.top - top:p.top - top + h, p.left - left:p.left - left + w] |= p.mask
    return Patch(mask, top, left)


def group_persons(person_regions: Sequence[Region]) -> list[Person]:
    """Person regions -> persons (see the module docstring for identity and id order)."""
    by_meta: dict[int, list[Patch]] = {}
    hand: list[Patch] = []
    for region in person_regions:
        if region.person is None:
            hand.append(region.patch)
        else:
            by_meta.setdefault(region.person, []).append(region.patch)
    out = [Person(0, meta, _union(patches)) for meta, patches in sorted(by_meta.items())]
    out += [Person(0, None, patch) for patch in hand]
    return [Person(i + 1, p.meta, p.patch) for i, p in enumerate(out)]


def _overlap(a: Patch, b: Patch) -> int:
    top, left = max(a.top, b.top), max(a.left, b.left)
    bottom = min(a.top + a.mask.shape[0], b.top + b.mask.shape[0])
    right = min(a.left + a.mask.shape[1], b.left + b.mask.shape[1])
    if bottom <= top or right <= left:
        return 0
    wa = a.mask[top - a.top:bottom - a.top, left - a.left:right - a.left]
    wb = b.mask[top - b.top:bottom - b.top, left - b.left:right - b.left]
    return int(np.count_nonzero(wa & wb))


def assign_person(part: Region, persons: list[Person]) -> Person | None:
    """The person a part belongs to (rules 1-3 of the module docstring); adds a person for an unknown meta."""
    if part.person is not None:
        found = next((p for p in persons if p.meta == part.person), None)
        if found is None:
            found = Person(len(persons) + 1, part.person, None)
            persons.append(found)
        return found
    scored = [(_overlap(part.patch, p.patch), -p.id, p) for p in persons if p.patch is not None]
    if scored:
        best = max(scored, key=lambda s: (s[0], s[1]))
        if best[0] > 0:
            return best[2]
    return persons[0] if len(persons) == 1 else None


def _dtype(count: int) -> type:
    return np.uint8 if count <= 255 else np.uint16


def compose(parts: Sequence[Region], person_regions: Sequence[Region], width: int, height: int) -> Composition:
    """The CIHP-style maps of one image from its regions (rules in the module docstring)."""
    persons = group_persons(person_regions)
    owners = [assign_person(part, persons) for part in parts]
    part_persons = tuple(o.id if o is not None else 0 for o in owners)
    category = np.zeros((height, width), dtype=np.uint8)
    human = np.zeros((height, width), dtype=_dtype(len(persons)))
    paint = sorted(range(len(parts)), key=lambda i: (-parts[i].patch.area, parts[i].order))
    for i in paint:
        patch = parts[i].patch
        rows, cols = patch.slices
        category[rows, cols][patch.mask] = parts[i].class_index
        human[rows, cols][patch.mask] = part_persons[i]
    # Part instances = distinct (person, class) pairs among the painted pixels, ordered by person then class.
    # (A count per key, not np.unique: no sort of two million pixels.)
    key = human.astype(np.int32) * 256 + category
    counts = np.bincount(key.ravel(), minlength=256 * (len(persons) + 1))
    counts[::256] = 0                                   # class 0: background, whatever the person
    present = np.flatnonzero(counts)
    instances = tuple(PartInstance(k + 1, int(v % 256), int(v // 256)) for k, v in enumerate(present.tolist()))
    lookup = np.zeros(counts.size, dtype=_dtype(len(instances)))
    lookup[present] = np.arange(1, len(instances) + 1)
    instance = lookup[key]
    return Composition(width, height, category, human, instance, instances, tuple(persons), part_persons)
