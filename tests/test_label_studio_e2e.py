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
