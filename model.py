"""THE model class: a LabelStudioMLBase whose labeling-config-driven `predict` every entry point calls.

The server's /predict, folder mode, project mode and the RQ workers build an `M2FPModel(label_config)` (cheap:
the parser is loaded once per process by backend.runtime) and call `predict` / `predict_outcomes`, which go down
the one path of backend/predict.py.

What `predict` returns, per task and in task order (Label Studio matches results to tasks by position):
- a prediction dict `{"result": [...], "score": s, "model_version": v}`, validated against the labeling
  config; an image with nobody in it gives `result: []` (a real "nothing here" answer, stored once);
- `[]` for a task whose image failed (404, not an image, too large...): Label Studio 1.23 reads each entry
  as that task's list of predictions and stores none for it, while a `None` entry would make it fail the
  whole batch. The reason is logged and counted (see /metrics).
"""
from __future__ import annotations

import multiprocessing
from typing import Any, Mapping, Sequence

from backend.predict import TaskOutcome
from backend.runtime import Runtime, get_runtime


def _import_base() -> type:
    # label-studio-ml 1.0.9 sets the process-wide multiprocessing start method to "spawn" when imported (for
    # its training jobs, which we never run); put back whatever this process had so importing the base class
    # changes nothing else (RQ, gunicorn and the tests start processes too).
    before = multiprocessing.get_start_method(allow_none=True)
    from label_studio_ml.model import LabelStudioMLBase

    if multiprocessing.get_start_method(allow_none=True) != before:
        multiprocessing.set_start_method(before, force=True)
    return LabelStudioMLBase


LabelStudioMLBase = _import_base()


class M2FPModel(LabelStudioMLBase):
    """Pre-labels every person's parts as PolygonLabels / BrushLabels regions, as the labeling config asks."""

    def __init__(self, label_config: str | None = None, train_output: dict | None = None, *,
                 runtime: Runtime | None = None, **kwargs: Any) -> None:
        self.runtime = runtime or get_runtime()
        # Checked before the base class parses the config itself: malformed XML becomes a LabelConfigError that
        # says what is wrong, not a bare exception from label-studio-tools.
        self.plan = self.runtime.predictor.plan(label_config or "")
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        # What /setup answers and every prediction carries: Label Studio stores duplicates when they differ.
        self.model_version = self.runtime.version

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict | list]:
        """One entry per task: a prediction dict, or [] when the task's image could not be used."""
        return [o.prediction if o.prediction is not None else [] for o in self.predict_outcomes(tasks, context)]

    def predict_outcomes(self, tasks: Sequence[Mapping], context: dict | None = None, *,
                         images: Sequence[Mapping[str, bytes]] | None = None,
                         keep_parsings: bool = False) -> list[TaskOutcome]:
        """`predict` with the reasons: one TaskOutcome per task. `images` (data key -> bytes, per task) when the
        caller already has them (folder mode)."""
        return self.runtime.predictor.predict_tasks(tasks, self.plan, images=images, keep_parsings=keep_parsings,
                                                    context=context)

    def fit(self, *args: Any, **kwargs: Any) -> dict:
        """Pre-labeling only: annotations never change the model."""
        return {}
