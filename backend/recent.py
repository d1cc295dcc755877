"""The last few parsings this process used for interactive clicks, decoded, by image digest.

An annotator clicks several times on one image: each click would otherwise fetch the parsing from Redis and
decode it (tens of ms at 1920x1080, a third of a click's budget). A 1920x1080 parsing holds ~60 MB of masks, so
only a handful are kept; an image that fell out is read from Redis again (or parsed, without Redis).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from backend.engine.types import Parsing

CAPACITY = 3


class RecentParsings:
    """A small thread-safe LRU: digest -> Parsing."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Parsing] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> Parsing | None:
        with self._lock:
            parsing = self._items.get(digest)
            if parsing is not None:
                self._items.move_to_end(digest)
            return parsing

    def put(self, digest: str, parsing: Parsing) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[digest] = parsing
            self._items.move_to_end(digest)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
