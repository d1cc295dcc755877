"""Folder mode of `m2fp-prelabel`: import JSON valid for the labeling config, label PNGs, overlays, failures.

The end-to-end tests run the real console script in a subprocess on the random-weight model, with a real
redis-server as the parsing cache (a second run over the same images is served from it).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.batch import folder
from backend.errors import InputError, describe
from backend.batch.progress import CACHED, DONE, FAILED, SKIPPED, ItemResult, Progress, Summary

ROOT = Path(__file__).resolve().parents[1]

POLYGON_CONFIG = """<View>
  <Image name="img" value="$photo"/>
  <PolygonLabels name="parts" toName="img">
    <Label value="Hair"/><Label value="Face"/><Label value="UpperClothes"/><Label value="Pants"/>
    <Label value="Left-arm"/><Label value="Right-arm"/><Label value="Left-leg"/><Label value="Right-leg"/>
    <Label value="Dress"/><Label value="Coat"/><Label value="Torso-skin"/>
  </PolygonLabels>
</View>"""


# ---------------------------------------------------------------- pure parts

def test_list_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["z.JPG", "a.png", "b/c.jpeg", "notes.txt", ".hidden/x.jpg", ".dot.png"]:
        (tmp_path / name).write_bytes(b"x")
    found = [folder.relative_key(p, tmp_path) for p in folder.list_images(tmp_path)]
    assert found == ["a.png", "b/c.jpeg", "z.JPG"]
    with pytest.raises(NotADirectoryError):
        folder.list_images(tmp_path / "a.png")


def test_image_url_local_files_and_root_url(tmp_path: Path) -> None:
    images = tmp_path / "shoot 1"
    images.mkdir()
    path = images / "a b#.jpg"
    path.write_bytes(b"x")
    local = folder.FolderOptions(images_dir=str(images), out_dir=str(tmp_path), label_config="")
    assert folder.image_url(path, local) == "/data/local-files/?d=shoot%201/a%20b%23.jpg"
    rooted = folder.FolderOptions(images_dir=str(images), out_dir=str(tmp_path), label_config="",
                                  document_root=str(images))
    assert folder.image_url(path, rooted) == "/data/local-files/?d=a%20b%23.jpg"
    remote = folder.FolderOptions(images_dir=str(images), out_dir=str(tmp_path), label_config="",
                                  image_root_url="https://cdn.example/photos/")
    assert folder.image_url(path, remote) == "https://cdn.example/photos/a%20b%23.jpg"
    outside = folder.FolderOptions(images_dir=str(images), out_dir=str(tmp_path), label_config="",
                                   document_root=str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="document root"):
        folder.image_url(path, outside)


def test_items_one_per_file_or_one_per_name_across_image_subfolders(tmp_path: Path) -> None:
    for name in ["a.jpg", "sub/b.png"]:
        (tmp_path / "one" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "one" / name).write_bytes(b"x")
    single = folder.list_items(tmp_path / "one", ("photo",))
    assert [(i.key, list(i.files)) for i in single] == [("a.jpg", ["photo"]), ("sub/b.png", ["photo"])]
    for name in ["front/x.jpg", "back/x.jpg", "front/y.jpg"]:
        (tmp_path / "two" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "two" / name).write_bytes(b"x")
    pairs = folder.list_items(tmp_path / "two", ("front", "back"))
    assert [(i.key, sorted(i.files)) for i in pairs] == [("x.jpg", ["back", "front"]), ("y.jpg", ["front"])]
    assert pairs[0].files["back"] == str((tmp_path / "two" / "back" / "x.jpg").resolve())
    with pytest.raises(NotADirectoryError, match="side/"):
        folder.list_items(tmp_path / "two", ("front", "side"))


def test_output_paths_keep_the_folder_structure(tmp_path: Path) -> None:
    assert folder.mask_path(tmp_path, "a/b.jpeg") == tmp_path / "masks" / "a" / "b.png"
    assert folder.overlay_path(tmp_path, "a/b.png") == tmp_path / "overlays" / "a" / "b.jpg"


def test_summary_counts_failures_and_exit_code() -> None:
    summary = Summary(total=4)
    for result in [ItemResult("a", DONE, regions=3), ItemResult("b", CACHED), ItemResult("c", SKIPPED)]:
        summary.add(result)
    assert summary.exit_code == 1  # one item unfinished
    summary.add(ItemResult("d", FAILED, "ImageDecodeError: not an image"))
    assert summary.exit_code == 1 and summary.failed == 1
    data = summary.to_dict()
    assert data["done"] == data["cached"] == data["skipped"] == data["failed"] == 1 and data["unfinished"] == 0
    assert data["failures"] == [{"item": "d", "reason": "ImageDecodeError: not an image"}]
    assert "FAILED d: ImageDecodeError: not an image" in summary.render()
    ok = Summary(total=1)
    ok.add(ItemResult("a", SKIPPED))
    assert ok.exit_code == 0
    with pytest.raises(ValueError):
        ItemResult("x", "exploded")


def test_progress_plain_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    progress = Progress(3, desc="folder", stream=stream, log_every_s=0.0)
    progress.update(ItemResult("a", DONE))
    progress.update([ItemResult("b", CACHED), ItemResult("c", FAILED, "boom")])
    summary = progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert lines[0].startswith("folder: 1/3 (33%) 1 done;") and "/h, ETA" in lines[0]
    assert lines[-1].startswith("folder: 3/3 (100%) 1 done, 1 cached, 1 failed;")
    assert summary.finished == 3 and summary.failures == [("c", "boom")]


def test_progress_bar_on_a_tty() -> None:
    stream = io.StringIO()
    progress = Progress(2, desc="folder", stream=stream, tty=True)
    progress.update(ItemResult("a", DONE))
    progress.update(ItemResult("b", DONE))
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "2/2" in text and "img/s" in text  # tqdm: redrawn bar with rate


def test_describe_is_one_line() -> None:
    assert describe(InputError("first line\nsecond", reason="decode")) == "first line"
    assert describe(InputError(reason="decode")) == "decode"
    assert describe(KeyError()) == "KeyError"


# ---------------------------------------------------------------- end to end

def _run_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "m2fp-prelabel"  # the console script pyproject.toml declares
    return subprocess.run([str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _env(model_dir: Path, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"M2FP_MODEL": str(model_dir), "M2FP_DEVICE": "cpu", "M2FP_THREADS": "2", "REDIS_URL": redis_url,
                "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, sample_images: list[Path]) -> Path:
    """Two good photos (one in a sub-folder) and one corrupt JPEG."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    (root / "a.jpg").write_bytes(sample_images[0].read_bytes())
    (root / "sub" / "b.jpg").write_bytes(sample_images[2].read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "readme.txt").write_text("not an image, ignored")
    return root


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, photo_dir: Path, model_dir: Path, redis_server) -> dict:
    out = tmp_path_factory.mktemp("out")
    config = out.parent / "config.xml"
    config.write_text(POLYGON_CONFIG)
    proc = _run_cli(["folder", str(photo_dir), "--label-config", str(config), "--out", str(out),
                     "--masks", "--overlays", "--alpha", "0.6"], _env(model_dir, redis_server.url))
    return {"proc": proc, "out": out, "config": config}


