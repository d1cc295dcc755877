"""Cloud-storage image URIs -> the Label Studio URL that resolves them (pure functions, no I/O).

Label Studio 1.23 sends a task from S3 / GCS / Azure source storage to /predict with the raw URI of `task.data`
(`s3://bucket/key`, `gs://bucket/key`, `azure-blob://container/blob`): only Label Studio holds the bucket
credentials, so only it can read the object. It does so at `/tasks/<task id>/resolve/?fileuri=<URI>`, the URI
urlsafe-base64-encoded with its padding (LS's io_storages proxy_api; `/tasks/<id>/presign/` is the legacy alias,
`/projects/<id>/resolve/` the project-level one), authenticated as the API key's user, and answers either
- 303 to a presigned URL on the storage's host (storage with "presign" on): the signature in the URL is the
  credential, so it is fetched WITHOUT our Label Studio token (AWS refuses a request carrying both), or
- 200 with the bytes, proxied from the storage (presign off).
Its errors: 403 the user may not see the task, 404 no such task or no storage of the project covers that bucket
(or presigning failed), 424 the storage refused to stream the object in proxy mode.

The API's own task lists return the resolve form already (relative, or absolute on LABEL_STUDIO_HOST when LS
has one), so project mode and workers meet `/tasks/<id>/resolve/?fileuri=...` while /predict meets `s3://...`.
Both end here as one `LsResolve` target on LABEL_STUDIO_URL.

`LABEL_STUDIO_HOST` is the public origin Label Studio puts in absolute URLs when it differs from the URL the
backend reaches it by (LABEL_STUDIO_URL, e.g. a compose service name): a URL on that origin is a Label Studio URL,
fetched through LABEL_STUDIO_URL with the token (`rebase_on_label_studio`).
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlencode, urljoin, urlsplit

from backend.errors import InputError

# Label Studio's storage `url_scheme`s (io_storages/{s3,gcs,azure_blob}/models.py).
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RESOLVE_PATH = re.compile(r"^/(tasks|projects)/(\d+)/(resolve|presign)/?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ERROR_CODE = re.compile(rb"<Code>\s*([A-Za-z0-9_.-]{1,64})\s*</Code>")


class StorageError(InputError):
    """Label Studio could not (or would not) hand over a cloud-storage image; `reason` says which case."""

    reason = "storage"


class StorageDenied(StorageError):
    reason = "storage_denied"


class StorageNotFound(StorageError):
    reason = "not_found"


class StorageAuthError(StorageError):
    reason = "auth"


class NoTaskId(StorageError):
    """A cloud URI outside a Label Studio task (demo API, a hand-made task): nothing can resolve it."""

    reason = "no_task_id"


class NoLabelStudioUrl(StorageError):
    reason = "no_ls_url"


@dataclass(frozen=True)
class LsResolve:
    """One GET on Label Studio's resolve endpoint: `url` is absolute on LABEL_STUDIO_URL (the token goes there)."""

    url: str
    uri: str          # the storage URI it stands for, for messages ("s3://bucket/key")
    task_id: int      # or the project id when `scope` is "project"
    scope: str = "tasks"

    @property
    def what(self) -> str:
        return f"{self.uri} ({self.scope[:-1]} {self.task_id})"


@dataclass(frozen=True)
class PresignedUrl:
    """A redirect target taken from Label Studio's resolve answer: the storage host, fetched without our token.

    This type marks the one kind of URL the backend fetches on Label Studio's word rather than the task's: an
    outbound allow-list may trust it (LS chose the host) where it would refuse the same URL found in a task."""

    url: str
    source: LsResolve

    @property
    def shown(self) -> str:
        """The URL without its query: the signature in it is a credential and must not reach a log."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"


def is_cloud_uri(url: str) -> bool:
    return urlsplit(url).scheme.lower() in CLOUD_SCHEMES if isinstance(url, str) else False


def encode_fileuri(uri: str) -> str:
    """The `fileuri` parameter exactly as Label Studio builds it (urlsafe base64, padded)."""
    return base64.urlsafe_b64encode(uri.encode()).decode()


def decode_fileuri(value: str) -> str:
    """Inverse of encode_fileuri, with Label Studio's fallback for old unencoded (percent-quoted) values."""
    try:
        return base64.urlsafe_b64decode(value.encode()).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return unquote(value)


