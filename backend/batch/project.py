"""Project mode: every task of a Label Studio project without a prediction of the current model version gets one.

`--force` re-predicts tasks that already have a prediction of the current version: under the same lock, the
task's predictions of that version are deleted, then the new one is created (a retried forced job does it
again: the task still ends with exactly one). `--skip-annotated` leaves tasks that have annotations alone.

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
from typing import TYPE_CHECKING, Any, Iterator

from backend import task_index
from backend.batch.progress import CACHED, DONE, FAILED, SKIPPED, ItemResult

if TYPE_CHECKING:
    from model import M2FPModel

log = logging.getLogger("m2fp.batch")

LOCK_TTL_S = 60          # longer than a re-check + create round trip, short enough that a dead holder frees it soon
LOCK_WAIT_S = 90
_VERSIONS_CHAR_LIMIT = 500  # Label Studio truncates predictions_model_versions at this many characters


@dataclass(frozen=True)
class ProjectTask:
    """What a job needs to know about one task; plain values so RQ can carry it (as JSON)."""

    id: int
    data: dict


@dataclass(frozen=True)
class ProjectRun:
    """The run-wide part of a project job. `ls_url` is where the CLI reached LS (it names the run in job ids and
    locks); a worker talks to LS only through its own LABEL_STUDIO_URL and key, which never travel through Redis."""

    project_id: int
    label_config: str
    model_version: str
    ls_url: str
    force: bool = False          # replace an existing prediction of model_version instead of skipping the task


def task_job_id(run: ProjectRun, task_id: int) -> str:
    """The RQ job id of one task of a run: the same for the CLI, the webhook and /predict, so a task queued
    twice (a re-run, a duplicate event) attaches to the job already there."""
    from backend.batch.jobs import stable_job_id

    parts = [run.ls_url, run.project_id, task_id, run.model_version, run.label_config]
    return stable_job_id("task", *parts, "force") if run.force else stable_job_id("task", *parts)


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


@dataclass
class TaskSelection:
    pending: list[ProjectTask]
    already_done: int = 0        # have a prediction of the version (and no --force)
    annotated: int = 0           # have annotations (with --skip-annotated)


def select_tasks(client: Any, project_id: int, model_version: str, *, force: bool = False,
                 skip_annotated: bool = False, page_size: int = 500) -> TaskSelection:
    """The tasks a run must predict: lacking a prediction of `model_version` (every task with `force`), minus
    the annotated ones with `skip_annotated`."""
    selection = TaskSelection([])
    pager = client.tasks.list(
        project=project_id, fields="all", page_size=page_size,
        include="id,data,total_predictions,predictions_model_versions,total_annotations",
    )
    for task in pager:
        task_id = int(_field(task, "id"))
        if skip_annotated and (_field(task, "total_annotations") or 0) > 0:
            selection.annotated += 1
            continue
        if not force:
            total = _field(task, "total_predictions")
            if total == 0:
                versions: set[str] = set()
            else:
                versions = _split_versions(_field(task, "predictions_model_versions"))
                if versions is None or (total and not versions):
                    versions = task_versions(client, task_id)
            if model_version in versions:
                selection.already_done += 1
                continue
        data = _field(task, "data") or {}
        selection.pending.append(ProjectTask(task_id, dict(data) if isinstance(data, dict) else {}))
    return selection


def tasks_to_predict(client: Any, project_id: int, model_version: str, page_size: int = 500, *,
                     force: bool = False, skip_annotated: bool = False) -> tuple[list[ProjectTask], int]:
    """Tasks to predict (see select_tasks), and how many were left alone (already done or annotated)."""
    selection = select_tasks(client, project_id, model_version, force=force, skip_annotated=skip_annotated,
                             page_size=page_size)
    return selection.pending, selection.already_done + selection.annotated


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


def process_task(model: M2FPModel, client: Any, redis: Any, run: ProjectRun, task: ProjectTask) -> ItemResult:
    """Predict one task and create its prediction in LS, unless it already has one of this version. A bad input
    is this task's failed result; anything else (LS or Redis unreachable) propagates, so a job is retried."""
    key = f"task {task.id}"
    if run.model_version != model.model_version:
        # A worker with another model would post predictions under a version nobody asked for.
        raise RuntimeError(f"this worker's model version is {model.model_version!r}, the run wants "
                           f"{run.model_version!r}")
    if not run.force and run.model_version in task_versions(client, task.id):
        return ItemResult(key, SKIPPED, "already has a prediction of this model version")
    task_dict = {"id": task.id, "data": task.data}
    outcome = model.predict_outcomes([task_dict])[0]
    if outcome.failure is not None:
        if outcome.failure.reason == "internal":
            raise RuntimeError(outcome.failure.message)
        return ItemResult(key, FAILED, f"{outcome.failure.reason}: {outcome.failure.message}")
    prediction = outcome.prediction
    task_index.record(model.runtime.predictor.cache, task_dict, model.plan, outcome)
    with posting_lock(redis, lock_key(run, task.id)):
        if run.force:
            for old in client.predictions.list(task=task.id):
                if str(old.model_version) == run.model_version:
                    client.predictions.delete(id=old.id)
        elif run.model_version in task_versions(client, task.id):
            return ItemResult(key, SKIPPED, "another worker posted it first")
        client.predictions.create(
            task=task.id, result=prediction["result"], score=prediction.get("score"),
            model_version=run.model_version,
        )
    return ItemResult(key, DONE if outcome.inferences else CACHED, regions=len(prediction["result"]))