def test_folder_run_reports_the_corrupt_image_and_exits_non_zero(first_run: dict) -> None:
    proc = first_run["proc"]
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((first_run["out"] / "summary.json").read_text())
    assert summary["total"] == 3 and summary["failed"] == 1 and summary["done"] + summary["cached"] == 2
    (failure,) = summary["failures"]
    assert failure["item"] == "broken.jpg" and failure["reason"].startswith("decode: "), failure
    assert "FAILED broken.jpg:" in proc.stderr
    # Not a terminal: plain progress lines, no carriage-return bar.
    assert "folder: 3/3 (100%)" in proc.stderr and "\r" not in proc.stderr


def test_folder_tasks_json_is_valid_for_the_labeling_config(first_run: dict, photo_dir: Path, parser) -> None:
    tasks = json.loads((first_run["out"] / "tasks.json").read_text())
    # Default URLs: Label Studio local files, relative to the images folder's parent (the document root).
    assert [t["data"]["photo"] for t in tasks] == [f"/data/local-files/?d={photo_dir.name}/a.jpg",
                                                   f"/data/local-files/?d={photo_dir.name}/sub/b.jpg"]
    interface = LabelInterface(POLYGON_CONFIG)
    total_regions = 0
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == parser.version
        ok = interface.validate_prediction(prediction, return_errors=True)
        assert ok is True or ok == [], ok
        total_regions += len(prediction["result"])
        for region in prediction["result"]:
            assert region["from_name"] == "parts" and region["to_name"] == "img"
            assert region["type"] == "polygonlabels" and 0 <= region["score"] <= 1
    assert total_regions > 0  # the shaped random model finds parts: an empty file would pass validation


