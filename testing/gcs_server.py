"""A real GCS-compatible server (gcp-storage-emulator, in memory) on 127.0.0.1, started by the tests.

    gcs = start_gcs_server(workdir)           # or the session fixture `gcs_server`
    gcs.endpoint                              # "http://127.0.0.1:<port>": STORAGE_EMULATOR_HOST for clients
    gcs.put_images(bucket, {name: bytes})     # creates the bucket if needed (JSON API, plain HTTP)
    gcs.label_studio_env()                    # what a Label Studio needs to use it (start_label_studio extra_env)
    gcs.stop()

google-cloud-storage clients (Label Studio's GCS storage among them) talk to it, anonymously, when their process
has STORAGE_EMULATOR_HOST set. Label Studio's proxy mode downloads from a URL of its own setting
(RESOLVER_PROXY_GCS_DOWNLOAD_URL, storage.googleapis.com by default), so a Label Studio meant to use the emulator
is started with both (`label_studio_env()`). Anonymous credentials cannot sign URLs and the emulator issues no
OAuth tokens, so such a Label Studio serves GCS objects with presigning off only (it proxies the bytes); with
presigning on it answers 404 (it could not presign).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

from testing.ports import free_port
from testing.processes import stop_process


@dataclass
class GcsServer:
    endpoint: str
    proc: subprocess.Popen
    log_path: Path

    def label_studio_env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint,
                "RESOLVER_PROXY_GCS_DOWNLOAD_URL":
                    self.endpoint + "/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media"}

    def put_images(self, bucket: str, objects: dict[str, bytes]) -> None:
        known = requests.get(f"{self.endpoint}/storage/v1/b/{bucket}", timeout=10)
        if known.status_code == 404:
            requests.post(f"{self.endpoint}/storage/v1/b?project=test", json={"name": bucket},
                          timeout=10).raise_for_status()
        for name, data in objects.items():
            requests.post(f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name)}",
                          data=data, headers={"Content-Type": "image/jpeg"}, timeout=30).raise_for_status()

    def delete(self, bucket: str, name: str) -> None:
        requests.delete(f"{self.endpoint}/storage/v1/b/{bucket}/o/{quote(name, safe='')}",
                        timeout=10).raise_for_status()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


def start_gcs_server(workdir: Path, timeout: float = 60.0) -> GcsServer:
    """gcp-storage-emulator on a free loopback port, objects kept in memory."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = workdir / "gcs-emulator.log"
    cli = Path(sys.executable).with_name("gcp-storage-emulator")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(cli), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = GcsServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if requests.get(f"{server.endpoint}/storage/v1/b?project=test", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"gcp-storage-emulator not up on {server.endpoint} after {timeout} s:\n"
                       f"{server.log_text()[-3000:]}")
