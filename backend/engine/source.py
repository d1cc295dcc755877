"""Where the model comes from: a local folder, or a ModelScope model id downloaded once into a cache.

A hub download lands in `<cache_dir>/<owner>/<name>/<revision>/`; once it holds the model files it is used
with no network call at all (the hub client writes each file as `<file>.incomplete` and renames it when its
size and sha256 match the hub's listing, so a present file is whole).

The first start:
- progress: one line per 10% of a large file (or every 15 s when slower), on the `backend.engine.source`
  logger, or on stderr when nothing configured logging (gunicorn's master, a bare `python -c`);
- resume: an interrupted file stays as `<file>.incomplete` in the revision folder, and the hub client
  continues it with an HTTP Range request, within one start (connection cut) and across restarts (killed);
- the pinned revision is the one listed and downloaded (the hub client sends it with every request);
- several processes starting at once on an empty cache (gunicorn workers, `--scale worker=N`) download
  once: an exclusive fcntl lock next to the revision folder; the others wait, then use the complete folder
  (the kernel drops the lock of a killed process, so a crash never leaves a stale lock);
- failures are a ModelNotAvailableError with a stable `reason`: hub_unreachable (after at most
  `connect_timeout` seconds), model_not_found, revision_not_found (naming the hub's revisions), not_found
  (a 404 we could not attribute), download_failed, incomplete_download; plus not_a_model_folder /
  no_such_folder for local paths.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .config import CONFIG_FILE
from .network import WEIGHTS_FILE

log = logging.getLogger(__name__)

DEFAULT_HUB_ENDPOINT = "https://www.modelscope.cn"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)   # all the engine reads: README/demo images on the hub are skipped
PARTIAL_SUFFIX = ".incomplete"              # the hub client's name for a file being downloaded
HUB_CLIENT_DIR = ".hub-client"              # the hub client's own per-file locks, inside our cache
_MARKER = ".m2fp-download-complete"
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MB = 1024 * 1024
_CURSOR_UP = "\x1b[A"


class ModelNotAvailableError(RuntimeError):
    """The model folder is missing/incomplete, or the hub cannot give it; `reason` is a stable tag."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModelSource:
    path: Path                 # folder holding configuration.json + pytorch_model.pt
    model_id: str | None       # hub id when it came from the hub
    revision: str | None       # hub revision when it came from the hub

    @property
    def name(self) -> str:
        return self.model_id.split("/")[-1] if self.model_id else self.path.name


def is_model_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def cached_folder(model_id: str, revision: str, cache_dir: Path) -> Path:
    owner, name = model_id.split("/", 1)
    return Path(cache_dir) / owner / name / revision


def lock_path(folder: Path) -> Path:
    """The download lock of a revision folder: a sibling file, so it exists before the folder does."""
    return folder.parent / f".{folder.name}.download.lock"


def hub_endpoint() -> str:
    return (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN")
            or DEFAULT_HUB_ENDPOINT)


def check_hub_reachable(endpoint: str, timeout: float) -> None:
    """Raise OSError unless the hub answers one HTTP request within `timeout` seconds.

    An HTTP answer (any status), not a bare TCP connect: intercepting proxies accept any connection,
    and the hub client would then spend its retries (many seconds) before failing.
    """
    import requests

    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    requests.head(url, timeout=(timeout, timeout), allow_redirects=False)  # RequestException is an OSError


# ------------------------------------------------------------------------------------------------ reporting

def say(message: str) -> None:
    """An INFO line about the model's first start, seen even where nobody configured logging.

    gunicorn's master (which downloads before forking workers) configures only its own loggers; without
    this fallback the progress of a several-hundred-MB download would be invisible there.
    """
    if log.hasHandlers():
        log.info("%s", message)
    else:
        # One write per line: the bar filter below drops lone newlines.
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO {__name__}: {message}\n")
        sys.stderr.flush()


def format_mb(n: float) -> str:
    return f"{n / _MB:.1f} MB"


def progress_line(name: str, done: int, total: int, elapsed: float, fresh: int) -> str:
    """`pytorch_model.pt: 40% (100.0 MB of 250.3 MB, 12.5 MB/s)`; `fresh` = bytes received in `elapsed`."""
    pct = 100.0 * done / total if total else 100.0
    speed = f", {fresh / _MB / elapsed:.1f} MB/s" if elapsed > 0 and fresh > 0 else ""
    return f"{name}: {pct:.0f}% ({format_mb(done)} of {format_mb(total)}{speed})"


