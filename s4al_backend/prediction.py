"""Bounding what one /predict costs: images scaled down to MAX_PREDICT_PIXELS before the
network, forward batches bounded in images and in pixels, and the per-pixel results
scaled back to each image's own size (Label Studio's brush masks are at full size).

The network's memory grows with the pixels it sees (about 450 MB per million on the
CPU), so a large image, however small its file, would otherwise take the process's
memory; scaled down it costs what a MAX_PREDICT_PIXELS image costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["NetworkInput", "batches", "fit_pixels", "scale_to"]


@dataclass
class NetworkInput:
    index: int  # the task's position in the request
    task_id: object  # as the task gives it, for logs
    image: np.ndarray  # uint8 h x w x 3, at most MAX_PREDICT_PIXELS
    size: tuple[int, int]  # (height, width) of the task's image

    @property
    def pixels(self) -> int:
        return self.image.shape[0] * self.image.shape[1]


def fit_pixels(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """``image`` scaled down (area averaging, aspect kept) to at most ``max_pixels``."""
    height, width = image.shape[:2]
    if height * width <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def batches(items: Iterable[NetworkInput], batch_size: int,
            max_pixels: int) -> Iterator[list[NetworkInput]]:
    """Consecutive same-size inputs, at most ``batch_size`` of them and at most
    ``max_pixels`` in all (an input alone may reach ``max_pixels``: ``fit_pixels``)."""
    batch: list[NetworkInput] = []
    for item in items:
        if batch and (item.image.shape != batch[0].image.shape or len(batch) >= batch_size
                      or sum(b.pixels for b in batch) + item.pixels > max_pixels):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def scale_to(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A per-pixel map (any dtype) scaled to ``size`` = (height, width), nearest pixel."""
    height, width = values.shape[:2]
    if (height, width) == tuple(size):
        return values
    rows = (np.arange(size[0]) * height // size[0]).astype(np.intp)
    cols = (np.arange(size[1]) * width // size[1]).astype(np.intp)
    return values[rows[:, None], cols[None, :]]
