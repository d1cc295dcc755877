"""RQ jobs: what a worker runs for one image or task, and the CLI's side (enqueue, then follow job statuses).

Job ids are derived from what the job does (task + model version, or image path + output folder), so a CLI
re-run attaches to jobs still queued or running instead of enqueuing them twice.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.errors import describe
from backend.batch import tracking
from backend.batch.progress import FAILED, ItemResult, Progress

log = logging.getLogger("m2fp.batch")

ACTIVE_STATUSES = {"queued", "started", "scheduled", "deferred"}
# Jobs travel as JSON, never pickle: anyone who can write to Redis could otherwise make a worker run code while
# it merely reads a job. And a worker runs only these functions, whatever a forged job names.
SERIALIZER = JSONSerializer
ALLOWED_FUNCTIONS = frozenset({"backend.batch.jobs.folder_image_job", "backend.batch.jobs.project_task_job",
                               "backend.offload.fanout_job"})


class ForbiddenJobError(Exception):
    """A job names a function this worker does not run (not enqueued by m2fp-prelabel)."""


class AllowListedJob(Job):
    """rq's Job that refuses, when the worker asks for its function, anything outside ALLOWED_FUNCTIONS."""

    @property
    def func(self) -> Callable[..., Any]:
        if self.func_name not in ALLOWED_FUNCTIONS:
            raise ForbiddenJobError(f"job {self.id} names {self.func_name!r}, which is not an m2fp-prelabel job")
        return super().func


def queue_for(connection: Redis, name: str) -> Queue:
    """The batch queue as the CLI, the server and the workers all open it (serializer, job class)."""
    return Queue(name, connection=connection, serializer=SERIALIZER, job_class=AllowListedJob)


def fetch_job(job_id: str, connection: Redis) -> Job:
    return AllowListedJob.fetch(job_id, connection=connection, serializer=SERIALIZER)
RESULT_TTL_S = 24 * 3600
MAINTENANCE_EVERY_S = 5.0


# ---------------------------------------------------------------- worker side
# A bad input comes back as a failed item (retrying cannot fix it); only our own or the infrastructure's
# errors raise, and rq retries those. Arguments and return values are plain JSON (see SERIALIZER).

def _result_dict(result: ItemResult, **extra: Any) -> dict:
    return {"result": asdict(result), **extra}


def folder_image_job(item: dict, options: dict) -> dict:
    """Predict one task of a folder run (the worker must see the same paths as the CLI).

    The task (prediction included, tens of kB) goes to a file in the output folder for the CLI to collect;
    only a small result stays in Redis, however many images the run has."""
    from backend.batch.folder import FolderItem, FolderOptions, process_item, write_task_part
    from model import M2FPModel

    folder_options = FolderOptions(**options)
    result, task = process_item(M2FPModel(folder_options.label_config), FolderItem(**item), folder_options)
    if task is None:
        return _result_dict(result)
    return _result_dict(result, task_file=str(write_task_part(Path(folder_options.out_dir), result.key, task)))


def project_task_job(task: dict, run: dict) -> dict:
    """Predict one Label Studio task and create its prediction through LS's API."""
    from rq import get_current_job

    from backend.batch.project import ProjectRun, ProjectTask, process_task
    from backend.runtime import get_runtime
    from model import M2FPModel

    runtime = get_runtime()
    project_run = ProjectRun(**run)
    # Label Studio's URL and key come from the worker's own environment, never from the job: whoever can write
    # to Redis must not be able to aim the worker's token at another host.
    url = runtime.settings.label_studio_url
    api_key = runtime.settings.label_studio_api_key
    if not (url and api_key):
        raise RuntimeError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for this worker (they never travel "
                           "through Redis)")
    job = get_current_job()
    connection = job.connection if job else None
    project_task = ProjectTask(**task)
    # Progress for `GET /projects/<id>/status` (backend/batch/tracking.py); a failure here is the job's own.
    tracking.mark(connection, project_run.project_id, project_task.id, project_run.model_version, tracking.RUNNING,
                  job.id if job else "")
    result = process_task(M2FPModel(project_run.label_config, runtime=runtime), runtime.ls_client(url, api_key),
                          connection, project_run, project_task)
    tracking.mark(connection, project_run.project_id, project_task.id, project_run.model_version,
                  tracking.state_of_result(result), job.id if job else "", result.reason)
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


@dataclass
class Enqueued:
    """What `enqueue` did with each spec."""

    queued: list[JobSpec] = field(default_factory=list)      # (re)enqueued now
    attached: list[JobSpec] = field(default_factory=list)    # left to the job already there

    @property
    def keys(self) -> dict[str, str]:
        """{job_id: key} of every spec, what `wait` follows."""
        return {s.job_id: s.key for s in (*self.queued, *self.attached)}


def enqueue(queue: Any, specs: Iterable[JobSpec], job_timeout: int, retries: int, *, replace_finished: bool = True,
            on_enqueue: Callable[[Any, list[JobSpec]], None] | None = None) -> Enqueued:
    """Enqueue every spec whose job is not already queued or running (nor finished, unless `replace_finished`);
    a failed job is always re-queued. `on_enqueue(pipeline, specs)` adds its own writes to the pipeline that
    enqueues those specs (progress records land with their jobs)."""
    from rq import Retry
    from rq.exceptions import NoSuchJobError

    specs = list(specs)
    connection = queue.connection
    statuses = job_statuses(connection, [s.job_id for s in specs])
    out = Enqueued()
    prepared = []
    for spec in specs:
        status = statuses.get(spec.job_id)
        if status in ACTIVE_STATUSES or (status == "finished" and not replace_finished):
            out.attached.append(spec)
            continue
        if status is not None:
            # A finished or failed job of an earlier run: replace it so its old result cannot be read as new.
            try:
                fetch_job(spec.job_id, connection).delete()
            except NoSuchJobError:
                pass
        out.queued.append(spec)
        prepared.append(queue.prepare_data(
            spec.func, args=spec.args, timeout=job_timeout, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
            job_id=spec.job_id, description=spec.key, retry=Retry(max=retries) if retries > 0 else None,
        ))
    for start in range(0, len(prepared), 500):
        with connection.pipeline() as pipe:
            if on_enqueue is not None:
                on_enqueue(pipe, out.queued[start:start + 500])
            queue.enqueue_many(prepared[start:start + 500], pipeline=pipe)
            pipe.execute()
    if out.attached:
        log.info("%d jobs were still queued or running: following them", len(out.attached))
    return out


def job_statuses(connection: Any, job_ids: list[str]) -> dict[str, str | None]:
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
    """Why a job failed (our code or the infrastructure: bad inputs come back as finished, failed items): the
    last line of its traceback."""
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
    if "AbandonedJobError" in lines[-1]:
        return "its worker died on every attempt (AbandonedJobError)"
    return lines[-1].strip()


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
        statuses = job_statuses(queue.connection, list(pending))
        results = []
        for job_id, status in statuses.items():
            if status in ACTIVE_STATUSES:
                continue
            key = pending.pop(job_id)
            if status is None:
                results.append(ItemResult(key, FAILED, "job vanished from Redis (deleted or expired)"))
                continue
            try:
                job = fetch_job(job_id, queue.connection)
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
