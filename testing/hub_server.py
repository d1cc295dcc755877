"""A local ModelScope hub: the subset of the hub's HTTP API that `snapshot_download` (modelscope 1.40 /
modelscope-hub 0.5) uses, serving model folders from disk, so the real hub client runs against it in tests.

Endpoints (all under the endpoint given to the client with MODELSCOPE_ENDPOINT):
  GET  /api/v1/models/<owner>/<name>                                   model info
  GET  /api/v1/models/<owner>/<name>/revisions                         tags (the served revisions)
  GET  /api/v1/models/<owner>/<name>/repo/files?Revision=&Recursive=   file list with Size and Sha256
  GET  /api/v1/models/<owner>/<name>/repo?Revision=&FilePath=          file bytes; honours `Range: bytes=a-[b]`
  HEAD /                                                               any answer (reachability check)
Anything unknown (model id, revision, file) gets the hub's error shape: HTTP 404 with
{"Code", "Message", "RequestId", "Success": false}. The client's region probe
(/api/v1/repos/internalAccelerationInfo) gets a 404 too, as off Alibaba Cloud.

Test controls (not part of the hub API), under /__hub__/:
  GET  stats   -> {"requests": [{"method", "kind", "model", "revision", "file", "range", "sent", "cut"}...]}
  POST reset   -> forget the recorded requests
  POST faults  -> JSON {"cut_after": bytes|null, "cut_file": path|null, "rate": bytes_per_s|null, "hold": bool}:
                  cut the next download (of `cut_file` when given) after that many body bytes, once; serve
                  file bodies at that rate; or hold file downloads (they wait, counted as started) until
                  `hold` is set false again.

Run it as a process (what the tests and the download benchmark do, through HubServer):
    python -m testing.hub_server --port 8765 --repo damo/model@v1.0.1=/path/to/folder [--repo ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .ports import free_port

ROOT = Path(__file__).resolve().parents[1]
_MODEL_PATH = re.compile(r"^/api/v1/models/([^/]+)/([^/]+)(/revisions|/repo/files|/repo)?/?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_BLOCK = 64 * 1024
_NOT_FOUND_CODE = 10010205001   # the hub's business code for "record not found"


@dataclass(frozen=True)
class ServedFile:
    path: str          # repo-relative, POSIX
    disk: Path
    size: int
    sha256: str


@dataclass
class Repo:
    model_id: str
    revisions: dict[str, list[ServedFile]] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan_folder(folder: Path) -> list[ServedFile]:
    """The files a revision serves: every regular file under `folder` (hidden ones excluded)."""
    files = []
    for disk in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = disk.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        files.append(ServedFile(rel, disk, disk.stat().st_size, _sha256(disk)))
    return files


class HubState:
    """What the server serves, what it saw, and the faults it injects; shared by the handler threads."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.cut_after: int | None = None
        self.cut_file: str | None = None
        self.rate: float | None = None
        self.released = threading.Event()
        self.released.set()

    def record(self, entry: dict) -> dict:
        with self.lock:
            self.requests.append(entry)
        return entry

    def take_cut(self, path: str) -> int | None:
        with self.lock:
            if self.cut_file not in (None, path):
                return None
            cut, self.cut_after = self.cut_after, None
            return cut


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive, as the client's session expects; every answer has a length
    server_version = "LocalModelScopeHub/1"
    state: HubState                   # set on the subclass made by make_server

    def log_message(self, format: str, *args) -> None:   # noqa: A002 - quiet: the tests read /__hub__/stats
        pass

    # ---------------------------------------------------------------- plumbing
    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-ID", uuid.uuid4().hex)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _ok(self, data: object) -> None:
        self._json(200, {"Code": 200, "Data": data, "Message": "success", "RequestId": uuid.uuid4().hex,
                         "Success": True})

    def _not_found(self, message: str) -> None:
        self._json(404, {"Code": _NOT_FOUND_CODE, "Message": message, "RequestId": uuid.uuid4().hex,
                         "Success": False})

    def _entry(self, kind: str, model: str | None = None, revision: str | None = None,
               file: str | None = None) -> dict:
        return self.state.record({"method": self.command, "kind": kind, "model": model, "revision": revision,
                                  "file": file, "range": self.headers.get("Range"), "sent": 0, "cut": False,
                                  "path": self.path})

    # ---------------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self._entry("head")
        self._json(404, {"Code": 404, "Message": "not found", "Success": False})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        st = self.state
        if url.path == "/__hub__/reset":
            with st.lock:
                st.requests.clear()
            return self._json(200, {"ok": True})
        if url.path == "/__hub__/faults":
            with st.lock:
                if "cut_after" in body:
                    st.cut_after = body["cut_after"]
                    st.cut_file = body.get("cut_file")
                if "rate" in body:
                    st.rate = body["rate"]
            if "hold" in body:
                (st.released.clear if body["hold"] else st.released.set)()
            return self._json(200, {"ok": True})
        self._entry("other")
        self._not_found(f"no such endpoint: POST {url.path}")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/__hub__/stats":
            with self.state.lock:
                return self._json(200, {"requests": list(self.state.requests)})
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        match = _MODEL_PATH.match(url.path)
        if not match:
            self._entry("other")
            return self._not_found(f"no such endpoint: GET {url.path}")
        model_id = f"{unquote(match.group(1))}/{unquote(match.group(2))}"
        what = match.group(3) or ""
        revision = query.get("Revision")
        kind = {"": "info", "/revisions": "revisions", "/repo/files": "files", "/repo": "download"}[what]
        entry = self._entry(kind, model_id, revision, query.get("FilePath"))
        repo = self.state.repos.get(model_id)
        if repo is None:
            return self._not_found(f"model {model_id} does not exist")
        if kind == "info":
            owner, name = model_id.split("/", 1)
            return self._ok({"Id": 1, "Name": name, "Path": owner, "ModelType": ["cv"], "Revision": "master",
                             "Visibility": 5})
        if kind == "revisions":
            tags = [{"Revision": r, "CreatedAt": 1700000000 + i, "CommitMessage": r}
                    for i, r in enumerate(repo.revisions)]
            return self._ok({"RevisionMap": {"Branches": [], "Tags": tags}})
        files = repo.revisions.get(revision or "master")
        if files is None:
            return self._not_found(f"revision {revision} of model {model_id} does not exist")
        if kind == "files":
            return self._ok({"Files": [{"Name": f.path.rsplit("/", 1)[-1], "Path": f.path, "Type": "blob",
                                        "Size": f.size, "Sha256": f.sha256, "Revision": revision,
                                        "IsLFS": f.size > (1 << 20), "CommittedDate": 1700000000}
                                       for f in files], "LatestCommitter": None})
        served = next((f for f in files if f.path == query.get("FilePath")), None)
        if served is None:
            return self._not_found(f"file {query.get('FilePath')} does not exist in {model_id}@{revision}")
        self._send_file(served, entry)

    def _send_file(self, served: ServedFile, entry: dict) -> None:
        st = self.state
        st.released.wait(timeout=300)
        start, end = 0, served.size - 1
        ranged = self.headers.get("Range")
        status = 200
        if ranged:
            m = _RANGE.match(ranged.strip())
            if not m:
                return self._json(400, {"Code": 400, "Message": f"bad Range {ranged}", "Success": False})
            start = int(m.group(1))
            end = min(int(m.group(2)), served.size - 1) if m.group(2) else served.size - 1
            if start >= served.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{served.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{served.size}")
        self.end_headers()
        cut = st.take_cut(served.path)
        budget = length if cut is None else min(cut, length)
        began = time.monotonic()
        with open(served.disk, "rb") as f:
            f.seek(start)
            while entry["sent"] < budget:
                block = f.read(min(_BLOCK, budget - entry["sent"]))
                if not block:
                    break
                self.wfile.write(block)
                entry["sent"] += len(block)
                rate = st.rate
                if rate:
                    ahead = entry["sent"] / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        if budget < length:
            # Mid-file disconnect: the client got the headers for `length` bytes and sees the body end early.
            entry["cut"] = True
            self.wfile.flush()
            self.close_connection = True


def make_server(repos: dict[str, Repo], host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    state = HubState(repos)
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def parse_repo_arg(text: str) -> tuple[str, str, Path]:
    """`owner/name@revision=folder` -> (model id, revision, folder)."""
    spec, sep, folder = text.partition("=")
    model_id, at, revision = spec.partition("@")
    if not sep or not at or model_id.count("/") != 1:
        raise argparse.ArgumentTypeError(f"--repo wants owner/name@revision=folder, got {text!r}")
    return model_id, revision, Path(folder)


def build_repos(specs: list[tuple[str, str, Path]]) -> dict[str, Repo]:
    repos: dict[str, Repo] = {}
    for model_id, revision, folder in specs:
        repos.setdefault(model_id, Repo(model_id)).revisions[revision] = scan_folder(folder)
    return repos


class HubServer:
    """The local hub as a real process on 127.0.0.1 (a free port), with the test controls as methods.

        with HubServer({"damo/m2fp": {"v1.0.1": folder}}) as hub:
            env["MODELSCOPE_ENDPOINT"] = hub.endpoint
            ... hub.downloads("pytorch_model.pt")
    """

    def __init__(self, repos: dict[str, dict[str, Path]], start_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "testing.hub_server", "--port", str(self.port)]
        for model_id, revisions in repos.items():
            for revision, folder in revisions.items():
                args += ["--repo", f"{model_id}@{revision}={folder}"]
        self._proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + start_timeout       # hashing a 250 MB file takes a moment
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"hub server exited: {self._proc.stderr.read().decode()[-2000:]}")
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"hub server did not answer on {self.endpoint} in {start_timeout} s")
                time.sleep(0.1)

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> list[dict]:
        return self._call("/__hub__/stats")["requests"]

    def reset(self) -> None:
        self._call("/__hub__/reset", {})

    def faults(self, *, cut_after: int | None = None, cut_file: str | None = None, rate: float | None = None,
               hold: bool = False) -> None:
        """Set all faults at once (the defaults clear them): cut the next download (of `cut_file`), slow, hold."""
        self._call("/__hub__/faults", {"cut_after": cut_after, "cut_file": cut_file, "rate": rate, "hold": hold})

    def downloads(self, file: str | None = None) -> list[dict]:
        """The file download requests seen (of one file when given), in order."""
        return [r for r in self.stats() if r["kind"] == "download" and (file is None or r["file"] == file)]

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--repo", type=parse_repo_arg, action="append", required=True,
                    help="owner/name@revision=folder (repeat for more models or revisions)")
    args = ap.parse_args(argv)
    server = make_server(build_repos(args.repo), args.host, args.port)
    print(f"local ModelScope hub on http://{args.host}:{server.server_address[1]} (pid {os.getpid()})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
