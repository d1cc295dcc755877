"""Images in cloud storage, read through Label Studio: the URI -> resolve-URL mapping (pure), then a REAL Label
Studio 1.23.2 with an S3 source storage on a REAL S3-compatible server (moto, testing/s3_server.py), with
presigning on (LS answers 303 to the storage) and off (LS proxies the bytes): the fetcher alone, the served
backend through "Retrieve Predictions", and project mode.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

from backend import storage_uris as su
from backend.images import ImageFetcher
from backend.settings import Settings
from testing.label_studio import (connect_ml_backend, create_project, import_gcs_storage, import_s3_storage,
                                  import_tasks, predictions_of, retrieve_predictions, start_label_studio)
from testing.random_model import make_sample_image
from testing.workers import base_env

ROOT = Path(__file__).resolve().parents[1]
LS = "http://label-studio:8080"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="parts" toName="image">
    <Label value="Hair"/><Label value="Face"/><Label value="UpperClothes"/><Label value="Pants"/>
    <Label value="Left-arm"/><Label value="Right-arm"/><Label value="Left-leg"/><Label value="Right-leg"/>
    <Label value="Human"/>
  </PolygonLabels>
</View>"""
UA = "m2fp-prelabel"


# ---------------------------------------------------------------- pure: URI -> Label Studio URL

@pytest.mark.parametrize("uri", ["s3://bucket/photos/a b+c.jpg", "gs://bucket/x/ü.png",
                                 "azure-blob://container/dir/img.webp"])
def test_cloud_uri_becomes_the_task_resolve_url_label_studio_builds(uri: str) -> None:
    target = su.ls_resolve_target(uri, 42, LS + "/")
    assert target == su.LsResolve(f"{LS}/tasks/42/resolve/?fileuri={encode_presign_fileuri(uri)}", uri, 42)
    # The encoding is label-studio-sdk's (and LS's): urlsafe base64 with padding, which decodes back.
    value = parse_qs(urlsplit(target.url).query)["fileuri"][0]
    assert su.decode_fileuri(value) == uri and "/" not in value and "+" not in value
    assert su.ls_resolve_target(uri, "42", LS).url == target.url   # ids from JSON may be strings


def test_resolve_and_legacy_presign_urls_relative_or_absolute_go_to_label_studio_url() -> None:
    fileuri = su.encode_fileuri("s3://bucket/k.jpg")
    want = su.LsResolve(f"{LS}/tasks/7/resolve/?fileuri={fileuri}", "s3://bucket/k.jpg", 7)
    for url in (f"/tasks/7/resolve/?fileuri={fileuri}", f"/tasks/7/presign/?fileuri={fileuri}",
                f"{LS}/tasks/7/presign/?fileuri={fileuri}",
                f"https://ls.example.com/tasks/7/resolve/?fileuri={fileuri}"):
        # The URL's own task id wins over the task's (LS checks permissions on the one in the URL).
        assert su.ls_resolve_target(url, 99, LS, "https://ls.example.com") == want, url
    project = su.ls_resolve_target(f"/projects/3/resolve/?fileuri={fileuri}", None, LS)
    assert project.url == f"{LS}/projects/3/resolve/?fileuri={fileuri}" and project.what.endswith("(project 3)")
    # Old unencoded values are kept as they are (LS falls back to unquoting them).
    assert su.ls_resolve_target("/tasks/7/resolve/?fileuri=s3%3A%2F%2Fb%2Fk.jpg", 7, LS).uri == "s3://b/k.jpg"


def test_other_urls_are_not_resolved() -> None:
    fileuri = su.encode_fileuri("s3://bucket/k.jpg")
    for url in ("/data/upload/1/a.jpg", "https://elsewhere.example/a.jpg",
                f"https://elsewhere.example/tasks/7/resolve/?fileuri={fileuri}",   # not LS: no token for it
                "/tasks/7/resolve/", "/tasks/x/resolve/?fileuri=abc", "data:image/png;base64,AAAA"):
        assert su.ls_resolve_target(url, 7, LS, "https://ls.example.com") is None, url


def test_label_studio_host_is_an_alias_of_label_studio_url() -> None:
    rebase = su.rebase_on_label_studio
    assert rebase("https://ls.example.com/data/upload/1/a.jpg", LS, "https://ls.example.com/") \
        == f"{LS}/data/upload/1/a.jpg"
    assert rebase("https://LS.example.com:443/data/upload/1/a.jpg?x=1", LS + "/sub", "https://ls.example.com") \
        == f"{LS}/sub/data/upload/1/a.jpg?x=1"
    # A host with a base path: only URLs below it; other hosts, ports and schemes are left alone.
    assert rebase("https://ls.example.com/ls/data/a.jpg", LS, "https://ls.example.com/ls") == f"{LS}/data/a.jpg"
    for other in ("https://ls.example.com/other/a.jpg", "http://ls.example.com/data/a.jpg",
                  "https://ls.example.com:8443/data/a.jpg", "https://ls.example.com.evil.test/data/a.jpg"):
        assert rebase(other, LS, "https://ls.example.com/ls" if "other" in other else "https://ls.example.com") \
            == other
    assert rebase("https://ls.example.com/a.jpg", "", "https://ls.example.com") == "https://ls.example.com/a.jpg"


