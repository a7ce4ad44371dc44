"""The endless batch streams a training cycle draws from, and which labelled images they
favour."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

from model import distributed
from model.data import Sample
from model.ignore import IGNORE_INDEX


def labelled_pixel_weights(samples: Sequence[Sample]) -> list[float] | None:
    """Draw labelled images in proportion to their labelled pixels. After a region
    acquisition most labelled images carry a few small blocks: drawn uniformly, a batch
    would hold mostly unlabelled pixels and the fully labelled images would starve. None
    (uniform) when every image is fully labelled alike."""
    counts = [float((sample.mask != IGNORE_INDEX).sum()) for sample in samples]
    if max(counts) <= 0 or min(counts) == max(counts):
        return None
    return counts


def infinite_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    weights: Sequence[float] | None = None,
) -> Iterator:
    """Batches forever, reshuffled every pass (or drawn in proportion to `weights`);
    datasets smaller than a batch repeat. Under torchrun each rank draws its shard of one
    global stream (model.distributed)."""
    sampler = distributed.InfiniteShardedSampler(len(dataset), seed=seed, weights=weights)
    loader = DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    while True:
        yield from loader
