"""Folder mode: images on disk -> Label Studio import JSON (tasks with predictions), label PNGs, overlays.

Processing one image (`process_image`) is the same function whether it runs in the CLI's process or in an RQ
worker (which then needs the same paths: same machine or a shared mount). Writing the run's files is here too.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from backend.batch.errors import BadInput
from backend.batch.progress import CACHED, DONE, ItemResult, Summary

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


def data_key(label_config: str) -> str:
    """The task data field the labeling config's Image reads (`value="$image"` -> "image")."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(label_config)
    for obj in interface.objects:
        if obj.tag.lower() == "image":
            value = str(obj.value or "")
            return value[1:] if value.startswith("$") else value
    raise ValueError("the labeling config has no <Image> tag")


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


def process_image(runtime, path: Path, options: FolderOptions) -> tuple[ItemResult, dict]:
    """Parse one image and build its task; write its label PNG / overlay when asked.

    Raises BadInput for a file that cannot be read or parsed; anything else propagates.
    """
    from backend.ls_results import make_prediction

    images_dir, out_dir = Path(options.images_dir), Path(options.out_dir)
    rel = relative_key(path, images_dir)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {rel}: {exc.strerror or exc}") from exc
    parsing, cached = runtime.predictor.parse_bytes(data)
    controls = runtime.predictor.controls_for(options.label_config)
    prediction = make_prediction(parsing, controls, runtime.version, options.label_config)
    task = {"data": {data_key(options.label_config): image_url(path, options)}, "predictions": [prediction]}

    if options.masks:
        from backend.visualise import label_map_image

        image = label_map_image(parsing, runtime.classes)
        _write_atomic(mask_path(out_dir, rel), lambda p: image.save(p, format="PNG"))
    if options.overlays:
        from backend.images import decode_image
        from backend.visualise import overlay

        photo = decode_image(data, runtime.settings.image_max_pixels)
        drawn = overlay(photo, parsing, alpha=options.alpha, outline=options.outline)
        _write_atomic(overlay_path(out_dir, rel), lambda p: drawn.save(p, format="JPEG", quality=90))
    result = ItemResult(rel, CACHED if cached else DONE, regions=len(prediction.get("result", [])))
    return result, task


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