def test_folder_masks_are_class_index_pngs_with_a_legend(first_run: dict, parser, sample_images) -> None:
    out = first_run["out"]
    legend = json.loads((out / "masks" / "classes.json").read_text())
    assert [e["name"] for e in legend] == list(parser.classes)
    assert (out / "masks" / "classes.txt").read_text().splitlines()[0] == "0 Background"
    seen: set[int] = set()
    for rel, source in [("a.png", sample_images[0]), ("sub/b.png", sample_images[2])]:
        mask = Image.open(out / "masks" / rel)
        values = np.asarray(mask)
        assert values.dtype == np.uint8 and mask.size == Image.open(source).size
        seen |= set(np.unique(values).tolist())
    assert seen <= set(range(len(parser.classes))) and len(seen - {0}) >= 2
    assert not (out / "masks" / "broken.png").exists()


def test_folder_overlays_are_written_for_review(first_run: dict, sample_images) -> None:
    out = first_run["out"]
    for rel, source in [("a.jpg", sample_images[0]), ("sub/b.jpg", sample_images[2])]:
        drawn = Image.open(out / "overlays" / rel)
        photo = Image.open(source)
        assert drawn.size == photo.size
        # Colours were blended in: the overlay is not the photo.
        diff = np.abs(np.asarray(drawn.convert("RGB"), np.int16) - np.asarray(photo.convert("RGB"), np.int16))
        assert diff.mean() > 2.0
    assert (out / "overlays" / "legend.png").exists()


def test_folder_rerun_is_served_from_the_shared_cache(tmp_path: Path, first_run: dict, photo_dir: Path,
                                                      model_dir: Path, redis_server) -> None:
    good = tmp_path / "good"
    (good / "sub").mkdir(parents=True)
    for rel in ["a.jpg", "sub/b.jpg"]:
        (good / rel).write_bytes((photo_dir / rel).read_bytes())
    out = tmp_path / "out"
    proc = _run_cli(["folder", str(good), "--label-config", str(first_run["config"]), "--out", str(out),
                     "--image-root-url", "https://cdn.example/set"], _env(model_dir, redis_server.url))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cached"] == 2 and summary["failed"] == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["photo"] for t in tasks] == ["https://cdn.example/set/a.jpg", "https://cdn.example/set/sub/b.jpg"]
    first = json.loads((first_run["out"] / "tasks.json").read_text())
    assert [t["predictions"] for t in tasks] == [t["predictions"] for t in first]
    assert not (out / "masks").exists() and not (out / "overlays").exists()


def test_folder_bad_labeling_config_is_a_usage_error(tmp_path: Path, photo_dir: Path, model_dir: Path,
                                                     redis_server) -> None:
    config = tmp_path / "config.xml"
    config.write_text('<View><Image name="img" value="$image"/><Choices name="c" toName="img">'
                      '<Choice value="x"/></Choices></View>')
    proc = _run_cli(["folder", str(photo_dir), "--label-config", str(config), "--out", str(tmp_path / "o")],
                    _env(model_dir, redis_server.url), timeout=120)
    assert proc.returncode == 2 and "labeling config" in proc.stderr, proc.stderr
