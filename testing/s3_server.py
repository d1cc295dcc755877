"""A real S3-compatible server (moto in server mode) on 127.0.0.1, started by the tests.

    s3 = start_s3_server(workdir)          # or the session fixture `s3_server`
    s3.endpoint                            # "http://127.0.0.1:<free port>": Label Studio's `s3_endpoint`
    s3.client()                            # boto3 S3 client on it (any key pair: moto checks no signatures)
    s3.put_images(bucket, {key: bytes})    # creates the bucket if needed
    s3.requests()                          # every request the server received (method, url, headers)
    s3.stop()

The server records each request (moto's recorder, MOTO_ENABLE_RECORDING) into a file of its own, so a test can
check what a client sent to the storage host: e.g. that the backend fetches presigned URLs without the Label
Studio token, or never talks to the storage at all when Label Studio proxies the bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from testing.ports import free_port
from testing.processes import stop_process

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    log_path: Path
    recording: Path

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)

    def put_images(self, bucket: str, objects: dict[str, bytes]) -> None:
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/jpeg")

    def requests(self) -> list[dict]:
        """Requests received so far: {"method", "url" (path + query), "headers"}, oldest first."""
        if not self.recording.exists():
            return []
        return [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


def start_s3_server(workdir: Path, timeout: float = 60.0) -> S3Server:
    """moto's S3 server on a free loopback port, recording requests under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    recording = workdir / "requests.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env.update({"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording),
                "PYTHONUNBUFFERED": "1"})
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{port}", proc, log_path, recording)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if requests.get(f"{server.endpoint}/moto-api/", timeout=2).status_code < 500:
                return server
        except requests.RequestException:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"moto server not up on {server.endpoint} after {timeout} s:\n{server.log_text()[-3000:]}")
