"""The model's first start for real: ModelScope's own hub client (modelscope 1.40) downloads from a local hub
server (testing/hub_server.py, a real process on 127.0.0.1) into an empty cache.

Most tests use a small fake model (a real configuration.json and 6 MiB of random "weights", two revisions);
one loads the full random-weight model through HumanParser.from_pretrained with a hub id.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.engine import HumanParser, ModelNotAvailableError
from backend.engine.source import FileProgress, lock_path, resolve
from testing.hub_server import HubServer
from testing.ports import free_port
from testing.random_model import make_sample_image

ROOT = Path(__file__).resolve().parents[1]
TINY = "m2fp-tests/tiny-parser"
REAL = "damo/cv_resnet101_image-multiple-human-parsing"
WEIGHTS = "pytorch_model.pt"
MiB = 1024 * 1024
WEIGHTS_SIZE = 6 * MiB
RESOLVE = ("import sys; from backend.engine.source import resolve; "
           "print(resolve(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3]).path, flush=True)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_revisions(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:
    """Two revisions with different weights, so a download of the wrong one shows."""
    folders = {}
    for i, revision in enumerate(("v1.0.0", "v1.0.1")):
        folder = tmp_path_factory.mktemp(f"tiny-{revision}")
        (folder / "configuration.json").write_bytes((model_dir / "configuration.json").read_bytes())
        (folder / WEIGHTS).write_bytes(os.urandom(WEIGHTS_SIZE - i))
        (folder / "README.md").write_text(f"# tiny {revision}\n")     # on the hub, not needed by the engine
        folders[revision] = folder
    return folders


@pytest.fixture(scope="module")
def hub(tiny_revisions: dict[str, Path], model_dir: Path):
    with HubServer({TINY: tiny_revisions, REAL: {"v1.0.1": model_dir}}) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_hub(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    hub.faults()
    hub.reset()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("MODELSCOPE_DOMAIN", raising=False)
    return hub


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="backend.engine.source")
    return caplog


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "backend.engine.source"]


def _percentages(lines: list[str], name: str = WEIGHTS) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(rf"{re.escape(name)}: (\d+)% \(", line))]


def _spawn(cache: Path, endpoint: str, stderr_path: Path, model: str = TINY,
           revision: str = "v1.0.1") -> subprocess.Popen:
    env = {**os.environ, "MODELSCOPE_ENDPOINT": endpoint}
    with open(stderr_path, "w") as err:
        return subprocess.Popen([sys.executable, "-c", RESOLVE, model, revision, str(cache)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ first start

def test_first_start_downloads_the_pinned_revision_with_progress_lines(
        tmp_path: Path, hub: HubServer, tiny_revisions: dict[str, Path], log: pytest.LogCaptureFixture) -> None:
    source = resolve(TINY, revision="v1.0.1", cache_dir=tmp_path)

    folder = tmp_path / "m2fp-tests" / "tiny-parser" / "v1.0.1"
    assert source.path == folder.resolve() and (source.model_id, source.revision) == (TINY, "v1.0.1")
    assert _sha(folder / WEIGHTS) == _sha(tiny_revisions["v1.0.1"] / WEIGHTS)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == \
        ["configuration.json", WEIGHTS]                                       # README.md is not fetched
    model_requests = [r for r in hub.stats() if r["model"] == TINY]
    assert {r["revision"] for r in model_requests} == {"v1.0.1"}              # the pinned revision, always
    assert sorted(r["file"] for r in hub.downloads()) == ["configuration.json", WEIGHTS]

    lines = _messages(log)
    assert any("not in the cache: downloading it from " + hub.endpoint in line for line in lines)
    pct = _percentages(lines)
    # A line per 10% step of a 6 MiB file read in 1 MiB chunks: a handful of lines, not one per chunk.
    assert 3 <= len(pct) <= 10 and pct == sorted(pct) and pct[-1] == 100
    assert _percentages(lines, "configuration.json") == []                   # a few kB: no progress lines
    assert any(line.startswith(f"downloaded {TINY}@v1.0.1 (6.0 MB) into {folder}") for line in lines)


def test_a_cached_model_is_used_with_no_network(tmp_path: Path, hub: HubServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve(TINY, revision="v1.0.1", cache_dir=tmp_path)
    hub.reset()
    again = resolve(TINY, revision="v1.0.1", cache_dir=tmp_path)
    assert again == first and hub.stats() == []
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")    # the hub is gone now
    assert resolve(TINY, revision="v1.0.1", cache_dir=tmp_path) == first
    # Another revision is another folder: it needs the hub.
    with pytest.raises(ModelNotAvailableError) as err:
        resolve(TINY, revision="v1.0.0", cache_dir=tmp_path, connect_timeout=1.0)
    assert err.value.reason == "hub_unreachable"


def test_a_connection_cut_mid_file_resumes_where_it_stopped(tmp_path: Path, hub: HubServer,
                                                            tiny_revisions: dict[str, Path]) -> None:
    hub.faults(cut_after=2 * MiB, cut_file=WEIGHTS)
    source = resolve(TINY, revision="v1.0.1", cache_dir=tmp_path)

    first, second = hub.downloads(WEIGHTS)                    # exactly two requests for the weights
    assert first["cut"] and first["range"] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second["range"]).group(1))
    assert 0 < resumed_at <= first["sent"]
    assert second["sent"] == (WEIGHTS_SIZE - 1) - resumed_at   # the rest only, not the whole file again
    assert _sha(source.path / WEIGHTS) == _sha(tiny_revisions["v1.0.1"] / WEIGHTS)


def test_a_killed_download_resumes_on_the_next_start(tmp_path: Path, hub: HubServer,
                                                     tiny_revisions: dict[str, Path],
                                                     log: pytest.LogCaptureFixture) -> None:
    hub.faults(rate=MiB)                                      # ~6 s for the weights: time to kill it midway
    folder = tmp_path / "m2fp-tests" / "tiny-parser" / "v1.0.1"
    partial = folder / (WEIGHTS + ".incomplete")
    proc = _spawn(tmp_path, hub.endpoint, tmp_path / "first.err")
    try:
        _wait_for(lambda: partial.exists() and partial.stat().st_size >= MiB, 90, "a partial download")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    kept = partial.stat().st_size
    assert 0 < kept < WEIGHTS_SIZE - 1 and not (folder / WEIGHTS).exists()

    hub.faults()
    hub.reset()
    source = resolve(TINY, revision="v1.0.1", cache_dir=tmp_path)   # the restart: the lock died with the process

    (request,) = hub.downloads(WEIGHTS)
    assert request["range"] == f"bytes={kept}-" and request["sent"] == (WEIGHTS_SIZE - 1) - kept
    assert _sha(source.path / WEIGHTS) == _sha(tiny_revisions["v1.0.1"] / WEIGHTS)
    assert not partial.exists()
    assert any(line.startswith(f"resuming an interrupted download: ") and WEIGHTS in line
               for line in _messages(log))


# ------------------------------------------------------------------------------------------------ errors

def test_an_unknown_revision_or_model_is_a_clear_error(tmp_path: Path, hub: HubServer) -> None:
    with pytest.raises(ModelNotAvailableError) as err:
        resolve(TINY, revision="v9", cache_dir=tmp_path)
    assert err.value.reason == "revision_not_found"
    assert "no revision 'v9'" in str(err.value) and "v1.0.0, v1.0.1" in str(err.value)
    assert "M2FP_MODEL_REVISION" in str(err.value)

    with pytest.raises(ModelNotAvailableError) as err:
        resolve("m2fp-tests/no-such-model", revision="v1.0.1", cache_dir=tmp_path)
    assert err.value.reason == "model_not_found"
    assert "no model 'm2fp-tests/no-such-model'" in str(err.value) and "M2FP_MODEL" in str(err.value)

    assert hub.downloads() == []
    # No empty revision folder is left behind to look like a (broken) cache entry.
    assert not (tmp_path / "m2fp-tests" / "tiny-parser" / "v9").exists()
    assert not (tmp_path / "m2fp-tests" / "no-such-model" / "v1.0.1").exists()


# ------------------------------------------------------------------------------------------------ concurrency

def test_processes_starting_together_on_an_empty_cache_download_once(tmp_path: Path, hub: HubServer,
                                                                     tiny_revisions: dict[str, Path]) -> None:
    # The hub holds file downloads until the other two processes are seen waiting for the lock, so the
    # three starts overlap for certain (like gunicorn workers or `--scale worker=3` starting together).
    hub.faults(hold=True)
    errs = [tmp_path / f"proc{i}.err" for i in range(3)]
    procs = [_spawn(tmp_path / "cache", hub.endpoint, err) for err in errs]
    try:
        _wait_for(lambda: len(hub.downloads(WEIGHTS)) == 1 and
                  sum("waiting for process" in e.read_text() for e in errs) == 2, 120,
                  "one download and two processes waiting for it")
        hub.faults()                                          # release the download
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0, 0], [e.read_text()[-2000:] for e in errs]

    folder = (tmp_path / "cache" / "m2fp-tests" / "tiny-parser" / "v1.0.1").resolve()
    assert outs == [str(folder)] * 3
    assert len(hub.downloads(WEIGHTS)) == 1 and len(hub.downloads("configuration.json")) == 1
    assert len([r for r in hub.stats() if r["kind"] == "files"]) == 1    # the waiters never asked the hub
    assert _sha(folder / WEIGHTS) == _sha(tiny_revisions["v1.0.1"] / WEIGHTS)

    texts = [e.read_text() for e in errs]
    (downloader,) = [t for t in texts if "waiting for process" not in t]
    holder_pid = next(p.pid for p, t in zip(procs, texts) if t is downloader)
    for t in texts:
        if t is not downloader:
            assert f"waiting for process {holder_pid}, which is downloading {TINY}@v1.0.1" in t
            assert "(downloaded by another process)" in t
    # Nobody configured logging in these processes: the lines still reach stderr, as whole lines (the hub
    # client's redrawn progress bars are dropped when stderr is not a terminal).
    assert _percentages(re.findall(r"INFO backend\.engine\.source: (.*)", downloader))[-1] == 100
    assert "\r" not in downloader
    assert lock_path(folder).exists()


# ------------------------------------------------------------------------------------------------ end to end

def test_the_parser_loads_from_the_hub_by_id(tmp_path: Path, hub: HubServer, model_dir: Path) -> None:
    parser = HumanParser.from_pretrained(REAL, revision="v1.0.1", cache_dir=tmp_path, device="cpu")

    assert parser.version == "cv_resnet101_image-multiple-human-parsing@v1.0.1"
    assert parser.source.path == (tmp_path / "damo" / "cv_resnet101_image-multiple-human-parsing" / "v1.0.1")
    assert parser.weights_sha256 == _sha(model_dir / WEIGHTS)
    (weights,) = hub.downloads(WEIGHTS)
    assert weights["sent"] == (model_dir / WEIGHTS).stat().st_size
    parsing = parser(make_sample_image(160, 120))
    assert (parsing.width, parsing.height) == (160, 120) and parsing.parts


# ------------------------------------------------------------------------------------------------ progress rule

def test_progress_lines_every_step_or_every_few_seconds_and_resume_baseline() -> None:
    now = [0.0]
    lines: list[str] = []
    p = FileProgress("w.pt", 100 * MiB, lines.append, resumed=30 * MiB, clock=lambda: now[0])
    p.add(30 * MiB)                       # the client first reports what was already on disk: no line
    assert lines == []
    for _ in range(4):                    # slow: 1 MiB per 5 s -> a line every 15 s even within a 10% step
        now[0] += 5
        p.add(MiB)
    assert lines == ["w.pt: 33% (33.0 MB of 100.0 MB, 0.2 MB/s)"]
    now[0] += 1
    p.add(7 * MiB)                        # crosses 40%: a line; the speed ignores the resumed 30 MiB
    assert lines[-1] == "w.pt: 41% (41.0 MB of 100.0 MB, 0.5 MB/s)"
    p.add(59 * MiB)
    assert lines[-1].startswith("w.pt: 100% (100.0 MB of 100.0 MB") and len(lines) == 3

    small: list[str] = []
    q = FileProgress("configuration.json", 2000, small.append)
    q.add(2000)
    assert small == []
