"""The RQ worker that runs batch jobs: `m2fp-prelabel worker` or `python -m backend.batch.worker`.

It is rq's SimpleWorker (jobs run in the worker process, so the model is loaded once per worker rather than per
job: rq's forking Worker starts a fresh interpreter per job) with a heartbeat thread that keeps the job's
StartedJobRegistry entry alive with a SHORT ttl while the job runs, so a worker killed mid-job (kill -9, OOM,
lost machine) is noticed within seconds, and rq's own registry cleanup (run by every other worker and by the
waiting CLI) retries its job elsewhere; SimpleWorker alone beats no heartbeat during a job, so rq would wait
for the job timeout plus a minute. Jobs are JSON and allow-listed (backend/batch/jobs.py); a bad input is a
finished job with a failed item, so rq's retries only ever cover real failures.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import uuid
from typing import Any

from rq import SimpleWorker
from rq.worker import WorkerStatus

from backend.batch.jobs import SERIALIZER, AllowListedJob, queue_for
from backend.settings import Settings, get_settings

log = logging.getLogger("m2fp.batch.worker")

class BatchWorker(SimpleWorker):
    """SimpleWorker with a short job heartbeat and no retries for bad inputs."""

    heartbeat_interval_s: float = 5.0

    @property
    def job_heartbeat_ttl(self) -> int:
        # Three missed beats before a job counts as abandoned: robust to a loaded machine, still fast.
        return int(self.heartbeat_interval_s * 3) + 1

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    @property
    def dequeue_timeout(self) -> int:
        # An idle worker wakes this often to run maintenance, which is what re-queues a dead worker's job.
        return max(1, int(self.maintenance_interval))

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="job-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join(timeout=self.heartbeat_interval_s + 5)
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Any, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval_s):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # a Redis hiccup must not kill the job; the next beat tries again
                log.warning("job heartbeat failed", exc_info=True)


def redis_connection(url: str):
    from redis import Redis

    if not url:
        raise SystemExit("no Redis URL: pass --redis-url or set REDIS_URL")
    # rq stores bytes: no decode_responses.
    return Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def build_worker(settings: Settings, redis_url: str, queue_name: str, name: str | None = None,
                 heartbeat_s: float = 5.0, maintenance_s: int = 10) -> BatchWorker:
    connection = redis_connection(redis_url)
    queue = queue_for(connection, queue_name)
    worker = BatchWorker([queue], connection=connection, name=name or _default_name(), serializer=SERIALIZER,
                         job_class=AllowListedJob, maintenance_interval=maintenance_s,
                         job_monitoring_interval=int(heartbeat_s))
    worker.heartbeat_interval_s = heartbeat_s
    return worker


def _default_name() -> str:
    return f"m2fp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings = get_settings()
    parser.add_argument("--redis-url", default=settings.redis_url, help="Redis of the queue (default: REDIS_URL)")
    parser.add_argument("--queue", default=settings.rq_queue, help="queue name (default: RQ_QUEUE)")
    parser.add_argument("--name", default=None, help="worker name (default: host-pid-random)")
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    parser.add_argument("--max-jobs", type=int, default=None, help="quit after this many jobs")
    parser.add_argument("--heartbeat", type=float, default=5.0,
                        help="seconds between job heartbeats; a job whose worker misses 3 is re-queued")
    parser.add_argument("--maintenance", type=int, default=10,
                        help="seconds between registry cleanups (re-queues jobs of dead workers)")


def run(args: argparse.Namespace) -> int:
    from backend.runtime import get_runtime

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = build_worker(settings, args.redis_url, args.queue, args.name, args.heartbeat, args.maintenance)
    # Load before taking the first job: loading must not count against that job's timeout.
    runtime = get_runtime(settings)
    log.info("worker %s ready on queue %r, model version %s", worker.name, args.queue, runtime.version)
    worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.batch.worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
