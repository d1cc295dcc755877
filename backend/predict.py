"""One Label Studio task -> one prediction: fetch the image, parse it (through the cache), build the results.

The cache holds both the parsing (by image hash + parser fingerprint; any config can reuse it) and, per
labeling config, the finished prediction (so repeating a request skips the polygon conversion as well).

A failure is confined to its task: the image cannot be fetched (404, auth, timeout, too large), is not an
image, or is corrupt -> that task gets None, a log line names the task, the URL and the reason, and a
counter per reason goes up; the other tasks of the request still get their predictions. Only a labeling
config the backend cannot serve (no PolygonLabels/BrushLabels bound to an Image) fails the whole request,
with a LabelConfigError saying why.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from backend.cache import ParsingCache, image_digest
from backend.engine import InvalidImageError
from backend.engine.types import Parsing
from backend.images import ImageError, ImageFetcher, decode_image
from backend.ls_config import LabelConfigError, parse_label_config
from backend.ls_results import make_prediction
from backend.settings import Settings

logger = logging.getLogger(__name__)


class TaskError(Exception):
    """A task this backend cannot predict for a reason of its own (not an image problem)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TaskFailure:
    """Why one task got no prediction (kept for the stats endpoint and for callers that report it)."""

    task_id: Any
    url: str | None
    reason: str
    message: str


