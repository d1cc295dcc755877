"""Image fetching and decoding: a task's image URL -> bytes -> a PIL RGB image, with limits.

URLs a Label Studio task can carry:
- `/data/upload/...` and other LS-relative paths: fetched from `LABEL_STUDIO_URL` with the API key;
- cloud-storage URIs (`s3://`, `gs://`, `azure-blob://`) and LS's `/tasks/<id>/resolve/?fileuri=...` form: resolved
  by Label Studio for the task (backend/storage_uris.py); a presigned redirect target gets no token;
- absolute URLs on `LABEL_STUDIO_HOST` (LS's public origin): fetched through `LABEL_STUDIO_URL` like relative ones;
- `/data/local-files/?d=<path>`: read from disk under `LOCAL_FILES_DOCUMENT_ROOT` when set (no HTTP round trip,
  same path rules as LS's own view), else fetched from Label Studio like any LS-relative URL;
- absolute `http(s)://` URLs: fetched directly; the API key is sent only when the host is Label Studio's;
- `data:image/...;base64,...` URIs (small inline images).

Every failure is an `ImageError` subclass whose message names the URL and the reason, so one bad task can be
reported precisely while the others go on. Nothing is cached on disk: the parsing cache (backend/cache.py) keys
on the image bytes, so re-downloading a known image costs one transfer and no inference.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import logging
import posixpath
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend import net_guard, storage_uris
from backend.errors import InputError
from backend.net_guard import shorten, status_text
from backend.settings import Settings

logger = logging.getLogger(__name__)

# An access token is renewed this long before it expires, so a download never starts with a dying token.
_TOKEN_MARGIN_S = 30.0


class ImageError(InputError):
    """An image could not be obtained or decoded; `reason` is a short stable tag for metrics and logs."""

    reason = "fetch"


class ImageNotFound(ImageError):
    reason = "not_found"


class ImageAuthError(ImageError):
    reason = "auth"


class ImageTooLarge(ImageError):
    reason = "too_large"


class ImageDecodeError(ImageError):
    reason = "decode"


class ImageFetchError(ImageError):
    """Timeouts, refused connections, unexpected HTTP statuses, unsupported or unresolvable URLs."""

    reason = "fetch"


def _is_jwt(token: str) -> bool:
    """True for a JWT (LS personal access tokens are JWT refresh tokens); legacy tokens are 40 hex chars."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        header = json.loads(_b64url(parts[0]))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim (unverified: we only use it to renew early; LS is the one that verifies)."""
    try:
        exp = json.loads(_b64url(token.split(".")[1])).get("exp")
    except (ValueError, IndexError, binascii.Error, AttributeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) else None


class ImageBlocked(ImageFetchError):
    """The URL points at an address outside what the outbound policy allows (backend/net_guard.py)."""

    reason = "blocked"


class ImageBadUrl(ImageFetchError):
    reason = "bad_url"


_GUARD_ERRORS = {"blocked": ImageBlocked, "bad_url": ImageBadUrl, "too_large": ImageTooLarge}


@dataclass
class _AccessToken:
    value: str
    expires_at: float | None  # unix time, None when the token does not say


