"""End to end with a REAL Label Studio 1.23.2 and our real backend (python _wsgi.py, random-weight M2FP).

What a user does: create a project, import images (uploaded files and a Local Storage folder), connect the
backend on the Model page, run "Retrieve Predictions" from the data manager; then we read back from Label
Studio's API what it stored: regions, labels, scores, model_version, and that a second run adds nothing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from testing.label_studio import (LabelStudioServer, connect_ml_backend, create_project,
                                         import_local_files, import_tasks, import_uploads,
                                         predictions_of, retrieve_predictions)

CIHP_PARTS = ["Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants",
              "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg",
              "Left-shoe", "Right-shoe"]

POLYGON_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <PolygonLabels name="parts" toName="image" strokeWidth="2" opacity="0.4">
""" + "\n".join(f'    <Label value="{name}"/>' for name in CIHP_PARTS + ["Human"]) + """
  </PolygonLabels>
</View>"""

# A project with its own vocabulary: several model classes folded into one label, and a lower-case name.
BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="skin" predicted_values="Face,Torso-skin,Left-arm,Right-arm,Left-leg,Right-leg"/>
    <Label value="clothes" predicted_values="UpperClothes,Dress,Coat,Pants,Skirt,Scarf,Socks"/>
    <Label value="hair"/>
    <Label value="Person" predicted_values="Human"/>
  </BrushLabels>
