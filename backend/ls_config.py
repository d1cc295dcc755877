"""Label Studio labeling config -> the controls this backend fills, with their label maps.

Every `<PolygonLabels>` and `<BrushLabels>` bound to an `<Image>` becomes a ControlSpec. Model classes
are matched to the control's `<Label>`s, first match wins, in this order:
  1. `predicted_values="Face,Hair"` on a `<Label>` (several model classes -> one project label; entries
     compared case/punctuation-insensitively);
  2. a label spelled exactly like the model class;
  3. a label equal up to case and punctuation (`Upper-clothes` = `UpperClothes`, `left_arm` = `Left-arm`).
The model class `Human` (person instances) also matches a label named `Person`. Model classes no label
claims are skipped; `Background` never gets regions.

Optional attributes on the control tag (defaults from Settings / env):
  model_score_threshold="0.5"   regions scoring below are dropped           (SCORE_THRESHOLD)
  model_polygon_detail="2"      more (>1) or fewer (<1) polygon vertices    (POLYGON_DETAIL)
  model_min_pixels="32"         connected components smaller are dropped    (MIN_REGION_PIXELS)
The `model_` prefix is the convention of Label Studio's own ML backends (e.g. `model_score_threshold`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from label_studio_sdk.label_interface import LabelInterface

from backend.errors import InputError
from backend.settings import Settings

# The hub model's classes (configuration.json of damo/cv_resnet101_image-multiple-human-parsing):
# used only when a caller does not pass the loaded parser's own `classes`.
DEFAULT_CLASSES: tuple[str, ...] = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants",
    "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe",
    "Right-shoe", "Human",
)
HUMAN_CLASS = "Human"
BACKGROUND_CLASS = "Background"
SUPPORTED_TAGS = {"polygonlabels": "polygonlabels", "brushlabels": "brushlabels"}
ATTR_SCORE = "model_score_threshold"
ATTR_DETAIL = "model_polygon_detail"
ATTR_MIN_PIXELS = "model_min_pixels"
_HUMAN_ALIASES = ("human", "person")


class LabelConfigError(InputError, ValueError):
    """The labeling config cannot be served by this backend (the message says why and what to add)."""

    reason = "bad_config"


def normalise(name: str) -> str:
    """Case- and punctuation-insensitive form of a label: `Upper-clothes` -> `upperclothes`."""
    return re.sub(r"[^0-9a-z]", "", name.casefold())


@dataclass(frozen=True)
class LabelRule:
    """One `<Label>` of a control: the value LS stores, its spellings, and its predicted_values."""

    label: str                      # what goes into the region (alias if set, else value)
    names: tuple[str, ...]          # value and alias
    predicted: tuple[str, ...]      # normalised predicted_values entries


@dataclass(frozen=True)
class ControlSpec:
    """A control to fill: where regions go and which model class becomes which project label."""

    from_name: str
    to_name: str
    type: str                                   # 'polygonlabels' | 'brushlabels'
    label_map: dict[str, str]                   # model part class -> project label
    human_label: str | None                     # project label of person instances, or None
    score_threshold: float
    polygon_detail: float
    min_pixels: int = 16
    value_key: str | None = None                # task data key the Image reads ($image -> "image")
    rules: tuple[LabelRule, ...] = ()
    warnings: tuple[str, ...] = ()              # harmless config issues worth a log line
    index: int = 0                              # position among the config's controls: region ids stay unique
                                                # across every image of a multi-image config

    def label_for(self, model_class: str) -> str | None:
        """Project label for a model class (also one not in the class list given at parse time)."""
        if model_class == HUMAN_CLASS:
            return self.human_label
        if model_class in self.label_map:
            return self.label_map[model_class]
        if model_class == BACKGROUND_CLASS:
            return None
        return _match(model_class, self.rules)


def _match(model_class: str, rules: Sequence[LabelRule]) -> str | None:
    key = normalise(model_class)
    keys = {key, "person"} if model_class == HUMAN_CLASS else {key}
    for rule in rules:
        if keys & set(rule.predicted):
            return rule.label
    for rule in rules:
        if model_class in rule.names:
            return rule.label
    for rule in rules:
        if keys & {normalise(n) for n in rule.names}:
            return rule.label
    return None


def _number(control, attr: str, default, kind, minimum, maximum) -> float:
    raw = control.attr.get(attr)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = kind(str(raw).strip())
    except (ValueError, OverflowError):
        raise LabelConfigError(f'control "{control.name}": {attr}="{raw}" is not a {kind.__name__}') from None
    # NaN compares false with everything: without the explicit check it would pass both bounds.
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise LabelConfigError(f'control "{control.name}": {attr}="{raw}" must be >= {minimum} and <= '
                               f"{maximum}")
    return value


def _rules(control) -> tuple[LabelRule, ...]:
    rules = []
    for label, tag in (control.labels_attrs or {}).items():
        attrs = getattr(tag, "attr", {}) or {}
        names = tuple(dict.fromkeys(n for n in (attrs.get("value"), attrs.get("alias"), label) if n))
        predicted = tuple(normalise(p) for p in str(attrs.get("predicted_values", "")).split(",") if p.strip())
        rules.append(LabelRule(label=label, names=names, predicted=predicted))
    return tuple(rules)


def parse_label_config(label_config: str, settings: Settings,
                       classes: Sequence[str] | None = None) -> list[ControlSpec]:
    """The PolygonLabels/BrushLabels controls bound to an Image, with label maps for `classes`.

    `classes`: the loaded model's class names (`parser.classes`); defaults to the hub model's.
    Raises LabelConfigError when the config does not parse or has no control this backend can fill.
    """
    if not isinstance(label_config, str) or not label_config.strip():
        raise LabelConfigError("the labeling config is empty")
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises assorted XML/validation errors
        raise LabelConfigError(f"the labeling config does not parse: {exc}") from exc
    classes = tuple(DEFAULT_CLASSES if classes is None else classes)
    part_classes = [c for c in classes if c not in (BACKGROUND_CLASS, HUMAN_CLASS)]

    specs: list[ControlSpec] = []
    for control in interface.controls:
        kind = SUPPORTED_TAGS.get(str(control.tag).lower())
        if kind is None:
            continue
        for to_name in control.to_name or []:
            obj = next((o for o in control.objects if o.name == to_name), None)
            if obj is None or str(obj.tag).lower() != "image":
                continue
            rules = _rules(control)
            label_map = {c: lab for c in part_classes if (lab := _match(c, rules)) is not None}
            human = _match(HUMAN_CLASS, rules) if HUMAN_CLASS in classes else None
            warnings = _warnings(control.name, rules, classes, label_map, human)
            value = getattr(obj, "value", None) or ""
            specs.append(ControlSpec(
                from_name=control.name,
                to_name=to_name,
                type=kind,
                label_map=label_map,
                human_label=human,
                score_threshold=float(_number(control, ATTR_SCORE, settings.score_threshold, float, 0.0, 1.0)),
                polygon_detail=float(_number(control, ATTR_DETAIL, settings.polygon_detail, float, 0.01, 100.0)),
                min_pixels=int(_number(control, ATTR_MIN_PIXELS, settings.min_region_pixels, int, 0, 10**9)),
                value_key=value[1:] if value.startswith("$") else None,
                rules=rules,
                warnings=warnings,
                index=len(specs),
            ))
    if not specs:
        found = sorted({f"<{c.tag} name=\"{c.name}\">" for c in interface.controls}) or ["no control tags"]
        raise LabelConfigError(
            "the labeling config has no <PolygonLabels> or <BrushLabels> bound to an <Image>; "
            f"found: {', '.join(found)}. Add e.g. <PolygonLabels name=\"parts\" toName=\"image\">"
            "<Label value=\"Hair\"/>...</PolygonLabels> next to <Image name=\"image\" value=\"$image\"/>")
    return specs


def _warnings(name: str, rules: Sequence[LabelRule], classes: Sequence[str],
              label_map: Mapping[str, str], human: str | None) -> tuple[str, ...]:
    known = {normalise(c) for c in classes} | {"person"}
    out = []
    for rule in rules:
        for p in rule.predicted:
            if p not in known:
                out.append(f'control "{name}", label "{rule.label}": predicted_values entry "{p}" '
                           f"names no model class ({', '.join(classes)})")
    if not label_map and human is None:
        out.append(f'control "{name}": none of its labels matches a model class; it will get no regions')
    return tuple(out)
