"""Interactive prompts (Label Studio's smart tools) -> which people and parts of a Parsing to return.

With "Interactive preannotations" on, Label Studio sends `/predict` with `params.context = {"result": [the
regions the annotator just drew with a smart tool]}`. This module reads those regions and picks, from the
image's full Parsing, only what they point at:

- keypoint (`keypointlabels` / `keypoint`), positive: the person whose mask holds the point; when none does,
  the nearest person within CLICK_RADIUS (a fraction of the image's long side);
- keypoint, negative (`is_positive: false`, Alt+click in the editor): that person is removed from the answer
  (with only negative prompts, the answer is everyone else);
- rectangle (`rectanglelabels` / `rectangle`): every person whose mask lies mostly (>= RECT_MIN_COVER) inside;
- brush (`brushlabels` / `brush`, RLE): every person holding >= BRUSH_MIN_SHARE of the stroke's pixels.

A prompt's label says what of that person is wanted, mapped to model classes like every other label
(backend/ls_config.py: predicted_values, exact name, case/punctuation-insensitive name): a label that maps to
part classes (`Hair`, or `skin` with predicted_values="Face,Left-arm,...") selects only those parts of the
person; a label mapped to `Human`/`Person`, or to nothing, selects the whole person (its own region and all
its parts). A part-labelled rectangle selects the parts of that class lying mostly inside it, whoever owns them.

Pure functions on dataclasses; the one I/O-free entry points are `read_prompts` and `select`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence, Union

import cv2
import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from backend.engine.types import Parsing
from backend.errors import InputError
from backend.ls_config import BACKGROUND_CLASS, DEFAULT_CLASSES, HUMAN_CLASS, LabelRule, _match, _rules

# A click that misses every person still selects the nearest one within this distance (fraction of the
# image's long side; 1.5% is ~29 px at 1920x1080): the annotator aims at a person, not at a pixel.
CLICK_RADIUS = 0.015
# A rectangle selects a person (or part) when at least this share of its mask is inside.
RECT_MIN_COVER = 0.5
# A brush stroke selects a person holding at least this share of the stroke's pixels.
BRUSH_MIN_SHARE = 0.25

_POINT_TYPES = {"keypointlabels": "keypointlabels", "keypoint": None}
_RECT_TYPES = {"rectanglelabels": "rectanglelabels", "rectangle": None}
_BRUSH_TYPES = {"brushlabels": "brushlabels", "brush": None}


class PromptError(InputError):
    """`context.result` holds a prompt this backend cannot read (the message names the region and the field)."""

    reason = "bad_prompt"


@dataclass(frozen=True)
class Target:
    """What a prompt wants of the person it hits: the whole person, or only some part classes."""

    parts: frozenset[str] | None = None       # model part classes; None = the whole person

    @property
    def whole(self) -> bool:
        return self.parts is None

    def describe(self) -> str:
        return "person" if self.parts is None else "/".join(sorted(self.parts))


@dataclass(frozen=True)
class PointPrompt:
    x: float                                   # percent of the image width (Label Studio's frame)
    y: float
    positive: bool = True
    target: Target = Target()
    to_name: str | None = None
    id: str = ""


@dataclass(frozen=True)
class BoxPrompt:
    x: float                                   # top-left corner, percent
    y: float
    width: float                               # percent
    height: float
    rotation: float = 0.0                      # degrees, clockwise around the top-left corner (as LS draws it)
    positive: bool = True
    target: Target = Target()
    to_name: str | None = None
    id: str = ""


@dataclass(frozen=True)
class BrushPrompt:
    rle: tuple[int, ...]                       # Label Studio brush RLE (RGBA at the original image size)
    positive: bool = True
    target: Target = Target()
    to_name: str | None = None
    id: str = ""


Prompt = Union[PointPrompt, BoxPrompt, BrushPrompt]


@dataclass(frozen=True)
class Prompts:
    """The prompts of one interactive request."""

    items: tuple[Prompt, ...] = ()
    ignored: tuple[str, ...] = ()              # region types in context.result that are no prompt (logged)

    def for_image(self, to_name: str) -> tuple[Prompt, ...]:
        """The prompts drawn on this `<Image>` (a prompt without `to_name` applies to every image)."""
        return tuple(p for p in self.items if p.to_name in (None, to_name))


@dataclass(frozen=True)
class Selection:
    """Instances of one Parsing to keep: person indices (their own region) and part indices."""

    humans: frozenset[int] = frozenset()
    parts: frozenset[int] = frozenset()
    notes: tuple[str, ...] = field(default=(), compare=False)   # what each prompt hit, for the log

    @property
    def empty(self) -> bool:
        return not self.humans and not self.parts


# ------------------------------------------------------------------------------------------------ reading

def is_interactive(context: object) -> bool:
    """True for a request carrying prompts: `context` is `{"result": [at least one region]}`."""
    return isinstance(context, Mapping) and isinstance(context.get("result"), list) and bool(context["result"])


@lru_cache(maxsize=64)
def _prompt_rules(label_config: str) -> dict[str, tuple[LabelRule, ...]]:
    """Label rules of every labels control of the config, by control name."""
    try:
        interface = LabelInterface(label_config)
    except Exception:  # noqa: BLE001 - the config was already checked by plan_config; no rules then
        return {}
    return {control.name: _rules(control) for control in interface.controls}


def label_target(labels: Sequence[str], rules: Sequence[LabelRule], classes: Sequence[str]) -> Target:
    """The Target of a prompt carrying `labels`, under its control's label `rules` and the model's `classes`."""
    parts: set[str] = set()
    part_classes = [c for c in classes if c not in (BACKGROUND_CLASS, HUMAN_CLASS)]
    for label in labels:
        # Each label on its own (ls_config's rules for one <Label>): `Hair` means hair even when another label
        # of the prompt control lists Hair in its predicted_values. A label the control does not declare (an
        # API client's) is matched by its name alone.
        own = [r for r in rules if r.label == label][:1] or [LabelRule(label, (label,), ())]
        rule_set = tuple(own)
        if _match(HUMAN_CLASS, rule_set) == label:
            return Target()
        claimed = {c for c in part_classes if _match(c, rule_set) == label}
        if not claimed:
            return Target()        # a label naming no model class (e.g. "Click"): the whole person
        parts |= claimed
    return Target(frozenset(parts)) if parts else Target()


def _number(region: Mapping, value: Mapping, key: str, n: int) -> float:
    raw = value.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(float(raw)):
        raise PromptError(f"prompt {n} ({region.get('type')}, id {region.get('id')!r}): value.{key} must be a "
                          f"number, got {raw!r}")
    return float(raw)


def _labels(value: Mapping, key: str | None) -> list[str]:
    for name in (key, "labels"):
        if name and isinstance(value.get(name), list):
            return [str(v) for v in value[name] if isinstance(v, (str, int, float))]
    return []


def read_prompts(context: Mapping | None, label_config: str, classes: Sequence[str] = DEFAULT_CLASSES) -> Prompts:
    """The prompts of `context.result`; PromptError (reason "bad_prompt") for a region that cannot be read or a
    result with no prompt at all. Regions of other types (text, choices...) are listed in `ignored`."""
    if not is_interactive(context):
        return Prompts()
    rules = _prompt_rules(label_config)
    items: list[Prompt] = []
    ignored: list[str] = []
    for n, region in enumerate(context["result"]):
        if not isinstance(region, Mapping):
            raise PromptError(f"prompt {n}: context.result entries must be region objects, got {type(region).__name__}")
        kind = str(region.get("type", "")).lower()
        value = region.get("value")
        if kind not in (*_POINT_TYPES, *_RECT_TYPES, *_BRUSH_TYPES):
            ignored.append(kind or "untyped")
            continue
        if not isinstance(value, Mapping):
            raise PromptError(f"prompt {n} ({kind}, id {region.get('id')!r}): no 'value' object")
        positive = region.get("is_positive", True) is not False
        label_key = {**_POINT_TYPES, **_RECT_TYPES, **_BRUSH_TYPES}[kind]
        target = label_target(_labels(value, label_key), rules.get(str(region.get("from_name")), ()), classes)
        common = dict(positive=positive, target=target, id=str(region.get("id", "")),
                      to_name=str(region["to_name"]) if region.get("to_name") else None)
        if kind in _POINT_TYPES:
            items.append(PointPrompt(_number(region, value, "x", n), _number(region, value, "y", n), **common))
        elif kind in _RECT_TYPES:
            items.append(BoxPrompt(_number(region, value, "x", n), _number(region, value, "y", n),
                                   _number(region, value, "width", n), _number(region, value, "height", n),
                                   _number(region, value, "rotation", n) if value.get("rotation") is not None
                                   else 0.0, **common))
        else:
            rle = value.get("rle")
            if not isinstance(rle, list) or not rle or not all(isinstance(b, int) and 0 <= b < 256 for b in rle):
                raise PromptError(f"prompt {n} ({kind}, id {region.get('id')!r}): value.rle must be a non-empty "
                                  "list of bytes (Label Studio brush RLE)")
            items.append(BrushPrompt(tuple(rle), **common))
    if not items:
        raise PromptError("context.result has no keypoint, rectangle or brush prompt (found: "
                          f"{', '.join(sorted(set(ignored))) or 'nothing'}); this backend answers those only")
    return Prompts(tuple(items), tuple(ignored))


# ------------------------------------------------------------------------------------------------ geometry

def _pixel(x_percent: float, y_percent: float, width: int, height: int) -> tuple[int, int]:
    """(row, col) of the pixel under a point given in percent: pixel c spans [c, c+1] in LS's frame."""
    col = min(max(int(math.floor(x_percent / 100.0 * width)), 0), width - 1)
    row = min(max(int(math.floor(y_percent / 100.0 * height)), 0), height - 1)
    return row, col


