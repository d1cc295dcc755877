"""Project mode of `m2fp-prelabel` against a REAL Label Studio: predictions created through LS's API, resume
without duplicates, the same through RQ workers (with a race on one task), a bad task failing alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from redis import Redis
from rq.job import JobStatus

from backend.batch import jobs, project
from testing.label_studio import create_project, import_tasks, import_uploads
from testing.workers import WorkerProcess, base_env, db_url

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "m2fp-test"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="parts" toName="image">
    <Label value="Hair"/><Label value="Face"/><Label value="UpperClothes"/><Label value="Pants"/>
    <Label value="Left-arm"/><Label value="Right-arm"/><Label value="Left-leg"/><Label value="Right-leg"/>
  </PolygonLabels>
</View>"""


# ---------------------------------------------------------------- pure parts

def test_model_versions_listed_by_label_studio_are_split_exactly() -> None:
    assert project._split_versions("m2fp@v1.0.1, other@abc") == {"m2fp@v1.0.1", "other@abc"}
    assert project._split_versions("") == set()
    assert project._split_versions(["a", None, "b"]) == {"a", "b"}
    # Missing or truncated at LS's 500 characters: cannot be trusted, the caller asks per task.
    assert project._split_versions(None) is None
    assert project._split_versions("x" * 500) is None


def test_lock_key_is_per_server_project_task_and_version() -> None:
    run = project.ProjectRun(3, "<View/>", "m@1", "http://ls:8080")
    keys = {project.lock_key(run, 7), project.lock_key(run, 8),
            project.lock_key(project.ProjectRun(3, "<View/>", "m@2", "http://ls:8080"), 7),
            project.lock_key(project.ProjectRun(4, "<View/>", "m@1", "http://ls:8080"), 7)}
    assert len(keys) == 4


# ---------------------------------------------------------------- against Label Studio

def _make_project(label_studio, sample_images: list[Path], extra_tasks: list[dict] | None = None) -> int:
    project_id = create_project(label_studio, CONFIG)
    import_uploads(label_studio, project_id, sample_images)
    if extra_tasks:
        import_tasks(label_studio, project_id, extra_tasks)
    return project_id


def _predictions_by_task(client, project_id: int) -> dict[int, list]:
    out: dict[int, list] = {}
    for task in client.tasks.list(project=project_id):
        out[task.id] = list(client.predictions.list(task=task.id))
    return out


def _ids(predictions: dict[int, list]) -> dict[int, list[tuple[int, str]]]:
    """What must not change between runs: which predictions exist (LS's `created_ago` text moves with the clock)."""
    return {tid: sorted((p.id, str(p.model_version)) for p in preds) for tid, preds in predictions.items()}


