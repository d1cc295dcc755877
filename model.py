"""The Label Studio ML backend model: a thin LabelStudioMLBase (label-studio-ml 1.0.9) over backend.predict.

label-studio-ml builds a model object per request; the parser (63M parameters) is loaded once per process
by `get_predictor()`, the one process-wide singleton, and shared by every model object and request thread.

What `predict` returns, per task and in task order (Label Studio matches results to tasks by position):
- a prediction dict `{"result": [...], "score": s, "model_version": v}`, validated against the labeling
  config; an image with nobody in it gives `result: []` (a real "nothing here" answer, stored once);
- `[]` for a task whose image failed (404, not an image, too large...): Label Studio 1.23 reads each entry
  as that task's list of predictions and stores none for it, while a `None` entry would make it fail the
  whole batch. The reason is logged and counted (see /metrics).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from label_studio_ml.model import LabelStudioMLBase

from backend.predict import LabelConfigError, Predictor
from backend.settings import Settings, get_settings

logger = logging.getLogger(__name__)

_predictor: Predictor | None = None
_predictor_lock = threading.Lock()


def load_predictor(settings: Settings) -> Predictor:
    """Load the parser named by the settings and wrap it in a Predictor (cache + image fetcher)."""
    predictor = Predictor.from_settings(settings)
    logger.info("model %s loaded (cache: %s)", predictor.model_version, "redis" if settings.redis_url else "off")
    return predictor


def get_predictor() -> Predictor:
    """The process's Predictor, loaded on first use (the only global state of the backend)."""
    global _predictor
    if _predictor is None:
        with _predictor_lock:
            if _predictor is None:
                _predictor = load_predictor(get_settings())
    return _predictor


class M2FPModel(LabelStudioMLBase):
    """Pre-labels every person's parts as PolygonLabels / BrushLabels regions, as the labeling config asks."""

    def __init__(self, label_config: str | None = None, train_output: dict | None = None, **kwargs: Any) -> None:
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.predictor = get_predictor()
        # What /setup answers and every prediction carries: Label Studio stores duplicates when they differ.
        self.model_version = self.predictor.model_version

    def predict(self, tasks: list[dict], **kwargs: Any) -> list[dict | list]:
        """One entry per task: a prediction dict, or [] when the task's image could not be used."""
        label_config = kwargs.get("label_config") or self.label_config
        if not label_config:
            raise LabelConfigError("no labeling config: call /setup first or send label_config with /predict")
        predictions = self.predictor.predict_tasks(tasks, label_config)
        return [p if p is not None else [] for p in predictions]

    def fit(self, *args: Any, **kwargs: Any) -> dict:
        """Pre-labeling only: annotations never change the model."""
        return {}
