"""The one path from a task (or images already in hand) to a validated Label Studio prediction.

    plan = predictor.plan(label_config)              # which images the config draws on, which controls on each
    outcome = predictor.predict_task(task, plan)     # fetch each image -> parse (cache) -> regions -> validated

The server's /predict, folder mode, project mode and the RQ workers all come here through `model.M2FPModel`.
Every `<Image>` of the config gets its own regions from its own image (a config with `$front` and `$back`
gets the front's regions on the front control and the back's on the back), and region ids are unique across
all of them (Label Studio merges regions that share an id).

Two caches sit on the way (backend/cache.py): the parsing, by image hash + parser fingerprint (any config reuses
it), and per image + controls the finished result items, so a repeated request skips the polygon conversion
too. Cached items are validated like fresh ones, in `build_prediction`.

A failure is confined to its task: an input error (backend/errors.py: 404, not an image, too large, no image
field...) gives that task no prediction, a log line naming the task, the URL and the reason, and a counter per
reason; the other tasks still get theirs. Only a labeling config the backend cannot serve fails a whole
request, with a LabelConfigError saying why.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from backend.cache import ParsingCache, image_digest
from backend.engine.types import Parsing
from backend.errors import InputError, describe, reason_of
from backend.images import ImageFetcher, decode_image
from backend.inference import InferenceThreads
from backend.ls_config import ControlSpec, LabelConfigError, parse_label_config
from backend.ls_results import build_prediction, parsing_to_results
from backend.net_guard import shorten
from backend.settings import Settings

if TYPE_CHECKING:
    from backend.engine import HumanParser

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePlan:
    """One `<Image>` of the config and the controls that draw on it."""

    data_key: str                         # task data field with the image URL (value="$front" -> "front")
    to_name: str                          # the Image tag's name
    controls: tuple[ControlSpec, ...]
    variant: str                          # results-cache variant: everything besides the bytes that shapes regions


@dataclass(frozen=True)
class ConfigPlan:
    """What a labeling config asks of this backend: one ImagePlan per image it draws on."""

    label_config: str
    images: tuple[ImagePlan, ...]

    @property
    def data_keys(self) -> tuple[str, ...]:
        return tuple(image.data_key for image in self.images)


@dataclass(frozen=True)
class Failure:
    """Why one task got no prediction."""

    task_id: object
    url: str | None
    reason: str
    message: str


@dataclass
class TaskOutcome:
    """One task's answer: a validated prediction, or the failure that stands in for it."""

    task_id: object
    prediction: dict | None = None
    failure: Failure | None = None
    inferences: int = 0                              # model runs for this task (0: every image came from a cache)
    parsings: dict[str, Parsing] | None = None       # per data key, only when asked for (folder mode's PNGs)
    digests: dict[str, str] = field(default_factory=dict)  # per data key, sha256 of the image bytes used

    @property
    def ok(self) -> bool:
        return self.prediction is not None


