"""Request body limits that hold for chunked uploads too.

Werkzeug enforces `max_content_length` from the Content-Length header; a chunked body (no Content-Length) is
only wrapped in a stream that STOPS at the limit, so `get_data()` returns the first N bytes as if they were the
whole upload: a cut image that then gets parsed (200 instead of 413). Here a chunked body is read up front,
at most limit + 1 bytes: over the limit it is a 413, else it is handed on with its real length.

Limits: MAX_UPLOAD_BYTES for the demo page and /api/* (backend/web.py), MAX_REQUEST_BYTES for the rest.
"""
from __future__ import annotations

import io

from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge

from backend.auth import is_web_path
from backend.settings import Settings

_READ = 64 * 1024


def body_limit(path: str, settings: Settings) -> int:
    return settings.max_upload_bytes if is_web_path(path) else settings.max_request_bytes


def install_body_limits(app: Flask, settings: Settings) -> None:
    @app.before_request
    def buffer_chunked_body() -> None:
        environ = request.environ
        if environ.get("CONTENT_LENGTH") or "wsgi.input_terminated" not in environ:
            return  # a declared length is checked by Werkzeug itself; without either, Werkzeug reads nothing
        limit = body_limit(request.path, settings)
        stream = environ["wsgi.input"]
        buf = bytearray()
        while True:
            chunk = stream.read(min(_READ, limit + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                raise RequestEntityTooLarge()
        environ["wsgi.input"] = io.BytesIO(bytes(buf))
        environ["CONTENT_LENGTH"] = str(len(buf))
        del environ["wsgi.input_terminated"]
        # The body is plain bytes now: Werkzeug ignores CONTENT_LENGTH while the request still says "chunked".
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        request.__dict__.pop("content_length", None)  # a cached_property: forget a value read before this hook


__all__ = ["body_limit", "install_body_limits"]
