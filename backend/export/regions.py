"""One annotation's result items -> part and person regions as pixel masks, with a reason for each one dropped.

Polygons are filled in Label Studio's frame (raster.py), brush regions decoded (brush.py), labels mapped through
the project's config (labels.py). Result items of other kinds (choices, text, rectangles...) are not regions of a
parsing and are counted as ignored. A region that cannot be used (unknown label, broken geometry, a size that
does not match the image) becomes a `Skip` with a stable `reason`; the others go on.

Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from backend.export.brush import BrushError, decode_brush
from backend.export.labels import PERSON, ClassMap, LabelLookupError
from backend.export.raster import NONZERO, Patch, polygon_mask

REGION_TYPES = ("polygonlabels", "brushlabels")


@dataclass(frozen=True)
class Region:
    """A part or person region of one annotation, as pixels."""

    id: str
    order: int                  # position in the annotation's result list
    class_index: int | None     # training class of a part; None for a person
    patch: Patch
    person: int | None          # `meta.person` when the region carries one

    @property
    def is_person(self) -> bool:
        return self.class_index is None


@dataclass(frozen=True)
class Skip:
    """Something left out of the export, and why (`reason` is a stable tag, `detail` a sentence)."""

    reason: str
    detail: str
    task_id: int | None = None
    annotation_id: int | None = None
    region_id: str | None = None

    def line(self) -> str:
        where = [f"task {self.task_id}" if self.task_id is not None else "",
                 f"annotation {self.annotation_id}" if self.annotation_id is not None else "",
                 f"region {self.region_id}" if self.region_id else ""]
        return f"{', '.join(w for w in where if w)}: {self.reason}: {self.detail}"


@dataclass
class Regions:
    parts: list[Region] = field(default_factory=list)
    persons: list[Region] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    ignored: int = 0


def _meta_person(item: dict) -> int | None:
    meta = item.get("meta")
    value = meta.get("person") if isinstance(meta, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        return None
    return int(value)


def _mask(item: dict, kind: str, width: int, height: int) -> Patch:
    value = item.get("value") or {}
    if kind == "polygonlabels":
        return polygon_mask(value.get("points") or [], width, height, NONZERO)
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise BrushError(f"brush format {value.get('format')!r} is not supported (only rle)")
    stored = (item.get("original_width"), item.get("original_height"))
    if stored != (width, height) and None not in stored:
        # The RLE is a bitmap of the size the editor saw; any other size would misplace every pixel.
        raise BrushError(f"brush bitmap is {stored[0]}x{stored[1]}, the image {width}x{height}")
    return Patch.from_full(decode_brush(value["rle"], width, height))


def read_regions(result: Sequence[Any], class_map: ClassMap, width: int, height: int,
                 task_id: int | None = None, annotation_id: int | None = None) -> Regions:
    """Regions of one annotation's (or prediction's) `result` on a width x height image."""
    out = Regions()
    for order, item in enumerate(result or []):
        if not isinstance(item, dict) or item.get("type") not in REGION_TYPES:
            out.ignored += 1
            continue
        kind = item["type"]
        region_id = str(item.get("id", f"#{order}"))

        def skip(reason: str, detail: str) -> None:
            out.skipped.append(Skip(reason, detail, task_id, annotation_id, region_id))

        labels = (item.get("value") or {}).get(kind) or []
        if len(labels) != 1:
            skip("label_count", f"region has {len(labels)} labels, a training pixel takes exactly one")
            continue
        try:
            target = class_map.lookup(str(item.get("from_name", "")), str(labels[0]))
        except LabelLookupError as exc:
            skip(exc.reason, str(exc))
            continue
        try:
            patch = _mask(item, kind, width, height)
        except (ValueError, TypeError) as exc:  # BrushError is a ValueError; so are malformed points
            skip("bad_geometry", str(exc))
            continue
        if patch.area == 0:
            skip("empty_region", "the region covers no pixel centre")
            continue
        region = Region(region_id, order, None if target == PERSON else int(target), patch, _meta_person(item))
        (out.persons if region.is_person else out.parts).append(region)
    return out
