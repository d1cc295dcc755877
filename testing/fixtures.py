"""The pytest plugin of shared fixtures (tests/conftest.py loads it): real servers started once per session and
random-weight models built once per machine.

Fixture names are an interface the test modules rely on: `model_dir`, `plain_model_dir`, `parser`,
`sample_images`, `redis_server`, `label_studio`, `backend_server`, `s3_server`, `gcs_server`. Model folders are
built once by testing/random_model.py into $M2FP_CACHE/models/<variant>-<hash>/ and reused (building one takes a
minute of CPU).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from testing.backend_server import BackendServer, start_backend
from testing.label_studio import start_label_studio
from testing.random_model import cached_model, make_sample_image
from testing.gcs_server import GcsServer, start_gcs_server
from testing.redis_server import RedisServer
from testing.s3_server import S3Server, start_s3_server


# name -> (width, height): landscape VGA, landscape HD and a portrait, so resizing, padding and
# aspect-ratio handling are all exercised.
SAMPLE_SIZES: dict[str, tuple[int, int]] = {
    "scene_640x480": (640, 480),
    "scene_1280x720": (1280, 720),
    "portrait_480x800": (480, 800),
}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """A full-size M2FP folder (configuration.json + pytorch_model.pt) whose output is non-empty and varied."""
    return cached_model("shaped")


@pytest.fixture(scope="session")
def plain_model_dir() -> Path:
    """Same architecture, unshaped random weights: finds nobody in any image (the empty-result case)."""
    return cached_model("plain")


@pytest.fixture(scope="session")
def parser(model_dir: Path):
    """The native engine loaded from `model_dir` on CPU, exactly as the product loads real weights."""
    from backend.engine import HumanParser

    return HumanParser.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """JPEG files of different sizes and aspect ratios (see SAMPLE_SIZES), in a session temp dir."""
    folder = tmp_path_factory.mktemp("sample_images")
    paths = []
    for seed, (name, (w, h)) in enumerate(SAMPLE_SIZES.items()):
        path = folder / f"{name}.jpg"
        make_sample_image(w, h, seed=seed).save(path, quality=92)
        paths.append(path)
    return paths

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """The session's redis-server (url, client(), stop(), start(), restart(), flushall())."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    """The session's real Label Studio (see the module docstring); stopped at the end of the session."""
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    try:
        yield server
    finally:
        server.stop()



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """The session's S3-compatible server (moto, testing/s3_server.py): endpoint, client(), put_images(),
    requests() (what it received); use a bucket of your own."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> GcsServer:
    """The session's GCS emulator (testing/gcs_server.py): endpoint, put_images(), label_studio_env()."""
    server = start_gcs_server(tmp_path_factory.mktemp("gcs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def backend_server(tmp_path_factory):
    """Factory: backend_server(env={...}, server="dev"|"gunicorn", workers=1, threads=2) -> BackendServer."""
    started: list[BackendServer] = []
    log_dir = tmp_path_factory.mktemp("backend-logs")

    def start(env: dict[str, str] | None = None, **kwargs) -> BackendServer:
        backend = start_backend(env or {}, log_dir, **kwargs)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()