def resolve_url(ls_url: str, uri: str, task_id: int) -> str:
    return f"{ls_url.rstrip('/')}/tasks/{task_id}/resolve/?{urlencode({'fileuri': encode_fileuri(uri)}, safe='=')}"


def task_id_of(task_id: object, uri: str) -> int:
    """The task id as Label Studio's URL wants it; NoTaskId when there is none to give."""
    if isinstance(task_id, int) and not isinstance(task_id, bool) and task_id > 0:
        return task_id
    if isinstance(task_id, str) and task_id.strip().isdigit() and int(task_id) > 0:
        return int(task_id)
    if task_id is None:
        raise NoTaskId(f"{uri}: a cloud-storage URI can only be read through Label Studio, for a task: this "
                       "request carries no task id (send it as a Label Studio task, or send the image itself)")
    raise NoTaskId(f"{uri}: task id {task_id!r} is not a Label Studio task id")


# ----- origins -----

def _origin(url: str) -> tuple[str, str, int | None, str] | None:
    """(scheme, host, port, base path) of an absolute http(s) URL; None for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], parts.path.rstrip("/")


def _relative_to(url: str, base: str) -> str | None:
    """`url`'s path + query below `base` ("/tasks/1/resolve/?..."), when url lies under base; else None."""
    base_origin = _origin(base) if base else None
    here = _origin(url)
    if base_origin is None or here is None or here[:3] != base_origin[:3]:
        return None
    parts = urlsplit(url)
    path = parts.path
    prefix = base_origin[3]
    if prefix and not (path == prefix or path.startswith(prefix + "/")):
        return None
    rest = path[len(prefix):] or "/"
    return rest + (f"?{parts.query}" if parts.query else "")


def rebase_on_label_studio(url: str, ls_url: str, ls_host: str) -> str:
    """A URL on Label Studio's public origin (LABEL_STUDIO_HOST) as the same URL on LABEL_STUDIO_URL; any other
    URL unchanged. Only then is it recognised as Label Studio's (token sent, local files read from disk)."""
    if not ls_url or not ls_host or _origin(ls_host) == _origin(ls_url):
        return url
    rest = _relative_to(url, ls_host)
    return url if rest is None else ls_url.rstrip("/") + rest


# ----- the route -----

def ls_resolve_target(url: str, task_id: object, ls_url: str, ls_host: str = "") -> LsResolve | None:
    """The Label Studio request that yields this image, when `url` is a cloud URI or LS's resolve/presign URL
    (relative, or absolute on LABEL_STUDIO_URL / LABEL_STUDIO_HOST); None for every other URL.

    Raises NoTaskId for a cloud URI without a task id, NoLabelStudioUrl when LABEL_STUDIO_URL is not set."""
    url = url.strip()
    if is_cloud_uri(url):
        tid = task_id_of(task_id, url)
        if not ls_url:
            raise NoLabelStudioUrl(f"{url}: a cloud-storage URI is read through Label Studio: set LABEL_STUDIO_URL "
                                   "and LABEL_STUDIO_API_KEY")
        return LsResolve(resolve_url(ls_url, url, tid), url, tid)

    rest = _ls_relative(url, ls_url, ls_host)
    if rest is None:
        return None
    parts = urlsplit(rest)
    found = _RESOLVE_PATH.match(parts.path)
    fileuris = parse_qs(parts.query, keep_blank_values=True).get("fileuri")
    if not found or not fileuris:
        return None
    if not ls_url:
        raise NoLabelStudioUrl(f"{url}: a Label Studio relative URL needs LABEL_STUDIO_URL to be set")
    scope, owner = found.group(1), int(found.group(2))
    uri = decode_fileuri(fileuris[-1])
    # Always the current /resolve/ path (the legacy /presign/ is the same view) and LS's own encoding.
    target = f"{ls_url.rstrip('/')}/{scope}/{owner}/resolve/?{urlencode({'fileuri': fileuris[-1]}, safe='=')}"
    return LsResolve(target, uri, owner, scope)


