"""Redis cache of parsings, keyed by the image bytes' hash and the parser's fingerprint.

- Key: `m2fp:parsing:<format>:<fingerprint>:<sha256 of the image bytes>`. The fingerprint covers the model
  (id, revision, weights) and every parameter that changes the parsing, so a new model or threshold never
  reads an old entry.
- Value: `encode_parsing(...)`: a version byte then zlib of a small JSON header and, per instance, the
  bit-packed mask cropped to its bounding box. A 1920x1080 parsing is tens of kB instead of the ~50 MB of
  its boolean masks.
- Results: next to each parsing, the Label Studio prediction built from it for a given labeling config
  (`get_results`/`put_results`, zlib JSON under `m2fp:results:...`), so a repeated /predict of an image with
  the same config skips the polygon conversion too. The caller's `variant` key covers the config, the
  settings and the code that turn a parsing into results.
- Redis down or slow (every call bounded by REDIS_TIMEOUT): the parsing is computed anyway, one warning is
  logged per outage, Redis is left alone for REDIS_RETRY_SECONDS and used again once it answers.
- Concurrent requests for one uncached image compute it once: threads of a process share one in-flight
  computation; processes (gunicorn workers, RQ workers) take redis-py's `Lock` and the others poll for the
  value. The lock is tied to its holder's life: a short timeout (LOCK_TIMEOUT_S) that a thread of the holder
  extends while the parse runs, so a holder that dies (SIGKILL, OOM) frees the image within seconds and the
  job's redo parses at once instead of waiting out a long TTL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import redis
import redis.lock
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend.engine.types import Instance, Parsing
from backend.settings import Settings

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_KEY_PREFIX = "m2fp:parsing"
_RESULTS_PREFIX = "m2fp:results"

LOCK_TIMEOUT_S = 6.0   # a dead holder's lock is gone this long after its last renewal


class CacheFormatError(ValueError):
    """A cached value that this code cannot read (corrupt, truncated or another format version)."""


# ----------------------------------------------------------------------------------------------------
# Compact encoding (pure functions)
# ----------------------------------------------------------------------------------------------------

def _encode_mask(mask: np.ndarray) -> tuple[list[int], bytes]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0], b""
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return [x0, y0, x1, y1], np.packbits(mask[y0:y1, x0:x1], axis=None).tobytes()


def _instances_header(instances: list[Instance], blobs: list[bytes], offset: int) -> tuple[list[list], int]:
    rows = []
    for inst in instances:
        mask = np.asarray(inst.mask, dtype=bool)
        bbox, bits = _encode_mask(mask)
        rows.append([inst.label, int(inst.class_id), float(inst.score),
                     None if inst.person is None else int(inst.person), *bbox, len(bits)])
        blobs.append(bits)
        offset += len(bits)
    return rows, offset


def encode_parsing(parsing: Parsing, level: int = 1) -> bytes:
    """Parsing -> bytes: version byte + zlib(header length, JSON header, bit-packed bbox-cropped masks)."""
    for inst in (*parsing.parts, *parsing.humans):
        if inst.mask.shape != (parsing.height, parsing.width):
            raise ValueError(f"mask of {inst.label!r} is {inst.mask.shape}, expected "
                             f"{(parsing.height, parsing.width)}")
    blobs: list[bytes] = []
    parts, offset = _instances_header(parsing.parts, blobs, 0)
    humans, _ = _instances_header(parsing.humans, blobs, offset)
    header = json.dumps({"w": parsing.width, "h": parsing.height, "parts": parts, "humans": humans},
                        separators=(",", ":")).encode()
    body = _HEADER_LEN.pack(len(header)) + header + b"".join(blobs)
    # Level 1: packed masks are mostly long runs, higher levels gain a few % for several times the CPU.
    return bytes([FORMAT_VERSION]) + zlib.compress(body, level)


def _decode_instances(rows: list, body: memoryview, pos: int, width: int, height: int) -> tuple[list[Instance], int]:
    out = []
    for label, class_id, score, person, x0, y0, x1, y1, nbytes in rows:
        mask = np.zeros((height, width), dtype=bool)
        if nbytes:
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise CacheFormatError(f"bad bbox {(x0, y0, x1, y1)} for a {width}x{height} parsing")
            if pos + nbytes > len(body):
                raise CacheFormatError("truncated mask data")
            count = (y1 - y0) * (x1 - x0)
            bits = np.unpackbits(np.frombuffer(body[pos:pos + nbytes], dtype=np.uint8), count=count)
            mask[y0:y1, x0:x1] = bits.reshape(y1 - y0, x1 - x0).view(bool)
            pos += nbytes
        out.append(Instance(label=label, class_id=class_id, score=score, mask=mask, person=person))
    return out, pos


def decode_parsing(data: bytes) -> Parsing:
    """Inverse of `encode_parsing`; raises CacheFormatError on anything it cannot read."""
    if not data:
        raise CacheFormatError("empty value")
    if data[0] != FORMAT_VERSION:
        raise CacheFormatError(f"format version {data[0]}, this code reads {FORMAT_VERSION}")
    try:
        body = memoryview(zlib.decompress(data[1:]))
        (header_len,) = _HEADER_LEN.unpack_from(body, 0)
        header = json.loads(bytes(body[_HEADER_LEN.size:_HEADER_LEN.size + header_len]))
        width, height = int(header["w"]), int(header["h"])
        pos = _HEADER_LEN.size + header_len
        parts, pos = _decode_instances(header["parts"], body, pos, width, height)
        humans, pos = _decode_instances(header["humans"], body, pos, width, height)
    except CacheFormatError:
        raise
    except (zlib.error, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CacheFormatError(f"unreadable cached parsing: {exc}") from None
    if pos != len(body):
        raise CacheFormatError(f"{len(body) - pos} trailing bytes")
    return Parsing(width=width, height=height, parts=parts, humans=humans)


def image_digest(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


# ----------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------

@dataclass
class CacheStats:
    hits: int = 0              # served from Redis
    shared: int = 0            # served by another thread's computation of the same image (no inference)
    misses: int = 0            # not in Redis (or Redis unavailable): computed here
    computed: int = 0          # calls of `compute`, successful or not
    results_hits: int = 0      # predictions served whole from the results cache (no parsing decoded, no polygons)
    results_misses: int = 0
    redis_errors: int = 0
    redis_available: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Flight:
    """One in-process computation that other threads asking for the same key wait for."""

    done: threading.Event = field(default_factory=threading.Event)
    parsing: Parsing | None = None
    hit: bool = False
    error: BaseException | None = None


class ParsingCache:
    """get_or_compute(image bytes, compute) -> (Parsing, served_without_inference)."""

    def __init__(self, settings: Settings, fingerprint: str, *, lock_timeout: float = LOCK_TIMEOUT_S,
                 wait_timeout: float = 600.0, poll_interval: float = 0.05) -> None:
        self.fingerprint = fingerprint
        self.ttl = int(settings.cache_ttl)
        self.retry_interval = float(settings.redis_retry_seconds)
        self.lock_timeout = lock_timeout
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        self._url = settings.redis_url
        self._client: redis.Redis | None = None
        if self._url:
            self._client = redis.Redis.from_url(
                self._url, socket_timeout=settings.redis_timeout, socket_connect_timeout=settings.redis_timeout,
                # One attempt per call: retrying a dead Redis would make every prediction wait for it.
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._down_until = 0.0
        self._outage_logged = False
        self._state_lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._stats = CacheStats(redis_available=self._client is not None)
        self._stats_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def key(self, digest: str) -> str:
        return f"{_KEY_PREFIX}:{FORMAT_VERSION}:{self.fingerprint}:{digest}"

    def stats(self) -> CacheStats:
        with self._stats_lock:
            return CacheStats(**self._stats.as_dict())

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    # ----- public -----

    def get_or_compute(self, image_bytes: bytes, compute: Callable[[], Parsing],
                       digest: str | None = None) -> tuple[Parsing, bool]:
        """The parsing of these bytes, from Redis when there, else from `compute()` (stored for next time).

        The bool is True when no inference ran for this call (Redis hit, or another thread's result).
        An exception from `compute` propagates to every caller waiting on the same image; nothing is cached.
        `digest`: `image_digest(image_bytes)` when the caller already has it.
        """
        key = self.key(digest or image_digest(image_bytes))
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            self._count(shared=1)
            return flight.parsing, True
        try:
            flight.parsing, flight.hit = self._lookup_or_compute(key, compute)
            return flight.parsing, flight.hit
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                del self._flights[key]
            flight.done.set()

    def results_key(self, digest: str, variant: str) -> str:
        return f"{_RESULTS_PREFIX}:{FORMAT_VERSION}:{self.fingerprint}:{digest}:{variant}"

    def get_results(self, digest: str, variant: str) -> object | None:
        """The JSON value stored by `put_results` for these image bytes and this variant, or None. The caller
        validates it: whatever sits in Redis is read back, not trusted."""
        data = self._redis_call(lambda c: c.get(self.results_key(digest, variant)))
        if data:
            try:
                value = json.loads(zlib.decompress(data))
            except (zlib.error, ValueError) as exc:
                logger.warning("ignoring unreadable cached results: %s", exc)
                value = None
            if value is not None:
                self._count(results_hits=1)
                return value
        self._count(results_misses=1)
        return None

    def put_results(self, digest: str, variant: str, value: object) -> None:
        if not self.enabled or not self._usable():
            return
        data = zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 1)
        key = self.results_key(digest, variant)
        self._redis_call(lambda c: c.set(key, data, ex=self.ttl if self.ttl > 0 else None))

    def call(self, op: Callable[[redis.Redis], object]) -> object | None:
        """One command on the cache's Redis with the cache's failure handling (None when disabled or down);
        for small indexes that live next to the cache (backend/task_index.py)."""
        return self._redis_call(op)

    # ----- internals -----

    def _lookup_or_compute(self, key: str, compute: Callable[[], Parsing]) -> tuple[Parsing, bool]:
        cached = self._load(key)
        if cached is not None:
            return cached, True
        lock = self._try_lock(key + ":lock")
        if lock is False:
            # Another process is computing this image: wait for its value rather than duplicate the work.
            cached = self._wait_for(key, key + ":lock")
            if cached is not None:
                return cached, True
            lock = self._try_lock(key + ":lock")
        renewal = _Renewal(lock, self.lock_timeout) if isinstance(lock, redis.lock.Lock) else None
        try:
            parsing = self._compute(compute)
            self._store(key, parsing)
            return parsing, False
        finally:
            if renewal is not None:
                renewal.stop()
                self._redis_call(lambda c: _release(lock))

    def _try_lock(self, lock_key: str) -> "redis.lock.Lock | bool | None":
        """A held Lock; False: another process holds it; None: no Redis to lock with."""
        def take(client: redis.Redis) -> "redis.lock.Lock | bool":
            lock = client.lock(lock_key, timeout=self.lock_timeout, thread_local=False)
            return lock if lock.acquire(blocking=False) else False
        return self._redis_call(take)

    def _compute(self, compute: Callable[[], Parsing]) -> Parsing:
        self._count(computed=1, misses=1)
        return compute()

    def _wait_for(self, key: str, lock_key: str) -> Parsing | None:
        deadline = time.monotonic() + self.wait_timeout
        while time.monotonic() < deadline:
            time.sleep(self.poll_interval)
            cached = self._load(key)
            if cached is not None:
                return cached
            holder = self._redis_call(lambda c: c.exists(lock_key))
            if not holder:
                # The holder finished without storing (it failed), died (its lock was not renewed), or
                # Redis went away: stop waiting.
                return self._load(key)
        logger.warning("waited %.0f s for another worker to parse %s; parsing it here", self.wait_timeout, key)
        return None

    def _load(self, key: str) -> Parsing | None:
        data = self._redis_call(lambda c: c.get(key))
        if not data:
            return None
        try:
            parsing = decode_parsing(data)
        except CacheFormatError as exc:
            logger.warning("ignoring unreadable cache entry %s: %s", key, exc)
            self._redis_call(lambda c: c.delete(key))
            return None
        self._count(hits=1)
        return parsing

    def _store(self, key: str, parsing: Parsing) -> None:
        if not self.enabled or not self._usable():
            return
        value = encode_parsing(parsing)
        self._redis_call(lambda c: c.set(key, value, ex=self.ttl if self.ttl > 0 else None))

    def _usable(self) -> bool:
        with self._state_lock:
            return time.monotonic() >= self._down_until

    def _redis_call(self, op: Callable[[redis.Redis], object]) -> object | None:
        """Run one Redis command; None when Redis is disabled, known down, or fails now (then marked down)."""
        if self._client is None or not self._usable():
            return None
        try:
            result = op(self._client)
        except redis.RedisError as exc:
            self._mark_down(exc)
            return None
        self._mark_up()
        return result

    def _mark_down(self, exc: BaseException) -> None:
        with self._state_lock:
            self._down_until = time.monotonic() + self.retry_interval
            first = not self._outage_logged
            self._outage_logged = True
        with self._stats_lock:
            self._stats.redis_errors += 1
            self._stats.redis_available = False
        if first:
            logger.warning("Redis cache at %s unavailable (%s: %s); predictions are computed without the cache, "
                           "retrying every %.0f s", _redacted(self._url), type(exc).__name__, exc, self.retry_interval)
        # Drop pooled sockets so the next attempt reconnects instead of reusing a dead connection.
        try:
            self._client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - cleanup of an already broken pool must not fail a prediction
            pass

    def _mark_up(self) -> None:
        if not self._outage_logged:
            return
        with self._state_lock:
            recovered = self._outage_logged
            self._outage_logged = False
        with self._stats_lock:
            self._stats.redis_available = True
        if recovered:
            logger.warning("Redis cache at %s is back", _redacted(self._url))


class _Renewal:
    """Extends a held lock every third of its timeout while the parse runs: the lock lives exactly as long
    as its holder does (plus at most one timeout)."""

    def __init__(self, lock: "redis.lock.Lock", timeout: float) -> None:
        self._lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(timeout / 3,), name="cache-lock-renewal",
                                        daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._lock.reacquire()
            except (redis.RedisError, redis.exceptions.LockError) as exc:
                # Lost (Redis restarted, or a stall longer than the timeout): another process may parse the
                # same image too; the result is the same, only the work is done twice.
                logger.debug("cache lock renewal stopped: %s", exc)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _release(lock: "redis.lock.Lock") -> None:
    try:
        lock.release()
    except redis.exceptions.LockError:
        pass  # expired meanwhile (see _Renewal): nothing of ours left to release


def _redacted(url: str) -> str:
    """The Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
