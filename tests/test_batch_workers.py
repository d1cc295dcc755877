"""Scale-out through RQ with a real redis-server and real worker processes (`m2fp-prelabel worker`).

- two workers complete every job exactly once, and a corrupt image fails its job alone, without retries;
- a worker SIGKILLed mid-job: its job is re-queued by rq's registry cleanup and completed by another worker.
Each test uses its own Redis database so queues, registries and cache entries never mix.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from redis import Redis
from rq import Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from backend.batch.jobs import fetch_job
from testing.workers import QUEUE, WorkerProcess, base_env, db_url, finish_cli, start_cli

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="parts" toName="image">
    <Label value="Hair"/><Label value="Face"/><Label value="UpperClothes"/><Label value="Pants"/>
  </PolygonLabels>
</View>"""


def make_photos(root: Path, sample_images: list[Path], corrupt: bool) -> Path:
    root.mkdir(parents=True)
    for i, source in enumerate(sample_images):
        (root / f"p{i}.jpg").write_bytes(source.read_bytes())
    if corrupt:
        (root / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xdb" + b"\x00" * 64)
    return root


def queue_jobs(connection: Redis) -> tuple[list[Job], list[Job]]:
    finished = FinishedJobRegistry(QUEUE, connection=connection).get_job_ids()
    failed = FailedJobRegistry(QUEUE, connection=connection).get_job_ids()
    return ([fetch_job(i, connection) for i in finished], [fetch_job(i, connection) for i in failed])


def test_two_workers_complete_every_job_once_and_a_corrupt_image_fails_alone(
        tmp_path: Path, model_dir: Path, sample_images: list[Path], redis_server) -> None:
    url = db_url(redis_server, 3)
    connection = Redis.from_url(url)
    connection.flushdb()
    good = sample_images[:2]
    photos = make_photos(tmp_path / "photos", good, corrupt=True)
    config = tmp_path / "config.xml"
    config.write_text(CONFIG)
    env = base_env(model_dir, cache_url=url)
    workers = [WorkerProcess(f"w{i}-{os.getpid()}", url, env, tmp_path) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready(connection)
        cli, log = start_cli(["folder", str(photos), "--label-config", str(config), "--out", str(tmp_path / "out"),
                              "--enqueue", "--redis-url", url, "--queue", QUEUE, "--retries", "2"],
                             env, tmp_path / "cli.log")
        code = finish_cli(cli, log, timeout=400)
    finally:
        for w in workers:
            w.stop()
    output = (tmp_path / "cli.log").read_text()
    assert code == 1, output

    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert [t["data"]["image"].rsplit("/", 1)[1] for t in tasks] == [f"p{i}.jpg" for i in range(len(good))]
    assert not (tmp_path / "out" / ".tasks").exists()  # the workers' per-image parts were gathered, then removed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done"] == len(good) and summary["failed"] == 1
    assert summary["failures"][0]["item"] == "zz_corrupt.jpg"
    assert summary["failures"][0]["reason"].startswith("decode: "), summary

    finished, failed = queue_jobs(connection)
    # A bad input is a finished job carrying a failed item: nothing for rq to retry.
    assert len(finished) == len(good) + 1 and failed == []
    # Exactly once: one execution result per job, no retry of the good ones, none of the corrupt one either.
    for job in finished:
        assert len(job.results()) == 1, (job.description, job.results())
    corrupt = next(job for job in finished if job.description == "zz_corrupt.jpg")
    assert corrupt.return_value()["result"]["status"] == "failed"
    # Both workers took part.
    assert {r.worker_name for job in finished for r in job.results()} == {w.name for w in workers}


def test_a_killed_workers_job_completes_on_another_worker(
        tmp_path: Path, model_dir: Path, sample_images: list[Path], redis_server) -> None:
    url = db_url(redis_server, 4)
    connection = Redis.from_url(url)
    connection.flushdb()
    photos = make_photos(tmp_path / "photos", sample_images[:1], corrupt=False)
    config = tmp_path / "config.xml"
    config.write_text(CONFIG)
    # With the parsing cache: the victim dies holding the cache's compute lock for the image, and that lock
    # must go with it, or the survivor's redo would idle waiting for a parse nobody is running.
    env = base_env(model_dir, cache_url=url)
    victim = WorkerProcess(f"victim-{os.getpid()}", url, env, tmp_path)
    survivor = None
    cli = None
    try:
        victim.wait_ready(connection)
        cli, log = start_cli(["folder", str(photos), "--label-config", str(config), "--out", str(tmp_path / "out"),
                              "--enqueue", "--redis-url", url, "--queue", QUEUE],
                             base_env(model_dir), tmp_path / "cli.log")
        registry = StartedJobRegistry(QUEUE, connection=connection)
        deadline = time.monotonic() + 120
        while not registry.get_job_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        (victim_job_id,) = registry.get_job_ids()
        time.sleep(0.5)  # well inside the parse: inference takes seconds
        deadline = time.monotonic() + 60
        while not connection.keys("m2fp:parsing:*:lock") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connection.keys("m2fp:parsing:*:lock"), "the victim never took the parsing lock"
        victim.kill()
        assert fetch_job(victim_job_id, connection).get_status() == JobStatus.STARTED
        # The lock lives as long as its holder renews it: a few seconds after the kill it is gone by itself.
        deadline = time.monotonic() + 30
        while connection.keys("m2fp:parsing:*:lock") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not connection.keys("m2fp:parsing:*:lock"), "a dead worker's parsing lock outlived it"

        survivor = WorkerProcess(f"survivor-{os.getpid()}", url, env, tmp_path)
        code = finish_cli(cli, log, timeout=300)
    finally:
        victim.kill()
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait(timeout=30)
        if survivor is not None:
            survivor.stop()
    output = (tmp_path / "cli.log").read_text()
    assert code == 0, output + survivor.log()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["done"] == 1
    job = fetch_job(victim_job_id, connection)
    assert job.get_status() == JobStatus.FINISHED
    results = job.results()
    # The victim left no result (it died); the job ran once more and the survivor finished it.
    assert [r.worker_name for r in results] == [survivor.name]
    assert job.retries_left == 1  # one of its 2 retries was spent re-queuing it after the kill
    assert len(json.loads((tmp_path / "out" / "tasks.json").read_text())) == 1


def test_a_worker_runs_only_json_jobs_of_its_own_functions(tmp_path: Path, model_dir: Path, redis_server) -> None:
    """What anyone who can write to Redis might try: a job naming os.system, and a pickled job. Neither runs."""
    from rq import Queue

    from backend.batch.jobs import queue_for

    url = db_url(redis_server, 5)
    connection = Redis.from_url(url)
    connection.flushdb()
    marker = tmp_path / "pwned"
    forged = queue_for(connection, QUEUE).enqueue("os.system", f"touch {marker}", job_id="forged-json")
    # A pickle-serialised job (rq's default) in the same queue: the worker's JSON reader must not unpickle it.
    Queue(QUEUE, connection=connection).enqueue("os.system", f"touch {marker}.pickle", job_id="forged-pickle")
    worker = WorkerProcess(f"guard-{os.getpid()}", url, base_env(model_dir), tmp_path)
    try:
        worker.wait_ready(connection)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(FailedJobRegistry(QUEUE, connection=connection)) < 2:
            time.sleep(0.2)
    finally:
        worker.stop()
    assert not marker.exists() and not Path(f"{marker}.pickle").exists()
    failed = set(FailedJobRegistry(QUEUE, connection=connection).get_job_ids())
    assert failed == {"forged-json", "forged-pickle"}, worker.log()
    assert "not an m2fp-prelabel job" in fetch_job(forged.id, connection).latest_result().exc_string
