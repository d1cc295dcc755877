"""Project mode: every task of a Label Studio project without a prediction of the current model version gets one.

Idempotency has two layers. Listing (`tasks_to_predict`) skips tasks whose predictions already carry the
version, so a re-run only does what is left. Posting (`process_task`) re-checks the task's predictions right
before creating one, inside a short Redis lock per task + version, so two workers that got the same task (a job
re-queued after its worker was thought dead, two CLI runs at once) post it once. The lock expires by itself,
so a worker killed while holding it blocks nobody for long.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from backend.batch.errors import BadInput
from backend.batch.progress import CACHED, DONE, SKIPPED, ItemResult

log = logging.getLogger("m2fp.batch")

LOCK_TTL_S = 60          # longer than a re-check + create round trip, short enough that a dead holder frees it soon
LOCK_WAIT_S = 90
_VERSIONS_CHAR_LIMIT = 500  # Label Studio truncates predictions_model_versions at this many characters


@dataclass(frozen=True)
class ProjectTask:
    """What a job needs to know about one task; plain values so RQ can carry it."""

    id: int
    image_url: str


@dataclass(frozen=True)
class ProjectRun:
    """The run-wide part of a project job. `ls_url` is where the CLI reached LS: a worker's own
    LABEL_STUDIO_URL wins (it may reach LS under another name), and the API key never travels through Redis."""

    project_id: int
    label_config: str
    model_version: str
    ls_url: str


def project_label_config(client: Any, project_id: int) -> tuple[str, str]:
    """(label_config, title) of a project; a missing project is a clear error."""
    project = client.projects.get(id=project_id)
    return str(project.label_config or ""), str(getattr(project, "title", "") or "")


def _field(task: Any, name: str) -> Any:
    if isinstance(task, dict):
        return task.get(name)
    value = getattr(task, name, None)
    if value is None and getattr(task, "model_extra", None):
        value = task.model_extra.get(name)
    return value


def _split_versions(raw: Any) -> set[str] | None:
    """The model versions Label Studio listed for a task, or None when the list cannot be trusted (absent,
    truncated, or a version with a comma in it): the caller then asks for the task's predictions instead."""
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)):
        return {str(v) for v in raw if v is not None}
    text = str(raw)
    if len(text) >= _VERSIONS_CHAR_LIMIT:
        return None
    return {part.strip() for part in text.split(",") if part.strip()}


def task_versions(client: Any, task_id: int) -> set[str]:
    """Exact model versions of a task's predictions (never GET /api/tasks/<id>: with auto-predictions on, LS
    would call the ML backend from that request)."""
    return {str(p.model_version) for p in client.predictions.list(task=task_id) if p.model_version is not None}


def tasks_to_predict(client: Any, project_id: int, image_key: str, model_version: str,
                     page_size: int = 500) -> tuple[list[ProjectTask], int]:
    """Tasks lacking a prediction of `model_version`, and how many were skipped because they have one."""
    pending: list[ProjectTask] = []
    skipped = 0
    pager = client.tasks.list(
        project=project_id, fields="all", page_size=page_size,
        include="id,data,total_predictions,predictions_model_versions",
    )
    for task in pager:
        task_id = int(_field(task, "id"))
        total = _field(task, "total_predictions")
        if total == 0:
            versions: set[str] = set()
        else:
            versions = _split_versions(_field(task, "predictions_model_versions"))
            if versions is None or (total and not versions):
                versions = task_versions(client, task_id)
        if model_version in versions:
            skipped += 1
            continue
        data = _field(task, "data") or {}
        pending.append(ProjectTask(task_id, str(data.get(image_key, ""))))
    return pending, skipped


def lock_key(run: ProjectRun, task_id: int) -> str:
    digest = hashlib.sha1(f"{run.ls_url}|{run.model_version}".encode()).hexdigest()[:12]
    return f"m2fp:batch:post:{digest}:{run.project_id}:{task_id}"


@contextmanager
def posting_lock(redis: Any, key: str) -> Iterator[None]:
    """Exclusive for LOCK_TTL_S; a no-op without Redis (a single local process cannot race itself)."""
    if redis is None:
        yield
        return
    lock = redis.lock(key, timeout=LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S)
    if not lock.acquire():
        raise TimeoutError(f"another worker holds {key} for more than {LOCK_WAIT_S} s")
    try:
        yield
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: nothing left to release
            log.debug("lock %s had expired before release", key)


def process_task(runtime: Any, client: Any, redis: Any, run: ProjectRun, task: ProjectTask,
                 api_key: str = "") -> ItemResult:
    """Predict one task and create its prediction in LS, unless it already has one of this version."""
    from backend.ls_results import make_prediction

    key = f"task {task.id}"
    if run.model_version != runtime.version:
        # A worker with another model would post predictions under a version nobody asked for.
        raise RuntimeError(f"this worker's model version is {runtime.version!r}, the run wants {run.model_version!r}")
    if run.model_version in task_versions(client, task.id):
        return ItemResult(key, SKIPPED, "already has a prediction of this model version")
    if not task.image_url:
        raise BadInput("the task has no image URL in the field the labeling config reads")

    data = runtime.fetcher(run.ls_url, api_key).fetch(task.image_url)
    parsing, cached = runtime.predictor.parse_bytes(data)
    controls = runtime.predictor.controls_for(run.label_config)
    prediction = make_prediction(parsing, controls, run.model_version, run.label_config)

    with posting_lock(redis, lock_key(run, task.id)):
        if run.model_version in task_versions(client, task.id):
            return ItemResult(key, SKIPPED, "another worker posted it first")
        client.predictions.create(
            task=task.id, result=prediction["result"], score=prediction.get("score"),
            model_version=run.model_version,
        )
    return ItemResult(key, CACHED if cached else DONE, regions=len(prediction["result"]))
