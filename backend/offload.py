"""Whole projects without waiting: pre-label on import (Label Studio's TASKS_CREATED webhook) and a /predict that
hands what it cannot finish in time to the RQ workers. The server calls in at three places (backend/server.py):

- POST /webhook, `TASKS_CREATED`: Label Studio posts it inside the import request and waits 1 s. We queue one
  project job per new task (backend/batch/jobs.py project_task_job: the worker predicts, then posts through
  Label Studio's API under the per-task lock, re-checking the model version: never a duplicate) and answer.
  Job ids are stable per task + model version + config (backend/batch/project.py task_job_id, the CLI's too),
  so a duplicate event, or a CLI run on the same project, attaches to the job already there.
- POST /predict with several tasks and no interactive context, when Redis is configured and a worker listens
  on RQ_QUEUE (else: exactly as before). Tasks whose prediction is in the results cache (backend/task_index.py
  tells without fetching their image) are answered from it; tasks that already have a job (queued, running, or
  done earlier: re-queued, the worker re-checks Label Studio) get `[]`; the rest are predicted in the request
  when there are at most PREDICT_INLINE_MAX_TASKS of them, else queued and answered `[]` (Label Studio stores
  nothing for `[]`; the workers post as they finish). So the request returns in seconds whatever the count,
  well inside Label Studio's ML_TIMEOUT_PREDICT. A single task (the editor opening it) is never offloaded.
- GET /projects/<id>/status: backend/batch/tracking.py's counts (queued, running, done, failed with reasons,
  rate, ETA), the live worker count and, when the backend has Label Studio credentials, Label Studio's own
  task and prediction counts for the project.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from flask import Blueprint, Response, jsonify

from backend import task_index
from backend.batch import tracking
from backend.errors import describe
from backend.ls_config import LabelConfigError
from backend.settings import Settings

if TYPE_CHECKING:
    from model import M2FPModel

    from backend.batch.project import ProjectRun, ProjectTask
    from backend.runtime import Runtime

log = logging.getLogger("m2fp.offload")

# Queuing a job costs ~1 ms: up to this many tasks the webhook queues them itself within Label Studio's 1 s; a
# bigger import (Label Studio sends up to 5000 tasks per event) is handed whole to a worker as one job.
FANOUT_ABOVE = 200
WORKER_CHECK_EVERY_S = 5.0     # how long "no worker listens" (or "Redis is down") is trusted before asking again


def project_id_of(value: Any) -> int | None:
    """Label Studio's project field: `12` in webhooks, `"12.1795300910"` (id.timestamp) in /predict."""
    if isinstance(value, Mapping):
        value = value.get("id")
    try:
        return int(str(value).split(".", 1)[0])
    except (TypeError, ValueError):
        return None


@dataclass
class QueuedTasks:
    queued: list[int] = field(default_factory=list)     # task ids (re)enqueued now
    attached: list[int] = field(default_factory=list)   # task ids whose job was already queued or running


def enqueue_project_tasks(queue: Any, run: ProjectRun, tasks: Sequence[ProjectTask], source: str, *,
                          replace_finished: bool, job_timeout: int, retries: int) -> QueuedTasks:
    """One project job per task (backend/batch/jobs.enqueue), its progress record written in the same pipeline.
    A task whose job is queued or running is attached to it; a finished job is left alone unless
    `replace_finished` (then re-queued, and the worker re-checks Label Studio before posting); a failed one is
    always re-queued."""
    from backend.batch import jobs, project

    task_of: dict[str, int] = {}
    specs = []
    for task in tasks:
        job_id = project.task_job_id(run, task.id)
        task_of[job_id] = task.id
        specs.append(jobs.JobSpec(job_id, f"task {task.id}", jobs.project_task_job,
                                  (dataclasses.asdict(task), dataclasses.asdict(run))))

    def mark(pipe: Any, queued: list) -> None:
        tracking.mark_queued(pipe, run.project_id, run.model_version, {task_of[s.job_id]: s.job_id for s in queued},
                             source)

    done = jobs.enqueue(queue, specs, job_timeout, retries, replace_finished=replace_finished, on_enqueue=mark)
    return QueuedTasks(queued=[task_of[s.job_id] for s in done.queued],
                    attached=[task_of[s.job_id] for s in done.attached])


