"""Stopping the server processes tests start: politely first, then for sure."""
from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns once the process is gone."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
