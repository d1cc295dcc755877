"""Where the model runs: on a few dedicated threads per process (MAX_CONCURRENT_INFERENCES, default 1).

Request threads hand over encoded bytes and wait; decoding and inference happen on the inference thread. So N
concurrent requests cost one inference's memory plus the waiting requests' bytes, not N inferences. A lock
alone is not enough: glibc gives each thread its own malloc arena, and with the allocator tuning that keeps
activation buffers (backend/engine/parser.py tune_allocator) every request thread that once ran an inference
keeps a full inference's worth of memory (measured: 4.7x the single-request peak with 10 request threads and a
lock; 1.2x with one dedicated thread; docs/benchmarks/memory.md).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class InferenceThreads:
    """Runs callables on `workers` dedicated threads, FIFO; `run` blocks the caller until its call is done."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"MAX_CONCURRENT_INFERENCES must be >= 1, got {workers}")
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            # Threads do not survive fork: a forked child builds its own pool instead of waiting forever.
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="m2fp-inference")
                self._pid = os.getpid()
            return self._pool

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on an inference thread; its exception is raised here."""
        return self._executor().submit(fn, *args).result()


__all__ = ["InferenceThreads"]