</View>"""


@pytest.fixture(scope="module")
def backend(backend_server, model_dir: Path, redis_server, label_studio: LabelStudioServer):
    """Our backend as a user deploys it next to Label Studio: LS URL + legacy token to fetch images, Redis cache."""
    return backend_server(env={"M2FP_MODEL": str(model_dir), "REDIS_URL": redis_server.url,
                               "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})


def _setup_version(backend, label_config: str) -> str:
    """What /setup answers for this config: the version every stored prediction must carry."""
    answer = requests.post(backend.url + "/setup", json={"project": "1.0", "schema": label_config}, timeout=60)
    answer.raise_for_status()
    return answer.json()["model_version"]


def _stored(ls: LabelStudioServer, task_ids: list[int]) -> dict[int, list[dict]]:
    return {tid: predictions_of(ls, tid) for tid in task_ids}


def _sizes(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {p.name: Image.open(p).size for p in paths}


def _image_size_of_task(ls: LabelStudioServer, task_id: int, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    url = ls.api("GET", f"/api/tasks/{task_id}/").json()["data"]["image"]
    # Uploaded files get a random prefix ("<8 hex>-name.jpg"); local files keep their name.
    matches = [size for name, size in sizes.items() if url.endswith(name)]
    assert len(matches) == 1, (url, sizes)
    return matches[0]


def test_polygon_prelabels_retrieved_by_label_studio(label_studio: LabelStudioServer, backend,
                                                     sample_images: list[Path]) -> None:
    ls = label_studio
    project = create_project(ls, POLYGON_CONFIG, title="e2e polygons")
    uploaded = import_uploads(ls, project, sample_images[:2])
    local = import_local_files(ls, project, sample_images[2:], subdir=f"e2e-{project}")
    # One task whose image does not exist: it must cost that task only, not the batch.
    broken = import_tasks(ls, project, [{"image": f"/data/upload/{project}/no-such-file.jpg"}])
    good = uploaded + local
    assert len(good) == len(sample_images) and len(broken) == 1

    ml_id = connect_ml_backend(ls, project, backend.url)
    version = _setup_version(backend, POLYGON_CONFIG)
    # LS asked /setup when connecting and keeps the version it was told.
    assert ls.api("GET", f"/api/ml/{ml_id}").json()["model_version"] == version

    answer = retrieve_predictions(ls, project)
    assert answer.get("processed_items") == len(good) + len(broken), answer

    stored = _stored(ls, good + broken)
    assert stored[broken[0]] == []
    sizes = _sizes(sample_images)
    allowed = set(CIHP_PARTS) | {"Human"}
    interface = LabelInterface(POLYGON_CONFIG)
    seen_labels: set[str] = set()
    for tid in good:
        assert len(stored[tid]) == 1, (tid, stored[tid])
        prediction = stored[tid][0]
        assert prediction["model_version"] == version
        assert 0.0 <= prediction["score"] <= 1.0
        regions = prediction["result"]
        assert regions, f"task {tid}: no regions"
        assert interface.validate_prediction({"result": regions}), regions[:2]
        width, height = _image_size_of_task(ls, tid, sizes)
        for region in regions:
            assert region["type"] == "polygonlabels"
            assert (region["from_name"], region["to_name"]) == ("parts", "image")
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert 0.0 <= region["score"] <= 1.0
            value = region["value"]
            assert len(value["polygonlabels"]) == 1 and value["polygonlabels"][0] in allowed
            seen_labels.add(value["polygonlabels"][0])
            assert len(value["points"]) >= 3
            assert all(0.0 <= x <= 100.0 and 0.0 <= y <= 100.0 for x, y in value["points"])
    assert len(seen_labels) >= 2, seen_labels   # the shaped random model finds several classes

    # The backend read uploads and local files through Label Studio with the token; the bad task is logged.
    assert "no-such-file.jpg" in backend.log_text()

    # Same model_version as /setup -> a second run stores nothing new.
    retrieve_predictions(ls, project)
    again = _stored(ls, good)
    assert {tid: [p["id"] for p in preds] for tid, preds in again.items()} == \
        {tid: [p["id"] for p in preds] for tid, preds in stored.items() if tid in good}


def test_brush_prelabels_with_mapped_labels(label_studio: LabelStudioServer, backend,
                                            sample_images: list[Path]) -> None:
    ls = label_studio
    project = create_project(ls, BRUSH_CONFIG, title="e2e brush")
    images = sample_images[:2]
    tasks = import_uploads(ls, project, images)
    connect_ml_backend(ls, project, backend.url)
    version = _setup_version(backend, BRUSH_CONFIG)
    retrieve_predictions(ls, project, ids=tasks)

    sizes = _sizes(images)
    interface = LabelInterface(BRUSH_CONFIG)
    labels: set[str] = set()
    for tid, preds in _stored(ls, tasks).items():
        assert len(preds) == 1 and preds[0]["model_version"] == version
        regions = preds[0]["result"]
        assert regions and interface.validate_prediction({"result": regions})
        width, height = _image_size_of_task(ls, tid, sizes)
        for region in regions:
            assert region["type"] == "brushlabels" and region["from_name"] == "mask"
            value = region["value"]
            assert value["format"] == "rle" and len(value["brushlabels"]) == 1
            labels.add(value["brushlabels"][0])
            # Lossless RLE of a mask at the ORIGINAL size: RGBA bytes, alpha set where the mask is.
            pixels = decode_rle(value["rle"])
            assert pixels.size == width * height * 4
            assert pixels.reshape(-1, 4)[:, 3].any()
    # Only the project's own vocabulary, never the model's class names it was mapped from.
    assert labels and labels <= {"skin", "clothes", "hair", "Person"}, labels


# Two images per task, a control on each (front: polygons, back: brush): every image gets its own regions, with
# its own size, and no region id is shared (Label Studio merges regions that share an id).
TWO_IMAGE_CONFIG = """<View>
  <Image name="front" value="$front"/>
  <PolygonLabels name="front_parts" toName="front">
""" + "\n".join(f'    <Label value="{name}"/>' for name in CIHP_PARTS) + """
  </PolygonLabels>
  <Image name="back" value="$back"/>
  <BrushLabels name="back_parts" toName="back">
""" + "\n".join(f'    <Label value="{name}"/>' for name in CIHP_PARTS) + """
  </BrushLabels>