def _cli(args: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.batch.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _env(model_dir: Path, label_studio, cache_url: str = "") -> dict[str, str]:
    env = base_env(model_dir, cache_url=cache_url)
    env.update({"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})
    return env


def test_project_local_mode_creates_missing_predictions_and_resumes_without_duplicates(
        tmp_path: Path, label_studio, model_dir: Path, parser, sample_images: list[Path], redis_server) -> None:
    client = label_studio.client
    project_id = _make_project(label_studio, sample_images[:2])
    task_ids = sorted(t.id for t in client.tasks.list(project=project_id))
    assert len(task_ids) == 2
    # Task 0 already has our version (must be left alone); task 1 has another model's (must get ours too).
    client.predictions.create(task=task_ids[0], result=[], score=0.5, model_version=parser.version)
    client.predictions.create(task=task_ids[1], result=[], score=0.5, model_version="some-other-model@1")

    # Third task added after the setup: only tasks 1 and 2 lack our version.
    import_uploads(label_studio, project_id, sample_images[2:3])
    task_ids = sorted(t.id for t in client.tasks.list(project=project_id))
    # The shared parsing cache (warm when the folder tests ran first) and, with it, the posting lock.
    env = _env(model_dir, label_studio, cache_url=redis_server.url)
    summary_path = tmp_path / "summary.json"
    args = ["project", str(project_id), "--ls-url", label_studio.url, "--api-key", label_studio.token, "--local",
            "--summary-json", str(summary_path)]
    proc = _cli(args, env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["total"] == 2 and summary["done"] + summary["cached"] == 2 and summary["already_done"] == 1, summary

    predictions = _predictions_by_task(client, project_id)
    ours = {tid: [p for p in preds if p.model_version == parser.version] for tid, preds in predictions.items()}
    assert all(len(ours[tid]) == 1 for tid in task_ids), ours
    assert ours[task_ids[0]][0].result == []                 # the pre-existing one, untouched
    for tid in task_ids[1:]:
        regions = ours[tid][0].result
        assert regions and {r["from_name"] for r in regions} == {"parts"}
        assert all(r["type"] == "polygonlabels" and 0 <= r["score"] <= 1 for r in regions)
    assert len(predictions[task_ids[1]]) == 2                # the other model's prediction stays

    # Resume: nothing left to do, nothing created.
    again = _cli(args, env)
    assert again.returncode == 0, again.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["total"] == 0 and summary["already_done"] == 3
    assert _ids(_predictions_by_task(client, project_id)) == _ids(predictions)


def test_project_through_two_workers_posts_each_task_once_and_a_bad_task_fails_alone(
        tmp_path: Path, label_studio, model_dir: Path, parser, sample_images: list[Path], redis_server) -> None:
    client = label_studio.client
    url = db_url(redis_server, 5)
    connection = Redis.from_url(url)
    connection.flushdb()
    missing = {"image": f"{label_studio.url}/data/upload/999999/does-not-exist.jpg"}
    project_id = _make_project(label_studio, sample_images, extra_tasks=[missing])
    tasks = list(client.tasks.list(project=project_id))
    bad_id = next(t.id for t in tasks if "does-not-exist" in t.data["image"])
    good_ids = sorted(t.id for t in tasks if t.id != bad_id)

    # A race: one task enqueued twice under different job ids (as two CLI runs on two machines would).
    run = project.ProjectRun(project_id, CONFIG, parser.version, label_studio.url)
    first = next(t for t in tasks if t.id == good_ids[0])
    jobs.queue_for(connection, QUEUE).enqueue(
        jobs.project_task_job, {"id": first.id, "data": first.data},
        {"project_id": run.project_id, "label_config": run.label_config, "model_version": run.model_version,
         "ls_url": run.ls_url}, job_id="m2fp-duplicate-of-first-task", job_timeout=300)

    # Queue and registries in their own database; parsings from the session's shared cache (warm when the
    # folder tests ran first): this test is about posting, the workers test about parsing.
    env = _env(model_dir, label_studio, cache_url=redis_server.url)
    workers = [WorkerProcess(f"pw{i}-{os.getpid()}", url, env, tmp_path) for i in range(2)]
    summary_path = tmp_path / "summary.json"
    args = ["project", str(project_id), "--ls-url", label_studio.url, "--api-key", label_studio.token,
            "--enqueue", "--redis-url", url, "--queue", QUEUE, "--model-version", parser.version,
            "--summary-json", str(summary_path)]
    try:
        for w in workers:
            w.wait_ready(connection)
        proc = _cli(args, env)
        assert proc.returncode == 1, proc.stderr
        summary = json.loads(summary_path.read_text())
        assert summary["failed"] == 1 and summary["failures"][0]["item"] == f"task {bad_id}", summary
        # LS answers 500 (not 404) for a missing upload; either way the reason names the error and the URL.
        reason = summary["failures"][0]["reason"]
        assert reason.split(":")[0] in ("fetch", "not_found") and "does-not-exist.jpg" in reason, reason
        # Every good task has exactly one prediction of our version, the duplicate job included.
        duplicate = jobs.fetch_job("m2fp-duplicate-of-first-task", connection)
        deadline = time.monotonic() + 120
        while duplicate.get_status() not in (JobStatus.FINISHED, JobStatus.FAILED) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert duplicate.get_status() == JobStatus.FINISHED
        predictions = _predictions_by_task(client, project_id)
        counts = {tid: sum(p.model_version == parser.version for p in predictions[tid]) for tid in predictions}
        assert counts == {**{tid: 1 for tid in good_ids}, bad_id: 0}, counts

        # Re-run: only the bad task is tried again (and fails again); no duplicates anywhere.
        again = _cli(args, env)
        assert again.returncode == 1, again.stderr
        summary = json.loads(summary_path.read_text())
        assert summary["total"] == 1 and summary["already_done"] == len(good_ids) and summary["failed"] == 1
        assert _ids(_predictions_by_task(client, project_id)) == _ids(predictions)
    finally:
        for w in workers:
            w.stop()


def test_folder_mode_json_imports_into_label_studio_and_project_mode_then_has_nothing_to_do(
        tmp_path: Path, label_studio, model_dir: Path, parser, sample_images: list[Path], redis_server) -> None:
    # Images where Label Studio serves local files from; tasks.json points there (/data/local-files/?d=...).
    folder = label_studio.local_files_root / f"set-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for path in sample_images[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    config = tmp_path / "config.xml"
    config.write_text(CONFIG)
    env = _env(model_dir, label_studio, cache_url=redis_server.url)
    proc = _cli(["folder", str(folder), "--label-config", str(config), "--out", str(tmp_path / "out"),
                 "--document-root", str(label_studio.local_files_root)], env)
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d={folder.name}/{name}"
                                                  for name in sorted(p.name for p in sample_images[:2])]

    project_id = create_project(label_studio, CONFIG)
    ids = import_tasks(label_studio, project_id, tasks)
    assert len(ids) == 2
    for task_id, task in zip(ids, tasks):
        (stored,) = label_studio.client.predictions.list(task=task_id)
        assert stored.model_version == parser.version
        assert stored.result == task["predictions"][0]["result"] and stored.result

    summary_path = tmp_path / "summary.json"
    proc = _cli(["project", str(project_id), "--ls-url", label_studio.url, "--api-key", label_studio.token,
                 "--summary-json", str(summary_path)], env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["total"] == 0 and summary["already_done"] == 2