def test_cloud_uri_without_task_id_or_label_studio_url_is_a_clear_error() -> None:
    for task_id in (None, "abc", True, 0, -3, 1.5):
        with pytest.raises(su.NoTaskId, match="s3://b/k.jpg") as info:
            su.ls_resolve_target("s3://b/k.jpg", task_id, LS)
        assert info.value.reason == "no_task_id"
    with pytest.raises(su.NoLabelStudioUrl, match="LABEL_STUDIO_URL") as info:
        su.ls_resolve_target("gs://b/k.jpg", 3, "")
    assert info.value.reason == "no_ls_url"


def test_label_studio_answers_map_to_stable_reasons() -> None:
    target = su.ls_resolve_target("azure-blob://c/k.jpg", 5, LS)
    reasons = {status: su.resolve_error(target, status, has_key=True) for status in (200, 206, 401, 403, 404,
                                                                                     424, 500, 502, 400)}
    assert reasons[200] is None and reasons[206] is None
    assert {s: e.reason for s, e in reasons.items() if e} == {401: "auth", 403: "storage_denied", 404: "not_found",
                                                              424: "storage", 500: "storage", 502: "storage",
                                                              400: "storage"}
    assert all("azure-blob://c/k.jpg (task 5)" in str(e) for e in reasons.values() if e)
    assert "LABEL_STUDIO_API_KEY is not set" in str(su.resolve_error(target, 401, has_key=False))

    presigned = su.presigned_target(target, "https://acct.blob.example/c/k.jpg?sig=SECRET&se=1")
    assert presigned.shown == "https://acct.blob.example/c/k.jpg"
    assert {s: su.presigned_error(presigned, s).reason for s in (403, 404, 500)} == \
        {403: "storage_denied", 404: "not_found", 500: "storage"}
    code = su.storage_error_code(b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Key>k</Key></Error>')
    assert code == "NoSuchKey" and "HTTP 404 NoSuchKey" in str(su.presigned_error(presigned, 404, code))
    assert su.storage_error_code(b"<html>nope</html>") == ""
    assert su.presigned_error(presigned, 200) is None
    assert all("SECRET" not in str(su.presigned_error(presigned, s)) for s in (403, 404, 500))
    # A relative Location is on LS; LS's fallback when presigning fails is a redirect to the raw URI.
    assert su.presigned_target(target, "/data/x.jpg").url == f"{LS}/data/x.jpg"
    for location in ("azure-blob://c/k.jpg", "", None):
        with pytest.raises(su.StorageError) as info:
            su.presigned_target(target, location)
        assert info.value.reason == "storage"


# ---------------------------------------------------------------- real Label Studio + S3 (moto)

def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    make_sample_image(320, 240, seed=seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


IMAGES = {"people/one.jpg": _jpeg(11), "people/two.jpg": _jpeg(12)}


@pytest.fixture(scope="module")
def s3_projects(label_studio, s3_server) -> dict[str, tuple[int, list[int]]]:
    """Two projects on two buckets holding the same images: presign on / off -> (project id, task ids)."""
    out = {}
    for mode, presign in (("presign", True), ("proxy", False)):
        bucket = f"cloud-{mode}-{label_studio.url.rsplit(':', 1)[-1]}"
        s3_server.put_images(bucket, IMAGES)
        project = create_project(label_studio, CONFIG, title=f"s3 {mode}")
        out[mode] = (project, import_s3_storage(label_studio, project, s3_server, bucket, presign=presign))
    return out


def _fetcher(label_studio, **overrides) -> ImageFetcher:
    # Presigned URLs point at the S3 stand-in on loopback, which downloads may reach only when allowed.
    values = {"label_studio_url": label_studio.url, "label_studio_api_key": label_studio.token,
              "image_url_allow": "127.0.0.1"} | overrides
    return ImageFetcher(Settings(**values))


def _raw_uri(label_studio, task_id: int) -> str:
    """The task's image as stored (and as LS's /predict sends it); the API resolves it unless told not to."""
    return label_studio.api("GET", f"/api/tasks/{task_id}/?resolve_uri=false").json()["data"]["image"]


def _ours(s3_server, since: int) -> list[dict]:
    """The backend's requests to the storage host since request number `since`."""
    return [r for r in s3_server.requests()[since:] if r["headers"].get("User-Agent") == UA]


def test_fetcher_reads_s3_images_through_label_studio_presigned_and_proxied(label_studio, s3_server,
                                                                            s3_projects) -> None:
    fetcher = _fetcher(label_studio)
    for mode, (project, task_ids) in s3_projects.items():
        assert len(task_ids) == len(IMAGES)
        for tid in task_ids:
            uri = _raw_uri(label_studio, tid)
            assert uri.startswith("s3://cloud-")              # what /predict gets: the raw URI
            since = len(s3_server.requests())
            assert fetcher.fetch(uri, task_id=tid) == IMAGES[uri.split("/", 3)[-1]], (mode, uri)
            ours = _ours(s3_server, since)
            if mode == "presign":
                # Followed LS's 303 to the storage host ourselves, with the signature and WITHOUT our token.
                assert len(ours) == 1 and "Signature=" in ours[0]["url"], ours
                assert not any(k.lower() == "authorization" for k in ours[0]["headers"]), ours[0]["headers"]
            else:
                assert ours == []                           # LS proxied the bytes; we never met the storage


def test_resolve_url_forms_label_studio_host_and_legacy_presign(label_studio, s3_projects) -> None:
    project, (tid, *_) = s3_projects["presign"]
    uri = _raw_uri(label_studio, tid)
    image = IMAGES[uri.split("/", 3)[-1]]
    fileuri = su.encode_fileuri(uri)
    public = "https://labelstudio.example.test"   # LS's LABEL_STUDIO_HOST: not even resolvable from here
    fetcher = _fetcher(label_studio, label_studio_host=public)
    for url in (f"/tasks/{tid}/resolve/?fileuri={fileuri}", f"/tasks/{tid}/presign/?fileuri={fileuri}",
                f"{label_studio.url}/tasks/{tid}/resolve/?fileuri={fileuri}",
                f"{public}/tasks/{tid}/resolve/?fileuri={fileuri}"):
        assert fetcher.fetch(url, task_id=None) == image, url
    # The task list of LS's API (what project mode reads) carries the resolve form; it works as it is.
    listed = next(t for t in label_studio.client.tasks.list(project=project, fields="all") if t.id == tid)
    assert fetcher.fetch(listed.data["image"], task_id=tid) == image


def test_label_studio_refusals_are_specific_errors(label_studio, s3_server, s3_projects) -> None:
    project, (tid, *_) = s3_projects["presign"]

    def failure(fetcher, url, task_id):
        with pytest.raises(su.StorageError) as info:
            fetcher.fetch(url, task_id=task_id)
        return info.value.reason, str(info.value)

    fetcher = _fetcher(label_studio)
    # No storage of the project covers an Azure container (or another bucket): LS answers 404.
    assert failure(fetcher, "azure-blob://nowhere/img.jpg", tid)[0] == "not_found"
    assert failure(fetcher, "gs://not-a-bucket-here/img.jpg", tid)[0] == "not_found"
    assert failure(fetcher, "s3://cloud-presign/img.jpg", 10**9)[0] == "not_found"      # no such task
    assert failure(_fetcher(label_studio, label_studio_api_key=""), "s3://b/img.jpg", tid)[0] == "auth"
    assert failure(fetcher, "s3://b/img.jpg", None)[0] == "no_task_id"

    # Objects deleted from the buckets after the sync: presigned -> the storage's own answer, with its error
    # code (S3 says 404 NoSuchKey, or 403 when the signer may not list the bucket; moto signs its 403);
    # proxied -> LS's 424.
    for mode, (project, task_ids) in s3_projects.items():
        uri = _raw_uri(label_studio, task_ids[0])
        bucket, key = uri[len("s3://"):].split("/", 1)
        s3_server.client().delete_object(Bucket=bucket, Key=key)
        try:
            reason, message = failure(fetcher, uri, task_ids[0])
        finally:
            s3_server.put_images(bucket, {key: IMAGES[key]})
        if mode == "presign":
            assert reason in ("not_found", "storage_denied") and "via the presigned URL" in message, message
            assert any(code in message for code in ("NoSuchKey", "AccessDenied", "SignatureDoesNotMatch")), message
        else:
            assert reason == "storage" and "HTTP 424" in message, message
        assert uri in message and not any(q in message for q in ("Signature=", "AWSAccessKeyId=", "Expires=")), message
        assert fetcher.fetch(uri, task_id=task_ids[0]) == IMAGES[key]


@pytest.fixture(scope="module")
def backend(backend_server, model_dir: Path, redis_server, label_studio):
    return backend_server(env={"M2FP_MODEL": str(model_dir), "REDIS_URL": redis_server.url,
                               "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
                               "IMAGE_URL_ALLOW": "127.0.0.1"})   # the S3 stand-in of presigned URLs


def test_retrieve_predictions_for_s3_projects_presigned_and_proxied(label_studio, s3_projects, backend) -> None:
    ls = label_studio
    presign_project, presign_tasks = s3_projects["presign"]
    # A task pointing at an Azure container the project has no storage for: it alone gets no prediction.
    azure = import_tasks(ls, presign_project, [{"image": "azure-blob://no-such-container/people/x.jpg"}])
    for mode, (project, task_ids) in s3_projects.items():
        connect_ml_backend(ls, project, backend.url)
        answer = retrieve_predictions(ls, project)
        expected = len(task_ids) + (len(azure) if mode == "presign" else 0)
        assert answer.get("processed_items") == expected, answer
        for tid in task_ids:
            stored = predictions_of(ls, tid)
            assert len(stored) == 1 and stored[0]["result"], (mode, tid, stored)
            assert {r["type"] for r in stored[0]["result"]} == {"polygonlabels"}
    assert predictions_of(ls, azure[0]) == []
    log = backend.log_text()
    assert f"task {azure[0]}: no prediction (not_found)" in log and "azure-blob://no-such-container" in log, log[-3000:]
    # A hand-made request: a cloud URI in a task without an id cannot be resolved, and says so.
    uri = _raw_uri(ls, presign_tasks[0])
    answer = requests.post(backend.url + "/predict", timeout=120, json={
        "tasks": [{"data": {"image": uri}}, {"id": presign_tasks[0], "data": {"image": uri}}], "label_config": CONFIG})
    results = answer.json()["results"]
    assert results[0] == [] and results[1]["result"], results
    assert f"no prediction (no_task_id): {uri}" in backend.log_text()
    metrics = requests.get(backend.url + "/metrics", timeout=30).json()
    assert metrics["failures"] == {"not_found": 1, "no_task_id": 1}, metrics
    assert metrics["predictions"] == 2 * len(IMAGES) + 1, metrics


def test_project_mode_reads_s3_tasks(label_studio, s3_server, model_dir: Path, redis_server, tmp_path: Path) -> None:
    bucket = f"cloud-cli-{label_studio.url.rsplit(':', 1)[-1]}"
    s3_server.put_images(bucket, {"people/one.jpg": IMAGES["people/one.jpg"]})
    project = create_project(label_studio, CONFIG, title="s3 project mode")
    (tid,) = import_s3_storage(label_studio, project, s3_server, bucket, presign=True)
    env = base_env(model_dir, cache_url=redis_server.url) | {"IMAGE_URL_ALLOW": "127.0.0.1"}  # the S3 stand-in
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "backend.batch.cli", "project", str(project), "--ls-url",
                           label_studio.url, "--api-key", label_studio.token, "--local", "--summary-json",
                           str(summary)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["total"] == 1 and result["done"] + result["cached"] == 1, result
    stored = predictions_of(label_studio, tid)
    assert len(stored) == 1 and stored[0]["result"], stored


# ---------------------------------------------------------------- GCS (emulator) and Azure (by URI)

@pytest.fixture(scope="module")
def gcs_label_studio(gcs_server, tmp_path_factory):
    """A Label Studio of its own whose GCS client talks to the emulator (the variables must be set at start)."""
    server = start_label_studio(tmp_path_factory.mktemp("ls-gcs"), extra_env=gcs_server.label_studio_env())
    try:
        yield server
    finally:
        server.stop()


def test_gcs_images_are_read_through_label_studio(gcs_label_studio, gcs_server) -> None:
    ls = gcs_label_studio
    gcs_server.put_images("gcs-images", IMAGES)
    project = create_project(ls, CONFIG, title="gcs proxy")
    task_ids = import_gcs_storage(ls, project, "gcs-images", expected=len(IMAGES))
    fetcher = _fetcher(ls)
    for tid in task_ids:
        uri = _raw_uri(ls, tid)
        assert uri.startswith("gs://gcs-images/")
        assert fetcher.fetch(uri, task_id=tid) == IMAGES[uri.split("/", 3)[-1]]
    # An object gone from the bucket: Label Studio's proxy cannot stream it.
    gcs_server.delete("gcs-images", "people/two.jpg")
    missing = next(t for t in task_ids if _raw_uri(ls, t).endswith("two.jpg"))
    with pytest.raises(su.StorageError) as info:
        fetcher.fetch("gs://gcs-images/people/two.jpg", task_id=missing)
    assert info.value.reason == "storage" and "gs://gcs-images/people/two.jpg" in str(info.value)
