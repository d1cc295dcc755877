"""Per-project progress of queued tasks, kept in Redis: what `GET /projects/<id>/status` and
`m2fp-prelabel status PROJECT_ID` report (queued, running, done, failed with reasons, rate, ETA).

One hash per project, `m2fp:progress:<project id>`: task id -> a small JSON record (state, job id, model
version, where the work came from, reason, when it was queued and last changed). Whoever queues a task writes
`queued`; the job writes `running`, then its result (`done`, `skipped`: it already had a prediction, `failed`
with the reason); a task answered inside a /predict request is written `answered`. A record can lag behind its
job (a worker SIGKILLed while running, a job rq gave up on after its retries): the status reads the RQ job of
every record that is not final and reports what the job says, so nothing stays "running" for a dead worker.
The hash expires RECORD_TTL_S after its last write.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from backend.batch.progress import CACHED, DONE, FAILED, SKIPPED, ItemResult

QUEUED = "queued"
RUNNING = "running"
POSTED = "done"            # predicted and posted through Label Studio's API by a worker
ALREADY = "skipped"        # the task already had a prediction of this model version: nothing posted
ANSWERED = "answered"      # predicted inside a /predict request: Label Studio stored the answer itself
ERROR = "failed"
FINAL_STATES = frozenset({POSTED, ALREADY, ANSWERED, ERROR})
SOURCES = ("import", "predict", "cli")

RECORD_TTL_S = 7 * 24 * 3600
RATE_WINDOW_S = 600.0      # the rate is measured over the tasks finished this recently
MAX_FAILURES_SHOWN = 50

_ACTIVE_JOB = {"queued": QUEUED, "scheduled": QUEUED, "deferred": QUEUED, "started": RUNNING}


def progress_key(project_id: int) -> str:
    return f"m2fp:progress:{int(project_id)}"


@dataclass(frozen=True)
class TaskRecord:
    state: str
    version: str
    job_id: str = ""
    source: str = ""
    reason: str = ""
    queued_at: float = 0.0
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"s": self.state, "v": self.version, "j": self.job_id, "o": self.source,
                           "r": self.reason, "q": round(self.queued_at, 3), "t": round(self.updated_at, 3)},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> TaskRecord | None:
        try:
            d = json.loads(raw)
            return cls(state=str(d["s"]), version=str(d["v"]), job_id=str(d.get("j") or ""),
                       source=str(d.get("o") or ""), reason=str(d.get("r") or ""),
                       queued_at=float(d.get("q") or 0.0), updated_at=float(d.get("t") or 0.0))
        except (ValueError, TypeError, KeyError):
            return None  # written by someone else or damaged: not ours to report


def state_of_result(result: ItemResult) -> str:
    """The record state for a job's ItemResult."""
    if result.status in (DONE, CACHED):
        return POSTED
    if result.status == SKIPPED:
        return ALREADY
    return ERROR


# ---------------------------------------------------------------- writing (queue side, worker side)

def mark_queued(pipe: Any, project_id: int, version: str, jobs_by_task: Mapping[int, str], source: str,
                now: float | None = None) -> None:
    """Add `queued` records to a Redis pipeline (the caller executes it, with the enqueue itself)."""
    if not jobs_by_task:
        return
    now = time.time() if now is None else now
    key = progress_key(project_id)
    pipe.hset(key, mapping={str(task_id): TaskRecord(QUEUED, version, job_id, source, "", now, now).to_json()
                            for task_id, job_id in jobs_by_task.items()})
    pipe.expire(key, RECORD_TTL_S)


def mark_answered(connection: Any, project_id: int, version: str, outcomes: Mapping[int, str],
                  now: float | None = None) -> None:
    """Tasks answered inside a /predict request: task id -> "" (answered) or the failure reason."""
    if not outcomes:
        return
    now = time.time() if now is None else now
    key = progress_key(project_id)
    mapping = {str(task_id): TaskRecord(ERROR if reason else ANSWERED, version, "", "predict", reason, now,
                                        now).to_json() for task_id, reason in outcomes.items()}
    with connection.pipeline() as pipe:
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, RECORD_TTL_S)
        pipe.execute()


def mark(connection: Any, project_id: int, task_id: int, version: str, state: str, job_id: str = "",
         reason: str = "", now: float | None = None) -> None:
    """A job's own update (running, then its result); keeps the record's source and queue time."""
    if connection is None:
        return
    now = time.time() if now is None else now
    key = progress_key(project_id)
    old = connection.hget(key, str(task_id))
    previous = TaskRecord.from_json(old) if old else None
    queued_at = previous.queued_at if previous is not None and previous.queued_at else now
    source = previous.source if previous is not None else ""
    record = TaskRecord(state, version, job_id or (previous.job_id if previous else ""), source, reason,
                        queued_at, now)
    with connection.pipeline() as pipe:
        pipe.hset(key, str(task_id), record.to_json())
        pipe.expire(key, RECORD_TTL_S)
        pipe.execute()


# ---------------------------------------------------------------- reading

