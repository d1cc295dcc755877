"""`m2fp-prelabel export PROJECT_ID --format cihp|coco --out DIR`: a Label Studio project's labels as a training set.

Exit status 0 when the export was written (regions or tasks that could not be used are skipped, listed on stderr
and in OUT/export_summary.json), 2 for a usage error (no Label Studio URL/key, unknown project, a labeling config
without PolygonLabels/BrushLabels, an output folder holding something else).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path

from backend.errors import describe
from backend.settings import Settings, get_settings

OUR_OUTPUTS = ("Training", "Validation", "images", "annotations", "classes.txt", "classes.json", "palette.txt",
               "export_summary.json")
MAX_STDERR_SKIPS = 50


class ExportUsageError(Exception):
    """The export as a whole cannot run (one line, exit status 2)."""


def add_arguments(p: argparse.ArgumentParser, settings: Settings) -> None:
    p.add_argument("project_id", type=int)
    p.add_argument("--format", required=True, choices=("cihp", "coco"),
                   help="cihp: Images/, Category_ids/, Human_ids/, Instance_ids/ PNGs + id lists; "
                        "coco: images/ + annotations/instances_<split>.json with RLE masks and person ids")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument("--ls-url", default=settings.label_studio_url, help="Label Studio URL (default: LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=settings.label_studio_api_key,
                   help="legacy token or personal access token (default: LABEL_STUDIO_API_KEY)")
    p.add_argument("--annotations", choices=("latest", "all"), default="latest",
                   help="latest: each task's most recently updated annotation (default); all: every annotation, "
                        "one sample each (<task>_<annotation> names, same split)")
    p.add_argument("--only-reviewed", action="store_true",
                   help="only annotations starred as ground truth or accepted by a reviewer (Enterprise review)")
    p.add_argument("--predictions", action="store_true",
                   help="export each task's latest prediction instead of its annotations")
    p.add_argument("--model-version", default="", help="with --predictions: only predictions of this version")
    p.add_argument("--classes", choices=("model", "project"), default="model",
                   help="model: the M2FP class order (labels folding several model classes are skipped); "
                        "project: the project's own labels in config order")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of tasks in the validation split, chosen by a hash of the task id (default 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    p.set_defaults(func=run)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportUsageError(f"--out {out} is a file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportUsageError(f"--out {out} is not empty (pass --overwrite to replace a previous export)")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUR_OUTPUTS)
        if foreign:
            raise ExportUsageError(f"--out {out} holds files no export writes ({', '.join(foreign[:5])}); "
                                   "refusing to overwrite it")
        for name in OUR_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_command(args: argparse.Namespace) -> int:
    from backend.export.labels import build_class_map
    from backend.export.run import SUMMARY_FILE, run_export
    from backend.export.source import Selection
    from backend.images import ImageFetcher, decode_image

    if not (args.ls_url and args.api_key):
        raise ExportUsageError("export needs --ls-url and --api-key (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
    if not 0.0 <= args.val_fraction <= 1.0:
        raise ExportUsageError("--val-fraction must be within [0, 1]")
    if args.model_version and not args.predictions:
        raise ExportUsageError("--model-version only applies with --predictions")
    if args.predictions and (args.only_reviewed or args.annotations != "latest"):
        raise ExportUsageError("--predictions exports predictions: --only-reviewed and --annotations do not apply")
    settings = dataclasses.replace(get_settings(), label_studio_url=args.ls_url, label_studio_api_key=args.api_key)
    if not getattr(args, "verbose", False):
        # One INFO line per API page and image would bury the skip lines this command is read for.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from label_studio_sdk.client import LabelStudio

    client = LabelStudio(base_url=args.ls_url, api_key=args.api_key, timeout=120)
    try:
        project = client.projects.get(id=args.project_id)
        label_config = str(project.label_config or "")
    except Exception as exc:
        raise ExportUsageError(f"cannot read project {args.project_id} at {args.ls_url}: {describe(exc)}") from exc
    from backend.engine.source import ModelNotAvailableError
    from backend.runtime import model_classes

    try:
        classes = model_classes(settings)
    except ModelNotAvailableError as exc:
        raise ExportUsageError(f"cannot read the model's classes (M2FP_MODEL): {exc}") from exc
    try:
        class_map = build_class_map(label_config, settings, args.classes, model_classes=classes)
    except ValueError as exc:  # LabelConfigError
        raise ExportUsageError(f"project {args.project_id}: labeling config: {exc}") from exc
    if not class_map.image_key:
        raise ExportUsageError(f"project {args.project_id}: the labeling config's <Image> reads no $field")
    out = Path(args.out)
    _prepare_out(out, args.overwrite)

    shown = 0

    def report(line: str) -> None:
        nonlocal shown
        shown += 1
        if shown <= MAX_STDERR_SKIPS:
            print(f"skipped: {line}", file=sys.stderr, flush=True)

    fetcher = ImageFetcher(settings)
    selection = Selection(annotations=args.annotations, only_reviewed=args.only_reviewed,
                          predictions=args.predictions, model_version=args.model_version)
    summary = run_export(client, args.project_id, class_map.image_key, class_map, selection, args.format, out,
                         fetcher.fetch, lambda data: decode_image(data, settings.image_max_pixels),
                         args.val_fraction, report)
    if shown > MAX_STDERR_SKIPS:
        print(f"skipped: ... {shown - MAX_STDERR_SKIPS} more", file=sys.stderr)
    print(summary.render(), file=sys.stderr)
    print(f"wrote {out} (details: {out / SUMMARY_FILE})", file=sys.stderr, flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return export_command(args)
    except ExportUsageError as exc:
        print(f"m2fp-prelabel: error: {exc}", file=sys.stderr)
        return 2
