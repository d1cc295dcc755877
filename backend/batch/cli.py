"""`m2fp-prelabel`: pre-label a folder of images or a whole Label Studio project, locally or through RQ workers.

    m2fp-prelabel folder IMAGES_DIR --label-config config.xml --out OUT_DIR [--masks] [--overlays]
    m2fp-prelabel project PROJECT_ID --ls-url URL --api-key KEY [--enqueue | --local] [--force] [--skip-annotated]
    m2fp-prelabel status PROJECT_ID [--redis-url URL] [--json]
    m2fp-prelabel worker [--redis-url URL] [--queue NAME]
    m2fp-prelabel export PROJECT_ID --format cihp|coco --out DIR   (annotations as a training set: backend/export)

Exit status: 0 when every item succeeded (or was already done), 1 when any failed or was left unfinished,
2 for a usage error (bad labeling config, unknown project, empty folder, unreachable Redis).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.batch import worker as worker_cli
from backend.cache import _redacted
from backend.errors import InputError, describe
from backend.batch.progress import FAILED, ItemResult, Progress, Summary
from backend.settings import Settings, get_settings

if TYPE_CHECKING:
    from backend.predict import ConfigPlan
    from backend.runtime import Runtime

log = logging.getLogger("m2fp.batch")


class UsageError(Exception):
    """A problem with the run as a whole (not one item): reported on one line, exit status 2."""


# ---------------------------------------------------------------- shared pieces

def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    settings = get_settings()
    changes = {k: v for k, v in overrides.items() if v not in (None, "")}
    if getattr(args, "redis_url", None):
        changes["redis_url"] = args.redis_url
    if getattr(args, "threads", None):
        changes["threads"] = args.threads
    return dataclasses.replace(settings, **changes) if changes else settings


def _queue(args: argparse.Namespace):
    from backend.batch import jobs

    if not args.redis_url:
        raise UsageError("--enqueue needs Redis: pass --redis-url or set REDIS_URL")
    connection = worker_cli.redis_connection(args.redis_url)
    try:
        connection.ping()
    except Exception as exc:
        # Redacted: REDIS_URL carries the Redis password.
        raise UsageError(f"cannot reach Redis at {_redacted(args.redis_url)}: {describe(exc)}") from exc
    return jobs.queue_for(connection, args.queue)


def _run_local(items: list, key_of, work, progress: Progress) -> None:
    """Process items one after another in this process; one bad item costs one item (bad inputs come back as
    failed items; an unexpected error is still this item's alone)."""
    for item in items:
        key = key_of(item)
        try:
            result = work(item)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - keep going, report it
            log.debug("item %s failed", key, exc_info=True)
            result = ItemResult(key, FAILED, describe(exc))
        progress.update(result)


def _finish(summary: Summary, out: Any = None) -> int:
    print(summary.render(), file=out or sys.stderr, flush=True)
    return summary.exit_code


def _load_runtime(settings: Settings) -> Runtime:
    from backend.runtime import get_runtime

    return get_runtime(settings)


# ---------------------------------------------------------------- folder mode

def cmd_folder(args: argparse.Namespace) -> int:
    from backend.batch import folder, jobs

    images_dir = Path(args.images_dir)
    out_dir = Path(args.out)
    try:
        label_config = Path(args.label_config).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the labeling config {args.label_config}: {exc.strerror or exc}") from exc
    settings = _settings(args)
    classes = _model_classes(settings)
    plan = _check_label_config(label_config, settings, classes)
    try:
        items = folder.list_items(images_dir, plan.data_keys)
    except NotADirectoryError as exc:
        raise UsageError(str(exc)) from exc
    if not items:
        raise UsageError(f"no images ({', '.join(sorted(folder.IMAGE_SUFFIXES))}) under {images_dir}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError("--alpha must be within [0, 1]")
    options = folder.FolderOptions(
        images_dir=str(images_dir.resolve()), out_dir=str(out_dir.resolve()), label_config=label_config,
        masks=args.masks, overlays=args.overlays, alpha=args.alpha, outline=not args.no_outline,
        image_root_url=args.image_root_url or "", document_root=args.document_root or "",
    )
    try:
        if not options.image_root_url:
            folder.image_url(Path(next(iter(items[0].files.values()))), options)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict] = {}

    def collect(result: ItemResult, value: dict) -> None:
        if value.get("task") is not None:
            tasks[result.key] = value["task"]
        elif value.get("task_file"):
            tasks[result.key] = folder.read_task_part(Path(value["task_file"]))

    if args.enqueue:
        queue = _queue(args)
        progress = Progress(len(items), desc="folder")
        run_id = json.dumps(options.to_dict(), sort_keys=True)
        specs = [jobs.JobSpec(jobs.stable_job_id("img", json.dumps(item.files, sort_keys=True), run_id), item.key,
                              jobs.folder_image_job, (dataclasses.asdict(item), options.to_dict()))
                 for item in items]
        job_ids = jobs.enqueue(queue, specs, args.job_timeout, args.retries).keys
        log.info("enqueued %d images on queue %r; waiting for workers", len(job_ids), queue.name)
        try:
            jobs.wait(queue, job_ids, progress, on_result=collect)
        finally:
            summary = progress.close()
    else:
        from model import M2FPModel

        model = M2FPModel(label_config, runtime=_load_runtime(settings))
        progress = Progress(len(items), desc="folder")  # after loading: the rate is the steady-state one

        def work(item: folder.FolderItem) -> ItemResult:
            result, task = folder.process_item(model, item, options)
            collect(result, {"task": task})
            return result

        try:
            _run_local(items, lambda item: item.key, work, progress)
        finally:
            summary = progress.close()

    ordered = [tasks[k] for k in sorted(tasks)]
    folder.remove_task_parts(out_dir)
    if args.masks or args.overlays:
        folder.write_legend(out_dir, list(classes), args.masks, args.overlays)
    tasks_path = folder.write_run_files(out_dir, ordered, summary)
    print(f"wrote {len(ordered)} tasks to {tasks_path}", file=sys.stderr)
    return _finish(summary)


def _model_classes(settings: Settings) -> tuple[str, ...]:
    """The model's classes from its configuration.json, without loading the weights: the config is checked
    against what this model really predicts before anything slow starts (and the legend files need them when
    workers, not this process, load the model)."""
    from backend.engine.source import ModelNotAvailableError
    from backend.runtime import model_classes

    try:
        return model_classes(settings)
    except ModelNotAvailableError as exc:
        raise UsageError(f"cannot read the model's classes: {exc}") from exc


def _check_label_config(label_config: str, settings: Settings, classes: tuple[str, ...]) -> ConfigPlan:
    """What the config asks for, checked before loading a model or enqueuing anything."""
    from backend.predict import plan_config

    try:
        return plan_config(label_config, settings, classes)
    except InputError as exc:
        raise UsageError(f"labeling config: {describe(exc)}") from exc


# ---------------------------------------------------------------- project mode

def cmd_project(args: argparse.Namespace) -> int:
    from backend.batch import jobs, project

    settings = _settings(args, label_studio_url=args.ls_url, label_studio_api_key=args.api_key)
    from label_studio_sdk.client import LabelStudio

    client = LabelStudio(base_url=args.ls_url, api_key=args.api_key, timeout=60)
    try:
        label_config, title = project.project_label_config(client, args.project_id)
    except Exception as exc:
        raise UsageError(f"cannot read project {args.project_id} at {args.ls_url}: {describe(exc)}") from exc
    _check_label_config(label_config, settings, _model_classes(settings))

    model = None
    model_version = args.model_version
    if not model_version or not args.enqueue:
        from model import M2FPModel

        model = M2FPModel(label_config, runtime=_load_runtime(settings))
        model_version = model_version or model.model_version
    selection = project.select_tasks(client, args.project_id, model_version, force=args.force,
                                     skip_annotated=args.skip_annotated)
    pending, already = selection.pending, selection.already_done
    log.info("project %s %r: %d tasks to pre-label, %d already have model version %s, %d annotated left alone",
             args.project_id, title, len(pending), already, model_version, selection.annotated)
    run = project.ProjectRun(args.project_id, label_config, model_version, args.ls_url, force=args.force)
    progress = Progress(len(pending), desc=f"project {args.project_id}")

    if args.enqueue:
        queue = _queue(args)
        specs = [jobs.JobSpec(project.task_job_id(run, t.id), f"task {t.id}", jobs.project_task_job,
                              (dataclasses.asdict(t), dataclasses.asdict(run))) for t in pending]
        job_ids = jobs.enqueue(queue, specs, args.job_timeout, args.retries).keys
        _track_queued(queue, run, pending)
        log.info("enqueued %d tasks on queue %r; waiting for workers", len(job_ids), queue.name)
        try:
            jobs.wait(queue, job_ids, progress)
        finally:
            summary = progress.close()
    else:
        redis = None
        if settings.redis_url:
            # Locks against a concurrent run on the same project (workers, another CLI) when Redis is there.
            redis = worker_cli.redis_connection(settings.redis_url)
        try:
            _run_local(pending, lambda t: f"task {t.id}",
                       lambda t: project.process_task(model, client, redis, run, t), progress)
        finally:
            summary = progress.close()
    summary_dict = summary.to_dict()
    summary_dict["already_done"] = already
    summary_dict["annotated_skipped"] = selection.annotated
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary_dict, indent=1) + "\n")
    print(f"{already} tasks already had a prediction of {model_version}", file=sys.stderr)
    return _finish(summary)


