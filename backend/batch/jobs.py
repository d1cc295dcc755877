"""RQ jobs: what a worker runs for one image or task, and the CLI's side (enqueue, then follow job statuses).

Job ids are derived from what the job does (task + model version, or image path + output folder), so a CLI
re-run attaches to jobs still queued or running instead of enqueuing them twice.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from backend.batch.errors import BadInput, describe, input_error_types
from backend.batch.progress import FAILED, ItemResult, Progress

log = logging.getLogger("m2fp.batch")

ACTIVE_STATUSES = {"queued", "started", "scheduled", "deferred"}
RESULT_TTL_S = 24 * 3600
MAINTENANCE_EVERY_S = 5.0


# ---------------------------------------------------------------- worker side

def _result_dict(result: ItemResult, **extra: Any) -> dict:
    return {"result": asdict(result), **extra}


def folder_image_job(path: str, options: dict) -> dict:
    """Parse one image of a folder run (the worker must see the same paths as the CLI).

    The task (prediction included, tens of kB) goes to a file in the output folder for the CLI to collect;
    only a small result stays in Redis, however many images the run has."""
    from backend.batch.folder import FolderOptions, process_image, write_task_part
    from backend.batch.runtime import get_runtime

    folder_options = FolderOptions(**options)
    try:
        result, task = process_image(get_runtime(), Path(path), folder_options)
    except input_error_types() as exc:
        raise BadInput(describe(exc)) from exc
    return _result_dict(result, task_file=str(write_task_part(Path(folder_options.out_dir), result.key, task)))


def project_task_job(task: dict, run: dict) -> dict:
    """Predict one Label Studio task and create its prediction through LS's API."""
    from rq import get_current_job

    from backend.batch.project import ProjectRun, ProjectTask, process_task
    from backend.batch.runtime import get_runtime

    runtime = get_runtime()
    project_run = ProjectRun(**run)
    url = runtime.settings.label_studio_url or project_run.ls_url
    api_key = runtime.settings.label_studio_api_key
    if not api_key:
        raise RuntimeError("set LABEL_STUDIO_API_KEY for this worker (API keys never travel through Redis)")
    client = runtime.ls_client(url, api_key)
    job = get_current_job()
    try:
        result = process_task(runtime, client, job.connection if job else None, project_run,
                              ProjectTask(**task), api_key)
    except input_error_types() as exc:
        raise BadInput(describe(exc)) from exc
    return _result_dict(result)


# ---------------------------------------------------------------- CLI side

@dataclass(frozen=True)
class JobSpec:
    job_id: str
    key: str                      # the item's name in progress and summary
    func: Callable[..., dict]
    args: tuple


def stable_job_id(kind: str, *parts: object) -> str:
    digest = hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:20]
    return f"m2fp-{kind}-{digest}"


def enqueue(queue: Any, specs: Iterable[JobSpec], job_timeout: int, retries: int) -> dict[str, str]:
    """Enqueue every spec not already queued or running; returns {job_id: key} for all of them."""
    from rq import Retry
    from rq.job import Job
    from rq.exceptions import NoSuchJobError

    specs = list(specs)
    connection = queue.connection
    statuses = _statuses(connection, [s.job_id for s in specs])
    to_enqueue = []
    attached = 0
    for spec in specs:
        status = statuses.get(spec.job_id)
        if status in ACTIVE_STATUSES:
            attached += 1
            continue
        if status is not None:
            # A finished or failed job of an earlier run: replace it so its old result cannot be read as new.
            try:
                Job.fetch(spec.job_id, connection=connection).delete()
            except NoSuchJobError:
                pass
        to_enqueue.append(queue.prepare_data(
            spec.func, args=spec.args, timeout=job_timeout, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
            job_id=spec.job_id, description=spec.key, retry=Retry(max=retries) if retries > 0 else None,
        ))
    for start in range(0, len(to_enqueue), 500):
        with connection.pipeline() as pipe:
            queue.enqueue_many(to_enqueue[start:start + 500], pipeline=pipe)
            pipe.execute()
    if attached:
        log.info("%d jobs were still queued or running from an earlier run: following them", attached)
    return {s.job_id: s.key for s in specs}


