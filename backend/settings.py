"""Every setting of the product, read from the environment once, in this one place.

Each field documents its environment variable; README.md lists them all. Code takes a `Settings`
(usually `get_settings()`) instead of reading os.environ itself, so tests can build their own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Mapping

DEFAULT_MODEL_ID = "damo/cv_resnet101_image-multiple-human-parsing"
DEFAULT_MODEL_REVISION = "v1.0.1"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    # --- model / engine ---
    model: str = DEFAULT_MODEL_ID            # M2FP_MODEL: ModelScope model id or local model folder
    model_revision: str = DEFAULT_MODEL_REVISION  # M2FP_MODEL_REVISION: hub revision (pinned)
    model_cache_dir: str = os.path.expanduser("~/.cache/m2fp")  # M2FP_CACHE_DIR: where hub downloads live
    device: str = "auto"                     # M2FP_DEVICE: auto | cpu | cuda | cuda:N
    threads: int = 0                         # M2FP_THREADS: torch intra-op threads, 0 = torch default
    precision: str = "fp32"                  # M2FP_PRECISION: fp32 (matches the official pipeline) | bf16 (opt-in)
    # --- Label Studio ---
    label_studio_url: str = ""               # LABEL_STUDIO_URL: base URL used to resolve /data/... image URLs
    label_studio_api_key: str = ""           # LABEL_STUDIO_API_KEY: legacy token or personal access token
    label_studio_host: str = ""              # LABEL_STUDIO_HOST: LS's public origin, when LS puts it in URLs
    # --- image fetching ---
    image_connect_timeout: float = 5.0       # IMAGE_CONNECT_TIMEOUT (s)
    image_read_timeout: float = 30.0         # IMAGE_READ_TIMEOUT (s)
    image_max_bytes: int = 50 * 1024 * 1024  # IMAGE_MAX_BYTES
    image_max_pixels: int = 25_000_000       # IMAGE_MAX_PIXELS: refuses larger images (memory grows with pixels)
    image_url_allow: str = ""                # IMAGE_URL_ALLOW: hosts/CIDRs image URLs may reach besides LS's origin
    image_max_redirects: int = 5             # IMAGE_MAX_REDIRECTS: redirects followed per download
    image_max_url_length: int = 8192         # IMAGE_MAX_URL_LENGTH: longer task URLs are refused (bad_url)
    local_files_root: str = ""               # LOCAL_FILES_DOCUMENT_ROOT: read /data/local-files/ from disk when set
    # --- cache ---
    redis_url: str = ""                      # REDIS_URL: empty = no cache
    cache_ttl: int = 30 * 24 * 3600          # CACHE_TTL_SECONDS: 0 = never expire
    redis_timeout: float = 0.5               # REDIS_TIMEOUT (s): a slow Redis never stalls predictions
    redis_retry_seconds: float = 30.0        # REDIS_RETRY_SECONDS: after a Redis failure, serve without it this long
    # --- Label Studio results ---
    score_threshold: float = 0.3             # SCORE_THRESHOLD: default minimum region score
    polygon_detail: float = 1.0              # POLYGON_DETAIL: default simplification detail (higher = more vertices)
    min_region_pixels: int = 16              # MIN_REGION_PIXELS: connected components smaller than this are dropped
    # --- serving ---
    log_level: str = "INFO"                  # LOG_LEVEL
    basic_auth_user: str = ""                # BASIC_AUTH_USER: with BASIC_AUTH_PASS, required on every route but /health
    basic_auth_pass: str = ""                # BASIC_AUTH_PASS
    web_ui: bool = True                      # WEB_UI: serve the demo page and /api/* (off: 404)
    web_auth_user: str = ""                  # WEB_AUTH_USER: own credentials for /demo and /api/* (default: BASIC_AUTH_*)
    web_auth_pass: str = ""                  # WEB_AUTH_PASS
    max_request_bytes: int = 32 * 1024 * 1024  # MAX_REQUEST_BYTES: body limit of /predict /setup /webhook
    max_tasks_per_request: int = 1000        # MAX_TASKS_PER_REQUEST: /predict tasks per request
    max_concurrent_inferences: int = 1       # MAX_CONCURRENT_INFERENCES: model runs at once per process
    max_upload_bytes: int = 20 * 1024 * 1024  # MAX_UPLOAD_BYTES: demo page / HTTP API uploads
    gunicorn_workers: int = 1                # GUNICORN_WORKERS: processes (each loads the model once)
    gunicorn_threads: int = 4                # GUNICORN_THREADS: request threads per process
    gunicorn_timeout: int = 600              # GUNICORN_TIMEOUT (s): a request (or a worker's model load) taking longer is killed
    # --- batch ---
    rq_queue: str = "m2fp"                   # RQ_QUEUE: queue the batch CLI and workers share
    batch_job_timeout: int = 600             # BATCH_JOB_TIMEOUT (s): one batch job (image/task) at most
    batch_retries: int = 2                   # BATCH_RETRIES: re-runs of a job whose worker failed or died
    # --- offloading to the workers (backend/offload.py; needs REDIS_URL and workers on RQ_QUEUE) ---
    predict_inline_max_tasks: int = 8        # PREDICT_INLINE_MAX_TASKS: more uncached tasks in one /predict -> queued
    prelabel_on_import: bool = True          # PRELABEL_ON_IMPORT: queue tasks Label Studio's TASKS_CREATED announces


_ENV_NAMES = {
    "model": "M2FP_MODEL",
    "model_revision": "M2FP_MODEL_REVISION",
    "model_cache_dir": "M2FP_CACHE_DIR",
    "device": "M2FP_DEVICE",
    "threads": "M2FP_THREADS",
    "precision": "M2FP_PRECISION",
    "label_studio_url": "LABEL_STUDIO_URL",
    "label_studio_api_key": "LABEL_STUDIO_API_KEY",
    "label_studio_host": "LABEL_STUDIO_HOST",
    "image_connect_timeout": "IMAGE_CONNECT_TIMEOUT",
    "image_read_timeout": "IMAGE_READ_TIMEOUT",
    "image_max_bytes": "IMAGE_MAX_BYTES",
    "image_max_pixels": "IMAGE_MAX_PIXELS",
    "image_url_allow": "IMAGE_URL_ALLOW",
    "image_max_redirects": "IMAGE_MAX_REDIRECTS",
    "image_max_url_length": "IMAGE_MAX_URL_LENGTH",
    "local_files_root": "LOCAL_FILES_DOCUMENT_ROOT",
    "redis_url": "REDIS_URL",
    "cache_ttl": "CACHE_TTL_SECONDS",
    "redis_timeout": "REDIS_TIMEOUT",
    "redis_retry_seconds": "REDIS_RETRY_SECONDS",
    "score_threshold": "SCORE_THRESHOLD",
    "polygon_detail": "POLYGON_DETAIL",
    "min_region_pixels": "MIN_REGION_PIXELS",
    "log_level": "LOG_LEVEL",
    "basic_auth_user": "BASIC_AUTH_USER",
    "basic_auth_pass": "BASIC_AUTH_PASS",
    "web_ui": "WEB_UI",
    "web_auth_user": "WEB_AUTH_USER",
    "web_auth_pass": "WEB_AUTH_PASS",
    "max_request_bytes": "MAX_REQUEST_BYTES",
    "max_tasks_per_request": "MAX_TASKS_PER_REQUEST",
    "max_concurrent_inferences": "MAX_CONCURRENT_INFERENCES",
    "max_upload_bytes": "MAX_UPLOAD_BYTES",
    "gunicorn_workers": "GUNICORN_WORKERS",
    "gunicorn_threads": "GUNICORN_THREADS",
    "gunicorn_timeout": "GUNICORN_TIMEOUT",
    "rq_queue": "RQ_QUEUE",
    "batch_job_timeout": "BATCH_JOB_TIMEOUT",
    "batch_retries": "BATCH_RETRIES",
    "predict_inline_max_tasks": "PREDICT_INLINE_MAX_TASKS",
    "prelabel_on_import": "PRELABEL_ON_IMPORT",
}


def env_name(field_name: str) -> str:
    return _ENV_NAMES[field_name]


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from an environment mapping; a malformed value is a clear error naming the variable."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Settings):
        name = _ENV_NAMES[f.name]
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        kind = type(f.default)
        try:
            values[f.name] = _bool(raw) if kind is bool else kind(raw)
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
    return Settings(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return settings_from_env()