def _track_queued(queue: Any, run: Any, pending: list) -> None:
    from backend.batch import project, tracking

    with queue.connection.pipeline() as pipe:
        tracking.mark_queued(pipe, run.project_id, run.model_version,
                             {t.id: project.task_job_id(run, t.id) for t in pending}, "cli")
        pipe.execute()


def cmd_status(args: argparse.Namespace) -> int:
    """Progress of a project's queued tasks, as the backend's GET /projects/<id>/status reports it."""
    from backend.batch import tracking

    if not args.redis_url:
        raise UsageError("status reads Redis: pass --redis-url or set REDIS_URL")
    connection = worker_cli.redis_connection(args.redis_url)
    try:
        status = tracking.project_status(connection, args.project_id, args.model_version)
    except Exception as exc:
        raise UsageError(f"cannot read progress from Redis at {args.redis_url}: {describe(exc)}") from exc
    if args.json:
        print(json.dumps(status.to_dict(), indent=1))
    else:
        print(status.line())
        for failure in status.failures:
            print(f"FAILED task {failure['task']}: {failure['reason']}")
    return 1 if status.failed else 0


# ---------------------------------------------------------------- argument parsing

def _add_queue_arguments(parser: argparse.ArgumentParser, settings: Settings) -> None:
    group = parser.add_argument_group("RQ (with --enqueue)")
    group.add_argument("--redis-url", default=settings.redis_url,
                       help="Redis for the queue and the parsing cache (default: REDIS_URL)")
    group.add_argument("--queue", default=settings.rq_queue, help="queue name (default: RQ_QUEUE)")
    group.add_argument("--job-timeout", type=int, default=settings.batch_job_timeout,
                       help="seconds one job may run before it is stopped (default: BATCH_JOB_TIMEOUT)")
    group.add_argument("--retries", type=int, default=settings.batch_retries,
                       help="retries of a job whose worker failed or died (default: BATCH_RETRIES)")


