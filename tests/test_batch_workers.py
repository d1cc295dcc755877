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

from backend.batch.worker import _is_bad_input
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
    return ([Job.fetch(i, connection=connection) for i in finished],
            [Job.fetch(i, connection=connection) for i in failed])


def test_bad_input_is_recognised_from_the_traceback() -> None:
    assert _is_bad_input("Traceback (most recent call last):\n  ...\n"
                         "backend.batch.errors.BadInput: ImageDecodeError: not an image\n")
    assert not _is_bad_input("Traceback...\nConnectionError: LS is down\n")
    assert not _is_bad_input("")


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
    assert "ImageDecodeError" in summary["failures"][0]["reason"], summary

    finished, failed = queue_jobs(connection)
    assert len(finished) == len(good) and len(failed) == 1
    # Exactly once: one execution result per job, no retry of the good ones, none of the corrupt one either.
    for job in finished + failed:
        assert len(job.results()) == 1, (job.description, job.results())
    assert failed[0].description == "zz_corrupt.jpg" and failed[0].retries_left == 0
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
    # No parsing cache here: the victim dies holding the cache's compute lock, and the survivor would first wait
    # for that lock to lapse; the cache's own tests cover that path.
    env = base_env(model_dir, cache_url="")
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
        victim.kill()
        assert Job.fetch(victim_job_id, connection=connection).get_status() == JobStatus.STARTED

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
    job = Job.fetch(victim_job_id, connection=connection)
    assert job.get_status() == JobStatus.FINISHED
    results = job.results()
    # The victim left no result (it died); the job ran once more and the survivor finished it.
    assert [r.worker_name for r in results] == [survivor.name]
    assert job.retries_left == 1  # one of its 2 retries was spent re-queuing it after the kill
    assert len(json.loads((tmp_path / "out" / "tasks.json").read_text())) == 1
