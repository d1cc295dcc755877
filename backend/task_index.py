"""Which tasks have their prediction in the results cache, known WITHOUT fetching their images.

The results cache (backend/cache.py) is keyed by the image bytes' hash: to look a task up there one must first
download its image, which is exactly what a /predict over thousands of tasks cannot afford. So every time a
prediction is made for a task, a tiny entry records which bytes its image had:

    m2fp:taskidx:<sha1(task id | image URL | results variant)> -> sha256 of the image bytes   (CACHE_TTL_SECONDS)

A task is "cached" when every image of its config has an entry AND the results those digests point at are
still in the cache (they expire on their own). Looking up N tasks is one MGET of the index, then one GET per
task found there (the cached result items themselves): no image is fetched, no parsing decoded. The task id is part of the key, so a task reusing another task's
URL is not answered from an entry it never made; the URL too, so a task whose image was replaced misses.
Caveat: a URL whose content changes in place (same task, same URL, new bytes) keeps answering the old
prediction until the entry expires, as the results cache itself would for any client that sent the old bytes.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from backend.cache import ParsingCache
    from backend.predict import ConfigPlan, TaskOutcome

_PREFIX = "m2fp:taskidx"


def index_key(task_id: object, url: str, variant: str) -> str:
    digest = hashlib.sha1(f"{task_id}|{url}|{variant}".encode()).hexdigest()
    return f"{_PREFIX}:{digest}"


def _urls(task: Mapping, plan: ConfigPlan) -> list[str] | None:
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    urls = [data.get(image.data_key) for image in plan.images]
    return urls if all(isinstance(u, str) and u for u in urls) else None


def record(cache: ParsingCache, task: Mapping, plan: ConfigPlan, outcome: TaskOutcome) -> None:
    """Remember the image digests of a task that got its prediction (no-op without Redis or a task id)."""
    task_id = task.get("id") if isinstance(task, Mapping) else None
    urls = _urls(task, plan)
    if not cache.enabled or task_id is None or urls is None or not outcome.ok:
        return
    entries = {}
    for image, url in zip(plan.images, urls):
        digest = outcome.digests.get(image.data_key)
        if digest is None:
            return
        entries[index_key(task_id, url, image.variant)] = digest
    ttl = cache.ttl if cache.ttl > 0 else None

    def write(client):
        with client.pipeline(transaction=False) as pipe:
            for key, digest in entries.items():
                pipe.set(key, digest, ex=ttl)
            pipe.execute()
    cache.call(write)


def cached_results(cache: ParsingCache, tasks: Sequence[Mapping], plan: ConfigPlan) -> list[list[dict] | None]:
    """Per task, its result items from the cache (every image's, in plan order), or None when not cached.
    Reads only Redis: no image is fetched."""
    out: list[list[dict] | None] = [None] * len(tasks)
    if not cache.enabled or not tasks:
        return out
    keys: list[str] = []
    slots: list[int] = []
    for i, task in enumerate(tasks):
        urls = _urls(task, plan)
        task_id = task.get("id") if isinstance(task, Mapping) else None
        if urls is None or task_id is None:
            continue
        keys.extend(index_key(task_id, url, image.variant) for image, url in zip(plan.images, urls))
        slots.append(i)
    if not keys:
        return out
    digests = cache.call(lambda c: c.mget(keys))
    if not digests:
        return out
    per_image = len(plan.images)
    for n, i in enumerate(slots):
        found = digests[n * per_image:(n + 1) * per_image]
        if any(d is None for d in found):
            continue
        results: list[dict] = []
        for image, raw in zip(plan.images, found):
            digest = raw.decode() if isinstance(raw, bytes) else str(raw)
            items = cache.get_results(digest, image.variant)
            if not isinstance(items, list):
                results = None
                break
            results.extend(items)
        out[i] = results
    return out
