"""Serves the Label Studio ML backend (model.py) and the demo page / HTTP API (backend/web.py).

Quick start:  python _wsgi.py --host 127.0.0.1 --port 9090
Production:   gunicorn -c gunicorn.conf.py _wsgi:app      (GUNICORN_WORKERS, GUNICORN_THREADS, GUNICORN_TIMEOUT)

The app is label-studio-ml 1.0.9's Flask app (its /health, /setup, /predict, /webhook, /metrics routes), with
four of its views replaced because 1.0.9 gets them wrong for a pre-labeling backend:
- /setup answers the parser's version. 1.0.9 answers "INITIAL" (or a training job id), which differs from
  the predictions' model_version and makes Label Studio store duplicate predictions on every trigger.
- /predict builds the model from the request's own label_config. 1.0.9 predicts with whatever model the
  last /setup of ANY project created in this process: 500 before the first /setup, the wrong config with
  two projects, and 500 on every gunicorn worker that did not receive the /setup.
- /webhook acknowledges and does nothing. Label Studio posts every annotation event to it, and 1.0.9 would
  start a training subprocess per event for a model that does not train.
- /metrics reports this process's counters (tasks, predictions, failures by reason, cache hits, inferences).
- /versions (GET, as Label Studio asks it; 1.0.9 routes only POST and then fails without a model dir) lists
  the one version; /train answers that there is nothing to train.
The model is loaded when the app is created, so the first request is not slow; once per process.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from flask import Flask, jsonify, request
from label_studio_ml.api import init_app

from backend.predict import LabelConfigError
from backend.settings import get_settings
from model import M2FPModel, get_predictor

logger = logging.getLogger("m2fp.server")


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    root.setLevel(get_settings().log_level.upper())


def _json_body() -> dict[str, Any] | None:
    data = request.get_json(silent=True)
    return data if isinstance(data, dict) else None


def _error(status: int, code: str, message: str):
    return jsonify({"error": code, "message": message}), status


def health():
    predictor = get_predictor()
    return jsonify({"status": "UP", "model_class": M2FPModel.__name__, "model_version": predictor.model_version,
                    "v2": True})


def setup():
    data = _json_body() or {}
    predictor = get_predictor()
    schema = data.get("schema") or ""
    if schema:
        try:
            predictor.controls_for(schema)
        except LabelConfigError as exc:
            # Label Studio shows this message on the model card: the project can be fixed before any predict.
            logger.warning("/setup for project %s: %s", data.get("project"), exc)
            return _error(400, "label_config", str(exc))
    return jsonify({"model_version": predictor.model_version})


def predict():
    data = _json_body()
    if data is None or not isinstance(data.get("tasks"), list):
        return _error(400, "bad_request", "expected a JSON object with a 'tasks' list")
    label_config = data.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        return _error(400, "label_config", "the request has no label_config (Label Studio always sends it)")
    tasks = data["tasks"]
    try:
        # Checked first: label-studio-ml's constructor would turn malformed XML into a bare 500.
        get_predictor().controls_for(label_config)
        model = M2FPModel(label_config=label_config)
        results = model.predict(tasks)
    except LabelConfigError as exc:
        logger.warning("/predict for project %s: %s", data.get("project"), exc)
        return _error(400, "label_config", str(exc))
    failed = sum(1 for r in results if r == [])
    logger.info("/predict project=%s tasks=%d predictions=%d failed=%d", data.get("project"), len(tasks),
                len(tasks) - failed, failed)
    return jsonify({"results": results, "model_version": model.model_version})


def webhook():
    data = _json_body() or {}
    return jsonify({"status": "ignored", "action": data.get("action"),
                    "reason": "pre-labeling backend: annotations do not train the model"}), 200


def versions():
    return jsonify({"versions": [get_predictor().model_version], "model_dir": None, "v2": True})


def train():
    return jsonify({}), 201


def metrics():
    stats = get_predictor().stats()
    stats["pid"] = os.getpid()
    return jsonify(stats)


def create_app(preload: bool = True) -> Flask:
    """label-studio-ml's app with our views (see the module doc), plus the demo page and API when present."""
    _configure_logging()
    flask_app = init_app(model_class=M2FPModel)
    for endpoint, view in {"health": health, "_setup": setup, "_predict": predict, "webhook": webhook,
                           "metrics": metrics, "get_version": versions, "_train": train}.items():
        if endpoint not in flask_app.view_functions:
            raise RuntimeError(f"label-studio-ml has no {endpoint!r} view to replace: is it 1.0.9?")
        flask_app.view_functions[endpoint] = view
    # Label Studio asks GET /versions; 1.0.9 only routes POST.
    flask_app.add_url_rule("/versions", endpoint="get_version", methods=["GET"])
    try:
        from backend.web import register_web
    except ImportError as exc:  # the demo page ships with the backend; log rather than refuse to serve LS
        logger.warning("demo page and HTTP API unavailable: %s", exc)
    else:
        register_web(flask_app, get_predictor)
    if preload:
        get_predictor()
    return flask_app


_app: Flask | None = None


def __getattr__(name: str) -> Any:
    """`_wsgi.app` (what gunicorn imports) is created, and the model loaded, on first access (PEP 562):
    importing this module, or `python _wsgi.py --help`, loads nothing."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(description="M2FP Label Studio ML backend (development server; "
                                              "use gunicorn -c gunicorn.conf.py _wsgi:app in production)")
    cli.add_argument("--host", default="0.0.0.0")
    cli.add_argument("-p", "--port", type=int, default=9090)
    cli.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    args = cli.parse_args(argv)
    app = create_app()
    logger.info("serving %s on http://%s:%d", get_predictor().model_version, args.host, args.port)
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