def _statuses(connection: Any, job_ids: list[str]) -> dict[str, str | None]:
    from rq.job import Job

    out: dict[str, str | None] = {}
    for start in range(0, len(job_ids), 1000):
        chunk = job_ids[start:start + 1000]
        with connection.pipeline() as pipe:
            for job_id in chunk:
                pipe.hget(Job.key_for(job_id), "status")
            values = pipe.execute()
        for job_id, value in zip(chunk, values):
            out[job_id] = value.decode() if isinstance(value, bytes) else value
    return out


def failure_reason(job: Any) -> str:
    """The last line of the job's traceback, without the module path of our own exception."""
    text = ""
    try:
        latest = job.latest_result()
        text = (latest.exc_string if latest is not None else "") or ""
    except Exception:
        pass
    text = text or (job.exc_info or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return f"job {job.get_status(refresh=False)} without a reason"
    last = lines[-1].strip()
    bad_input = f"{BadInput.__module__}.{BadInput.__name__}: "
    if last.startswith(bad_input):
        return last[len(bad_input):]
    if "AbandonedJobError" in last:
        return "its worker died on every attempt (AbandonedJobError)"
    return last


def _finished_result(job: Any, key: str) -> tuple[ItemResult, dict]:
    value = job.return_value() or {}
    data = value.get("result") or {}
    try:
        return ItemResult(**data), value
    except TypeError:
        return ItemResult(key, FAILED, f"job returned an unexpected value: {value!r:.200}"), value


def run_maintenance(queue: Any) -> None:
    """Re-queue jobs whose worker stopped heart-beating (rq's own StartedJobRegistry cleanup), so a killed
    worker's job moves on even while every other worker is busy."""
    from rq.registry import clean_registries

    if queue.acquire_maintenance_lock():
        try:
            clean_registries(queue)
        finally:
            queue.release_maintenance_lock()


def wait(queue: Any, jobs: dict[str, str], progress: Progress, on_result: Callable[[ItemResult, dict], None]
         | None = None, poll_s: float = 0.5, timeout_s: float | None = None) -> None:
    """Follow job statuses until every job has finished or failed, reporting each result as it arrives."""
    from rq import Worker
    from rq.job import Job
    from rq.exceptions import NoSuchJobError

    pending = dict(jobs)
    start = time.monotonic()
    last_maintenance = 0.0
    warned_no_worker = False
    while pending:
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            log.warning("stopped waiting after %.0f s with %d jobs unfinished", timeout_s, len(pending))
            return
        if now - last_maintenance >= MAINTENANCE_EVERY_S:
            last_maintenance = now
            run_maintenance(queue)
            if not warned_no_worker and now - start > 10 and Worker.count(queue=queue) == 0:
                log.warning("no worker listens on queue %r: start some with `m2fp-prelabel worker`", queue.name)
                warned_no_worker = True
        statuses = _statuses(queue.connection, list(pending))
        results = []
        for job_id, status in statuses.items():
            if status in ACTIVE_STATUSES:
                continue
            key = pending.pop(job_id)
            if status is None:
                results.append(ItemResult(key, FAILED, "job vanished from Redis (deleted or expired)"))
                continue
            try:
                job = Job.fetch(job_id, connection=queue.connection)
            except NoSuchJobError:
                results.append(ItemResult(key, FAILED, "job vanished from Redis (deleted or expired)"))
                continue
            if status == "finished":
                result, value = _finished_result(job, key)
                if on_result is not None:
                    try:
                        on_result(result, value)
                    except Exception as exc:  # e.g. a worker wrote its output where this machine cannot read
                        result = ItemResult(key, FAILED, f"cannot collect the job's output: {describe(exc)}")
                results.append(result)
            else:
                results.append(ItemResult(key, FAILED, failure_reason(job)))
        progress.update(results)
        if pending:
            time.sleep(poll_s)
