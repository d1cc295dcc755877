"""The served backend through real HTTP: real model (random weights), real redis-server, real image server.

Each unique image costs one CPU inference (several seconds here), so the tests reuse two good images and
rely on the cache between tests; every assertion about inferences compares counters within one test.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from testing.http_servers import serve_folder

REDIS_DB = 2  # this module flushes it; see testing/redis_server.py
CLASSES = ["Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks", "Pants", "Torso-skin",
           "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe", "Right-shoe"]


def polygon_config(labels: list[str] | None = None, extra: str = "") -> str:
    labels = labels if labels is not None else CLASSES + ["Human"]
    items = "".join(f'<Label value="{name}"/>' for name in labels) + extra
    return (f'<View><Image name="image" value="$image"/>'
            f'<PolygonLabels name="parts" toName="image">{items}</PolygonLabels></View>')


BRUSH_CONFIG = ('<View><Image name="img" value="$photo"/><BrushLabels name="masks" toName="img">'
                '<Label value="Face"/><Label value="Hair"/><Label value="Dress"/><Label value="Hat"/>'
                '<Label value="Person" predicted_values="Human"/></BrushLabels></View>')

# Several controls on one image; labels written the way a project might: other case, punctuation, grouping.
MAPPING_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<PolygonLabels name="regions" toName="image">'
    '<Label value="hair"/><Label value="upper clothes"/><Label value="FACE"/>'
    '<Label value="Legs" predicted_values="Left-leg,Right-leg"/>'
    '<Label value="Shoes" predicted_values="Left-shoe, Right-shoe"/>'
    '</PolygonLabels>'
    '<BrushLabels name="people" toName="image"><Label value="Human"/></BrushLabels>'
    '</View>')


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_images) -> Path:
    folder = tmp_path_factory.mktemp("served-images")
    by_name = {p.stem: p for p in sample_images}
    shutil.copy(by_name["scene_640x480"], folder / "scene.jpg")
    shutil.copy(by_name["portrait_480x800"], folder / "portrait.jpg")
    good = (folder / "scene.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (folder / "not-an-image.jpg").write_bytes(b"<html><body>Sign in</body></html>")
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(folder / "huge-pixels.png")       # > IMAGE_MAX_PIXELS
    (folder / "huge-bytes.jpg").write_bytes(good + b"\0" * 3_000_000)                    # > IMAGE_MAX_BYTES
    return folder


@pytest.fixture(scope="module")
def image_host(images):
    with serve_folder(images) as url:
        yield url


@pytest.fixture(scope="module")
def server(backend_server, model_dir, redis_server, images, tmp_path_factory):
    redis_server.flushdb(REDIS_DB)
    backend = backend_server(env={
        "M2FP_MODEL": str(model_dir), "M2FP_THREADS": "2", "M2FP_CACHE_DIR": str(tmp_path_factory.mktemp("hub")),
        "REDIS_URL": redis_server.url_for(REDIS_DB), "REDIS_TIMEOUT": "0.3", "REDIS_RETRY_SECONDS": "1",
        "LOCAL_FILES_DOCUMENT_ROOT": str(images), "IMAGE_MAX_PIXELS": "10000000", "IMAGE_MAX_BYTES": "2000000",
        "IMAGE_READ_TIMEOUT": "10", "LOG_LEVEL": "DEBUG",
        # The test image host is on loopback, which task URLs may reach only when allowed (backend/net_guard.py).
        "IMAGE_URL_ALLOW": "127.0.0.1"})
    yield backend
    backend.stop()


def predict(server, tasks: list[dict], config: str, timeout: float = 300) -> dict:
    response = requests.post(server.url + "/predict", timeout=timeout, json={
        "tasks": tasks, "label_config": config, "project": "1.1700000000",
        "params": {"login": None, "password": None, "context": None}})
    assert response.status_code == 200, response.text
    return response.json()


def metrics(server) -> dict:
    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    return response.json()


def setup(server, config: str) -> requests.Response:
    return requests.post(server.url + "/setup", timeout=30, json={
        "project": "1.1700000000", "schema": config, "hostname": "http://localhost:8080", "access_token": "x",
        "extra_params": ""})


def scene_task(image_host: str, task_id: int = 1) -> dict:
    return {"id": task_id, "data": {"image": f"{image_host}/scene.jpg"}}


def portrait_task(task_id: int = 2) -> dict:
    return {"id": task_id, "data": {"image": "/data/local-files/?d=portrait.jpg"}}


def without_ids(prediction: dict) -> dict:
    """Region ids may be generated per response; everything else must be identical."""
    return {**prediction, "result": [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]}


def labels_of(prediction: dict) -> list[str]:
    out = []
    for region in prediction["result"]:
        value = region["value"]
        out += value.get("polygonlabels") or value.get("brushlabels") or []
    return out


# ----------------------------------------------------------------------------------------------------

def test_health_and_setup_answer_the_model_version(server):
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    answer = setup(server, polygon_config())
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == health.json()["model_version"]
    assert answer.json()["model_version"] not in ("", "INITIAL")


def test_polygon_predictions(server, image_host):
    version = setup(server, polygon_config()).json()["model_version"]
    config = polygon_config()
    tasks = [scene_task(image_host), portrait_task()]
    before = metrics(server)["inferences"]
    # The first predictions of this module (Redis flushed): two identical requests at once run each image once.
    other: list = []
    twin = threading.Thread(target=lambda: other.append(predict(server, tasks, config)))
    twin.start()
    body = predict(server, tasks, config)
    twin.join()
    assert metrics(server)["inferences"] - before == 2
    assert [without_ids(p) for p in other[0]["results"]] == [without_ids(p) for p in body["results"]]
    assert body["model_version"] == version
    assert len(body["results"]) == 2
    interface = LabelInterface(config)
    sizes = [(640, 480), (480, 800)]
    for prediction, (w, h) in zip(body["results"], sizes):
        assert isinstance(prediction, dict) and prediction["model_version"] == version
        assert 0.0 <= prediction["score"] <= 1.0
        assert len(prediction["result"]) >= 3
        assert interface.validate_prediction(prediction)
        for region in prediction["result"]:
            assert region["type"] == "polygonlabels"
            assert (region["from_name"], region["to_name"]) == ("parts", "image")
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert 0.0 <= region["score"] <= 1.0
            points = np.asarray(region["value"]["points"], dtype=float)
            assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
            assert points.min() >= 0.0 and points.max() <= 100.0
            assert set(region["value"]["polygonlabels"]) <= set(CLASSES + ["Human"])
        assert "Human" in labels_of(prediction)


def test_brush_predictions_and_the_cache_hit_path(server, image_host):
    before = metrics(server)
    # Same image as the polygon test, new config: served from the parsing cache, no inference.
    body = predict(server, [{"id": 7, "data": {"photo": f"{image_host}/scene.jpg"}}], BRUSH_CONFIG)
    body_again = predict(server, [{"id": 7, "data": {"photo": f"{image_host}/scene.jpg"}}], BRUSH_CONFIG)
    after = metrics(server)
    prediction = body["results"][0]
    assert without_ids(prediction) == without_ids(body_again["results"][0])
    assert LabelInterface(BRUSH_CONFIG).validate_prediction(prediction)
    assert prediction["result"], "no brush regions"
    for region in prediction["result"]:
        assert region["type"] == "brushlabels" and region["from_name"] == "masks" and region["to_name"] == "img"
        assert region["value"]["format"] == "rle"
        decoded = np.asarray(decode_rle(region["value"]["rle"]))
        assert decoded.size == 640 * 480 * 4 and decoded.reshape(480, 640, 4)[..., 3].any()
        assert set(region["value"]["brushlabels"]) <= {"Face", "Hair", "Dress", "Hat", "Person"}
    assert "Person" in labels_of(prediction)   # predicted_values="Human" on a differently named label
    assert after["inferences"] == before["inferences"]
    # 1st request: parsing from the cache, brush results built; 2nd: the finished prediction from the cache.
    assert after["cache"]["hits"] == before["cache"]["hits"] + 1
    assert after["cache"]["results_hits"] == before["cache"]["results_hits"] + 1


def test_label_mapping(server, image_host):
    reference = predict(server, [scene_task(image_host)], polygon_config())["results"][0]
    seen = labels_of(reference)
    assert len(set(seen)) >= 3, seen   # the random-weight model is shaped to give varied labels
    before = metrics(server)["inferences"]
    mapped = predict(server, [scene_task(image_host)], MAPPING_CONFIG)["results"][0]
    assert metrics(server)["inferences"] == before
    assert LabelInterface(MAPPING_CONFIG).validate_prediction(mapped)
    polygons = [r for r in mapped["result"] if r["type"] == "polygonlabels"]
    brushes = [r for r in mapped["result"] if r["type"] == "brushlabels"]
    got = [label for r in polygons for label in r["value"]["polygonlabels"]]
    expected = {"hair": ["Hair"], "upper clothes": ["UpperClothes"], "FACE": ["Face"],
                "Legs": ["Left-leg", "Right-leg"], "Shoes": ["Left-shoe", "Right-shoe"]}
    for project_label, model_classes in expected.items():
        # Same geometry and thresholds as the reference config: one region per reference region of those classes.
        assert got.count(project_label) == sum(seen.count(c) for c in model_classes), project_label
    assert set(got) <= set(expected)
    assert {r["from_name"] for r in polygons} == {"regions"} and {r["from_name"] for r in brushes} == {"people"}
    # Brush: one region per person (polygons: one per connected component of a person).
    persons = {r.get("meta", {}).get("person") for r in reference["result"]
               if "Human" in r["value"]["polygonlabels"]}
    assert len(brushes) == len(persons) > 0
    assert all(r["value"]["brushlabels"] == ["Human"] for r in brushes)


def test_bad_tasks_cost_only_their_own_prediction(server, image_host):
    tasks = [
        scene_task(image_host, 1),
        {"id": 2, "data": {"image": f"{image_host}/missing.jpg"}},
        {"id": 3, "data": {"image": "/data/local-files/?d=corrupt.jpg"}},
        {"id": 4, "data": {"image": f"{image_host}/not-an-image.jpg"}},
        {"id": 5, "data": {"image": "/data/local-files/?d=huge-pixels.png"}},
        {"id": 6, "data": {"image": f"{image_host}/huge-bytes.jpg"}},
        {"id": 7, "data": {"text": "no image field"}},
        portrait_task(8),
    ]
    before = metrics(server)
    body = predict(server, tasks, polygon_config())
    results = body["results"]
    assert len(results) == len(tasks)
    assert isinstance(results[0], dict) and results[0]["result"]
    assert isinstance(results[-1], dict) and results[-1]["result"]
    assert results[1:-1] == [[]] * 6   # an empty list of predictions: Label Studio stores nothing for those
    after = metrics(server)
    grew = {k: after["failures"].get(k, 0) - before["failures"].get(k, 0) for k in after["failures"]}
    assert grew.get("not_found") == 1 and grew.get("too_large") == 2 and grew.get("no_image") == 1
    assert grew.get("decode") == 2   # corrupt bytes + not an image
    log = server.log_text()
    for task_id, words in [(2, "404"), (3, "corrupt or truncated"), (4, "not an image"),
                           (5, "IMAGE_MAX_PIXELS"), (6, "IMAGE_MAX_BYTES"), (7, "no 'image' field")]:
        assert any(f"task {task_id}:" in line and words in line for line in log.splitlines()), (task_id, words)
    # ...and the server keeps serving
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert predict(server, [portrait_task(9)], polygon_config())["results"][0]["result"]


def test_unusable_label_config_is_a_clear_error(server, image_host):
    choices = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
               '<Choice value="a"/></Choices></View>')
    answer = setup(server, choices)
    assert answer.status_code == 400 and answer.json()["error"] == "bad_config"
    assert "PolygonLabels" in answer.json()["message"] or "BrushLabels" in answer.json()["message"]
    response = requests.post(server.url + "/predict", timeout=30,
                             json={"tasks": [scene_task(image_host)], "label_config": choices})
    assert response.status_code == 400 and response.json()["error"] == "bad_config"
    malformed = requests.post(server.url + "/predict", timeout=30,
                              json={"tasks": [scene_task(image_host)], "label_config": "<View><Image name="})
    assert malformed.status_code == 400 and "does not parse" in malformed.json()["message"]
    assert requests.post(server.url + "/predict", timeout=30, data="nope").status_code == 400


def test_webhook_versions_and_train_routes(server):
    response = requests.post(server.url + "/webhook", timeout=10,
                             json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    version = requests.get(server.url + "/health", timeout=10).json()["model_version"]
    versions = requests.get(server.url + "/versions", params={"project": "1.1"}, timeout=10)  # as LS asks it
    assert versions.status_code == 200 and versions.json()["versions"] == [version]
    assert requests.post(server.url + "/train", json={"annotations": [1], "project": "1"}, timeout=10).ok


def test_redis_killed_mid_run_then_back(server, redis_server, image_host):
    task = scene_task(image_host)
    config = polygon_config()
    warm = predict(server, [task], config)["results"][0]
    redis_server.stop()
    try:
        before = metrics(server)["inferences"]
        served = predict(server, [task], config)["results"][0]   # cache unreachable: computed again
        assert without_ids(served) == without_ids(warm)
        assert metrics(server)["inferences"] == before + 1
        assert metrics(server)["cache"]["redis_available"] is False
    finally:
        redis_server.start()
    time.sleep(1.5)  # REDIS_RETRY_SECONDS=1 in this server
    before = metrics(server)["inferences"]
    again = predict(server, [task], config)["results"][0]     # Redis lost its data: computed, stored
    assert without_ids(again) == without_ids(warm)
    again = predict(server, [task], config)["results"][0]     # ...and now served from it again
    assert without_ids(again) == without_ids(warm)
    after = metrics(server)
    assert after["inferences"] == before + 1
    assert after["cache"]["redis_available"] is True
    log = server.log_text()
    outages = [line for line in log.splitlines() if "Redis cache at" in line and "unavailable" in line]
    assert len(outages) == 1, outages          # one warning for the outage, however many requests it cost
    assert "is back" in log


def test_gunicorn_workers_predict_without_setup(backend_server, model_dir, redis_server, image_host, server):
    # `server` ran first: the scene image is in Redis, so the workers only load the model.
    backend = backend_server(env={"M2FP_MODEL": str(model_dir), "REDIS_URL": redis_server.url_for(REDIS_DB),
                                  "IMAGE_URL_ALLOW": "127.0.0.1"}, server="gunicorn", workers=2, threads=2)
    try:
        version = requests.get(backend.url + "/health", timeout=10).json()["model_version"]
        for _ in range(3):  # requests spread over both workers, none of which saw a /setup
            body = predict(backend, [scene_task(image_host)], polygon_config())
            assert body["model_version"] == version and body["results"][0]["result"]
        assert setup(backend, polygon_config()).json()["model_version"] == version
    finally:
        backend.stop()


def test_debug_logs_carry_no_credentials_and_no_request_bodies(server, image_host):
    """The server logs at DEBUG here: what Label Studio sends (its token, the tasks) must still not reach the log."""
    secret = "Token 3f9c0d-never-in-a-log"
    marker = "body-marker-7b1e"
    response = requests.post(server.url + "/predict", timeout=300, headers={"Authorization": secret}, json={
        "tasks": [{"id": 77, "data": {"image": f"{image_host}/scene.jpg", "note": marker}}],
        "label_config": polygon_config(), "project": "1.1700000000"})
    assert response.status_code == 200
    requests.post(server.url + "/setup", timeout=30, headers={"Authorization": secret},
                  json={"project": "1.1", "schema": polygon_config(), "access_token": secret, "note": marker})
    log = server.log_text()
    assert "DEBUG" in log  # the level is really on
    assert "never-in-a-log" not in log and marker not in log