def build_parser() -> argparse.ArgumentParser:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="m2fp-prelabel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("folder", help="pre-label a folder of images into Label Studio import JSON")
    p.add_argument("images_dir", help="folder of images (searched recursively)")
    p.add_argument("--label-config", required=True, help="the project's labeling config (XML file)")
    p.add_argument("--out", required=True, help="output folder: tasks.json, summary.json, masks/, overlays/")
    p.add_argument("--masks", action="store_true",
                   help="write masks/<image>.png: uint8 class index per pixel (legend in masks/classes.txt)")
    p.add_argument("--overlays", action="store_true", help="write overlays/<image>.jpg: colours over the photo")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0 (photo) to 1 (flat colours)")
    p.add_argument("--no-outline", action="store_true", help="overlays without each person's outline")
    p.add_argument("--image-root-url", default="",
                   help="task image URL prefix, e.g. https://bucket.example/photos (default: Label Studio "
                        "local-files URLs, /data/local-files/?d=<path under --document-root>)")
    p.add_argument("--document-root", default=settings.local_files_root,
                   help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: LOCAL_FILES_DOCUMENT_ROOT "
                        "or the images folder's parent)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for local mode (default: M2FP_THREADS)")
    p.add_argument("--enqueue", action="store_true",
                   help="parse on RQ workers (they must see the same paths) instead of in this process")
    _add_queue_arguments(p, settings)
    p.set_defaults(func=cmd_folder)

    p = sub.add_parser("project", help="create a prediction for every task of a Label Studio project lacking one")
    p.add_argument("project_id", type=int)
    p.add_argument("--ls-url", default=settings.label_studio_url, help="Label Studio URL (default: LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=settings.label_studio_api_key,
                   help="legacy token or personal access token (default: LABEL_STUDIO_API_KEY)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--enqueue", action="store_true", help="one RQ job per task; workers parse and post")
    mode.add_argument("--local", action="store_true", help="parse and post in this process (the default)")
    p.add_argument("--model-version", default="",
                   help="model version to fill in (default: the loaded model's; with --enqueue, giving it "
                        "spares this process loading the model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for local mode (default: M2FP_THREADS)")
    p.add_argument("--summary-json", default="", help="also write the summary to this file")
    p.add_argument("--force", action="store_true",
                   help="re-predict tasks that already have a prediction of this model version (it is replaced)")
    p.add_argument("--skip-annotated", action="store_true", help="leave tasks that have annotations alone")
    _add_queue_arguments(p, settings)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("status", help="progress of a project's queued tasks (webhook, /predict and --enqueue)")
    p.add_argument("project_id", type=int)
    p.add_argument("--redis-url", default=settings.redis_url, help="Redis of the queue (default: REDIS_URL)")
    p.add_argument("--model-version", default="", help="default: the version of the latest queued task")
    p.add_argument("--json", action="store_true", help="the status as JSON (what the backend's endpoint answers)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="export a project's annotations as a training set (CIHP layout or COCO)")
    from backend.export import cli as export_cli

    export_cli.add_arguments(p, settings)

    p = sub.add_parser("worker", help="run an RQ worker for batch jobs (model loaded once)")
    worker_cli.add_arguments(p)
    p.set_defaults(func=worker_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "worker":
        level = logging.DEBUG if args.verbose else getattr(logging, get_settings().log_level.upper(), logging.INFO)
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "project" and not (args.ls_url and args.api_key):
        parser.error("project mode needs --ls-url and --api-key (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"m2fp-prelabel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m2fp-prelabel: interrupted (queued jobs stay queued; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
