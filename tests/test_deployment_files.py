"""Dockerfile and docker-compose.yml, checked without a Docker engine (none runs here or in CI).

docker-compose.yml goes through Debian's `docker-compose config` (the real Compose parser: schema,
interpolation, anchors); the resolved file is then checked for the wiring between the services. The
Dockerfile is read instruction by instruction.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from backend.settings import _ENV_NAMES

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = set(_ENV_NAMES.values())
SECRETS = {"LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567", "LABEL_STUDIO_PASSWORD": "s3cret-pw",
           "REDIS_PASSWORD": "0123456789abcdef0123456789abcdef", "BASIC_AUTH_PASS": "s3cret-backend"}


def _compose(env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed (make system-deps installs it)"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("LABEL_STUDIO_", "M2FP_", "COMPOSE_", "REDIS_", "BASIC_AUTH_", "WEB_"))}
    return subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    proc = _compose(SECRETS)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return {k: str(v) for k, v in env.items()}


# ----------------------------------------------------------------------------------------- compose

def test_compose_has_the_four_services_and_named_volumes(compose: dict) -> None:
    assert set(compose["services"]) == {"label-studio", "redis", "backend", "worker"}
    assert compose["services"]["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    assert compose["services"]["redis"]["image"].startswith("redis:7")
    assert {"label-studio-data", "redis-data", "model-cache"} <= set(compose["volumes"])


def test_the_readme_run_command_writes_every_secret_compose_needs(tmp_path: Path) -> None:
    """The README's one-line start: the .env it writes must satisfy every `${VAR:?}` of docker-compose.yml."""
    readme = (ROOT / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("printf ") and "> .env" in ln]
    write_env = line.split(" && docker compose up", 1)[0]
    subprocess.run(["bash", "-c", write_env], cwd=tmp_path, check=True, timeout=30)
    env = dict(ln.split("=", 1) for ln in (tmp_path / ".env").read_text().splitlines() if ln)
    assert set(SECRETS) <= set(env), sorted(env)
    proc = _compose(env)
    assert proc.returncode == 0, proc.stderr


def test_compose_refuses_to_start_without_the_secrets() -> None:
    for missing in SECRETS:
        proc = _compose({k: v for k, v in SECRETS.items() if k != missing})
        assert proc.returncode != 0
        assert missing in proc.stderr


def test_backend_and_worker_env_names_are_settings_the_backend_reads(compose: dict) -> None:
    for name in ("backend", "worker"):
        env = _env(compose["services"][name])
        unknown = set(env) - SETTINGS_ENV
        assert not unknown, f"{name} sets variables backend/settings.py does not read: {unknown}"
        assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "M2FP_MODEL", "M2FP_CACHE_DIR"} <= set(env)


def test_backend_reaches_label_studio_and_redis_by_service_name(compose: dict) -> None:
    services = compose["services"]
    for name in ("backend", "worker"):
        env = _env(services[name])
        ls_url = urlparse(env["LABEL_STUDIO_URL"])
        assert ls_url.hostname == "label-studio" and ls_url.port == 8080
        redis_url = urlparse(env["REDIS_URL"])
        assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)
        # The key the backend sends is the token Label Studio creates for its admin user.
        assert env["LABEL_STUDIO_API_KEY"] == SECRETS["LABEL_STUDIO_API_KEY"]
    ls_env = _env(services["label-studio"])
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == SECRETS["LABEL_STUDIO_API_KEY"]
    assert ls_env["LABEL_STUDIO_PASSWORD"] == SECRETS["LABEL_STUDIO_PASSWORD"]


