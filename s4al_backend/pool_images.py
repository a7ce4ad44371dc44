"""The pool's images, streamed: a cycle never holds the decoded images of every task.

`PoolImages.prepare(items)` (the cycle's `images` phase) fetches each task image once into
the disk cache (`images.ImageCache`, IMAGE_CACHE_MB), decodes it to learn its size and to
find the broken ones, and drops it. Afterwards each `PoolItem.image` asks `PoolImages`,
which decodes the cached bytes again and keeps only the last few images (a batch or two
of scoring and prediction read the same image close together). Peak memory is then a few
images, whatever the pool's size; the price is one decode per use. A pool larger than
the disk cache is downloaded again for each pass over it (still correct, but slower and
more traffic: size IMAGE_CACHE_MB to the pool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .lru import BoundedLRU
from .pool import PoolItem

RECENT_IMAGES = 32  # decoded images kept, at most
RECENT_BYTES = 256 * 2**20  # and at most this many bytes of them
FETCH_THREADS = 4
FETCH_WINDOW = 64  # images in flight in the images phase (futures are not all made at once)


class PoolImages:
    """Reads pool images through an `images.ImageFetcher` (or anything with its `load`)."""

    def __init__(self, fetcher, recent: int = RECENT_IMAGES, recent_bytes: int = RECENT_BYTES):
        self.fetcher = fetcher
        self.recent = BoundedLRU(recent, recent_bytes, size=lambda image: image.nbytes)

    def __call__(self, item: PoolItem) -> np.ndarray:
        image = self.recent.get(item.id)
        if image is None:
            image = self.fetcher.load(item.url, item.id)
            self.recent.put(item.id, image)
        return image

    def prepare(self, items: Iterable[PoolItem],
                failed: Callable[[PoolItem, Exception], None],
                done: Callable[[int], None] = lambda count: None) -> None:
        """Fetch and check every item's image, FETCH_WINDOW at a time; an item whose image
        loads gets its `shape` and this reader, one that fails goes to `failed`."""
        items = list(items)
        with ThreadPoolExecutor(max_workers=FETCH_THREADS,
                                thread_name_prefix="s4al-cycle-img") as pool:
            for start in range(0, len(items), FETCH_WINDOW):
                window = items[start:start + FETCH_WINDOW]
                futures = [pool.submit(self._shape, item) for item in window]
                for item, future in zip(window, futures, strict=True):
                    try:
                        item.shape = future.result()
                        item.reader = self
                    except Exception as exc:
                        failed(item, exc)
                done(start + len(window))

    def _shape(self, item: PoolItem) -> tuple[int, int]:
        return tuple(self.fetcher.load(item.url, item.id).shape[:2])
