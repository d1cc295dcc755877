"""Folder mode: images on disk -> Label Studio import JSON (tasks with predictions), label PNGs, overlays.

One task per image file. A labeling config with several `<Image>` tags (`$front`, `$back`) takes one subfolder
per image field (IMAGES_DIR/front/x.jpg and IMAGES_DIR/back/x.jpg make one task), each image getting its own
regions. Processing one task (`process_item`) is the same function whether it runs in the CLI's process or in
an RQ worker (which then needs the same paths: same machine or a shared mount); it goes through the model class
like every other entry point. Writing the run's files is here too.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import quote

from backend.batch.progress import CACHED, DONE, FAILED, ItemResult, Summary
from backend.errors import InputError

if TYPE_CHECKING:
    from model import M2FPModel

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
TASKS_FILE = "tasks.json"
SUMMARY_FILE = "summary.json"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
PARTS_DIR = ".tasks"  # one task per image written by workers, gathered into tasks.json by the CLI


@dataclass(frozen=True)
class FolderOptions:
    """Everything a folder job needs besides the image; plain values so RQ can carry it."""

    images_dir: str
    out_dir: str
    label_config: str
    masks: bool = False
    overlays: bool = False
    alpha: float = 0.5
    outline: bool = True
    image_root_url: str = ""   # tasks get <image_root_url>/<relative path>
    document_root: str = ""    # else /data/local-files/?d=<path relative to this folder>

    def to_dict(self) -> dict:
        return asdict(self)


def list_images(images_dir: Path) -> list[Path]:
    """Every image file under `images_dir` (recursively, hidden folders skipped), sorted for stable output."""
    if not images_dir.is_dir():
        raise NotADirectoryError(f"{images_dir} is not a folder")
    found = []
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(images_dir).as_posix())


@dataclass(frozen=True)
class FolderItem:
    """One task of a folder run: its name, and per image field of the config the file (absent: none found)."""

    key: str
    files: dict[str, str]


def list_items(images_dir: Path, data_keys: tuple[str, ...]) -> list[FolderItem]:
    """The run's tasks: one per image file, or, for a config with several images, one per relative name found
    in any of the per-field subfolders (a name missing from one subfolder fails its task alone)."""
    if len(data_keys) == 1:
        return [FolderItem(relative_key(p, images_dir), {data_keys[0]: str(p.resolve())})
                for p in list_images(images_dir)]
    missing = [k for k in data_keys if not (images_dir / k).is_dir()]
    if missing:
        raise NotADirectoryError(
            f"the labeling config reads {len(data_keys)} images per task ({', '.join('$' + k for k in data_keys)}): "
            f"put each field's images in its own subfolder of {images_dir} "
            f"({', '.join(k + '/' for k in data_keys)}; missing: {', '.join(k + '/' for k in missing)})")
    names: dict[str, dict[str, str]] = {}
    for k in data_keys:
        for p in list_images(images_dir / k):
            names.setdefault(relative_key(p, images_dir / k), {})[k] = str(p.resolve())
    return [FolderItem(rel, names[rel]) for rel in sorted(names)]


def relative_key(path: Path, images_dir: Path) -> str:
    return path.relative_to(images_dir).as_posix()


def image_url(path: Path, options: FolderOptions) -> str:
    """The task's image URL: under --image-root-url when given, else a Label Studio local-files URL."""
    rel = relative_key(path, Path(options.images_dir))
    if options.image_root_url:
        return options.image_root_url.rstrip("/") + "/" + quote(rel)
    root = Path(options.document_root or Path(options.images_dir).resolve().parent).resolve()
    try:
        local = path.resolve().relative_to(root).as_posix()
    except ValueError as exc:
        raise ValueError(f"{path} is not under the local-files document root {root}") from exc
    return "/data/local-files/?d=" + quote(local)


def _suffixed(rel: str, suffix: str) -> PurePosixPath:
    return PurePosixPath(rel).with_suffix(suffix)