@dataclass
class ProjectStatus:
    project_id: int
    model_version: str
    total: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0                 # posted + answered + already_predicted: tasks that have their prediction
    failed: int = 0
    posted: int = 0
    answered: int = 0
    already_predicted: int = 0
    failures: list[dict] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)
    rate_per_hour: float = 0.0
    eta_s: float | None = None

    @property
    def pending(self) -> int:
        return self.queued + self.running

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pending"] = self.pending
        return out

    def line(self) -> str:
        """One line for people (the CLI)."""
        eta = "?" if self.eta_s is None else _format_duration(self.eta_s)
        return (f"project {self.project_id} ({self.model_version}): {self.total} tasks: {self.queued} queued, "
                f"{self.running} running, {self.done} done, {self.failed} failed; "
                f"{self.rate_per_hour:.0f}/h, ETA {eta if self.pending else '-'}")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def reason_code(reason: str) -> str:
    """`not_found: HTTP 404 for ...` -> `not_found`; free text (a traceback's last line) -> its first word."""
    head = reason.split(":", 1)[0].strip()
    return head if head and " " not in head and len(head) <= 40 else "internal"


def summarize(project_id: int, version: str, records: Mapping[int, TaskRecord], now: float,
              window_s: float = RATE_WINDOW_S) -> ProjectStatus:
    """Counts, failures, rate and ETA from records that are already reconciled with their jobs (pure)."""
    status = ProjectStatus(project_id, version)
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    recent = 0
    started = now
    for task_id, record in sorted(records.items()):
        if record.version != version:
            continue
        status.total += 1
        sources[record.source or "unknown"] += 1
        if record.state == QUEUED:
            status.queued += 1
        elif record.state == RUNNING:
            status.running += 1
        elif record.state == ERROR:
            status.failed += 1
            reasons[reason_code(record.reason)] += 1
            if len(status.failures) < MAX_FAILURES_SHOWN:
                status.failures.append({"task": task_id, "reason": record.reason})
        else:
            status.posted += record.state == POSTED
            status.answered += record.state == ANSWERED
            status.already_predicted += record.state == ALREADY
        if record.state in FINAL_STATES:
            if record.updated_at >= now - window_s:
                recent += 1
                started = min(started, max(record.queued_at, now - window_s))
        else:
            started = min(started, max(record.queued_at or now, now - window_s))
    status.done = status.posted + status.answered + status.already_predicted
    status.failure_reasons = dict(reasons)
    status.by_source = dict(sources)
    elapsed = now - started
    if recent and elapsed > 0:
        status.rate_per_hour = round(recent / elapsed * 3600, 1)
        status.eta_s = round(status.pending / (recent / elapsed), 1)
    return status


def read_records(connection: Any, project_id: int) -> dict[int, TaskRecord]:
    records: dict[int, TaskRecord] = {}
    for raw_id, raw in (connection.hgetall(progress_key(project_id)) or {}).items():
        record = TaskRecord.from_json(raw)
        try:
            task_id = int(raw_id)
        except ValueError:
            continue
        if record is not None:
            records[task_id] = record
    return records


def reconcile(connection: Any, records: dict[int, TaskRecord]) -> dict[int, TaskRecord]:
    """Records whose job moved on without them (killed worker, rq gave up, result not yet written) take the
    job's word: an active job gives queued/running, a finished one its result, a failed or vanished one a
    failure with its reason."""
    from backend.batch import jobs

    open_records = {t: r for t, r in records.items() if r.state not in FINAL_STATES and r.job_id}
    if not open_records:
        return records
    statuses = jobs.job_statuses(connection, sorted({r.job_id for r in open_records.values()}))
    out = dict(records)
    for task_id, record in open_records.items():
        job_status = statuses.get(record.job_id)
        if job_status in _ACTIVE_JOB:
            state, reason = _ACTIVE_JOB[job_status], ""
            if state == record.state:
                continue
        else:
            state, reason = _settled(connection, record.job_id, job_status, task_id)
        out[task_id] = TaskRecord(state, record.version, record.job_id, record.source, reason, record.queued_at,
                                  record.updated_at)
    return out


def _settled(connection: Any, job_id: str, job_status: str | None, task_id: int) -> tuple[str, str]:
    from rq.exceptions import NoSuchJobError

    from backend.batch import jobs

    if job_status is None:
        return ERROR, "lost: its job vanished from Redis (deleted or expired) before it finished"
    try:
        job = jobs.fetch_job(job_id, connection)
    except NoSuchJobError:
        return ERROR, "lost: its job vanished from Redis (deleted or expired) before it finished"
    if job_status == "finished":
        result, _ = jobs._finished_result(job, f"task {task_id}")
        return state_of_result(result), result.reason if result.status == FAILED else ""
    return ERROR, f"internal: {jobs.failure_reason(job)}"


def latest_version(records: Iterable[TaskRecord]) -> str:
    best = max(records, key=lambda r: r.updated_at, default=None)
    return best.version if best is not None else ""


def project_status(connection: Any, project_id: int, version: str = "", now: float | None = None) -> ProjectStatus:
    """The project's status for `version` (default: the version of its most recently updated record)."""
    records = reconcile(connection, read_records(connection, project_id))
    version = version or latest_version(records.values())
    return summarize(project_id, version, records, time.time() if now is None else now)
