"""Who may call the backend: HTTP basic auth, as Label Studio sends it, on every route but /health.

    BASIC_AUTH_USER / BASIC_AUTH_PASS   Label Studio's routes (/predict /setup /webhook /versions /train /metrics
                                        and /): connect the model in Label Studio with "Basic Authentication"
                                        and the same user and password (the label-studio-ml-backend convention)
    WEB_AUTH_USER / WEB_AUTH_PASS       the demo page and /api/* when set (people with a browser, not Label
                                        Studio); default: the BASIC_AUTH_* pair
    WEB_UI=off                          no demo page and no /api/* at all (404)

/health stays open: Label Studio, Docker and load balancers probe it, and it tells nothing but the model version.
With no credentials configured a route is open, as before, and the server logs a warning at start.
Both the user and the password are always compared, in constant time (hmac.compare_digest).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request

from backend.settings import Settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
WEB_PREFIXES = ("/demo", "/api/")
REALM = "m2fp-prelabel"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.password)

    def accepts(self, header: str | None) -> bool:
        """True when `header` is `Basic <base64 user:password>` with exactly these credentials."""
        user, password = _decode_basic(header)
        # Both comparisons always run: the time does not tell which half was wrong.
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        pass_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return user_ok and pass_ok and header is not None


def _decode_basic(header: str | None) -> tuple[str, str]:
    if not header or not header[:6].lower() == "basic ":
        return "", "\0"
    try:
        text = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return "", "\0"
    user, sep, password = text.partition(":")
    return (user, password) if sep else ("", "\0")


def is_web_path(path: str) -> bool:
    return path == "/demo" or path.startswith(WEB_PREFIXES)


def credentials_for(path: str, settings: Settings) -> Credentials:
    backend = Credentials(settings.basic_auth_user, settings.basic_auth_pass)
    if is_web_path(path):
        web = Credentials(settings.web_auth_user, settings.web_auth_pass)
        return web if web.enabled else backend
    return backend


def _unauthorized() -> Response:
    response = jsonify(error="unauthorized", message="this backend needs HTTP basic auth (BASIC_AUTH_USER)")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
    return response


def install_auth(app: Flask, settings: Settings) -> None:
    """Check credentials before every request (see the module docstring)."""
    if not Credentials(settings.basic_auth_user, settings.basic_auth_pass).enabled:
        logger.warning("BASIC_AUTH_USER/BASIC_AUTH_PASS are not set: anyone who reaches this port can use "
                       "/predict, /metrics%s", "" if not settings.web_ui else " and the demo API")

    @app.before_request
    def require_credentials() -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        credentials = credentials_for(request.path, settings)
        if credentials.enabled and not credentials.accepts(request.headers.get("Authorization")):
            return _unauthorized()
        return None


__all__ = ["Credentials", "credentials_for", "install_auth", "is_web_path"]
