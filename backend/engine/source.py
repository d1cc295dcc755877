"""Where the model comes from: a local folder, or a ModelScope model id downloaded once into a cache.

A hub download lands in `<cache_dir>/<owner>/<name>/<revision>/`; once it holds the model files it is
used with no network call at all (the hub client writes files atomically, so a present file is whole). When the hub is needed but cannot be
reached, a ModelNotAvailableError says what to do, after at most `connect_timeout` seconds.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import CONFIG_FILE
from .network import WEIGHTS_FILE

DEFAULT_HUB_ENDPOINT = "https://www.modelscope.cn"
_MARKER = ".m2fp-download-complete"
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotAvailableError(RuntimeError):
    """The model folder is missing/incomplete, or the hub is unreachable and nothing is cached."""


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


def _unavailable(model_id: str, revision: str, folder: Path, why: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {model_id}@{revision} is not in the cache ({folder}) and cannot be downloaded: {why}. "
        f"Either give the machine access to the ModelScope hub ({hub_endpoint()}), or copy the model folder "
        f"(configuration.json + {WEIGHTS_FILE}) to this machine and set M2FP_MODEL to its path "
        f"(or mount it at {folder}).")


def download(model_id: str, revision: str, folder: Path, connect_timeout: float) -> None:
    """Fetch the model with ModelScope's own hub client into `folder` (fails fast when offline)."""
    try:
        check_hub_reachable(hub_endpoint(), connect_timeout)
    except OSError as exc:
        raise _unavailable(model_id, revision, folder, f"hub unreachable ({exc})") from exc
    try:
        from modelscope.hub.snapshot_download import snapshot_download  # hub client only, no model code
        folder.mkdir(parents=True, exist_ok=True)
        snapshot_download(model_id, revision=revision, local_dir=str(folder))
    except Exception as exc:  # the hub client raises many types (HTTP, auth, IO)
        raise _unavailable(model_id, revision, folder, f"download failed ({type(exc).__name__}: {exc})") from exc
    if not is_model_folder(folder):
        raise _unavailable(model_id, revision, folder, "the download does not contain the model files")
    (folder / _MARKER).write_text(f"{model_id}@{revision}\n")


def resolve(source: str | os.PathLike, *, revision: str, cache_dir: str | os.PathLike,
            connect_timeout: float = 5.0) -> ModelSource:
    """A local model folder, or a hub id (cached folder if complete, else downloaded once)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not is_model_folder(path):
            raise ModelNotAvailableError(f"{path} is not a model folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        return ModelSource(path=path.resolve(), model_id=None, revision=None)
    if text.startswith(("/", ".", "~")) or not _MODEL_ID.match(text):
        raise ModelNotAvailableError(f"model folder {path} does not exist (and {text!r} is not a hub model id)")
    folder = cached_folder(text, revision, Path(cache_dir).expanduser())
    # A complete folder is used as is (downloaded earlier, or mounted there by hand): no network call.
    if not is_model_folder(folder):
        download(text, revision, folder, connect_timeout)
    return ModelSource(path=folder.resolve(), model_id=text, revision=revision)