class Predictor:
    """Fetch -> cache/parse -> Label Studio predictions, for any number of tasks. Thread-safe."""

    def __init__(self, parser: HumanParser, settings: Settings, cache: ParsingCache, fetcher: ImageFetcher) -> None:
        self.parser = parser
        self.settings = settings
        self.cache = cache
        self.fetcher = fetcher
        self._lock = threading.Lock()
        self._tasks = 0
        self._predictions = 0
        self._inferences = 0
        self._engine_seconds = 0.0
        self._failures: Counter[str] = Counter()
        self._last_failures: list[Failure] = []
        self._inference = InferenceThreads(settings.max_concurrent_inferences)

    @property
    def model_version(self) -> str:
        return str(self.parser.version)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.parser.classes)

    # ----- the labeling config -----

    def plan(self, label_config: str) -> ConfigPlan:
        """The images and controls a config asks for; LabelConfigError when this backend cannot serve it."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise LabelConfigError("no labeling config was given")
        return plan_config(label_config, self.settings, self.classes, self.model_version)

    # ----- parsing -----

    def parse_bytes(self, data: bytes, digest: str | None = None) -> tuple[Parsing, bool]:
        """Parsing of encoded image bytes; the bool is True when it came from the cache (no inference)."""
        # Decoding happens only on a miss: a cache hit needs neither the pixels nor the decoder's time.
        return self.cache.get_or_compute(data, lambda: self._parse(data), digest=digest)

    def _parse(self, data: bytes) -> Parsing:
        # Decoding and inference run on the inference thread(s): see backend/inference.py for why.
        return self._inference.run(self._decode_and_parse, data)

    def _decode_and_parse(self, data: bytes) -> Parsing:
        start = time.perf_counter()
        image = decode_image(data, self.settings.image_max_pixels)
        with self._lock:
            self._inferences += 1
        try:
            return self.parser(image)
        finally:
            with self._lock:
                self._engine_seconds += time.perf_counter() - start

    # ----- tasks -----

    def predict_tasks(self, tasks: Sequence[Mapping], plan: ConfigPlan, *,
                      images: Sequence[Mapping[str, bytes]] | None = None, keep_parsings: bool = False,
                      fetcher: ImageFetcher | None = None) -> list[TaskOutcome]:
        """One outcome per task, in order. `images[i]` (data key -> bytes) spares fetching task i's images."""
        return [self.predict_task(task, plan, images=images[i] if images is not None else None,
                                  keep_parsings=keep_parsings, fetcher=fetcher)
                for i, task in enumerate(tasks)]

    def predict_task(self, task: Mapping, plan: ConfigPlan, *, images: Mapping[str, bytes] | None = None,
                     keep_parsings: bool = False, fetcher: ImageFetcher | None = None) -> TaskOutcome:
        """The prediction for one task; never raises for a problem of this task (see TaskOutcome.failure)."""
        task_id = task.get("id") if isinstance(task, Mapping) else None
        outcome = TaskOutcome(task_id, parsings={} if keep_parsings else None)
        url: str | None = None
        with self._lock:
            self._tasks += 1
        try:
            results: list[dict] = []
            for image in plan.images:
                data = images.get(image.data_key) if images is not None else None
                if data is None:
                    url = _image_url(task, image.data_key)
                    data = (fetcher or self.fetcher).fetch(url, task_id=task_id)
                results.extend(self._image_results(data, image, outcome))
                url = None
            outcome.prediction = build_prediction(results, self.model_version, plan.label_config)
        except Exception as exc:  # noqa: BLE001 - one task's problem must not cost the other tasks theirs
            # Clipped: a task URL or message can be megabytes; logs and /metrics keep a readable prefix.
            outcome.failure = Failure(task_id, shorten(url) if url is not None else None, reason_of(exc),
                                      shorten(describe(exc), 500))
            self._failed(outcome.failure, exc)
            return outcome
        with self._lock:
            self._predictions += 1
        return outcome

    def _image_results(self, data: bytes, image: ImagePlan, outcome: TaskOutcome) -> list[dict]:
        """The result items of one image for the controls on it: results cache, else parsing (cache) + regions."""
        digest = image_digest(data)
        outcome.digests[image.data_key] = digest
        if outcome.parsings is None:
            cached = self.cache.get_results(digest, image.variant)
            if isinstance(cached, list):
                return cached
        parsing, hit = self.parse_bytes(data, digest)
        if not hit:
            outcome.inferences += 1
        if outcome.parsings is not None:
            outcome.parsings[image.data_key] = parsing
        results = parsing_to_results(parsing, image.controls)
        self.cache.put_results(digest, image.variant, results)
        return results

    def _failed(self, failure: Failure, exc: BaseException) -> None:
        if isinstance(exc, InputError):
            where = "" if failure.url is None or failure.message.startswith(failure.url) else f"{failure.url}: "
            logger.warning("task %s: no prediction (%s): %s%s", failure.task_id, failure.reason, where,
                           failure.message)
        else:
            logger.error("task %s: unexpected error predicting %s", failure.task_id, failure.url, exc_info=exc)
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
                "last_failures": [asdict(f) for f in self._last_failures],
            }
        out["cache"] = self.cache.stats().as_dict()
        out["cache"]["enabled"] = self.cache.enabled
        return out


def _image_url(task: Mapping, data_key: str) -> str:
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        raise InputError("task has no 'data' object", reason="bad_task")
    url = data.get(data_key)
    if not isinstance(url, str) or not url:
        fields = ", ".join(sorted(map(str, data))[:20]) or "none"
        raise InputError(f"task data has no {data_key!r} field with the image URL (fields: {fields})",
                         reason="no_image")
    return url


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


@lru_cache(maxsize=64)
def plan_config(label_config: str, settings: Settings, classes: tuple[str, ...], model_version: str = "") -> ConfigPlan:
    """The plan of a config for a model with these classes and version (the CLI checks a config before loading
    the weights, with the classes of the model's configuration.json); LabelConfigError when it cannot be served."""
    controls = parse_label_config(label_config, settings, classes)
    groups: dict[str, list[ControlSpec]] = {}
    names: dict[str, str] = {}
    for control in controls:
        for warning in control.warnings:
            logger.warning("labeling config: %s", warning)
        if not control.value_key:
            raise LabelConfigError(f"control {control.from_name!r}: its Image {control.to_name!r} has no "
                                   "value=\"$field\" naming the task field that holds the image URL")
        groups.setdefault(control.value_key, []).append(control)
        names.setdefault(control.value_key, control.to_name)
    images = []
    for data_key, group in groups.items():
        text = "\0".join([_RESULTS_CODE, model_version, label_config, data_key, *map(repr, group)])
        images.append(ImagePlan(data_key=data_key, to_name=names[data_key], controls=tuple(group),
                                variant=hashlib.sha256(text.encode()).hexdigest()[:24]))
    return ConfigPlan(label_config=label_config, images=tuple(images))


__all__ = ["ConfigPlan", "Failure", "ImagePlan", "LabelConfigError", "Predictor", "TaskOutcome", "plan_config"]