class Predictor:
    """Fetch -> cache/parse -> Label Studio predictions, for any number of tasks. Thread-safe."""

    def __init__(self, parser: Any, settings: Settings, cache: ParsingCache | None = None,
                 fetcher: ImageFetcher | None = None) -> None:
        self.parser = parser
        self.settings = settings
        self.cache = cache if cache is not None else ParsingCache(settings, parser.fingerprint)
        self.fetcher = fetcher if fetcher is not None else ImageFetcher(settings)
        self._lock = threading.Lock()
        self._tasks = 0
        self._predictions = 0
        self._inferences = 0
        self._engine_seconds = 0.0
        self._failures: Counter[str] = Counter()
        self._last_failures: list[TaskFailure] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> "Predictor":
        """Load the parser the settings name (model, revision, device, threads, cache dir) and wrap it."""
        from backend.engine import HumanParser

        parser = HumanParser.from_pretrained(
            settings.model, revision=settings.model_revision, device=settings.device,
            threads=settings.threads or None, cache_dir=settings.model_cache_dir)
        return cls(parser, settings)

    @property
    def model_version(self) -> str:
        return str(self.parser.version)

    # ----- parsing -----

    def parse_bytes(self, data: bytes, digest: str | None = None) -> tuple[Parsing, bool]:
        """Parsing of encoded image bytes; the bool is True when it came from the cache (no inference)."""
        # Decoding happens only on a miss: a cache hit needs neither the pixels nor the decoder's time.
        return self.cache.get_or_compute(data, lambda: self._parse(data), digest=digest)

    def _parse(self, data: bytes) -> Parsing:
        start = time.perf_counter()
        image = decode_image(data, self.settings.image_max_pixels)
        with self._lock:
            self._inferences += 1
        try:
            return self.parser(image)
        finally:
            # decode + parse: what calling the engine directly on the bytes costs (the benchmark's reference)
            with self._lock:
                self._engine_seconds += time.perf_counter() - start

    def controls_for(self, label_config: str) -> list:
        """The config's controls this backend fills; LabelConfigError when there is none."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise LabelConfigError("no labeling config was given")
        controls = list(_controls_cached(label_config, self.settings, tuple(self.parser.classes)))
        for control in controls:
            if not control.value_key:
                raise LabelConfigError(f"control {control.from_name!r}: its Image {control.to_name!r} has no "
                                       "value=\"$field\" naming the task field that holds the image URL")
        return controls

    # ----- tasks -----

    def predict_tasks(self, tasks: Sequence[Mapping], label_config: str) -> list[dict | None]:
        """One entry per task, in order: a validated prediction dict, or None when that task failed."""
        controls = self.controls_for(label_config)
        return [self.predict_task(task, controls, label_config) for task in tasks]

    def predict_task(self, task: Mapping, controls: list, label_config: str) -> dict | None:
        task_id = task.get("id") if isinstance(task, Mapping) else None
        url: str | None = None
        with self._lock:
            self._tasks += 1
        try:
            groups = self._controls_by_image(controls)
            predictions = []
            for data_key, group in groups.items():
                url = self._image_url(task, data_key)
                predictions.append(self._predict_image(self.fetcher.fetch(url), group, label_config))
            prediction = predictions[0] if len(predictions) == 1 else self._merge(predictions)
        except ImageError as exc:
            self._failed(TaskFailure(task_id, url, exc.reason, str(exc)))
            return None
        except TaskError as exc:
            self._failed(TaskFailure(task_id, url, exc.reason, str(exc)))
            return None
        except InvalidImageError as exc:
            # Decoded, but not something the engine can parse.
            self._failed(TaskFailure(task_id, url, "decode", str(exc)))
            return None
        except Exception as exc:  # noqa: BLE001 - one task's bug must not cost the other tasks their predictions
            logger.exception("task %s: unexpected error predicting %s", task_id, url)
            self._failed(TaskFailure(task_id, url, "internal", f"{type(exc).__name__}: {exc}"), log=False)
            return None
        with self._lock:
            self._predictions += 1
        return prediction

    def _predict_image(self, data: bytes, controls: list, label_config: str) -> dict:
        """The prediction for one image and the controls on it: results cache, else parsing (cache) + results."""
        digest = image_digest(data)
        variant = _results_variant(controls, label_config, self.model_version)
        prediction = self.cache.get_results(digest, variant)
        if prediction is None:
            parsing, _ = self.parse_bytes(data, digest)
            prediction = make_prediction(parsing, controls, self.model_version, label_config)
            self.cache.put_results(digest, variant, prediction)
        return prediction

    @staticmethod
    def _controls_by_image(controls: list) -> dict[str, list]:
        """Controls grouped by the task data key of their Image (one config may label several images)."""
        groups: dict[str, list] = {}
        for control in controls:
            groups.setdefault(control.value_key, []).append(control)
        return groups

    @staticmethod
    def _image_url(task: Mapping, data_key: str) -> str:
        data = task.get("data") if isinstance(task, Mapping) else None
        if not isinstance(data, Mapping):
            raise TaskError("bad_task", "task has no 'data' object")
        url = data.get(data_key)
        if not isinstance(url, str) or not url:
            raise TaskError("no_image", f"task data has no {data_key!r} field with the image URL "
                                        f"(fields: {', '.join(sorted(map(str, data))) or 'none'})")
        return url

    def _merge(self, predictions: list[dict]) -> dict:
        """Several Image tags in one config: one prediction carrying every image's regions."""
        scores = [p["score"] for p in predictions if p.get("score") is not None]
        return {"result": [r for p in predictions for r in p["result"]],
                "score": sum(scores) / len(scores) if scores else None,
                "model_version": self.model_version}

    def _failed(self, failure: TaskFailure, log: bool = True) -> None:
        if log:
            where = "" if failure.url is None or failure.message.startswith(failure.url) else f"{failure.url}: "
            logger.warning("task %s: no prediction (%s): %s%s", failure.task_id, failure.reason, where,
                           failure.message)
        with self._lock:
            self._failures[failure.reason] += 1
            self._last_failures = (self._last_failures + [failure])[-20:]

    # ----- stats -----

    def stats(self) -> dict:
        """Counters for /metrics: tasks, predictions, inferences (model runs), failures by reason, cache stats."""
        with self._lock:
            out = {
                "model_version": self.model_version,
                "tasks": self._tasks,
                "predictions": self._predictions,
                "inferences": self._inferences,
                "engine_seconds": round(self._engine_seconds, 6),
                "failures": dict(self._failures),
                "last_failures": [f.__dict__ for f in self._last_failures],
            }
        out["cache"] = self.cache.stats().as_dict()
        out["cache"]["enabled"] = self.cache.enabled
        return out


def _results_code_version() -> str:
    """Changes whenever the code or SDK that turns a parsing into Label Studio results changes, so cached
    results never outlive the code that made them."""
    from backend import geometry, ls_config, ls_results

    digest = hashlib.sha256()
    for module in (geometry, ls_config, ls_results):
        digest.update(Path(module.__file__).read_bytes())
    try:
        digest.update(importlib.metadata.version("label-studio-sdk").encode())
    except importlib.metadata.PackageNotFoundError:
        pass
    return digest.hexdigest()[:16]


_RESULTS_CODE = _results_code_version()


def _results_variant(controls: list, label_config: str, model_version: str) -> str:
    """Everything besides the image that decides a prediction: config, per-control settings, version, code."""
    text = "\0".join([_RESULTS_CODE, model_version, label_config, *map(repr, controls)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@lru_cache(maxsize=64)
def _controls_cached(label_config: str, settings: Settings, classes: tuple[str, ...]) -> tuple:
    controls = tuple(parse_label_config(label_config, settings, classes))
    for control in controls:
        for warning in control.warnings:
            logger.warning("labeling config: %s", warning)
    return controls


__all__ = ["Predictor", "TaskFailure", "TaskError", "LabelConfigError"]
