"""The simulator's oracle: which pixels of each train image are labelled, revealed from the
ground truth as acquisition asks, and replayable from its history (for --resume)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model import acquisition as acq
from model.data import IGNORE_INDEX, Sample


class LabelState:
    """Which pixels of each train image are labelled; the oracle's masks reveal them.

    ``history`` lists the acquisitions (``("regions", [Region...])`` or ``("images",
    [index...])``) so the state can be rebuilt from the start set by replaying it.
    """

    def __init__(self, truth: Sequence[np.ndarray], start: Sequence[int]):
        self.truth = truth
        self.start = sorted(start)
        self.labelled = [np.zeros(mask.shape, dtype=bool) for mask in truth]
        for index in self.start:
            self.labelled[index][:] = True
        self.history: list[tuple[str, list]] = []

    @property
    def total_pixels(self) -> int:
        return sum(mask.size for mask in self.truth)

    def is_full(self, index: int) -> bool:
        return bool(self.labelled[index].all())

    def pool(self) -> list[int]:
        """Train images with unlabelled pixels (partially labelled ones included)."""
        return [i for i in range(len(self.truth)) if not self.is_full(i)]

    def labelled_pixels(self) -> int:
        return int(sum(mask.sum() for mask in self.labelled))

    def labelled_valid_pixels(self) -> int:
        """Labelled pixels whose label is a class (not void)."""
        return int(
            sum(
                (m & (t != IGNORE_INDEX)).sum()
                for m, t in zip(self.labelled, self.truth, strict=True)
            )
        )

    def reveal_regions(self, regions: Sequence[acq.Region]) -> dict:
        new = void = 0
        for region in regions:
            open_ = ~self.labelled[region.image_index][region.slices]
            if not open_.any():
                raise ValueError(f"{region} is already labelled")
            new += int(open_.sum())
            void += int(
                (self.truth[region.image_index][region.slices][open_] == IGNORE_INDEX).sum()
            )
            self.labelled[region.image_index][region.slices] = True
        self.history.append(("regions", list(regions)))
        return {"pixels": new, "void_pixels": void, "regions": len(regions), "images": 0}

    def reveal_images(self, indices: Sequence[int]) -> dict:
        new = void = 0
        for index in indices:
            open_ = ~self.labelled[index]
            new += int(open_.sum())
            void += int((self.truth[index][open_] == IGNORE_INDEX).sum())
            self.labelled[index][:] = True
        self.history.append(("images", [int(i) for i in indices]))
        return {"pixels": new, "void_pixels": void, "regions": 0, "images": len(indices)}

    def mask(self, index: int) -> np.ndarray | None:
        """The label the trainer sees: ground truth where labelled, 255 elsewhere."""
        if self.is_full(index):
            return self.truth[index]
        if not self.labelled[index].any():
            return None
        return np.where(self.labelled[index], self.truth[index], IGNORE_INDEX)

    def training_sets(self, train: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
        """(labelled: every image with a labelled pixel, full or partial; unlabelled: every
        image not fully labelled, carrying its partial mask or None)."""
        labelled, unlabelled = [], []
        for index, sample in enumerate(train):
            mask = self.mask(index)
            if mask is not None:
                labelled.append(Sample(sample.name, sample.image, mask))
            if not self.is_full(index):
                unlabelled.append(Sample(sample.name, sample.image, mask))
        return labelled, unlabelled

    def to_dict(self) -> dict:
        return {
            "start": list(self.start),
            "history": [
                (kind, [r.to_dict() for r in items] if kind == "regions" else items)
                for kind, items in self.history
            ],
        }

    def restore(self, data: dict) -> None:
        """Become the state ``data`` (``to_dict()`` output) describes."""
        other = LabelState.from_dict(self.truth, data)
        self.start, self.labelled, self.history = other.start, other.labelled, other.history

    @classmethod
    def from_dict(cls, truth: Sequence[np.ndarray], data: dict) -> LabelState:
        state = cls(truth, data["start"])
        for kind, items in data["history"]:
            if kind == "regions":
                state.reveal_regions([acq.Region(**r) for r in items])
            else:
                state.reveal_images(items)
        return state


