"""Our Flask app: Label Studio's ML-backend protocol as Label Studio 1.23 speaks it, plus the demo page and API.

    GET  /health     {"status": "UP", "model_class", "model_version"}: LS calls it when connecting and listing
    POST /setup      {"schema": <labeling config>, "project", ...} -> {"model_version"}; 400 for a config we
                     cannot serve (LS shows the message on the model card)
    POST /predict    {"tasks", "label_config", "project", "params": {"context"}} -> {"results": [one entry per
                     task], "model_version"} (see model.py for what an entry is)
    POST /webhook    Label Studio's project events: TASKS_CREATED queues the new tasks (backend/offload.py),
                     the rest are acknowledged
    GET  /projects/<id>/status   progress of the project's queued tasks (backend/batch/tracking.py)
    GET  /versions   the one model version
    POST /train      nothing to train: pre-labeling only
    GET  /metrics    this process's counters (tasks, failures by reason, cache)
    /demo, /api/*    the demo page and HTTP API (backend/web.py); not served with WEB_UI=off

Basic auth (backend/auth.py) guards every route but /health when BASIC_AUTH_USER/BASIC_AUTH_PASS are set.

Every request builds an `M2FPModel` from its own labeling config (cheap; the parser is loaded once per process),
so any gunicorn worker answers any project, /setup or not. Request bodies and headers are never logged.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.auth import install_auth
from backend.errors import InputError
from backend.limits import install_body_limits
from backend.ls_config import LabelConfigError
from backend.offload import Offload
from backend.runtime import Runtime, get_runtime
from backend.settings import Settings, get_settings
from backend.web import web_blueprint

logger = logging.getLogger("m2fp.server")


def configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    root.setLevel(settings.log_level.upper())


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message}), status


def _json_object() -> dict[str, Any] | None:
    data = request.get_json(silent=True)
    return data if isinstance(data, dict) else None


def create_app(runtime: Runtime | None = None, *, settings: Settings | None = None, preload: bool = True) -> Flask:
    """The backend's app. `runtime`: an already loaded one (tests); default: the process's, loaded at creation
    when `preload` (so the first request is not slow), else on first use."""
    settings = settings or (runtime.settings if runtime is not None else get_settings())
    configure_logging(settings)
    current: Callable[[], Runtime] = (lambda: runtime) if runtime is not None else (lambda: get_runtime(settings))
    app = Flask("m2fp")
    # Label Studio's routes; an interactive /predict carries a task with all its regions (~3 MB for 1280x720).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    install_auth(app, settings)
    install_body_limits(app, settings)
    offload = Offload(settings, current)

    @app.get("/health")
    @app.get("/")
    def health() -> Response:
        from model import M2FPModel

        return jsonify({"status": "UP", "model_class": M2FPModel.__name__, "model_version": current().version,
                        "v2": True})

    @app.post("/setup")
    def setup() -> Response | tuple[Response, int]:
        data = _json_object() or {}
        schema = data.get("schema") or ""
        if schema:
            try:
                current().predictor.plan(schema)
            except LabelConfigError as exc:
                logger.warning("/setup for project %s: %s", data.get("project"), exc)
                return _error(400, exc.reason, str(exc))
        return jsonify({"model_version": current().version})

    @app.post("/predict")
    def predict() -> Response | tuple[Response, int]:
        from model import M2FPModel

        data = _json_object()
        if data is None or not isinstance(data.get("tasks"), list):
            return _error(400, "bad_request", "expected a JSON object with a 'tasks' list")
        label_config = data.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            return _error(400, "bad_config", "the request has no label_config (Label Studio always sends it)")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context") if isinstance(params.get("context"), dict) else None
        tasks = data["tasks"]
        if len(tasks) > settings.max_tasks_per_request:
            return _error(413, "too_many_tasks", f"{len(tasks)} tasks in one request; at most "
                          f"{settings.max_tasks_per_request} (MAX_TASKS_PER_REQUEST)")
        try:
            model = M2FPModel(label_config=label_config, runtime=current())
        except LabelConfigError as exc:
            logger.warning("/predict for project %s: %s", data.get("project"), exc)
            return _error(400, exc.reason, str(exc))
        results = offload.predict(model, tasks, context, data.get("project"))
        if results is None:
            results = model.predict(tasks, context=context)
        failed = sum(1 for r in results if r == [])
        logger.info("/predict project=%s tasks=%d predictions=%d failed=%d", data.get("project"), len(tasks),
                    len(tasks) - failed, failed)
        return jsonify({"results": results, "model_version": model.model_version})

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        answer, code = offload.webhook(_json_object() or {})
        return jsonify(answer), code

    @app.route("/versions", methods=["GET", "POST"])
    def versions() -> Response:
        return jsonify({"versions": [current().version], "model_dir": None, "v2": True})

    @app.post("/train")
    def train() -> tuple[Response, int]:
        return jsonify({"status": "ignored", "reason": "pre-labeling backend: nothing to train"}), 201

    @app.get("/metrics")
    def metrics() -> Response:
        stats = current().predictor.stats()
        stats["pid"] = os.getpid()
        return jsonify(stats)

    @app.errorhandler(InputError)
    def input_error(exc: InputError) -> tuple[Response, int]:
        return _error(400, exc.reason, str(exc))

    @app.errorhandler(RequestEntityTooLarge)
    def request_too_large(exc: RequestEntityTooLarge) -> tuple[Response, int]:
        return _error(413, "request_too_large", f"request body larger than {settings.max_request_bytes} bytes "
                      "(MAX_REQUEST_BYTES)")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return _error(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or "")

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> tuple[Response, int]:
        logger.error("internal error on %s %s", request.method, request.path, exc_info=exc)
        return _error(500, "internal", f"{type(exc).__name__}: the server could not process this request")

    if settings.web_ui:
        app.register_blueprint(web_blueprint(current, settings))
    app.register_blueprint(offload.blueprint())
    if preload:
        current()
    return app
