"""Outcome of each item, the end-of-run summary, and progress reporting (tqdm on a terminal, log lines otherwise)."""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterable

log = logging.getLogger("m2fp.batch")

DONE = "done"        # parsed now and written / posted
CACHED = "cached"    # parsing served from the image-hash cache, then written / posted
SKIPPED = "skipped"  # nothing to do: the task already has a prediction of this model version
FAILED = "failed"
STATUSES = (DONE, CACHED, SKIPPED, FAILED)


@dataclass(frozen=True)
class ItemResult:
    """What happened to one image or task. `key` names it for people (relative path, "task 12")."""

    key: str
    status: str
    reason: str = ""
    regions: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")


@dataclass
class Summary:
    """Counts per status and every failure with its reason, in the order they happened."""

    total: int = 0
    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def add(self, result: ItemResult) -> None:
        self.counts[result.status] += 1
        if result.status == FAILED:
            self.failures.append((result.key, result.reason))

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.counts[FAILED]

    @property
    def exit_code(self) -> int:
        # Unfinished items (an interrupted wait) count as failures: the run did not do its job.
        return 1 if self.failed or self.finished < self.total else 0

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            **{status: self.counts[status] for status in STATUSES},
            "unfinished": self.total - self.finished,
            "elapsed_s": round(self.elapsed_s, 3),
            "failures": [{"item": key, "reason": reason} for key, reason in self.failures],
        }

    def render(self) -> str:
        rate = self.finished / self.elapsed_s * 3600 if self.elapsed_s > 0 else 0.0
        lines = [
            f"{self.total} items in {self.elapsed_s:.1f} s ({rate:.0f}/h): "
            + ", ".join(f"{self.counts[s]} {s}" for s in STATUSES)
        ]
        if self.finished < self.total:
            lines.append(f"{self.total - self.finished} unfinished")
        for key, reason in self.failures:
            lines.append(f"FAILED {key}: {reason}")
        return "\n".join(lines)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Reports results as they arrive and builds the Summary.

    A terminal gets a tqdm bar (rate and ETA included); anything else (CI logs, files, nohup) gets one plain
    line every `log_every_s` seconds and a last one at the end, since a bar redrawn with \\r is unreadable there.
    """

    def __init__(self, total: int, desc: str = "pre-labelling", stream: IO[str] | None = None,
                 tty: bool | None = None, log_every_s: float = 10.0) -> None:
        self.summary = Summary(total=total)
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty() if tty is None else tty
        self._desc = desc
        self._log_every_s = log_every_s
        self._start = time.monotonic()
        self._last_log = self._start
        self._logged_at: int | None = None  # items finished when the last plain line was printed
        self._bar = None
        if self._tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="img", file=self._stream, dynamic_ncols=True)

    def update(self, results: ItemResult | Iterable[ItemResult]) -> None:
        batch = [results] if isinstance(results, ItemResult) else list(results)
        for result in batch:
            self.summary.add(result)
            if result.status == FAILED:
                log.warning("failed %s: %s", result.key, result.reason)
        if self._bar is not None:
            if batch:
                self._bar.update(len(batch))
                self._bar.set_postfix(self._postfix(), refresh=False)
        elif batch and time.monotonic() - self._last_log >= self._log_every_s:
            self._log_line()

    def _postfix(self) -> dict[str, int]:
        counts = self.summary.counts
        return {s: counts[s] for s in (CACHED, SKIPPED, FAILED) if counts[s]}

    def line(self) -> str:
        """One plain progress line: counts, rate and ETA."""
        s = self.summary
        elapsed = time.monotonic() - self._start
        rate = s.finished / elapsed if elapsed > 0 else 0.0
        remaining = s.total - s.finished
        eta = _format_eta(remaining / rate) if rate > 0 else "?"
        pct = 100.0 * s.finished / s.total if s.total else 100.0
        counts = ", ".join(f"{s.counts[k]} {k}" for k in STATUSES if s.counts[k])
        return (f"{self._desc}: {s.finished}/{s.total} ({pct:.0f}%) {counts or '0 done'}; "
                f"{rate * 3600:.0f}/h, ETA {eta}")

    def _log_line(self) -> None:
        self._last_log = time.monotonic()
        self._logged_at = self.summary.finished
        print(self.line(), file=self._stream, flush=True)

    def close(self) -> Summary:
        self.summary.elapsed_s = time.monotonic() - self._start
        if self._bar is not None:
            self._bar.close()
        elif self._logged_at != self.summary.finished:
            self._log_line()
        return self.summary
