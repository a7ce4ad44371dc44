"""Streaming softmax prediction: one probability map per image, bounded memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from model.data import normalize
from model.precision import Precision, resolve_precision, to_channels_last, to_device


def predict_probabilities(
    model: nn.Module,
    images: Iterable[np.ndarray],
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    amp: bool | str = False,
) -> Iterator[Tensor]:
    """Yields a float32 C x H x W softmax map (on the CPU) per uint8 H x W x 3 image, in order.

    Consecutive images of the same size share a batch of up to `batch_size`; a size change
    starts a new batch, so no image is ever resized. The model (already on `device`) runs in
    eval mode; its previous mode is restored when the stream ends or is closed.
    `amp` is model.precision's setting ("off"/False, "auto"/True, "bf16", "fp16"): with
    16-bit autocast the model's weights are made channels_last (in place, same values).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    precision = resolve_precision(amp, device)
    to_channels_last(model, precision.enabled)
    was_training = model.training
    model.eval()
    try:
        for batch in _same_size_batches(images, batch_size):
            yield from _predict_batch(model, batch, torch.device(device), precision)
    finally:
        model.train(was_training)


def _same_size_batches(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for image in images:
        if batch and image.shape != batch[0].shape:
            yield np.stack(batch)
            batch = []
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


# no_grad rather than inference_mode: callers may feed the maps into autograd code later.
@torch.no_grad()
def _predict_batch(
    model: nn.Module, batch: np.ndarray, device: torch.device, precision: Precision
) -> Tensor:
    inputs = to_device(normalize(batch), device, channels_last=precision.enabled)
    with precision.autocast():
        logits = model(inputs)
    return logits.float().softmax(dim=1).cpu()
