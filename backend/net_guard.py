"""Outbound HTTP for task images, safe to run next to internal services.

A task URL is attacker-controlled: anyone who can create a task (or reach /predict) chooses it. So every
download goes through one policy (`UrlPolicy`) and one request function (`guarded_request`):

- Where it may go: Label Studio's own origin (scheme + host + port of LABEL_STUDIO_URL), hosts and networks
  listed in IMAGE_URL_ALLOW, and public addresses. Any other URL whose host resolves to a loopback, private,
  link-local, multicast, reserved or unspecified address is refused (`blocked`) before a byte is sent. Hosts are
  resolved with getaddrinfo and EVERY address is checked, so spellings such as `2130706433`, `0x7f000001`,
  `127.1`, `[::1]` or `[::ffff:127.0.0.1]` are judged by what they resolve to, not by how they look.
- Pinning: the connection goes to the very address that was checked (the Host header and TLS SNI/certificate
  check keep the name), so a DNS answer that changes between check and connect (rebinding) changes nothing.
- Redirects are followed here, one hop at a time, each hop checked and pinned like the first, at most
  IMAGE_MAX_REDIRECTS of them.
- Credentials: headers given as `credentials` are sent only while the request stays on the credentials' origin
  (same scheme, host and port: never to another host, never from https down to http).
- Time: one deadline for the whole download (every hop's connect, headers and body). Each socket operation gets
  the time that is left as its timeout, and a timer shuts the socket at the deadline, so a server dripping one
  byte a second is cut at the deadline, whatever the read pattern.
- Size: at most `max_bytes` of body; responses are never decompressed (no Accept-Encoding but identity).

Errors are `ImageError`s whose messages name the URL (shortened) and the reason, never bytes of a response.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Iterable
from urllib.parse import urljoin, urlsplit

from backend.errors import InputError

# Addresses a URL may not reach unless its host or network is explicitly allowed.
_MAX_HOST = 253
_READ = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_URL_SHOWN = 200


class GuardError(InputError):
    """Base of the errors raised here; images.py maps them onto its ImageError classes by `reason`."""

    reason = "fetch"


class Blocked(GuardError):
    reason = "blocked"


class BadUrl(GuardError):
    reason = "bad_url"


class TooLarge(GuardError):
    reason = "too_large"


def shorten(url: str, limit: int = _URL_SHOWN) -> str:
    """A URL as logs, metrics and messages show it: at most `limit` characters."""
    return url if len(url) <= limit else f"{url[:limit]}...({len(url)} chars)"


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin | None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            return None
        return cls(scheme, parts.hostname.lower().rstrip("."), port or (443 if scheme == "https" else 80))


@dataclass(frozen=True)
class Target:
    """A checked hop: where to connect (the pinned `ip`) and what to ask for."""

    url: str
    origin: Origin
    ip: str
    path: str          # path + query, as sent in the request line


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return _is_public(mapped)
        if ip.teredo is not None:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


class UrlPolicy:
    """Which URLs a download may reach (see the module docstring). Immutable, shared across threads."""

    def __init__(self, label_studio_url: str = "", allow: str | Iterable[str] = "") -> None:
        self.ls_origin = Origin.of(label_studio_url) if label_studio_url else None
        entries = [e.strip() for e in (allow.split(",") if isinstance(allow, str) else allow)]
        self.hosts: set[tuple[str, int | None]] = set()
        self.suffixes: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in filter(None, entries):
            entry = entry.lower()
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith(("*.", ".")):
                self.suffixes.add("." + entry.lstrip("*."))
                continue
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if port and not port.isdigit():
                raise ValueError(f"IMAGE_URL_ALLOW entry {entry!r}: expected host, host:port, *.domain or CIDR")
            self.hosts.add((host.rstrip("."), int(port) if port else None))

    def _host_allowed(self, origin: Origin) -> bool:
        if origin == self.ls_origin:
            return True
        if (origin.host, None) in self.hosts or (origin.host, origin.port) in self.hosts:
            return True
        return any(origin.host.endswith(suffix) for suffix in self.suffixes)

    def check(self, url: str) -> Target:
        """The pinned target of `url`; BadUrl / Blocked when it may not be fetched."""
        origin = Origin.of(url)
        if origin is None:
            raise BadUrl(f"{shorten(url)}: not an http(s) URL with a host")
        if len(origin.host) > _MAX_HOST or any(len(label) > 63 for label in origin.host.split(".")):
            raise BadUrl(f"{shorten(url)}: host name longer than DNS allows")
        try:
            infos = socket.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except (UnicodeError, ValueError) as exc:
            raise BadUrl(f"{shorten(url)}: invalid host name ({exc})") from None
        except OSError as exc:
            raise GuardError(f"{shorten(url)}: cannot resolve host {shorten(origin.host, 80)!r} "
                             f"({exc.strerror or exc})") from None
        addresses = []
        for info in infos:
            text = info[4][0].split("%", 1)[0]
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError:
                raise Blocked(f"{shorten(url)}: host resolves to an unusable address") from None
        if not addresses:
            raise GuardError(f"{shorten(url)}: host resolves to no address")
        if not self._host_allowed(origin):
            for ip in addresses:
                plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
                if any(plain in net for net in self.networks if net.version == plain.version):
                    continue
                if not _is_public(ip):
                    raise Blocked(f"{shorten(url)}: host resolves to a non-public address, which only Label "
                                  "Studio's own origin (LABEL_STUDIO_URL) and IMAGE_URL_ALLOW may reach")
        parts = urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(url=url, origin=origin, ip=str(addresses[0]), path=path)


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str           # the URL that answered (after redirects)


class _Deadline:
    """The time left of one download, and the timer that shuts its current socket when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("deadline")
        return left

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.expired and sock is not None:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                self._shut(self._sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _connection(target: Target, deadline: _Deadline, connect_timeout: float) -> http.client.HTTPConnection:
    timeout = min(connect_timeout, deadline.left())
    if target.origin.scheme == "https":
        context = ssl.create_default_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.origin.host, target.origin.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(target.origin.host, target.origin.port, timeout=timeout)

    def pinned(address, timeout=timeout, source_address=None):
        # Connect to the checked address; the name stays for Host, SNI and the certificate check.
        sock = socket.create_connection((target.ip, target.origin.port), timeout, source_address)
        deadline.watch(sock)
        return sock

    conn._create_connection = pinned  # type: ignore[attr-defined]
    return conn


def _read_body(response: http.client.HTTPResponse, sock_of, deadline: _Deadline, read_timeout: float,
               max_bytes: int, url: str) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise TooLarge(f"{shorten(url)}: {int(length)} bytes is more than the limit of {max_bytes}")
    buf = bytearray()
    while True:
        sock = sock_of()
        if sock is not None:
            sock.settimeout(min(read_timeout, deadline.left()))
        chunk = response.read1(_READ)
        if not chunk:
            if deadline.expired:      # the timer shut the socket: what came so far is a cut-off body
                raise TimeoutError(f"deadline of {deadline.seconds:g} s")
            if length and length.strip().isdigit() and len(buf) < int(length):
                raise http.client.IncompleteRead(bytes(0), int(length) - len(buf))
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise TooLarge(f"{shorten(url)}: more than the limit of {max_bytes} bytes")


def _read_prefix(response: http.client.HTTPResponse, sock_of, deadline: _Deadline, read_timeout: float,
                 limit: int) -> bytes:
    buf = bytearray()
    while len(buf) < limit:
        sock = sock_of()
        if sock is not None:
            sock.settimeout(min(read_timeout, deadline.left()))
        chunk = response.read1(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def guarded_request(policy: UrlPolicy, method: str, url: str, *, headers: dict[str, str] | None = None,
                    credentials: dict[str, str] | None = None, credentials_origin: Origin | None = None,
                    body: bytes | None = None, deadline_s: float, connect_timeout: float, read_timeout: float,
                    max_bytes: int, max_redirects: int = 5, error_bytes: int = 0) -> Response:
    """One request under the policy, following up to `max_redirects` redirects (0: none; a 3xx is returned as
    is). `error_bytes`: how much of an error answer (status >= 300) to read, for a caller that extracts a code
    from it (0: none). `read_timeout` bounds each wait for bytes, `deadline_s` the whole download. `credentials` headers go
    only to `credentials_origin`. Raises GuardError subclasses or TimeoutError /
    OSError / http.client.HTTPException for transport failures (the caller words them)."""
    deadline = _Deadline(deadline_s)
    try:
        current = url
        for hop in range(max_redirects + 1):
            target = policy.check(current)
            send = {"User-Agent": "m2fp-prelabel", "Accept-Encoding": "identity", **(headers or {})}
            if credentials and credentials_origin is not None and target.origin == credentials_origin:
                send.update(credentials)
            conn = _connection(target, deadline, connect_timeout)
            try:
                conn.request(method, target.path, body=body if hop == 0 else None, headers=send)
                deadline.watch(conn.sock)
                if conn.sock is not None:
                    conn.sock.settimeout(min(read_timeout, deadline.left()))
                response = conn.getresponse()
                location = response.getheader("Location")
                if response.status in _REDIRECTS and location and hop < max_redirects and max_redirects > 0:
                    response.close()
                    current = urljoin(current, location.strip())
                    if method == "POST" and response.status in (301, 302, 303):
                        method, body = "GET", None
                    continue
                if response.status in _REDIRECTS and max_redirects > 0:
                    raise GuardError(f"{shorten(url)}: more than {max_redirects} redirects")
                if response.status < 300:
                    data = _read_body(response, lambda: conn.sock, deadline, read_timeout, max_bytes, current)
                elif error_bytes > 0:
                    data = _read_prefix(response, lambda: conn.sock, deadline, read_timeout, error_bytes)
                else:
                    data = b""
                return Response(response.status, response.headers, data, current)
            except (OSError, http.client.HTTPException, ValueError):
                if deadline.expired:
                    raise TimeoutError(f"deadline of {deadline.seconds:g} s") from None
                raise
            finally:
                deadline.watch(None)
                conn.close()
        raise GuardError(f"{shorten(url)}: more than {max_redirects} redirects")
    finally:
        deadline.cancel()


def status_text(status: int) -> str:
    """`404 Not Found`: the standard phrase, never the server's own reason text."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


__all__ = ["BadUrl", "Blocked", "GuardError", "Origin", "Response", "Target", "TooLarge", "UrlPolicy",
           "guarded_request", "shorten", "status_text"]