def test_redis_needs_its_password_and_the_backend_needs_basic_auth(compose: dict) -> None:
    services = compose["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == SECRETS["REDIS_PASSWORD"]
    assert _env(services["redis"])["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]   # the health check's redis-cli
    assert "ports" not in services["redis"]                                       # not published on the host
    for name in ("backend", "worker"):
        assert urlparse(_env(services[name])["REDIS_URL"]).password == SECRETS["REDIS_PASSWORD"]
    backend = _env(services["backend"])
    assert backend["BASIC_AUTH_PASS"] == SECRETS["BASIC_AUTH_PASS"] and backend["BASIC_AUTH_USER"]


def test_label_studio_settings_a_backend_on_the_compose_network_needs(compose: dict) -> None:
    env = _env(compose["services"]["label-studio"])
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"      # `Token ...` auth, off by default in 1.23
    assert env["ML_BLOCK_LOCAL_IP"] == "false"                       # backend has a private address
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    root = env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    # The backend reads local files from the same folder, mounted at the same path.
    for name in ("backend", "worker"):
        assert _env(compose["services"][name])["LOCAL_FILES_DOCUMENT_ROOT"] == root
        mounts = {v.split(":")[1]: v for v in compose["services"][name]["volumes"]}
        assert root in mounts and mounts[root].endswith(":ro")
    assert any(v.split(":")[1] == root for v in compose["services"]["label-studio"]["volumes"])


def test_healthchecks_and_startup_order(compose: dict) -> None:
    services = compose["services"]
    for name in ("label-studio", "redis", "backend"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1
    assert "/health" in " ".join(services["backend"]["healthcheck"]["test"])
    assert "9090" in " ".join(services["backend"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["label-studio"]["healthcheck"]["test"])
    # No HTTP server in a worker: the image's /health check must not mark it unhealthy.
    assert services["worker"]["healthcheck"]["test"] == ["NONE"]
    for name, needs in {"backend": {"redis", "label-studio"}, "worker": {"redis", "label-studio", "backend"}}.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs
        assert all(d["condition"] == "service_healthy" for d in depends.values())


def test_model_cache_volume_is_where_the_image_keeps_models(compose: dict) -> None:
    cache_dir = _dockerfile_env()["M2FP_CACHE_DIR"]
    assert cache_dir in _dockerfile_volumes()
    for name in ("backend", "worker"):
        service = compose["services"][name]
        assert _env(service)["M2FP_CACHE_DIR"] == cache_dir
        assert f"model-cache:{cache_dir}:rw" in service["volumes"]


def test_worker_is_the_batch_worker_and_can_scale(compose: dict) -> None:
    worker = compose["services"]["worker"]
    backend = compose["services"]["backend"]
    assert worker["command"] == ["python", "-m", "backend.batch.worker"]
    assert importlib.util.find_spec("backend.batch.worker") is not None
    # Same image as the backend; `--scale worker=N` needs no fixed name and no host port.
    assert worker["image"] == backend["image"] and worker["build"] == backend["build"]
    assert "container_name" not in worker and "ports" not in worker
    assert [p["target"] for p in backend["ports"]] == [9090]


# ------------------------------------------------------------------------------------------ Dockerfile

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker reads it."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _dockerfile_volumes() -> list[str]:
    import json

    return [v for keyword, args in _instructions() if keyword == "VOLUME" for v in json.loads(args)]


def test_dockerfile_base_user_and_command() -> None:
    instructions = _instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}\b", " ".join(a for k, a in instructions if k == "RUN"))
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert cmd.startswith('["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"')
    assert ("EXPOSE", "9090") in instructions
    assert '"0.0.0.0:9090"' in (ROOT / "gunicorn.conf.py").read_text()
    health = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "127.0.0.1:9090/health" in health[0]


def test_dockerfile_installs_cpu_torch_pinned_and_label_studio_ml_without_deps() -> None:
    runs = [args for keyword, args in _instructions() if keyword == "RUN"]
    torch = [r for r in runs if "torch" in r]
    assert len(torch) == 1
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch[0] and "torch==2.13.0" in torch[0]
    assert "--extra-index-url" not in torch[0]        # PyPI's CUDA wheel must not be a candidate
    requirements = [r for r in runs if "-r requirements.txt" in r]
    assert len(requirements) == 1 and runs.index(requirements[0]) > runs.index(torch[0])
    assert any("--no-deps label-studio-ml==1.0.9" in r for r in runs)
    # Nothing in requirements.txt may bring label-studio-ml's pins (or another torch) back.
    reqs = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^\s*(label-studio-ml|torch)\b", reqs, re.M)


def test_dockerfile_env_and_copies_match_the_project() -> None:
    env = _dockerfile_env()
    ours = {k for k in env if not k.startswith(("PYTHON", "PIP_"))}
    assert ours <= SETTINGS_ENV, ours - SETTINGS_ENV
    assert env["M2FP_CACHE_DIR"] == "/models" and env["M2FP_DEVICE"] == "cpu"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", ".cache"} <= set(ignored)
    for keyword, args in _instructions():
        if keyword != "COPY":
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