</View>"""
CONTROL_OF = {"front": "front_parts", "back": "back_parts"}


def _cli(args: list[str], model_dir: Path, redis_url: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "M2FP_MODEL": str(model_dir), "M2FP_DEVICE": "cpu", "M2FP_THREADS": "2",
           "REDIS_URL": redis_url, "LOG_LEVEL": "INFO"}
    script = Path(sys.executable).parent / "m2fp-prelabel"
    proc = subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _assert_each_image_has_its_own_regions(prediction: dict, sizes: dict[str, tuple[int, int]]) -> None:
    regions = prediction["result"]
    ids = [r["id"] for r in regions]
    assert len(ids) == len(set(ids)), "region ids shared between images"
    for image, control in CONTROL_OF.items():
        mine = [r for r in regions if r["to_name"] == image]
        assert mine, f"no regions on {image}"
        assert {r["from_name"] for r in mine} == {control}
        assert {(r["original_width"], r["original_height"]) for r in mine} == {sizes[image]}, image


@pytest.fixture(scope="module")
def two_image_files(label_studio: LabelStudioServer, sample_images: list[Path]) -> tuple[Path, dict]:
    """front/ and back/ folders (one pair, different sizes) under Label Studio's local-files root."""
    root = label_studio.local_files_root / "pairs"
    by_name = {p.stem: p for p in sample_images}
    for image, source in [("front", by_name["scene_640x480"]), ("back", by_name["portrait_480x800"])]:
        (root / image).mkdir(parents=True, exist_ok=True)
        (root / image / "look1.jpg").write_bytes(source.read_bytes())
    return root, {"front": (640, 480), "back": (480, 800)}


def _pair_project(ls: LabelStudioServer, root: Path) -> int:
    project = create_project(ls, TWO_IMAGE_CONFIG)
    # A Local Storage covering the folder lets LS serve its files; the tasks themselves come as JSON.
    ls.api("POST", "/api/storages/localfiles/", json={"project": project, "title": "pairs", "path": str(root),
                                                      "use_blob_urls": True})
    return project


def test_two_image_config_in_server_folder_and_project_modes(label_studio: LabelStudioServer, backend,
                                                             two_image_files, model_dir: Path, redis_server,
                                                             tmp_path: Path) -> None:
    ls = label_studio
    root, sizes = two_image_files
    pair = {image: f"/data/local-files/?d=pairs/{image}/look1.jpg" for image in CONTROL_OF}

    # Server mode: Label Studio's own "Retrieve predictions".
    project = _pair_project(ls, root)
    (task,) = import_tasks(ls, project, [pair])
    connect_ml_backend(ls, project, backend.url)
    retrieve_predictions(ls, project)
    (served,) = predictions_of(ls, task)
    _assert_each_image_has_its_own_regions(served, sizes)

    # Folder mode: one subfolder per image field; the import JSON it writes goes into Label Studio unchanged.
    config = tmp_path / "config.xml"
    config.write_text(TWO_IMAGE_CONFIG)
    _cli(["folder", str(root), "--label-config", str(config), "--out", str(tmp_path / "out"),
          "--document-root", str(ls.local_files_root)], model_dir, redis_server.url)
    import json

    (written,) = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert written["data"] == pair
    _assert_each_image_has_its_own_regions(written["predictions"][0], sizes)
    folder_project = _pair_project(ls, root)
    (imported,) = import_tasks(ls, folder_project, [written])
    (stored,) = predictions_of(ls, imported)
    assert len(stored["result"]) == len(written["predictions"][0]["result"])
    _assert_each_image_has_its_own_regions(stored, sizes)

    # Project mode: the CLI reads the tasks from Label Studio and posts one prediction per task.
    cli_project = _pair_project(ls, root)
    (cli_task,) = import_tasks(ls, cli_project, [pair])
    _cli(["project", str(cli_project), "--ls-url", ls.url, "--api-key", ls.token], model_dir, redis_server.url)
    (posted,) = predictions_of(ls, cli_task)
    _assert_each_image_has_its_own_regions(posted, sizes)
    # The same images and config give the same regions whichever way they were asked for.
    assert sorted(r["id"] for r in posted["result"]) == sorted(r["id"] for r in served["result"])
