"""ClassMix and S4AL's Balanced ClassMix (papers/s4al.md Sec. 3.3).

A mix pastes the pixels of some classes of a source image (chosen from its pseudo-label)
onto a target image; images, labels and confidences are mixed with the same mask. Which
classes are pasted is a small strategy object with `sample(present) -> classes`:
`RandomHalf` (ClassMix: a random half of the classes present) or `ClassSampler` (Balanced
ClassMix: separate draws from the labelled set's head and tail classes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.data import IGNORE_INDEX


def present_classes(labels: Tensor) -> Tensor:
    """Sorted class ids in a label map, 255 excluded, on the CPU."""
    classes = torch.unique(labels).cpu()
    return classes[classes != IGNORE_INDEX]


class RandomHalf:
    """ClassMix (Olsson et al., 2021): half of the present classes, rounded up, at random."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def sample(self, present: Tensor) -> Tensor:
        order = torch.randperm(len(present), generator=self.generator)
        return present[order[: (len(present) + 1) // 2]]


def head_tail_split(pixel_counts: Sequence[int], head_pixel_share: float) -> tuple[list, list]:
    """Head = the most frequent classes that together cover `head_pixel_share` of all
    labelled pixels (the fewest such); tail = every other class, unseen ones included."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    share = np.cumsum(counts[order]) / max(counts.sum(), 1.0)
    n_head = int(np.searchsorted(share, head_pixel_share) + 1) if counts.sum() else 0
    return sorted(order[:n_head].tolist()), sorted(order[n_head:].tolist())


class ClassSampler:
    """Balanced ClassMix's class draw: up to `n_head` of the present head classes and up to
    `n_tail` (None: all) of the present tail classes, each uniformly without replacement.

    Drawing the two groups separately is what over-samples the tail. How many of each
    matters more than the split: the head classes of a street scene cover most of a crop, so
    every pasted head class also covers the target's own tail pixels. On CamVid crops
    (`benchmarks.classmix_tail`) 3 head + 2 tail classes left 11% of the mixed pixels to the
    tail, below plain ClassMix (16%) and no mix at all (17%). Pasting only the source's tail
    classes can only add tail pixels (a mixed pixel is the target's where nothing is pasted,
    tail where something is): 29%, the default. One head class as well gives 26%, but then a
    replayed crop that one head class fills can cover all of the target's tail.
    """

    def __init__(
        self,
        head: Sequence[int],
        tail: Sequence[int],
        n_head: int = 0,
        n_tail: int | None = None,
        generator: torch.Generator | None = None,
    ):
        self.head = torch.as_tensor(list(head), dtype=torch.int64)
        self.tail = torch.as_tensor(list(tail), dtype=torch.int64)
        self.n_head = n_head
        self.n_tail = n_tail
        self.generator = generator

    @classmethod
    def from_masks(
        cls,
        masks: Iterable[np.ndarray | Tensor],
        num_classes: int,
        head_pixel_share: float = 0.8,
        n_head: int = 0,
        n_tail: int | None = None,
        generator: torch.Generator | None = None,
    ) -> ClassSampler:
        """Split classes by their pixel counts in the labelled masks (255 ignored)."""
        counts = np.zeros(num_classes, dtype=np.int64)
        for mask in masks:
            values = np.asarray(mask).ravel()
            counts += np.bincount(values[values != IGNORE_INDEX], minlength=num_classes)
        head, tail = head_tail_split(counts, head_pixel_share)
        return cls(head, tail, n_head, n_tail, generator)

    def sample(self, present: Tensor) -> Tensor:
        return torch.cat(
            [
                self._draw(present[torch.isin(present, self.head)], self.n_head),
                self._draw(present[torch.isin(present, self.tail)], self.n_tail),
            ]
        )

    def _draw(self, candidates: Tensor, n: int | None) -> Tensor:
        if n is None:
            return candidates
        return candidates[torch.randperm(len(candidates), generator=self.generator)[:n]]


def classmix_masks(labels: Tensor, sampler: RandomHalf | ClassSampler) -> Tensor:
    """Label maps N x H x W -> bool masks N x H x W: per image, its pixels whose class is
    among those the sampler draws from the classes present."""
    masks = []
    for image_labels in labels:
        chosen = sampler.sample(present_classes(image_labels)).to(labels.device)
        masks.append(torch.isin(image_labels, chosen))
    return torch.stack(masks)


def apply_mix(mask: Tensor, source: Sequence[Tensor], target: Sequence[Tensor]) -> list[Tensor]:
    """Per pair, take `source` where `mask` (N x H x W) is set and `target` elsewhere; works
    for images N x C x H x W and per-pixel maps N x H x W alike."""
    mixed = []
    for src, tgt in zip(source, target, strict=True):
        m = mask if src.dim() == mask.dim() else mask[:, None]
        mixed.append(torch.where(m, src, tgt))
    return mixed


class ReplayBuffer:
    """The last `size` distinct dataset indices seen, oldest dropped first; sampled
    uniformly with replacement.

    It holds indices, not tensors: a replayed image is re-read through the dataset's joint
    transform, so its image and partial labels get one and the same crop and flip (the
    authors' code loaded them with three separate random transforms).
    """

    def __init__(self, size: int, generator: torch.Generator | None = None):
        self.indices: deque[int] = deque(maxlen=size)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.indices)

    def add(self, indices: Iterable[int]) -> None:
        for index in map(int, indices):
            if index in self.indices:
                self.indices.remove(index)
            self.indices.append(index)

    def sample(self, n: int) -> list[int]:
        if not self.indices:
            raise IndexError("sample from an empty ReplayBuffer")
        picks = torch.randint(len(self.indices), (n,), generator=self.generator)
        return [self.indices[i] for i in picks.tolist()]

    def state_dict(self) -> dict:
        return {"indices": list(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        self.indices.clear()
        self.add(state["indices"])
