"""One export: Label Studio tasks -> samples -> CIHP or COCO files, and a summary of what was left out.

`export_sample` is the whole per-image path without I/O to Label Studio (regions -> composition -> writer), used
by the CLI and by the benchmark; `run_export` adds reading the project and fetching images.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from backend.export import files
from backend.export.compose import compose
from backend.export.labels import ClassMap
from backend.export.regions import Skip, read_regions
from backend.export.source import ALL, Item, Selection, choose, ensure_results, item_name, list_tasks, task_image_url

log = logging.getLogger("m2fp.export")

SUMMARY_FILE = "export_summary.json"


@dataclass
class ExportSummary:
    format: str
    tasks: int = 0
    samples: int = 0
    splits: Counter = field(default_factory=Counter)
    regions: int = 0
    persons: int = 0
    ignored_results: int = 0
    unlabelled: Counter = field(default_factory=Counter)    # tasks with nothing to export, by reason
    skipped: list[Skip] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": self.format, "tasks": self.tasks, "samples": self.samples, "splits": dict(self.splits),
                "regions": self.regions, "persons": self.persons, "ignored_results": self.ignored_results,
                "tasks_without_labels": dict(self.unlabelled),
                "skipped_by_reason": dict(Counter(s.reason for s in self.skipped)),
                "skipped": [{"reason": s.reason, "detail": s.detail, "task_id": s.task_id,
                             "source_id": s.annotation_id, "region_id": s.region_id} for s in self.skipped]}

    def render(self) -> str:
        reasons = Counter(s.reason for s in self.skipped)
        head = (f"exported {self.samples} samples ({self.splits.get('train', 0)} train, "
                f"{self.splits.get('val', 0)} val) from {self.tasks} tasks as {self.format}: "
                f"{self.regions} regions, {self.persons} persons")
        if self.unlabelled:
            head += " (tasks left out: " + ", ".join(f"{n} {r}" for r, n in sorted(self.unlabelled.items())) + ")"
        if not reasons:
            return head + "; nothing skipped"
        return head + "; skipped " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))


def split_of(task_id: int, val_fraction: float) -> str:
    """Stable split by task: the same task lands in the same split on every export, whatever else changed."""
    digest = hashlib.sha1(f"m2fp-export:{task_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2.0 ** 64 < val_fraction else "train"


def export_sample(writer: Any, class_map: ClassMap, item: Item, data: bytes, image: Image.Image, split: str,
                  summary: ExportSummary) -> None:
    """Regions of `item` on its decoded `image` -> the writer; skips go to the summary."""
    width, height = image.size
    regions = read_regions(item.result, class_map, width, height, item.task_id, item.source_id)
    summary.skipped.extend(regions.skipped)
    summary.ignored_results += regions.ignored
    comp = compose(regions.parts, regions.persons, width, height)
    writer.add(item.name, split, data, image, comp, task_id=item.task_id, source_id=item.source_id)
    summary.samples += 1
    summary.splits[split] += 1
    summary.regions += len(regions.parts) + len(regions.persons)
    summary.persons += len(comp.persons)


def make_writer(fmt: str, out_dir: Path, classes: tuple[str, ...]) -> Any:
    if fmt == "cihp":
        from backend.export.cihp import CihpWriter

        return CihpWriter(out_dir, classes)
    if fmt == "coco":
        from backend.export.coco import CocoWriter

        return CocoWriter(out_dir, classes)
    raise ValueError(f"unknown format {fmt!r} (cihp or coco)")


def run_export(client: Any, project_id: int, image_key: str, class_map: ClassMap, selection: Selection,
               fmt: str, out_dir: Path, fetch: Callable[[str], bytes], decode: Callable[[bytes], Image.Image],
               val_fraction: float, report: Callable[[str], None]) -> ExportSummary:
    """Export every task of the project; one bad task or region costs that task or region only."""
    from backend.images import ImageError

    writer = make_writer(fmt, out_dir, class_map.classes)
    summary = ExportSummary(format=fmt)

    def skip(s: Skip) -> None:
        summary.skipped.append(s)
        report(s.line())

    for task in list_tasks(client, project_id):
        summary.tasks += 1
        task_id = int(task["id"])
        try:
            task = ensure_results(client, task, selection)
        except Exception as exc:  # an API hiccup on one task: report it, go on with the others
            skip(Skip("api_error", f"cannot read its annotations: {type(exc).__name__}: {exc}", task_id))
            continue
        holders, why = choose(task, selection)
        if not holders:
            # Not an error: unlabelled tasks are normal in a project being annotated; counted, not listed.
            summary.unlabelled[why or "nothing_to_export"] += 1
            continue
        url = task_image_url(task, image_key)
        try:
            data = fetch(url)
            image = decode(data)
        except ImageError as exc:
            skip(Skip(f"image_{exc.reason}", str(exc), task_id))
            continue
        split = split_of(task_id, val_fraction)
        several = selection.annotations == ALL and not selection.predictions
        for holder in holders:
            source_id = int(holder["id"]) if holder.get("id") is not None else None
            item = Item(task_id, source_id, url, list(holder.get("result") or []),
                        item_name(task_id, source_id, several))
            before = len(summary.skipped)
            export_sample(writer, class_map, item, data, image, split, summary)
            for s in summary.skipped[before:]:
                report(s.line())
    writer.finish()
    files.write_json(out_dir / SUMMARY_FILE, summary.to_dict())
    return summary