@dataclass
class FileProgress:
    """Decides when a file's download deserves a log line: each 10% step, or every `every_s` seconds.

    Files under `min_size` get no lines (the configuration is a few kB). A resumed file starts at the
    bytes already on disk (the hub client reports them first), which count toward the percentage but
    not toward the speed.
    """
    name: str
    total: int
    emit: Callable[[str], None]
    resumed: int = 0
    clock: Callable[[], float] = time.monotonic
    step_pct: int = 10
    every_s: float = 15.0
    min_size: int = _MB
    done: int = field(default=0, init=False)
    _baseline: int = field(default=0, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)
    _last_step: int = field(default=0, init=False, repr=False)
    _last_time: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._started = self._last_time = self.clock()

    def add(self, n: int) -> None:
        if self.done == 0 and self.resumed and n == self.resumed:
            self._baseline = n
            self._last_step = self._step(n)
        self.done = max(0, self.done + n)      # the client reports a negative size when it restarts a file
        if self.total < self.min_size or self.total <= 0:
            return
        now = self.clock()
        step = self._step(self.done)
        if step > self._last_step or (now - self._last_time >= self.every_s and self.done < self.total):
            self._last_step, self._last_time = max(step, self._last_step), now
            self.emit(progress_line(self.name, self.done, self.total, now - self._started,
                                    self.done - self._baseline))

    def _step(self, done: int) -> int:
        return int(100 * done / self.total) // self.step_pct if self.total else 0


class _WithoutBars(io.TextIOBase):
    """stderr minus the hub client's tqdm bars, which it draws unconditionally: redrawn with '\\r' ten times a
    second and moved with newlines and cursor-up escapes, they make one endless line in container logs and
    bury the progress lines. Whole lines (warnings, log records, our lines) pass."""

    def __init__(self, target: io.TextIOBase) -> None:
        self.target = target

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if "\r" in text or not text.replace("\n", "").replace(_CURSOR_UP, ""):
            return len(text)
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def _client_bars_hidden() -> Iterator[None]:
    """Hide the bars unless a person watches a terminal (there they are the usual download display)."""
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        yield
        return
    with contextlib.redirect_stderr(_WithoutBars(stream)):
        yield


def _callback_class(emit: Callable[[str], None], resumed: dict[str, int]) -> type:
    """A hub-client ProgressCallback class (the client instantiates it per file) logging through FileProgress."""
    from modelscope.hub.callback import ProgressCallback

    class LoggedProgress(ProgressCallback):
        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            self.progress = FileProgress(filename, file_size, emit, resumed=resumed.get(filename, 0))

        def update(self, size: int) -> None:
            self.progress.add(size)

    return LoggedProgress


# ------------------------------------------------------------------------------------------------ errors

def _unavailable(model_id: str, revision: str, folder: Path, why: str, reason: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {model_id}@{revision} is not in the cache ({folder}) and cannot be downloaded: {why}. "
        f"Either give the machine access to the ModelScope hub ({hub_endpoint()}), or copy the model folder "
        f"(configuration.json + {WEIGHTS_FILE}) to this machine and set M2FP_MODEL to its path "
        f"(or mount it at {folder}).", reason)


