"""Project labels -> training classes, through the project's labeling config.

The backend maps model classes to project labels (backend/ls_config.py: exact name, case/punctuation-insensitive
name, `predicted_values`); the export inverts that map:

- `classes="model"` (default): class indices are the model's (`Background` = 0, then the CIHP parts in the model's
  order). A label that one model class maps to gets that class's index. A label several model classes fold into
  (`predicted_values="Left-arm,Right-arm"`) cannot be unfolded: its regions are skipped as `ambiguous_label` (use
  `classes="project"`); a label no model class maps to is skipped as `unmapped_label`.
- `classes="project"`: class indices are the project's own labels, in config order (`Background` = 0).

The label that receives the model's `Human` instances (`Human`/`Person`) marks person regions, in both modes.
Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from backend.ls_config import (BACKGROUND_CLASS, DEFAULT_CLASSES, HUMAN_CLASS, ControlSpec,
                               parse_label_config)
from backend.settings import Settings

MODEL = "model"
PROJECT = "project"
PERSON = "person"


class LabelLookupError(ValueError):
    """A region's label cannot become a training class; `reason` is a stable tag."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClassMap:
    """What each (control, label) of the project becomes: a class index, or PERSON."""

    classes: tuple[str, ...]                              # index -> name; 0 = Background; no Human
    controls: dict[str, str]                              # from_name -> 'polygonlabels' | 'brushlabels'
    targets: dict[tuple[str, str], int | str]             # (from_name, label) -> class index or PERSON
    problems: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # -> (reason, message)
    image_key: str = ""                                   # task data field of the Image (`$image` -> "image")

    @property
    def person_class_id(self) -> int:
        """The COCO category id of persons: right after the last part class (the model's `Human`)."""
        return len(self.classes)

    def lookup(self, from_name: str, label: str) -> int | str:
        """Class index or PERSON for a region's label; LabelLookupError when it has none."""
        key = (from_name, label)
        if key in self.targets:
            return self.targets[key]
        if key in self.problems:
            reason, message = self.problems[key]
            raise LabelLookupError(reason, message)
        if from_name not in self.controls:
            raise LabelLookupError("unknown_control", f'control "{from_name}" is not a PolygonLabels/BrushLabels '
                                                      "control of the project's labeling config")
        raise LabelLookupError("unknown_label", f'label "{label}" is not in control "{from_name}" of the labeling '
                                                "config")


def build_class_map(label_config: str, settings: Settings, mode: str = MODEL,
                    model_classes: Sequence[str] = DEFAULT_CLASSES) -> ClassMap:  # the CLI passes the model's own
    """The ClassMap of a project's config; raises backend.ls_config.LabelConfigError for an unusable config."""
    if mode not in (MODEL, PROJECT):
        raise ValueError(f"classes mode must be {MODEL!r} or {PROJECT!r}, got {mode!r}")
    specs = parse_label_config(label_config, settings, classes=model_classes)
    parts = [c for c in model_classes if c not in (BACKGROUND_CLASS, HUMAN_CLASS)]
    if mode == MODEL:
        classes = (BACKGROUND_CLASS, *parts)
    else:
        own: list[str] = []
        for spec in specs:
            for rule in spec.rules:
                if rule.label != spec.human_label and rule.label not in own:
                    own.append(rule.label)
        classes = (BACKGROUND_CLASS, *own)
    targets: dict[tuple[str, str], int | str] = {}
    problems: dict[tuple[str, str], tuple[str, str]] = {}
    for spec in specs:
        for rule in spec.rules:
            key = (spec.from_name, rule.label)
            if rule.label == spec.human_label:
                targets[key] = PERSON
            elif mode == PROJECT:
                targets[key] = classes.index(rule.label)
            else:
                sources = _model_classes_of(spec, rule.label, parts)
                if len(sources) == 1:
                    targets[key] = classes.index(sources[0])
                elif sources:
                    problems[key] = ("ambiguous_label", f'label "{rule.label}" folds model classes '
                                     f"{', '.join(sources)}: export with --classes project to keep it")
                else:
                    problems[key] = ("unmapped_label", f'label "{rule.label}" matches no model class '
                                     "(export with --classes project to keep it)")
    return ClassMap(classes=tuple(classes), controls={s.from_name: s.type for s in specs},
                    targets=targets, problems=problems,
                    image_key=next((s.value_key for s in specs if s.value_key), ""))


def _model_classes_of(spec: ControlSpec, label: str, parts: Sequence[str]) -> list[str]:
    return [c for c in parts if spec.label_for(c) == label]
