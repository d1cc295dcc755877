"""Real RQ worker processes (`python -m backend.batch.worker`) and batch CLI runs, as tests and benchmarks start them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from redis import Redis
from rq import Worker

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "m2fp-test"


def db_url(redis_server, db: int) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


def base_env(model_dir: Path, cache_url: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env.update({"M2FP_MODEL": str(model_dir), "M2FP_DEVICE": "cpu", "M2FP_THREADS": "1", "REDIS_URL": cache_url,
                "RQ_QUEUE": QUEUE, "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    return env


class WorkerProcess:
    """`python -m backend.batch.worker` in its own process group, logging to a file."""

    def __init__(self, name: str, queue_url: str, env: dict[str, str], log_dir: Path,
                 heartbeat: float = 1.0, maintenance: int = 2) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend.batch.worker", "--redis-url", queue_url, "--queue", QUEUE,
             "--name", name, "--heartbeat", str(heartbeat), "--maintenance", str(maintenance)],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, connection: Redis, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited: {self.log()}")
            if self.name in {w.name for w in Worker.all(connection=connection)}:
                return
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name} not ready after {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # no chance to clean up: what a crash looks like
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


def start_cli(args: list[str], env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "backend.batch.cli", *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finish_cli(proc: subprocess.Popen, log, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise
    finally:
        log.close()
