"""Serves the backend (backend/server.py): Label Studio's ML-backend protocol, the demo page and the HTTP API.

Quick start:  python _wsgi.py --host 127.0.0.1 --port 9090
Production:   gunicorn -c gunicorn.conf.py _wsgi:app      (GUNICORN_WORKERS, GUNICORN_THREADS, GUNICORN_TIMEOUT)
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from flask import Flask

_app: Flask | None = None


def __getattr__(name: str) -> Any:
    """`_wsgi.app` (what gunicorn imports) is created, and the model loaded, on first access (PEP 562):
    importing this module, or `python _wsgi.py --help`, loads nothing."""
    global _app
    if name == "app":
        if _app is None:
            from backend.server import create_app

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
    from backend.server import create_app

    app = create_app()
    logging.getLogger("m2fp.server").info("serving on http://%s:%d", args.host, args.port)
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
