"""A thread-safe least-recently-used map bounded in entries and in bytes: what the web
process remembers per caller (label configs per project id, parsed configs, warnings
given) stays bounded however many project ids or configs callers send."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["BoundedLRU"]


class BoundedLRU:
    """At most ``max_items`` entries and ``max_bytes`` (as ``size(value)`` counts them);
    the least recently used go first. A value larger than ``max_bytes`` is not kept."""

    def __init__(self, max_items: int, max_bytes: int | None = None,
                 size: Callable[[Any], int] = lambda _value: 1):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return default
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: Any) -> None:
        cost = self._size(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if self.max_bytes is not None and cost > self.max_bytes:
                return
            self._items[key] = (value, cost)
            self._bytes += cost
            while len(self._items) > self.max_items or (
                    self.max_bytes is not None and self._bytes > self.max_bytes):
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def add(self, key: Hashable) -> bool:
        """Remember ``key``; True when it was new (for once-only warnings)."""
        with self._lock:
            new = key not in self._items
        self.put(key, True)
        return new

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[Hashable]:
        """The keys now held, least recently used first (a copy)."""
        with self._lock:
            return list(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes
