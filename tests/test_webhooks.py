"""Whole projects without waiting (issue 11), against a REAL Label Studio, a real Redis and two real RQ workers:

- import 20 tasks into a project connected to the backend: Label Studio's TASKS_CREATED webhook queues them and
  every task gets exactly one prediction, with no retrieve; the same event again queues nothing;
- "Retrieve predictions" on 50 tasks returns at once (cached tasks answered in the request, the rest queued and
  answered []), a worker SIGKILLed mid-run loses nothing, and all 50 end with exactly one prediction;
- the status endpoint's counts match Label Studio's, and `m2fp-prelabel status` says the same;
- project mode's --skip-annotated leaves annotated tasks alone and --force replaces the current version's
  prediction (still exactly one).

The model reads images at a small network input (testing/small_model.py) and tasks share a few distinct images,
so the 2-core machine spends its time on the plumbing under test. Redis database 9 (queue, cache, progress).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from redis import Redis
from rq.registry import StartedJobRegistry

from backend.batch import tracking
from backend.batch.jobs import fetch_job
from backend.offload import project_id_of
from testing.label_studio import connect_ml_backend, create_project, import_uploads, retrieve_predictions
from testing.random_model import make_sample_image
from testing.small_model import small_input_model
from testing.workers import QUEUE, WorkerProcess, base_env

ROOT = Path(__file__).resolve().parents[1]
REDIS_DB = 9
INLINE_MAX = 4
LS_DEFAULT_PREDICT_TIMEOUT_S = 100  # Label Studio's ML_TIMEOUT_PREDICT default (the test server's is raised)
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="parts" toName="image">
    <Label value="Hair"/><Label value="Face"/><Label value="UpperClothes"/><Label value="Pants"/>
  </PolygonLabels>
</View>"""


def _images(folder: Path, seeds: list[int], copies: int, prefix: str) -> list[Path]:
    """`copies` files per seed, each under its own name (so its own upload URL), same bytes per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        data_path = folder / f"{prefix}-seed{seed}.jpg"
        make_sample_image(160, 120, seed=seed).save(data_path, quality=90)
        for copy in range(copies):
            path = folder / f"{prefix}-{seed}-{copy}.jpg"
            path.write_bytes(data_path.read_bytes())
            paths.append(path)
    return paths


class Stack:
    def __init__(self, backend, workers: list[WorkerProcess], connection: Redis, url: str, env: dict,
                 log_dir: Path) -> None:
        self.backend = backend
        self.workers = workers
        self.connection = connection
        self.url = url
        self.env = env
        self.log_dir = log_dir

    def status(self, project_id: int) -> dict:
        response = requests.get(f"{self.backend.url}/projects/{project_id}/status", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_settled(self, project_id: int, total: int, timeout: float = 400) -> dict:
        """Poll the status endpoint until `total` tasks are tracked and none is queued or running."""
        deadline = time.monotonic() + timeout
        status = {}
        while time.monotonic() < deadline:
            status = self.status(project_id)
            if status["total"] >= total and status["pending"] == 0:
                return status
            time.sleep(1)
        logs = "\n".join(w.log() for w in self.workers)
        raise AssertionError(f"project {project_id} not settled after {timeout} s: {status}\n{logs}")


@pytest.fixture(scope="module")
def stack(label_studio, redis_server, backend_server, tmp_path_factory):
    model = small_input_model()
    url = redis_server.url_for(REDIS_DB)
    connection = Redis.from_url(url)
    connection.flushdb()
    ls_env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    backend = backend_server(env={"M2FP_MODEL": str(model), "REDIS_URL": url, "RQ_QUEUE": QUEUE,
                                  "PREDICT_INLINE_MAX_TASKS": str(INLINE_MAX), "BATCH_RETRIES": "2", **ls_env})
    env = {**base_env(model, cache_url=url), **ls_env}
    log_dir = tmp_path_factory.mktemp("webhook-workers")
    workers = [WorkerProcess(f"wh{i}-{os.getpid()}", url, env, log_dir) for i in range(2)]
    try:
        for worker in workers:
            worker.wait_ready(connection)
        yield Stack(backend, workers, connection, url, env, log_dir)
    finally:
        for worker in workers:
            worker.stop()
        backend.stop()


def _predictions(label_studio, project_id: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for task in label_studio.client.tasks.list(project=project_id):
        out[task.id] = label_studio.api("GET", f"/api/predictions/?task={task.id}").json()
    return out


def _version(stack: Stack) -> str:
    return requests.get(stack.backend.url + "/health", timeout=10).json()["model_version"]


def _assert_counts_match_label_studio(status: dict, label_studio, project_id: int, tasks: int) -> None:
    project = label_studio.api("GET", f"/api/projects/{project_id}/").json()
    assert status["label_studio"] == {"tasks": project["task_number"],
                                      "predictions": project["total_predictions_number"]}
    assert status["done"] == status["total"] == project["task_number"] == tasks
    assert status["failed"] == 0 and status["pending"] == 0, status
    assert project["total_predictions_number"] == tasks


# ---------------------------------------------------------------- pure parts

def test_project_ids_as_label_studio_sends_them() -> None:
    assert project_id_of({"id": 12, "title": "x"}) == 12
    assert project_id_of("12.1795300910") == 12
    assert project_id_of(7) == 7
    assert project_id_of(None) is None and project_id_of({"title": "no id"}) is None


def test_status_counts_rate_and_eta_from_records() -> None:
    now = 10_000.0
    rec = tracking.TaskRecord
    records = {
        1: rec(tracking.POSTED, "v1", "j1", "import", "", now - 100, now - 50),
        2: rec(tracking.ANSWERED, "v1", "", "predict", "", now - 100, now - 40),
        3: rec(tracking.ERROR, "v1", "j3", "import", "not_found: HTTP 404 for /data/upload/x.jpg", now - 100,
               now - 30),
        4: rec(tracking.QUEUED, "v1", "j4", "import", "", now - 100, now - 100),
        5: rec(tracking.RUNNING, "v1", "j5", "import", "", now - 100, now - 10),
        6: rec(tracking.POSTED, "v0", "j6", "cli", "", now - 100, now - 50),   # another model version
    }
    status = tracking.summarize(7, "v1", records, now)
    assert (status.total, status.queued, status.running, status.done, status.failed) == (5, 1, 1, 2, 1)
    assert (status.posted, status.answered) == (1, 1)
    assert status.failure_reasons == {"not_found": 1}
    assert status.failures == [{"task": 3, "reason": "not_found: HTTP 404 for /data/upload/x.jpg"}]
    # 3 tasks finished in the 100 s since the oldest was queued; 2 still pending.
    assert status.rate_per_hour == pytest.approx(3 / 100 * 3600, abs=0.1)
    assert status.eta_s == pytest.approx(2 / (3 / 100), abs=0.1)
    assert tracking.TaskRecord.from_json(records[3].to_json()) == records[3]
    assert tracking.TaskRecord.from_json(b"not json") is None


# ---------------------------------------------------------------- against Label Studio

def test_import_prelabels_every_task_once_without_a_retrieve(stack: Stack, label_studio, tmp_path: Path) -> None:
    project_id = create_project(label_studio, CONFIG)
    connect_ml_backend(label_studio, project_id, stack.backend.url)   # LS adds the /webhook hook here
    paths = _images(tmp_path / "imgs", seeds=[0, 1, 2, 3], copies=5, prefix="imp")
    task_ids = import_uploads(label_studio, project_id, paths)
    assert len(task_ids) == 20

    status = stack.wait_settled(project_id, total=20)
    version = _version(stack)
    predictions = _predictions(label_studio, project_id)
    assert sorted(predictions) == task_ids
    for task_id, preds in predictions.items():
        assert len(preds) == 1, (task_id, preds)
        assert preds[0]["model_version"] == version
        assert preds[0]["result"] and {r["from_name"] for r in preds[0]["result"]} == {"parts"}
    assert status["by_source"] == {"import": 20} and status["posted"] == 20
    _assert_counts_match_label_studio(status, label_studio, project_id, 20)
    # No retrieve: Label Studio never asked /predict for this project.
    assert f"/predict project={project_id}." not in stack.backend.log_text()

    # The same event again (a retried delivery): every task attaches to its finished job, nothing is posted.
    project = label_studio.api("GET", f"/api/projects/{project_id}/").json()
    tasks = [{"id": t.id, "data": t.data} for t in label_studio.client.tasks.list(project=project_id)][:5]
    answer = requests.post(stack.backend.url + "/webhook", timeout=30,
                           json={"action": "TASKS_CREATED", "project": project, "tasks": tasks})
    assert answer.status_code == 200 and answer.json()["queued"] == 0 and answer.json()["attached"] == 5
    assert {tid: len(p) for tid, p in _predictions(label_studio, project_id).items()} == {t: 1 for t in task_ids}
    # Other actions stay acknowledged and ignored.
    other = requests.post(stack.backend.url + "/webhook", json={"action": "ANNOTATION_CREATED"}, timeout=30)
    assert other.status_code == 200 and other.json()["status"] == "ignored"


def test_retrieve_of_50_tasks_returns_at_once_and_a_killed_worker_loses_nothing(
        stack: Stack, label_studio, tmp_path: Path) -> None:
    project_id = create_project(label_studio, CONFIG)
    # Imported BEFORE connecting the model: no webhook yet, so only the retrieve brings predictions.
    paths = _images(tmp_path / "imgs", seeds=[10, 11, 12, 13, 14, 15], copies=9, prefix="ret")[:50]
    task_ids = import_uploads(label_studio, project_id, paths)
    assert len(task_ids) == 50
    connect_ml_backend(label_studio, project_id, stack.backend.url)

    # Three tasks retrieved first (few enough to be predicted in the request), then their predictions deleted:
    # the big retrieve must answer those three from the cache, without fetching their images.
    retrieve_predictions(label_studio, project_id, task_ids[:3])
    for task_id in task_ids[:3]:
        (prediction,) = label_studio.api("GET", f"/api/predictions/?task={task_id}").json()
        label_studio.api("DELETE", f"/api/predictions/{prediction['id']}/")
    assert stack.status(project_id)["answered"] == 3

    started = time.monotonic()
    retrieve_predictions(label_studio, project_id)
    took = time.monotonic() - started
    status = stack.status(project_id)
    assert took < LS_DEFAULT_PREDICT_TIMEOUT_S, took
    assert status["answered"] == 3 and status["by_source"] == {"predict": 50}, status
    # Label Studio stored what /predict answered: the 3 cached tasks; the other 47 were queued, answered [].
    stored_at_once = label_studio.api("GET", f"/api/projects/{project_id}/").json()["total_predictions_number"]
    assert 3 <= stored_at_once < 50

    # A worker SIGKILLed in the middle of a parse (a job of the fresh images: seconds of inference).
    registry = StartedJobRegistry(QUEUE, connection=stack.connection)
    victim_job = victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        if stack.connection.keys("m2fp:parsing:*:lock"):
            for job_id in registry.get_job_ids():
                name = fetch_job(job_id, stack.connection).worker_name
                victim = next((w for w in stack.workers if w.name == name), None)
                if victim is not None:
                    victim_job = job_id
                    break
        time.sleep(0.05)
    assert victim is not None, "no worker was caught parsing"
    victim.kill()

    status = stack.wait_settled(project_id, total=50)
    predictions = _predictions(label_studio, project_id)
    assert {tid: len(p) for tid, p in predictions.items()} == {t: 1 for t in task_ids}
    assert {p[0]["model_version"] for p in predictions.values()} == {_version(stack)}
    job = fetch_job(victim_job, stack.connection)
    assert job.get_status() == "finished"
    assert victim.name not in {r.worker_name for r in job.results()}   # finished by the survivor
    assert status["posted"] + status["already_predicted"] == 47
    _assert_counts_match_label_studio(status, label_studio, project_id, 50)

    # The CLI reads the same progress from Redis.
    cli = subprocess.run([sys.executable, "-m", "backend.batch.cli", "status", str(project_id), "--redis-url",
                          stack.url, "--json"], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)
    for key in ("total", "queued", "running", "done", "failed", "posted", "answered"):
        assert from_cli[key] == status[key], key


def test_project_mode_skip_annotated_and_force(stack: Stack, label_studio, tmp_path: Path) -> None:
    project_id = create_project(label_studio, CONFIG)
    task_ids = import_uploads(label_studio, project_id, _images(tmp_path / "imgs", [0], 3, prefix="cli"))
    annotated = task_ids[0]
    label_studio.api("POST", f"/api/tasks/{annotated}/annotations/", json={"result": [], "was_cancelled": False})
    base = ["project", str(project_id), "--ls-url", label_studio.url, "--api-key", label_studio.token, "--local"]

    def run(*extra: str) -> dict:
        summary = tmp_path / "summary.json"
        proc = subprocess.run([sys.executable, "-m", "backend.batch.cli", *base, *extra, "--summary-json",
                               str(summary)], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(summary.read_text())

    summary = run("--skip-annotated")
    assert summary["total"] == 2 and summary["annotated_skipped"] == 1, summary
    first = _predictions(label_studio, project_id)
    assert first[annotated] == [] and all(len(first[t]) == 1 for t in task_ids[1:])

    summary = run("--skip-annotated", "--force")
    assert summary["total"] == 2 and summary["done"] + summary["cached"] == 2, summary
    second = _predictions(label_studio, project_id)
    assert second[annotated] == []
    for task_id in task_ids[1:]:
        (old,), (new,) = first[task_id], second[task_id]
        assert new["id"] != old["id"] and new["model_version"] == old["model_version"]


def test_a_big_import_is_handed_whole_to_one_job_that_queues_every_task(redis_server, parser) -> None:
    """Label Studio sends up to 5000 tasks per TASKS_CREATED and waits 1 s: past FANOUT_ABOVE the webhook queues
    one job, and that job (run here as a worker runs it) queues the per-task jobs, with their progress records."""
    from backend.batch.jobs import queue_for
    from backend.offload import FANOUT_ABOVE, Offload
    from backend.runtime import build_runtime
    from backend.settings import Settings

    url = redis_server.url_for(10)
    connection = Redis.from_url(url)
    connection.flushdb()
    settings = Settings(redis_url=url, rq_queue="m2fp-fanout-test", label_studio_url="http://ls.invalid")
    runtime = build_runtime(parser, settings)
    offload = Offload(settings, lambda: runtime)
    tasks = [{"id": i, "data": {"image": f"/data/upload/77/{i}.jpg"}} for i in range(1, FANOUT_ABOVE + 2)]
    event = {"action": "TASKS_CREATED", "project": {"id": 77, "label_config": CONFIG}, "tasks": tasks}

    answer, code = offload.webhook(event)
    assert code == 200 and answer["queued"] == len(tasks), answer
    queue = queue_for(connection, "m2fp-fanout-test")
    assert queue.job_ids == [answer["fanout_job"]]
    assert fetch_job(answer["fanout_job"], connection).perform() == {"queued": len(tasks), "attached": 0}
    assert len(queue) == 1 + len(tasks)
    status = tracking.project_status(connection, 77, runtime.version)
    assert (status.total, status.queued, status.by_source) == (len(tasks), len(tasks), {"import": len(tasks)})

    # The same event again: nothing new is queued, neither a second fan-out nor any task twice.
    again, _ = offload.webhook(event)
    assert again["fanout_job"] == answer["fanout_job"] and again["attached"] == len(tasks), again
    assert len(queue) == 1 + len(tasks)
    # And should the fan-out job run twice (retried after its worker died), every task attaches to its job.
    assert fetch_job(answer["fanout_job"], connection).perform() == {"queued": 0, "attached": len(tasks)}
    assert len(queue) == 1 + len(tasks)
