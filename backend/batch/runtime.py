"""The loaded model and what is built around it, once per process (CLI or worker), never per image or job."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from backend.settings import Settings, get_settings

log = logging.getLogger("m2fp.batch")


@dataclass
class Runtime:
    settings: Settings
    parser: Any       # backend.engine.HumanParser
    predictor: Any    # backend.predict.Predictor: parse_bytes() through the shared image-hash cache
    _clients: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.parser.version)

    @property
    def classes(self) -> list[str]:
        return list(self.parser.classes)

    def ls_client(self, url: str, api_key: str):
        """One label_studio_sdk client per (url, key) for the process's lifetime (keeps HTTP connections)."""
        key = (url, api_key)
        if key not in self._clients:
            from label_studio_sdk.client import LabelStudio

            self._clients[key] = LabelStudio(base_url=url, api_key=api_key, timeout=60)
        return self._clients[key]

    def fetcher(self, ls_url: str = "", api_key: str = ""):
        """Image fetcher resolving LS-relative URLs against `ls_url` (the worker's own env wins when set)."""
        from backend.images import ImageFetcher

        settings = self.settings
        if ls_url and not settings.label_studio_url:
            settings = replace(settings, label_studio_url=ls_url)
        if api_key and not settings.label_studio_api_key:
            settings = replace(settings, label_studio_api_key=api_key)
        return _fetcher(settings, ImageFetcher)


@lru_cache(maxsize=8)
def _fetcher(settings: Settings, fetcher_class: type):
    return fetcher_class(settings)


def controls_for(label_config: str, settings: Settings) -> list:
    """The controls a labeling config gives this backend, without a loaded model (the CLI checks the config
    before anything else); LabelConfigError when there is none."""
    from backend.ls_config import LabelConfigError, parse_label_config

    if not label_config.strip():
        raise LabelConfigError("the labeling config is empty")
    return parse_label_config(label_config, settings)


def load_runtime(settings: Settings) -> Runtime:
    from backend.predict import Predictor

    log.info("loading model %s", settings.model)
    predictor = Predictor.from_settings(settings)
    return Runtime(settings=settings, parser=predictor.parser, predictor=predictor)


# The loaded model is the one piece of process-wide state: a worker loads it before its first job.
_RUNTIME: Runtime | None = None
_LOCK = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    global _RUNTIME
    with _LOCK:
        if _RUNTIME is None:
            _RUNTIME = load_runtime(settings or get_settings())
        return _RUNTIME


def set_runtime(runtime: Runtime | None) -> None:
    """Install an already-built runtime (benchmarks, the CLI's local mode) so jobs run in this process use it."""
    global _RUNTIME
    with _LOCK:
        _RUNTIME = runtime