def _is_not_found(exc: BaseException) -> bool:
    """The hub answered 404 (the client raises NotExistError, re-raised as requests' HTTPError)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if getattr(response, "status_code", None) == 404 or type(seen).__name__ == "NotExistError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _not_found_error(model_id: str, revision: str, folder: Path) -> ModelNotAvailableError:
    """Which of the two was wrong, the id or the revision (one more request: the model's revision list)."""
    try:
        from modelscope_hub import HubApi

        revisions = [r.get("Revision") for r in HubApi().list_repo_revisions(model_id, "model")]
    except Exception as exc:  # the same NotExistError for an unknown id; anything else: we cannot tell
        if _is_not_found(exc):
            return ModelNotAvailableError(
                f"the ModelScope hub ({hub_endpoint()}) has no model {model_id!r}: check M2FP_MODEL "
                f"(a hub id such as damo/cv_resnet101_image-multiple-human-parsing, or a local folder)",
                "model_not_found")
        return ModelNotAvailableError(
            f"the ModelScope hub ({hub_endpoint()}) has no {model_id}@{revision} (HTTP 404): check M2FP_MODEL and "
            f"M2FP_MODEL_REVISION", "not_found")
    listed = ", ".join(str(r) for r in revisions if r) or "none"
    return ModelNotAvailableError(
        f"model {model_id} on the ModelScope hub ({hub_endpoint()}) has no revision {revision!r} "
        f"(it has: {listed}): check M2FP_MODEL_REVISION", "revision_not_found")


# ------------------------------------------------------------------------------------------------ download

@contextlib.contextmanager
def download_lock(folder: Path, description: str) -> Iterator[None]:
    """Hold the revision folder's download lock; say who we wait for when another process holds it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = ""
            for _ in range(20):       # the holder writes its pid right after locking: give it that moment
                handle.seek(0)
                holder = handle.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            say(f"waiting for process {holder or '?'}, which is downloading {description} into {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def partial_files(folder: Path) -> dict[str, int]:
    """Files an interrupted download left (`<name>.incomplete`): name -> bytes already here."""
    if not folder.is_dir():
        return {}
    return {p.name[:-len(PARTIAL_SUFFIX)]: p.stat().st_size for p in folder.iterdir()
            if p.name.endswith(PARTIAL_SUFFIX) and p.is_file()}


def download(model_id: str, revision: str, folder: Path) -> None:
    """Fetch the model files with ModelScope's own hub client into `folder` (the caller holds the lock).

    `folder` is `<cache_dir>/<owner>/<name>/<revision>`; the client's own locks go to `<cache_dir>/.hub-client`
    (not ~/.cache/modelscope: the cache volume is the one place the container may write).
    """
    from modelscope.hub.snapshot_download import snapshot_download  # hub client only, no model code

    folder.mkdir(parents=True, exist_ok=True)
    resumed = partial_files(folder)
    for name, size in sorted(resumed.items()):
        say(f"resuming an interrupted download: {format_mb(size)} of {name} already in {folder}")
    start = time.monotonic()
    try:
        with _client_bars_hidden():
            snapshot_download(model_id, revision=revision, local_dir=str(folder),
                              cache_dir=str(folder.parents[2] / HUB_CLIENT_DIR), allow_patterns=list(MODEL_FILES),
                              progress_callbacks=[_callback_class(say, resumed)])
    except Exception as exc:  # the hub client raises many types (HTTP, auth, IO, integrity)
        _remove_if_empty(folder)
        if _is_not_found(exc):
            raise _not_found_error(model_id, revision, folder) from exc
        kept = partial_files(folder)
        note = (f"; the {', '.join(f'{format_mb(s)} of {n}' for n, s in sorted(kept.items()))} received so far "
                f"stay in {folder} and the next start resumes from there") if kept else ""
        raise _unavailable(model_id, revision, folder,
                           f"download failed ({type(exc).__name__}: {exc}){note}", "download_failed") from exc
    if not is_model_folder(folder):
        raise _unavailable(model_id, revision, folder,
                           f"the hub's {model_id}@{revision} does not contain {' and '.join(MODEL_FILES)}",
                           "incomplete_download")
    (folder / _MARKER).write_text(f"{model_id}@{revision}\n")
    size = sum((folder / name).stat().st_size for name in MODEL_FILES)
    say(f"downloaded {model_id}@{revision} ({format_mb(size)}) into {folder} in {time.monotonic() - start:.1f} s")


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()        # only succeeds when empty: an unknown id/revision leaves no empty folder behind


def fetch_once(model_id: str, revision: str, folder: Path, connect_timeout: float) -> None:
    """Download unless another process did (or does) it: only one process per cache downloads."""
    try:
        check_hub_reachable(hub_endpoint(), connect_timeout)
    except OSError as exc:
        raise _unavailable(model_id, revision, folder, f"hub unreachable ({exc})", "hub_unreachable") from exc
    description = f"{model_id}@{revision}"
    with download_lock(folder, description):
        if is_model_folder(folder):
            say(f"model {description} is in {folder} (downloaded by another process)")
            return
        say(f"model {description} is not in the cache: downloading it from {hub_endpoint()} into {folder} "
            f"(first start only; later starts use this folder with no network)")
        download(model_id, revision, folder)


def resolve(source: str | os.PathLike, *, revision: str, cache_dir: str | os.PathLike,
            connect_timeout: float = 5.0) -> ModelSource:
    """A local model folder, or a hub id (cached folder if complete, else downloaded once)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not is_model_folder(path):
            raise ModelNotAvailableError(f"{path} is not a model folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}",
                                         "not_a_model_folder")
        return ModelSource(path=path.resolve(), model_id=None, revision=None)
    if text.startswith(("/", ".", "~")) or not _MODEL_ID.match(text):
        raise ModelNotAvailableError(f"model folder {path} does not exist (and {text!r} is not a hub model id)",
                                     "no_such_folder")
    folder = cached_folder(text, revision, Path(cache_dir).expanduser())
    # A complete folder is used as is (downloaded earlier, or mounted there by hand): no network call.
    if not is_model_folder(folder):
        fetch_once(text, revision, folder, connect_timeout)
    return ModelSource(path=folder.resolve(), model_id=text, revision=revision)
