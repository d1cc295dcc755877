"""backend.recent: the small LRU of decoded parsings that interactive clicks reuse."""
from __future__ import annotations

from backend.engine.types import Parsing
from backend.recent import RecentParsings


def test_keeps_the_most_recently_used_parsings() -> None:
    recent = RecentParsings(capacity=2)
    a, b, c = Parsing(1, 1), Parsing(2, 2), Parsing(3, 3)
    recent.put("a", a)
    recent.put("b", b)
    assert recent.get("a") is a          # "a" is now the most recent
    recent.put("c", c)                   # evicts "b"
    assert recent.get("b") is None and recent.get("a") is a and recent.get("c") is c and len(recent) == 2
    off = RecentParsings(capacity=0)
    off.put("a", a)
    assert off.get("a") is None