def person_at(parsing: Parsing, x: float, y: float, radius: float = CLICK_RADIUS) -> int | None:
    """Index of the person under the point (x, y in percent): the best-scoring one whose mask holds it, else the
    nearest within `radius` (fraction of the long side), else None."""
    if not parsing.humans:
        return None
    row, col = _pixel(x, y, parsing.width, parsing.height)
    holding = [i for i, h in enumerate(parsing.humans) if h.mask[row, col]]
    if holding:
        return max(holding, key=lambda i: (parsing.humans[i].score, -i))
    r = int(math.ceil(radius * max(parsing.width, parsing.height)))
    if r <= 0:
        return None
    r0, r1 = max(0, row - r), min(parsing.height, row + r + 1)
    c0, c1 = max(0, col - r), min(parsing.width, col + r + 1)
    # Distance from the clicked pixel's centre to every pixel centre of the window.
    dy = (np.arange(r0, r1) - row)[:, None].astype(np.float64)
    dx = (np.arange(c0, c1) - col)[None, :].astype(np.float64)
    dist = np.sqrt(dy * dy + dx * dx)
    best: tuple[float, int] | None = None
    for i, human in enumerate(parsing.humans):
        window = human.mask[r0:r1, c0:c1]
        if not window.any():
            continue
        d = float(dist[window].min())
        if d <= r and (best is None or d < best[0]):
            best = (d, i)
    return None if best is None else best[1]


