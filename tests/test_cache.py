"""ParsingCache and the compact parsing encoding, against a real redis-server."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
import zlib

import numpy as np
import pytest

from backend.cache import (FORMAT_VERSION, CacheFormatError, ParsingCache, decode_parsing, encode_parsing,
                           image_digest)
from backend.engine.types import Instance, Parsing
from backend.settings import Settings


def make_parsing(width: int = 53, height: int = 37, seed: int = 0) -> Parsing:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    humans = [Instance("Human", 20, 0.97, (xx < width // 2), None),
              Instance("Human", 20, 0.5, (xx >= width // 3) & (yy > 3), None)]
    blob = (xx - width * 0.3) ** 2 + (yy - height * 0.4) ** 2 < (min(width, height) * 0.2) ** 2
    parts = [
        Instance("Face", 13, 0.912345678901, blob, 0),
        Instance("Hair", 2, 0.25, rng.random((height, width)) > 0.7, 1),   # noisy: many runs
        Instance("Hat", 1, 0.1, np.zeros((height, width), bool), None),     # empty mask
        Instance("Dress", 6, 1.0, np.ones((height, width), bool), 0),       # full mask
        Instance("Left-shoe", 18, 0.333, (yy == height - 1) & (xx == width - 1), None),  # one corner pixel
    ]
    return Parsing(width=width, height=height, parts=parts, humans=humans)


def assert_same(a: Parsing, b: Parsing) -> None:
    assert (a.width, a.height) == (b.width, b.height)
    for xs, ys in ((a.parts, b.parts), (a.humans, b.humans)):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert (x.label, x.class_id, x.person) == (y.label, y.class_id, y.person)
            assert x.score == y.score
            assert y.mask.dtype == bool and y.mask.shape == (a.height, a.width)
            assert np.array_equal(x.mask, y.mask)


def settings_for(redis_url: str = "", **kw) -> Settings:
    return Settings(redis_url=redis_url, **kw)


# ----- encoding -----

@pytest.mark.parametrize("size", [(53, 37), (1, 1), (640, 480), (8, 9)])
def test_encoding_round_trips_exactly(size):
    parsing = make_parsing(*size)
    assert_same(parsing, decode_parsing(encode_parsing(parsing)))


def test_empty_parsing_round_trips():
    empty = Parsing(width=320, height=200)
    decoded = decode_parsing(encode_parsing(empty))
    assert decoded.is_empty and (decoded.width, decoded.height) == (320, 200)


def test_encoding_is_compact_for_full_hd_masks():
    w, h = 1920, 1080
    yy, xx = np.mgrid[:h, :w]
    parts = [Instance(f"P{i}", i, 0.5, (xx - 100 * i - 200) ** 2 + (yy - 500) ** 2 < (40 + 10 * i) ** 2, 0)
             for i in range(15)]
    humans = [Instance("Human", 20, 0.9, (xx > 100) & (xx < 1800) & (yy > 50), None)]
    parsing = Parsing(w, h, parts, humans)
    data = encode_parsing(parsing)
    raw_bool_bytes = w * h * len(parts + humans)
    assert len(data) < raw_bool_bytes / 200, len(data)
    assert_same(parsing, decode_parsing(data))


def test_encoding_rejects_masks_of_the_wrong_size():
    bad = Parsing(10, 10, [Instance("Face", 13, 0.9, np.zeros((10, 11), bool), None)])
    with pytest.raises(ValueError, match="expected"):
        encode_parsing(bad)


def test_decode_refuses_other_versions_and_garbage():
    data = encode_parsing(make_parsing())
    with pytest.raises(CacheFormatError, match="version"):
        decode_parsing(bytes([FORMAT_VERSION + 1]) + data[1:])
    with pytest.raises(CacheFormatError):
        decode_parsing(data[:-5])
    with pytest.raises(CacheFormatError):
        decode_parsing(b"")
    with pytest.raises(CacheFormatError):
        decode_parsing(bytes([FORMAT_VERSION]) + zlib.compress(b"\x05\x00\x00\x00{}"))


# ----- cache behaviour -----

class Counter:
    """A compute() that counts its calls and can be slow or fail."""

    def __init__(self, parsing: Parsing, delay: float = 0.0, error: Exception | None = None) -> None:
        self.parsing, self.delay, self.error = parsing, delay, error
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> Parsing:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.error:
            raise self.error
        return self.parsing


def unique_bytes() -> bytes:
    return b"image-" + uuid.uuid4().bytes


def test_miss_then_hit_skips_compute_and_sets_ttl(redis_server):
    cache = ParsingCache(settings_for(redis_server.url, cache_ttl=1234), fingerprint="fp-" + uuid.uuid4().hex)
    compute = Counter(make_parsing())
    data = unique_bytes()
    first, hit1 = cache.get_or_compute(data, compute)
    second, hit2 = cache.get_or_compute(data, compute)
    assert (hit1, hit2) == (False, True)
    assert compute.calls == 1
    assert_same(first, second)
    key = cache.key(image_digest(data))
    assert 1200 <= redis_server.client().ttl(key) <= 1234
    stats = cache.stats()
    assert (stats.computed, stats.hits, stats.misses) == (1, 1, 1)


def test_ttl_zero_never_expires(redis_server):
    cache = ParsingCache(settings_for(redis_server.url, cache_ttl=0), fingerprint="fp-" + uuid.uuid4().hex)
    data = unique_bytes()
    cache.get_or_compute(data, Counter(make_parsing()))
    assert redis_server.client().ttl(cache.key(image_digest(data))) == -1


def test_fingerprint_and_bytes_are_part_of_the_key(redis_server):
    settings = settings_for(redis_server.url)
    data = unique_bytes()
    compute = Counter(make_parsing())
    ParsingCache(settings, "model-a").get_or_compute(data, compute)
    _, hit_other_model = ParsingCache(settings, "model-b").get_or_compute(data, compute)
    _, hit_other_image = ParsingCache(settings, "model-a").get_or_compute(data + b"x", compute)
    _, hit_same = ParsingCache(settings, "model-a").get_or_compute(data, compute)
    assert (hit_other_model, hit_other_image, hit_same) == (False, False, True)
    assert compute.calls == 3


def test_without_redis_url_every_call_computes():
    cache = ParsingCache(settings_for(""), "fp")
    compute = Counter(make_parsing())
    assert not cache.enabled
    assert cache.get_or_compute(b"x", compute)[1] is False
    assert cache.get_or_compute(b"x", compute)[1] is False
    assert compute.calls == 2


def test_unreadable_cached_value_is_recomputed_and_replaced(redis_server):
    cache = ParsingCache(settings_for(redis_server.url), "fp-" + uuid.uuid4().hex)
    data = unique_bytes()
    key = cache.key(image_digest(data))
    redis_server.client().set(key, b"\x01not zlib at all")
    compute = Counter(make_parsing())
    parsing, hit = cache.get_or_compute(data, compute)
    assert hit is False and compute.calls == 1
    assert_same(parsing, decode_parsing(redis_server.client().get(key)))


def test_compute_errors_propagate_and_nothing_is_cached(redis_server):
    cache = ParsingCache(settings_for(redis_server.url), "fp-" + uuid.uuid4().hex)
    data = unique_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_compute(data, Counter(make_parsing(), error=RuntimeError("boom")))
    assert redis_server.client().get(cache.key(image_digest(data))) is None
    assert redis_server.client().get(cache.key(image_digest(data)) + ":lock") is None
    assert cache.get_or_compute(data, Counter(make_parsing()))[1] is False


def test_concurrent_threads_compute_once(redis_server):
    cache = ParsingCache(settings_for(redis_server.url), "fp-" + uuid.uuid4().hex)
    compute = Counter(make_parsing(), delay=0.3)
    data = unique_bytes()
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute(data, compute)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compute.calls == 1
    assert len(results) == 8 and sum(not hit for _, hit in results) == 1
    for parsing, _ in results:
        assert_same(results[0][0], parsing)


def test_concurrent_threads_compute_once_even_without_redis():
    cache = ParsingCache(settings_for(""), "fp")
    compute = Counter(make_parsing(), delay=0.3)
    threads = [threading.Thread(target=cache.get_or_compute, args=(b"same", compute)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compute.calls == 1


def test_two_processes_share_one_computation_through_the_redis_lock(redis_server):
    # Two caches = two processes: separate in-process state, one Redis.
    settings = settings_for(redis_server.url)
    fp = "fp-" + uuid.uuid4().hex
    a, b = ParsingCache(settings, fp, poll_interval=0.02), ParsingCache(settings, fp, poll_interval=0.02)
    compute = Counter(make_parsing(), delay=0.5)
    data = unique_bytes()
    out = {}
    ta = threading.Thread(target=lambda: out.setdefault("a", a.get_or_compute(data, compute)))
    ta.start()
    time.sleep(0.1)  # a holds the lock
    out["b"] = b.get_or_compute(data, compute)
    ta.join()
    assert compute.calls == 1
    assert out["a"][1] is False and out["b"][1] is True
    assert_same(out["a"][0], out["b"][0])


def test_the_lock_lives_as_long_as_its_holder_computes(redis_server):
    """A parse longer than the lock's timeout keeps its lock (renewed), so no second process starts the same
    parse; the lock goes when the parse ends."""
    settings = settings_for(redis_server.url)
    fp = "fp-" + uuid.uuid4().hex
    a = ParsingCache(settings, fp, lock_timeout=0.6, poll_interval=0.02)
    b = ParsingCache(settings, fp, lock_timeout=0.6, poll_interval=0.02)
    compute = Counter(make_parsing(), delay=2.0)
    data = unique_bytes()
    lock_key = a.key(image_digest(data)) + ":lock"
    out = {}
    ta = threading.Thread(target=lambda: out.setdefault("a", a.get_or_compute(data, compute)))
    ta.start()
    time.sleep(1.5)  # well past the lock's own timeout: only renewal keeps it
    assert redis_server.client().exists(lock_key)
    out["b"] = b.get_or_compute(data, compute)
    ta.join()
    assert compute.calls == 1 and out["b"][1] is True
    assert not redis_server.client().exists(lock_key)


def test_waiter_computes_itself_when_the_lock_holder_fails(redis_server):
    settings = settings_for(redis_server.url)
    fp = "fp-" + uuid.uuid4().hex
    a, b = ParsingCache(settings, fp, poll_interval=0.02), ParsingCache(settings, fp, poll_interval=0.02)
    data = unique_bytes()
    failing = Counter(make_parsing(), delay=0.3, error=RuntimeError("holder died"))
    good = Counter(make_parsing())
    errors = []

    def run_a():
        try:
            a.get_or_compute(data, failing)
        except RuntimeError as exc:
            errors.append(exc)

    ta = threading.Thread(target=run_a)
    ta.start()
    time.sleep(0.1)
    parsing, hit = b.get_or_compute(data, good)
    ta.join()
    assert errors and hit is False and good.calls == 1


def test_waiter_stops_waiting_after_the_bounded_wait(redis_server):
    settings = settings_for(redis_server.url)
    fp = "fp-" + uuid.uuid4().hex
    cache = ParsingCache(settings, fp, wait_timeout=0.3, poll_interval=0.02)
    data = unique_bytes()
    # A lock held by a worker that never finishes (e.g. hung): waiters must not hang with it.
    redis_server.client().set(cache.key(image_digest(data)) + ":lock", "someone-else", px=60_000)
    compute = Counter(make_parsing())
    start = time.monotonic()
    _, hit = cache.get_or_compute(data, compute)
    assert hit is False and compute.calls == 1
    assert time.monotonic() - start < 5


def test_redis_down_then_back(redis_server, caplog):
    settings = settings_for(redis_server.url, redis_retry_seconds=0.5, redis_timeout=0.3)
    cache = ParsingCache(settings, "fp-" + uuid.uuid4().hex)
    data = unique_bytes()
    compute = Counter(make_parsing())
    caplog.set_level(logging.WARNING, logger="backend.cache")
    redis_server.stop()
    try:
        for _ in range(4):
            parsing, hit = cache.get_or_compute(data, compute)
            assert hit is False
            assert_same(parsing, make_parsing())
        time.sleep(0.6)
        cache.get_or_compute(data, compute)  # retries, fails again: still one warning for this outage
        unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(unavailable) == 1
        assert compute.calls == 5
        assert cache.stats().redis_available is False
    finally:
        redis_server.start()
    time.sleep(0.6)
    _, hit = cache.get_or_compute(data, compute)   # recovered: computed once more and stored
    _, hit2 = cache.get_or_compute(data, compute)
    assert (hit, hit2) == (False, True)
    assert compute.calls == 6
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert cache.stats().redis_available is True


def test_hung_redis_costs_at_most_the_timeout(redis_server):
    settings = settings_for(redis_server.url, redis_timeout=0.2, redis_retry_seconds=60)
    cache = ParsingCache(settings, "fp-" + uuid.uuid4().hex)
    cache.get_or_compute(unique_bytes(), Counter(make_parsing()))  # connection established
    pid = redis_server.proc.pid
    os.kill(pid, signal.SIGSTOP)  # a real Redis that stops answering
    try:
        compute = Counter(make_parsing())
        start = time.monotonic()
        for _ in range(3):
            assert cache.get_or_compute(unique_bytes(), compute)[1] is False
        elapsed = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    assert compute.calls == 3
    # One timed-out call, then Redis is left alone until the retry interval instead of timing out again.
    assert cache.stats().redis_errors == 1
    assert elapsed < 10, elapsed


def test_results_cache_round_trip_ttl_and_keys(redis_server):
    cache = ParsingCache(settings_for(redis_server.url, cache_ttl=600), "fp-" + uuid.uuid4().hex)
    digest = image_digest(unique_bytes())
    prediction = {"result": [{"id": "r1", "value": {"points": [[1.5, 2.25], [3, 4], [5, 0]]}}], "score": 0.5,
                  "model_version": "m@1"}
    assert cache.get_results(digest, "config-a") is None
    cache.put_results(digest, "config-a", prediction)
    assert cache.get_results(digest, "config-a") == prediction
    assert cache.get_results(digest, "config-b") is None     # another config / settings / code version
    assert 500 < redis_server.client().ttl(cache.results_key(digest, "config-a")) <= 600
    stats = cache.stats()
    assert (stats.results_hits, stats.results_misses) == (1, 2)
    redis_server.client().set(cache.results_key(digest, "config-a"), b"garbage")
    assert cache.get_results(digest, "config-a") is None


def test_results_cache_without_redis_is_a_miss():
    cache = ParsingCache(settings_for(""), "fp")
    cache.put_results("d", "v", {"result": []})
    assert cache.get_results("d", "v") is None