def fanout_job(tasks: list[dict], run: dict, source: str) -> dict:
    """Worker side of a big TASKS_CREATED: queue one project job per task on the queue this job came from."""
    from rq import get_current_job

    from backend.batch.jobs import queue_for
    from backend.batch.project import ProjectRun, ProjectTask
    from backend.settings import get_settings

    job = get_current_job()
    if job is None:
        raise RuntimeError("fanout_job runs on an RQ worker")
    settings = get_settings()
    result = enqueue_project_tasks(queue_for(job.connection, job.origin), ProjectRun(**run),
                                   [ProjectTask(**t) for t in tasks], source, replace_finished=False,
                                   job_timeout=settings.batch_job_timeout, retries=settings.batch_retries)
    return {"queued": len(result.queued), "attached": len(result.attached)}


class Offload:
    """The server's side of offloading; one per app (holds its Redis connection, made on first use)."""

    def __init__(self, settings: Settings, current: Callable[[], Runtime]) -> None:
        self.settings = settings
        self._current = current
        self._connection = None
        self._lock = threading.Lock()
        self._no_worker_until = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.redis_url)

    def queue(self) -> Any:
        from redis import Redis

        from backend.batch.jobs import queue_for

        with self._lock:
            if self._connection is None:
                # rq stores bytes (no decode_responses); short timeouts: Label Studio waits on these requests.
                self._connection = Redis.from_url(self.settings.redis_url, socket_timeout=3,
                                                  socket_connect_timeout=2, health_check_interval=30)
            return queue_for(self._connection, self.settings.rq_queue)

    def _run(self, project_id: int, label_config: str) -> ProjectRun:
        from backend.batch.project import ProjectRun

        return ProjectRun(project_id, label_config, self._current().version, self.settings.label_studio_url)

    def _enqueue(self, queue: Any, run: ProjectRun, tasks: Sequence[ProjectTask], source: str,
                 replace_finished: bool) -> QueuedTasks:
        return enqueue_project_tasks(queue, run, tasks, source, replace_finished=replace_finished,
                                     job_timeout=self.settings.batch_job_timeout,
                                     retries=self.settings.batch_retries)

    # ----------------------------------------------------------- POST /webhook

    def webhook(self, data: Mapping) -> tuple[dict, int]:
        """The answer to one Label Studio event: TASKS_CREATED queues its tasks; the rest is acknowledged."""
        from backend.batch.project import ProjectTask

        action = data.get("action")
        if action != "TASKS_CREATED":
            return {"status": "ignored", "action": action,
                    "reason": "pre-labeling backend: annotations do not train the model"}, 200
        if not self.settings.prelabel_on_import:
            return {"status": "ignored", "action": action, "reason": "PRELABEL_ON_IMPORT is off"}, 200
        if not self.enabled:
            return {"status": "ignored", "action": action,
                    "reason": "no REDIS_URL: pre-label on import needs Redis and workers"}, 200
        project = data.get("project")
        project_id = project_id_of(project)
        tasks = data.get("tasks")
        if project_id is None or not isinstance(tasks, list):
            return {"status": "error", "action": action, "error": "bad_payload",
                    "message": "TASKS_CREATED needs a project object with an id and a tasks list"}, 400
        label_config = project.get("label_config") if isinstance(project, Mapping) else None
        try:
            self._current().predictor.plan(label_config or "")
        except LabelConfigError as exc:
            # A project of another kind sharing this backend's URL: nothing for us to pre-label.
            log.warning("TASKS_CREATED for project %s: not pre-labeling (%s)", project_id, exc)
            return {"status": "ignored", "action": action, "error": exc.reason, "message": str(exc)}, 200
        new = [ProjectTask(int(t["id"]), dict(t.get("data") or {})) for t in tasks
               if isinstance(t, Mapping) and isinstance(t.get("id"), int) and not t.get("total_annotations")]
        run = self._run(project_id, label_config)
        try:
            if len(new) > FANOUT_ABOVE:
                return self._fanout(action, run, new), 200
            result = self._enqueue(self.queue(), run, new, "import", replace_finished=False)
        except Exception as exc:  # noqa: BLE001 - Redis down: say so to Label Studio's log and ours
            log.error("TASKS_CREATED for project %s: cannot queue %d tasks: %s", project_id, len(new), describe(exc))
            return {"status": "error", "action": action, "error": "queue_unavailable", "message": describe(exc)}, 503
        log.info("TASKS_CREATED project=%s tasks=%d queued=%d attached=%d", project_id, len(tasks),
                 len(result.queued), len(result.attached))
        return {"status": "queued", "action": action, "project": project_id, "queued": len(result.queued),
                "attached": len(result.attached)}, 200

    def _fanout(self, action: str, run: ProjectRun, tasks: list[ProjectTask]) -> dict:
        from rq import Retry

        from backend.batch.jobs import ACTIVE_STATUSES, RESULT_TTL_S, job_statuses, stable_job_id

        ids = ",".join(str(t.id) for t in tasks)
        job_id = stable_job_id("fanout", run.ls_url, run.project_id, run.model_version, run.label_config, ids)
        queue = self.queue()
        if job_statuses(queue.connection, [job_id]).get(job_id) in ACTIVE_STATUSES | {"finished"}:
            # The same event again: its tasks are (being) queued already.
            return {"status": "queued", "action": action, "project": run.project_id, "queued": 0,
                    "attached": len(tasks), "fanout_job": job_id}
        job = queue.enqueue(
            fanout_job, [dataclasses.asdict(t) for t in tasks], dataclasses.asdict(run), "import",
            job_id=job_id,
            job_timeout=self.settings.batch_job_timeout, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
            retry=Retry(max=self.settings.batch_retries) if self.settings.batch_retries > 0 else None,
            description=f"queue {len(tasks)} tasks of project {run.project_id}")
        log.info("TASKS_CREATED project=%s tasks=%d: handed to a worker to queue (job %s)", run.project_id,
                 len(tasks), job.id)
        return {"status": "queued", "action": action, "project": run.project_id, "queued": len(tasks),
                "attached": 0, "fanout_job": job.id}

    # ----------------------------------------------------------- POST /predict

    def _workers(self, queue: Any) -> int:
        from rq import Worker

        if time.monotonic() < self._no_worker_until:
            return 0
        count = Worker.count(queue=queue)
        if count == 0:
            self._no_worker_until = time.monotonic() + WORKER_CHECK_EVERY_S
        return count

    def predict(self, model: M2FPModel, tasks: list, context: dict | None, project: Any) -> list | None:
        """The /predict answer when offloading applies, else None (the caller predicts every task as before)."""
        project_id = project_id_of(project)
        if not self.enabled or context is not None or len(tasks) <= 1 or project_id is None:
            return None
        if not all(isinstance(t, Mapping) and isinstance(t.get("id"), int) for t in tasks):
            return None
        try:
            queue = self.queue()
            if self._workers(queue) == 0:
                return None
            return self._predict(queue, model, tasks, project_id)
        except Exception as exc:  # noqa: BLE001 - Redis trouble: answer the old way rather than fail
            from redis import RedisError

            if not isinstance(exc, RedisError):
                raise
            # Not asked again for a while: a Redis outage must not slow every /predict by a timeout.
            self._no_worker_until = time.monotonic() + WORKER_CHECK_EVERY_S
            log.warning("/predict project=%s: queue unavailable (%s), predicting in the request", project_id,
                        describe(exc))
            return None

    def _predict(self, queue: Any, model: M2FPModel, tasks: list, project_id: int) -> list:
        from backend.batch import jobs, project
        from backend.ls_results import build_prediction

        run = self._run(project_id, model.plan.label_config)
        job_ids = [project.task_job_id(run, t["id"]) for t in tasks]
        statuses = jobs.job_statuses(queue.connection, job_ids)
        answers: list[Any] = [[] for _ in tasks]
        has_job = [statuses.get(job_id) is not None for job_id in job_ids]
        free = [i for i, queued in enumerate(has_job) if not queued]
        cache = model.runtime.predictor.cache
        answered: dict[int, str] = {}
        from_cache = 0
        uncached: list[int] = []
        for i, items in zip(free, task_index.cached_results(cache, [tasks[i] for i in free], model.plan)):
            if items is None:
                uncached.append(i)
                continue
            try:
                answers[i] = build_prediction(items, model.model_version, model.plan.label_config)
                answered[tasks[i]["id"]] = ""
                from_cache += 1
            except Exception:  # noqa: BLE001 - an unreadable cached entry: predict it like an uncached task
                uncached.append(i)
        to_queue = [i for i, queued in enumerate(has_job) if queued]
        if len(uncached) <= self.settings.predict_inline_max_tasks:
            outcomes = model.predict_outcomes([tasks[i] for i in uncached])
            for i, outcome in zip(uncached, outcomes):
                answers[i] = outcome.prediction if outcome.prediction is not None else []
                answered[tasks[i]["id"]] = "" if outcome.ok else f"{outcome.failure.reason}: {outcome.failure.message}"
                task_index.record(cache, tasks[i], model.plan, outcome)
        else:
            to_queue.extend(uncached)
        to_queue.sort()
        result = self._enqueue(queue, run, [project.ProjectTask(tasks[i]["id"], dict(tasks[i].get("data") or {}))
                                            for i in to_queue], "predict", replace_finished=True)
        tracking.mark_answered(queue.connection, project_id, run.model_version, answered)
        log.info("/predict project=%s tasks=%d answered=%d (%d from cache) queued=%d attached=%d", project_id,
                 len(tasks), len(answered), from_cache, len(result.queued), len(result.attached))
        return answers

    # ----------------------------------------------------------- GET /projects/<id>/status

    def status(self, project_id: int) -> dict:
        from rq import Worker

        runtime = self._current()
        queue = self.queue()
        status = tracking.project_status(queue.connection, project_id, runtime.version)
        out = status.to_dict()
        out["workers"] = Worker.count(queue=queue)
        out["label_studio"] = self._label_studio_counts(runtime, project_id)
        return out

    def _label_studio_counts(self, runtime: Runtime, project_id: int) -> dict | None:
        url, key = self.settings.label_studio_url, self.settings.label_studio_api_key
        if not (url and key):
            return None
        try:
            project = runtime.ls_client(url, key).projects.get(id=project_id)
        except Exception as exc:  # noqa: BLE001 - the counts are a courtesy: report why they are missing
            code = getattr(exc, "status_code", None)
            return {"error": f"Label Studio answered HTTP {code}" if code else describe(exc)}
        return {"tasks": getattr(project, "task_number", None),
                "predictions": getattr(project, "total_predictions_number", None)}

    def blueprint(self) -> Blueprint:
        bp = Blueprint("m2fp_offload", __name__)

        @bp.get("/projects/<int:project_id>/status")
        def project_status(project_id: int) -> Response | tuple[Response, int]:
            if not self.enabled:
                return jsonify({"error": "no_queue", "message": "no REDIS_URL: nothing is queued by this backend"}), 404
            return jsonify(self.status(project_id))

        return bp