class ImageFetcher:
    """Fetches image bytes for task URLs. Thread-safe: one per process is enough."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ls_url = settings.label_studio_url.rstrip("/")
        self._api_key = settings.label_studio_api_key.strip()
        self._is_pat = _is_jwt(self._api_key) if self._api_key else False
        self._token: _AccessToken | None = None
        self._token_lock = threading.Lock()
        self._policy = net_guard.UrlPolicy(self._ls_url, settings.image_url_allow)

    # ----- public -----

    def fetch(self, url: str, task_id: object = None) -> bytes:
        """The bytes behind a task's image URL, at most `image_max_bytes` of them. `task_id` (the Label Studio
        task the URL comes from) is what lets Label Studio resolve a cloud-storage URI."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"task has no image URL (got {url!r})")
        url = url.strip()
        if url.startswith("data:"):
            return self._from_data_uri(url)
        if len(url) > self.settings.image_max_url_length:
            raise ImageBadUrl(f"{shorten(url)}: URL longer than IMAGE_MAX_URL_LENGTH="
                              f"{self.settings.image_max_url_length}")
        try:
            urlparse(url).port  # noqa: B018 - raises ValueError for a malformed port or IPv6 host
            url = storage_uris.rebase_on_label_studio(url, self._ls_url, self.settings.label_studio_host)
            resolve = storage_uris.ls_resolve_target(url, task_id, self._ls_url, self.settings.label_studio_host)
            parsed = urlparse(url)
            parsed.port  # noqa: B018
        except ValueError as exc:
            raise ImageBadUrl(f"{shorten(url)}: malformed URL ({exc})") from None
        if resolve is not None:
            return self._from_ls_resolve(resolve)
        if parsed.scheme in ("http", "https"):
            if self._is_ls_url(parsed) and self._local_file_path(parsed) is not None:
                return self._read_local(self._local_file_path(parsed), url)
            return self._http_get(url, auth=self._is_ls_url(parsed))
        if parsed.scheme:
            raise ImageBadUrl(f"{shorten(url)}: unsupported URL scheme {shorten(parsed.scheme, 20)!r} (expected "
                              "http(s), an LS-relative /data/... URL, s3:// gs:// azure-blob:// or a data: URI)")
        local = self._local_file_path(parsed)
        if local is not None:
            return self._read_local(local, url)
        if not self._ls_url:
            raise ImageFetchError(f"{shorten(url)}: a Label Studio relative URL needs LABEL_STUDIO_URL to be set")
        return self._http_get(urljoin(self._ls_url + "/", url.lstrip("/")), auth=True)

    # ----- local files -----

    def _local_file_path(self, parsed) -> Path | None:
        """The disk path of a /data/local-files/ URL when LOCAL_FILES_DOCUMENT_ROOT is set, else None."""
        if not self.settings.local_files_root or parsed.path.rstrip("/") != "/data/local-files":
            return None
        values = parse_qs(parsed.query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise ImageNotFound(f"{parsed.geturl()}: local-files URL has no ?d= path")
        if "\0" in relative:
            raise ImageBadUrl(f"{shorten(parsed.geturl())}: NUL byte in the local-files path")
        root = Path(self.settings.local_files_root).resolve()
        # Same rule as LS's /data/local-files/ view: ?d= is relative to the root, even with a leading slash.
        candidate = (root / posixpath.normpath(relative).lstrip("/")).resolve()
        if candidate != root and root not in candidate.parents:
            raise ImageAuthError(f"{parsed.geturl()}: path escapes LOCAL_FILES_DOCUMENT_ROOT")
        return candidate

    def _read_local(self, path: Path, url: str) -> bytes:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageNotFound(f"{url}: no such file under LOCAL_FILES_DOCUMENT_ROOT ({path})") from None
        except OSError as exc:
            raise ImageFetchError(f"{url}: cannot read {path}: {exc.strerror or exc}") from None
        if not path.is_file():
            raise ImageNotFound(f"{url}: {path} is not a file")
        self._check_size(size, url)
        try:
            with open(path, "rb") as f:
                data = f.read(self.settings.image_max_bytes + 1)
        except OSError as exc:
            raise ImageFetchError(f"{url}: cannot read {path}: {exc.strerror or exc}") from None
        self._check_size(len(data), url)
        return data

    # ----- data: URIs -----

    def _from_data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageDecodeError("data: URI without a comma")
        # base64 is 4/3 of the payload: refuse before decoding a huge string
        self._check_size(len(payload) * 3 // 4, "data: URI")
        try:
            data = base64.b64decode(payload, validate=False) if header.endswith(";base64") \
                else unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"data: URI is not valid base64: {exc}") from None
        self._check_size(len(data), "data: URI")
        return data

    # ----- cloud storage, through Label Studio -----

    def _from_ls_resolve(self, target: storage_uris.LsResolve) -> bytes:
        """Label Studio's resolve endpoint: the bytes it proxies, or its 303 to a presigned URL, followed here
        (not by the request) so that the token never goes to the storage host."""
        send_key = bool(self._api_key)
        response = self._guarded("GET", target.url, auth=send_key, max_redirects=0)
        if response.status == 401 and self._is_pat:
            self._auth_header(force_refresh=True)
            response = self._guarded("GET", target.url, auth=send_key, max_redirects=0)
        if response.status in storage_uris.REDIRECT_STATUSES:
            return self._from_presigned(storage_uris.presigned_target(target, response.headers.get("Location")))
        error = storage_uris.resolve_error(target, response.status, send_key)
        if error is not None:
            raise error
        return response.body

    def _from_presigned(self, presigned: storage_uris.PresignedUrl) -> bytes:
        """The storage's own URL that Label Studio redirected to: no token, and never the signed URL in a message."""
        try:
            # The storage's error document gives its code ("NoSuchKey"): only that code is kept, never the text.
            response = self._guarded("GET", presigned.url, auth=False, error_bytes=4096)
            if response.status >= 300:
                raise storage_uris.presigned_error(presigned, response.status,
                                                   storage_uris.storage_error_code(response.body))
            return response.body
        except InputError as exc:
            shown = shorten(presigned.url)
            if presigned.url not in str(exc) and shown not in str(exc):
                raise
            raise type(exc)(str(exc).replace(presigned.url, presigned.shown).replace(shown, presigned.shown),
                            reason=exc.reason) from None

    # ----- HTTP -----

    def _is_ls_url(self, parsed) -> bool:
        # Scheme, host and port: the token never goes to http:// when Label Studio is https://.
        return self._policy.ls_origin is not None and net_guard.Origin.of(parsed.geturl()) == self._policy.ls_origin

    def _guarded(self, method: str, url: str, *, auth: bool, body: bytes | None = None,
                 headers: dict[str, str] | None = None, max_redirects: int | None = None,
                 error_bytes: int = 0) -> net_guard.Response:
        """One request through the outbound policy (backend/net_guard.py), its failures worded as ImageErrors."""
        settings = self.settings
        try:
            return net_guard.guarded_request(
                self._policy, method, url, headers=headers, body=body,
                credentials={"Authorization": self._auth_header(force_refresh=False)} if auth else None,
                credentials_origin=self._policy.ls_origin,
                deadline_s=settings.image_connect_timeout + settings.image_read_timeout,
                connect_timeout=settings.image_connect_timeout, read_timeout=settings.image_read_timeout,
                max_bytes=settings.image_max_bytes, error_bytes=error_bytes,
                max_redirects=settings.image_max_redirects if max_redirects is None else max_redirects)
        except net_guard.TooLarge as exc:
            raise ImageTooLarge(f"{exc} (IMAGE_MAX_BYTES)") from None
        except net_guard.GuardError as exc:
            raise _GUARD_ERRORS.get(exc.reason, ImageFetchError)(str(exc), reason=exc.reason) from None
        except TimeoutError as exc:
            # socket.timeout is TimeoutError: a silent server (IMAGE_READ_TIMEOUT) or the whole-download deadline.
            raise ImageFetchError(f"{shorten(url)}: timed out ({exc or 'no answer'}; IMAGE_READ_TIMEOUT="
                                  f"{settings.image_read_timeout:g} s per wait, "
                                  f"{settings.image_connect_timeout + settings.image_read_timeout:g} s in all)") \
                from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ImageFetchError(f"{shorten(url)}: connection failed: {_short(exc)}") from None

    def _http_get(self, url: str, auth: bool) -> bytes:
        send_key = auth and bool(self._api_key)
        response = self._guarded("GET", url, auth=send_key)
        if response.status == 401 and send_key and self._is_pat:
            # The cached access token may have been revoked or expired early: renew once, then give up.
            self._auth_header(force_refresh=True)
            response = self._guarded("GET", url, auth=send_key)
        status = response.status
        if status == 404:
            raise ImageNotFound(f"{shorten(url)}: HTTP {status_text(status)}")
        if status in (401, 403):
            hint = "" if self._api_key or not auth else " (LABEL_STUDIO_API_KEY is not set)"
            raise ImageAuthError(f"{shorten(url)}: HTTP {status_text(status)}{hint}")
        if status >= 300:
            raise ImageFetchError(f"{shorten(url)}: HTTP {status_text(status)}")
        return response.body

    def _check_size(self, size: int, what: str) -> None:
        if size > self.settings.image_max_bytes:
            raise ImageTooLarge(f"{what}: {size} bytes is more than IMAGE_MAX_BYTES={self.settings.image_max_bytes}")

    # ----- Label Studio auth -----

    def _auth_header(self, force_refresh: bool) -> str:
        if not self._is_pat:
            return f"Token {self._api_key}"
        return f"Bearer {self._access_token(force_refresh)}"

    def _access_token(self, force_refresh: bool) -> str:
        """A personal access token is a JWT refresh token: LS wants a short-lived access token from it."""
        with self._token_lock:
            token = self._token
            fresh = token is not None and (token.expires_at is None
                                           or token.expires_at - _TOKEN_MARGIN_S > time.time())
            if fresh and not force_refresh:
                return token.value
            refresh_url = f"{self._ls_url}/api/token/refresh/"
            # No redirect is followed: the refresh token goes to LABEL_STUDIO_URL itself or nowhere.
            response = self._guarded("POST", refresh_url, auth=False, body=json.dumps({"refresh": self._api_key})
                                     .encode(), headers={"Content-Type": "application/json"}, max_redirects=0)
            if response.status in (400, 401, 403):
                raise ImageAuthError(f"{refresh_url}: Label Studio refused LABEL_STUDIO_API_KEY "
                                     f"(HTTP {status_text(response.status)})")
            if response.status != 200:
                raise ImageFetchError(f"{refresh_url}: HTTP {status_text(response.status)} exchanging the "
                                      "personal access token")
            try:
                access = json.loads(response.body)["access"]
                if not isinstance(access, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ImageFetchError(f"{refresh_url}: unexpected answer to the token exchange") from None
            self._token = _AccessToken(access, _jwt_expiry(access))
            return access


def _short(exc: BaseException) -> str:
    """The useful part of a transport error ("[Errno 111] Connection refused"), not its wrappers."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    return text if len(text) <= 300 else text[:300] + "..."


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied; refuses non-images, corrupt data and pixel bombs.

    The pixel count is read from the header before any pixel is decoded, so a 50 kB PNG claiming 100k x 100k
    never allocates anything.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the one that applies; PIL's global one would only warn or raise differently.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image: unrecognised format (first bytes {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels is more than IMAGE_MAX_PIXELS={max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {image.format or 'image'} data: {exc}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels over white, as an image viewer (and Label Studio) shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: keep the high byte instead of clipping everything above 255 to white.
        high = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    if image.mode in ("I", "F"):
        return _wide_to_rgb(image)
    return image.convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """32-bit integer or float greyscale -> 8 bits, by the range its values use; PIL's own convert clips
    everything above 255 to white. Values we cannot place on a scale (negative, NaN, beyond 16 bits) are refused."""
    values = np.asarray(image)
    if values.size == 0 or not np.isfinite(values).all() or values.min() < 0:
        raise ImageDecodeError(f"{image.mode} (32-bit) image with negative or non-finite values: not a photo")
    top = float(values.max())
    if image.mode == "F" and top <= 1.0:
        scaled = values * 255.0
    elif top <= 255:
        scaled = values
    elif top <= 65535:
        scaled = values / 257.0
    else:
        raise ImageDecodeError(f"{image.mode} (32-bit) image with values up to {top:g}: no known scale")
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


__all__ = [
    "ImageError", "ImageNotFound", "ImageAuthError", "ImageTooLarge", "ImageDecodeError", "ImageFetchError",
    "ImageBlocked", "ImageBadUrl",
    "ImageFetcher", "decode_image",
]
