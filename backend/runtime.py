"""The process runtime: settings -> parser -> predictor (cache, fetcher), built once per process.

The server, the batch CLI and the RQ workers all get theirs from `get_runtime()`; the loaded model is the one
piece of process-wide state. Tests and benchmarks build their own with `load_runtime(settings)` and pass it
where it is needed (or install it with `set_runtime`).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backend.cache import ParsingCache
from backend.images import ImageFetcher
from backend.predict import Predictor
from backend.settings import Settings, get_settings

if TYPE_CHECKING:
    from label_studio_sdk.client import LabelStudio

    from backend.engine import HumanParser

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    parser: HumanParser
    predictor: Predictor
    _clients: dict[tuple[str, str], LabelStudio] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> str:
        return self.predictor.model_version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.predictor.classes

    def ls_client(self, url: str, api_key: str) -> LabelStudio:
        """One label-studio-sdk client per (url, key) for the process's lifetime (keeps HTTP connections)."""
        from label_studio_sdk.client import LabelStudio

        with self._lock:
            if (url, api_key) not in self._clients:
                self._clients[(url, api_key)] = LabelStudio(base_url=url, api_key=api_key, timeout=60)
            return self._clients[(url, api_key)]


def load_runtime(settings: Settings) -> Runtime:
    """Load the parser the settings name (model, revision, device, threads) and build what goes around it."""
    from backend.engine import HumanParser

    parser = HumanParser.from_pretrained(settings.model, revision=settings.model_revision, device=settings.device,
                                         threads=settings.threads or None, cache_dir=settings.model_cache_dir,
                                         precision=settings.precision)
    runtime = build_runtime(parser, settings)
    logger.info("model %s loaded (cache: %s)", runtime.version, "redis" if settings.redis_url else "off")
    return runtime


def build_runtime(parser: HumanParser, settings: Settings) -> Runtime:
    """The runtime around an already loaded parser: its cache, fetcher and predictor."""
    predictor = Predictor(parser, settings, ParsingCache(settings, parser.fingerprint), ImageFetcher(settings))
    return Runtime(settings=settings, parser=parser, predictor=predictor)


def model_classes(settings: Settings) -> tuple[str, ...]:
    """The classes of the model the settings name, read from its configuration.json without loading weights
    (the CLI checks a labeling config against them before anything slow; the export maps labels back to them).
    Raises engine.source.ModelNotAvailableError when the model folder cannot be had."""
    from backend.engine import load_config
    from backend.engine.source import resolve

    source = resolve(settings.model, revision=settings.model_revision, cache_dir=settings.model_cache_dir)
    return tuple(load_config(source.path).classes)


_RUNTIME: Runtime | None = None
_RUNTIME_LOCK = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process's runtime, loaded on first use from `settings` (default: the environment's)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = load_runtime(settings or get_settings())
        return _RUNTIME


def set_runtime(runtime: Runtime | None) -> None:
    """Install an already-built runtime (tests, benchmarks, the CLI's local mode), or forget it (None)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        _RUNTIME = runtime