def mask_path(out_dir: Path, rel: str) -> Path:
    return out_dir / MASKS_DIR / _suffixed(rel, ".png")


def overlay_path(out_dir: Path, rel: str) -> Path:
    return out_dir / OVERLAYS_DIR / _suffixed(rel, ".jpg")


def _write_atomic(path: Path, write) -> None:
    # A worker killed while writing must not leave a half PNG that looks finished.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def process_item(model: M2FPModel, item: FolderItem, options: FolderOptions) -> tuple[ItemResult, dict | None]:
    """Predict one task of the folder (its images read from disk) and build its Label Studio task; write label
    PNGs / overlays when asked. A bad input is this item's failed result; anything else propagates."""
    out_dir = Path(options.out_dir)
    images: dict[str, bytes] = {}
    data: dict[str, str] = {}
    try:
        for key, path in item.files.items():
            data[key] = image_url(Path(path), options)
            try:
                images[key] = Path(path).read_bytes()
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror or exc}", reason="not_found") from exc
    except InputError as exc:
        return ItemResult(item.key, FAILED, f"{exc.reason}: {exc}"), None
    outcome = model.predict_outcomes([{"data": data}], images=[images],
                                     keep_parsings=options.masks or options.overlays)[0]
    if outcome.failure is not None:
        if outcome.failure.reason == "internal":
            raise RuntimeError(outcome.failure.message)
        return ItemResult(item.key, FAILED, f"{outcome.failure.reason}: {outcome.failure.message}"), None
    task = {"data": data, "predictions": [outcome.prediction]}
    for key, parsing in (outcome.parsings or {}).items():
        # Several images per task: their PNGs go under the field's name, like the input.
        name = item.key if len(model.plan.images) == 1 else f"{key}/{item.key}"
        if options.masks:
            from backend.visualise import label_map_image

            image = label_map_image(parsing, list(model.runtime.classes))
            _write_atomic(mask_path(out_dir, name), lambda p: image.save(p, format="PNG"))
        if options.overlays:
            from backend.images import decode_image
            from backend.visualise import overlay

            photo = decode_image(images[key], model.runtime.settings.image_max_pixels)
            drawn = overlay(photo, parsing, alpha=options.alpha, outline=options.outline)
            _write_atomic(overlay_path(out_dir, name), lambda p: drawn.save(p, format="JPEG", quality=90))
    status = DONE if outcome.inferences else CACHED
    return ItemResult(item.key, status, regions=len(outcome.prediction["result"])), task


def write_task_part(out_dir: Path, rel: str, task: dict) -> Path:
    path = out_dir / PARTS_DIR / PurePosixPath(rel + ".json")
    _write_atomic(path, lambda p: p.write_text(json.dumps(task)))
    return path


def read_task_part(path: Path) -> dict:
    return json.loads(path.read_text())


def remove_task_parts(out_dir: Path) -> None:
    import shutil

    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)


def write_legend(out_dir: Path, classes: list[str], masks: bool, overlays: bool) -> None:
    """classes.json / classes.txt next to the label PNGs (index -> name), legend.png next to the overlays."""
    from backend.visualise import color_of, legend, render_legend

    if masks:
        folder = out_dir / MASKS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        entries = [{"index": i, "name": name, "color": list(color_of(name)) if i else [0, 0, 0]}
                   for i, name in enumerate(classes)]
        (folder / "classes.json").write_text(json.dumps(entries, indent=1) + "\n")
        (folder / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes)))
    if overlays:
        folder = out_dir / OVERLAYS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        render_legend(legend(classes)).save(folder / "legend.png")


def write_run_files(out_dir: Path, tasks: list[dict], summary: Summary) -> Path:
    """tasks.json (importable as is: Label Studio > Import, or POST /api/projects/<id>/import) and summary.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks_path = out_dir / TASKS_FILE
    _write_atomic(tasks_path, lambda p: p.write_text(json.dumps(tasks, indent=1) + "\n"))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    return tasks_path