def _ls_relative(url: str, ls_url: str, ls_host: str) -> str | None:
    if url.startswith("/") and not url.startswith("//"):
        return url
    for base in (ls_url, ls_host):
        rest = _relative_to(url, base) if base else None
        if rest is not None:
            return rest
    return None


# ----- Label Studio's answers -----

def presigned_target(source: LsResolve, location: str | None) -> PresignedUrl:
    """Where Label Studio's redirect points; a StorageError when it points nowhere usable."""
    if not location:
        raise StorageError(f"{source.what}: Label Studio answered a redirect without a Location")
    target = urljoin(source.url, location)
    if _origin(target) is None:
        # LS redirects to the raw URI when the storage could not presign it (s3 resolve_s3_url's fallback).
        raise StorageError(f"{source.what}: Label Studio could not presign it (it redirected to "
                           f"{urlsplit(target).scheme or 'a non-HTTP'}: URL); check the storage's credentials "
                           "in Label Studio")
    return PresignedUrl(target, source)


def resolve_error(source: LsResolve, status: int, has_key: bool) -> StorageError | None:
    """The error for Label Studio's answer to a resolve request, None when it carries the image."""
    if status < 300:
        return None
    what = source.what
    if status == 401:
        hint = "" if has_key else " (LABEL_STUDIO_API_KEY is not set)"
        return StorageAuthError(f"{what}: Label Studio refused the API key (HTTP 401){hint}")
    if status == 403:
        return StorageDenied(f"{what}: Label Studio denied access (HTTP 403): the API key's user cannot see this "
                             "task's project")
    if status == 404:
        return StorageNotFound(f"{what}: Label Studio cannot resolve it (HTTP 404): no such task, or no cloud "
                               "storage of the project covers this bucket/container, or it could not be presigned")
    if status == 424 or status >= 500:
        return StorageError(f"{what}: Label Studio could not read it from the storage (HTTP {status}): missing "
                            "object, or wrong storage credentials/endpoint (see Label Studio's log)")
    return StorageError(f"{what}: unexpected answer from Label Studio's resolve endpoint (HTTP {status})")


def storage_error_code(body: bytes) -> str:
    """The `<Code>` of an S3 / GCS (XML API) / Azure error document ("NoSuchKey", "AccessDenied"...), or ""."""
    found = _ERROR_CODE.search(body[:4096])
    return found.group(1).decode() if found else ""


def presigned_error(target: PresignedUrl, status: int, code: str = "") -> StorageError | None:
    """The error for the storage's answer to a presigned URL (`code`: its error code), None when it carries
    the image."""
    if status < 300:
        return None
    what = f"{target.source.what} via the presigned URL {target.shown}"
    answer = f"HTTP {status} {code}".rstrip()
    if status in (401, 403):
        return StorageDenied(f"{what}: the storage refused it ({answer}): expired (presign TTL), Label Studio's "
                             "storage credentials may not read it, or (S3 without list permission) no such object")
    if status == 404:
        return StorageNotFound(f"{what}: the storage has no such object ({answer})")
    return StorageError(f"{what}: the storage answered {answer}")


__all__ = [
    "CLOUD_SCHEMES", "REDIRECT_STATUSES", "StorageError", "StorageDenied", "StorageNotFound", "StorageAuthError",
    "NoTaskId", "NoLabelStudioUrl", "LsResolve", "PresignedUrl", "is_cloud_uri", "encode_fileuri",
    "decode_fileuri", "resolve_url", "task_id_of", "rebase_on_label_studio", "ls_resolve_target",
    "presigned_target", "resolve_error", "presigned_error", "storage_error_code",
]