def box_mask(prompt: BoxPrompt, width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies inside the (possibly rotated) rectangle."""
    x0, y0 = prompt.x / 100.0 * width, prompt.y / 100.0 * height
    w, h = prompt.width / 100.0 * width, prompt.height / 100.0 * height
    mask = np.zeros((height, width), dtype=bool)
    if prompt.rotation % 360 == 0:
        if w < 0:
            x0, w = x0 + w, -w
        if h < 0:
            y0, h = y0 + h, -h
        # pixel c is inside when its centre c + 0.5 is in [x0, x0 + w)
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x0 + w - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y0 + h - 0.5))
        mask[r0:r1, c0:c1] = True
        return mask
    a = math.radians(prompt.rotation)
    ux, uy = math.cos(a), math.sin(a)
    corners = np.array([[x0, y0], [x0 + w * ux, y0 + w * uy], [x0 + w * ux - h * uy, y0 + w * uy + h * ux],
                        [x0 - h * uy, y0 + h * ux]]) - 0.5      # to pixel-centre coordinates
    shift = 4                                                   # sub-pixel precision for fillPoly
    points = np.round(corners * (1 << shift)).astype(np.int32)
    filled = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(filled, [points], 1, lineType=cv2.LINE_8, shift=shift)
    return filled.astype(bool)


def brush_mask(prompt: BrushPrompt, width: int, height: int) -> np.ndarray:
    """The stroke as a bool mask; PromptError when the RLE does not describe an image of this size."""
    from label_studio_sdk.converter.brush import decode_rle

    try:
        flat = np.asarray(decode_rle(list(prompt.rle)), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - the SDK raises assorted errors on a malformed stream
        raise PromptError(f"brush prompt {prompt.id!r}: the RLE does not decode ({type(exc).__name__})") from exc
    if flat.size != width * height * 4:
        raise PromptError(f"brush prompt {prompt.id!r}: the RLE holds {flat.size // 4} pixels, the image "
                          f"{width}x{height} has {width * height}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def _share_inside(mask: np.ndarray, area: np.ndarray) -> float:
    total = int(np.count_nonzero(mask))
    return int(np.count_nonzero(mask & area)) / total if total else 0.0


# ------------------------------------------------------------------------------------------------ selection

_Pick = frozenset  # of ("h", i) / ("p", i)


def _person_items(parsing: Parsing, person: int, target: Target) -> _Pick:
    if target.whole:
        return frozenset({("h", person)} | {("p", i) for i, part in enumerate(parsing.parts) if part.person == person})
    return frozenset(("p", i) for i, part in enumerate(parsing.parts)
                     if part.person == person and part.label in target.parts)


def _pick(parsing: Parsing, prompt: Prompt) -> tuple[_Pick, str]:
    """What one prompt points at, and a note for the log."""
    sign = "+" if prompt.positive else "-"
    what = prompt.target.describe()
    if isinstance(prompt, PointPrompt):
        person = person_at(parsing, prompt.x, prompt.y)
        if person is None and not prompt.target.whole:
            # Nobody's mask holds the point, but maybe a part of the asked class does (a part with no owner).
            row, col = _pixel(prompt.x, prompt.y, parsing.width, parsing.height)
            hits = [i for i, p in enumerate(parsing.parts) if p.label in prompt.target.parts and p.mask[row, col]]
            if hits:
                return frozenset(("p", i) for i in hits), f"{sign}point {what}: part(s) {hits} (no person)"
        if person is None:
            return frozenset(), f"{sign}point {what}: nobody at ({prompt.x:.2f}%, {prompt.y:.2f}%)"
        items = _person_items(parsing, person, prompt.target)
        return items, f"{sign}point {what}: person {person}" + ("" if items else f" (has no {what})")
    area = (box_mask(prompt, parsing.width, parsing.height) if isinstance(prompt, BoxPrompt)
            else brush_mask(prompt, parsing.width, parsing.height))
    kind = "box" if isinstance(prompt, BoxPrompt) else "brush"
    if isinstance(prompt, BoxPrompt) and not prompt.target.whole:
        hits = [i for i, p in enumerate(parsing.parts)
                if p.label in prompt.target.parts and _share_inside(p.mask, area) >= RECT_MIN_COVER]
        return frozenset(("p", i) for i in hits), f"{sign}box {what}: part(s) {hits}"
    if isinstance(prompt, BoxPrompt):
        persons = [i for i, h in enumerate(parsing.humans) if _share_inside(h.mask, area) >= RECT_MIN_COVER]
    else:
        stroke = int(np.count_nonzero(area))
        persons = [i for i, h in enumerate(parsing.humans)
                   if stroke and np.count_nonzero(h.mask & area) / stroke >= BRUSH_MIN_SHARE]
    items = frozenset().union(*(_person_items(parsing, p, prompt.target) for p in persons))
    return items, f"{sign}{kind} {what}: person(s) {persons}"


def select(parsing: Parsing, prompts: Sequence[Prompt]) -> Selection:
    """The people/parts of `parsing` the prompts point at: the union of the positive prompts' picks (everyone
    when there are only negative prompts) minus the negative prompts' picks."""
    positive: set = set()
    negative: set = set()
    notes = []
    for prompt in prompts:
        items, note = _pick(parsing, prompt)
        (positive if prompt.positive else negative).update(items)
        notes.append(note)
    if not any(p.positive for p in prompts) and prompts:
        positive = {("h", i) for i in range(len(parsing.humans))} | {("p", i) for i in range(len(parsing.parts))}
    kept = positive - negative
    # A removed person takes along the parts that belong to them even when another prompt added those parts.
    gone = {i for kind, i in negative if kind == "h"}
    kept = {(k, i) for k, i in kept if not (k == "p" and parsing.parts[i].person in gone)}
    return Selection(humans=frozenset(i for k, i in kept if k == "h"),
                     parts=frozenset(i for k, i in kept if k == "p"), notes=tuple(notes))


__all__ = ["BRUSH_MIN_SHARE", "CLICK_RADIUS", "RECT_MIN_COVER", "BoxPrompt", "BrushPrompt", "PointPrompt",
           "Prompt", "PromptError", "Prompts", "Selection", "Target", "box_mask", "brush_mask", "is_interactive",
           "label_target", "person_at", "read_prompts", "select"]
