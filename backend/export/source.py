"""Which labels of a Label Studio project are exported, read through label-studio-sdk.

Per task, the chosen result lists ("items"):
- `annotations="latest"` (default): the task's most recently updated annotation;
- `annotations="all"`: every annotation (one training sample each, all in the task's split);
- `only_reviewed`: only annotations a reviewer accepted (`last_action` accepted / fixed_and_accepted, Label Studio
  Enterprise's review) or that are starred as ground truth (`ground_truth`, Community and Enterprise);
- skipped annotations (`was_cancelled`, the annotator pressed Skip) are never exported;
- `predictions=True`: the task's latest prediction instead (optionally only of `model_version`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

LATEST = "latest"
ALL = "all"
REVIEWED_ACTIONS = ("accepted", "fixed_and_accepted")


@dataclass(frozen=True)
class Selection:
    annotations: str = LATEST
    only_reviewed: bool = False
    predictions: bool = False
    model_version: str = ""


@dataclass(frozen=True)
class Item:
    """One labelled image to export."""

    task_id: int
    source_id: int | None       # annotation id (or prediction id with predictions=True)
    image_url: str
    result: list
    name: str                   # file stem in the export


def _plain(obj: Any) -> Any:
    """SDK pydantic models -> plain dicts/lists (the API's own JSON shape), recursively."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _stamp(entry: dict) -> tuple[str, str, int]:
    return (str(entry.get("updated_at") or ""), str(entry.get("created_at") or ""), int(entry.get("id") or 0))


def is_reviewed(annotation: dict) -> bool:
    return bool(annotation.get("ground_truth")) or annotation.get("last_action") in REVIEWED_ACTIONS


def choose(task: dict, selection: Selection) -> tuple[list[dict], str | None]:
    """The result holders (annotations or predictions) of one task to export, and why none when empty."""
    if selection.predictions:
        preds = [p for p in task.get("predictions") or []
                 if not selection.model_version or str(p.get("model_version")) == selection.model_version]
        if not preds:
            return [], "no_prediction"
        return [max(preds, key=_stamp)], None
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not annotations:
        return [], "no_annotation"
    if selection.only_reviewed:
        annotations = [a for a in annotations if is_reviewed(a)]
        if not annotations:
            return [], "not_reviewed"
    annotations.sort(key=_stamp)
    return (annotations[-1:] if selection.annotations == LATEST else annotations), None


def item_name(task_id: int, source_id: int | None, several: bool) -> str:
    """CIHP-like numeric stems: the task id, plus the annotation id when a task gives several samples."""
    return f"{task_id:07d}_{source_id}" if several and source_id is not None else f"{task_id:07d}"


def list_tasks(client: Any, project_id: int, fields: str | None = None, page_size: int = 100) -> Iterator[dict]:
    """Every task of the project with its data, annotations and predictions, as plain dicts (`fields`: the
    task fields to ask for, comma-separated; all of them when None)."""
    for task in client.tasks.list(project=project_id, fields="all", include=fields, page_size=page_size):
        yield _plain(task)


def ensure_results(client: Any, task: dict, selection: Selection) -> dict:
    """The task with its annotations/predictions, asking for them when the task listing left them out."""
    key = "predictions" if selection.predictions else "annotations"
    counted = task.get("total_predictions" if selection.predictions else "total_annotations")
    listed = task.get(key) or []
    # Some task listings serialise annotations as bare ids: a holder without "result" must be fetched.
    if (listed and all(isinstance(h, dict) and "result" in h for h in listed)) or (not listed and not counted):
        return task
    if selection.predictions:
        fetched = client.predictions.list(task=task["id"])
    else:
        fetched = client.annotations.list(id=task["id"])
    return {**task, key: _plain(list(fetched))}


def task_image_url(task: dict, image_key: str) -> str:
    data = task.get("data") or {}
    value = data.get(image_key)
    return value if isinstance(value, str) else ""
