"""Which pixels to annotate next: pixel heuristics, block scoring and selection.

Three small steps, each usable alone:

1. A heuristic turns softmax probabilities ``C x H x W`` into a score map ``H x W``,
   higher = more uncertain (``Entropy``, ``Margin``, ``LeastConfidence``, ``RandomScore``).
2. ``block_scores`` averages a score map over square blocks (partial blocks at the right and
   bottom borders are real, smaller blocks) and excludes blocks that are already labelled,
   giving a ``BlockGrid`` (one score and one pixel cost per block).
3. ``BlockSelector`` / ``select_blocks`` pick blocks: the top ``k`` of every image and/or the
   best blocks across images within a global pixel budget. The selector consumes one image's
   grid at a time and keeps only candidates that can still be selected, so a whole pool is
   never held in memory. Costs are exact pixel counts of newly labelled pixels.

``score_pool`` runs a model over a pool of images (streamed through
``model.inference.predict_probabilities``), keeping one block grid and one image score per
image, never the probability maps. ``image_score`` / ``select_images`` give the image-level
baseline (mean uncertainty per image).
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.ignore import IGNORE_INDEX

_REFERENCE_HEIGHT = 360
_REFERENCE_REGION = 30


# --------------------------------------------------------------------------- heuristics
def _class_axis(probs) -> int:
    if probs.ndim < 3:
        raise ValueError(f"probabilities must be C x H x W (or N x C x H x W), got {probs.shape}")
    return probs.ndim - 3


class AbstractHeuristic:
    """One uncertainty measure. Subclasses override ``compute_score`` only.

    ``compute_score(probs)`` takes a torch tensor or numpy array ``C x H x W`` (a leading batch
    axis is allowed) and returns the same kind, ``H x W``, float32, higher = more uncertain.
    """

    name = "abstract"
    needs_model = True  # False: the score does not depend on the probabilities

    def compute_score(self, probs):  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, probs):
        return self.compute_score(probs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_tensor(probs) -> tuple[torch.Tensor, bool]:
    if isinstance(probs, torch.Tensor):
        return probs.float(), False
    return torch.from_numpy(np.asarray(probs, dtype=np.float32)), True


def _back(score: torch.Tensor, to_numpy: bool):
    return score.numpy() if to_numpy else score


class Entropy(AbstractHeuristic):
    """Softmax entropy ``-sum_c p log(p + eps)``. The epsilon keeps ``p = 0`` finite (the
    authors' code computed ``log(0)`` and ranked the resulting NaN first)."""

    name = "entropy"

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def compute_score(self, probs):
        p, to_numpy = _as_tensor(probs)
        axis = _class_axis(p)
        return _back(-(p * torch.log(p + self.eps)).sum(dim=axis), to_numpy)


class Margin(AbstractHeuristic):
    """``1 - (p_first - p_second)``: a small gap between the two best classes is uncertain."""

    name = "margin"

    def compute_score(self, probs):
        p, to_numpy = _as_tensor(probs)
        axis = _class_axis(p)
        if p.shape[axis] < 2:
            raise ValueError("Margin needs at least two classes")
        top = torch.topk(p, 2, dim=axis).values
        first, second = top.unbind(dim=axis)
        return _back(1.0 - (first - second), to_numpy)


class LeastConfidence(AbstractHeuristic):
    """``1 - p_max``."""

    name = "least-confidence"

    def compute_score(self, probs):
        p, to_numpy = _as_tensor(probs)
        return _back(1.0 - p.amax(dim=_class_axis(p)), to_numpy)


class RandomScore(AbstractHeuristic):
    """Uniform random scores from a seeded generator (a new draw at every call). Only the
    probabilities' shape is read, so a placeholder without classes (``0 x H x W``, see
    ``placeholder``) stands in for a network's output."""

    name = "random"
    needs_model = False

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def compute_score(self, probs):
        shape = tuple(probs.shape)
        axis = _class_axis(probs)
        out_shape = shape[:axis] + shape[axis + 1 :]
        score = self._rng.random(out_shape, dtype=np.float32)
        return score if not isinstance(probs, torch.Tensor) else torch.from_numpy(score)

    def __repr__(self) -> str:
        return f"RandomScore(seed={self.seed})"


HEURISTICS: dict[str, type[AbstractHeuristic]] = {
    "entropy": Entropy,
    "margin": Margin,
    "least-confidence": LeastConfidence,
    "random": RandomScore,
}


def get_heuristic(name: str, seed: int = 0) -> AbstractHeuristic:
    """A heuristic by name (``entropy``, ``margin``, ``least-confidence``, ``random``)."""
    try:
        cls = HEURISTICS[name]
    except KeyError:
        raise ValueError(f"unknown heuristic {name!r}; choose from {sorted(HEURISTICS)}") from None
    return cls(seed) if cls is RandomScore else cls()


def placeholder(height: int, width: int) -> torch.Tensor:
    """What a heuristic with ``needs_model = False`` scores instead of probabilities: an
    empty ``0 x H x W`` tensor (no memory, no network run)."""
    return torch.empty(0, height, width)


def region_size_for(height: int) -> int:
    """The paper's block side scaled with the image: 30 px per 360 px of height."""
    return max(1, round(_REFERENCE_REGION * height / _REFERENCE_HEIGHT))


# --------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class Region:
    """A block of one image: top-left ``(x, y)``, size ``w x h`` (clipped at the borders).
    ``score`` is its mean uncertainty, ``cost`` the number of pixels it newly labels."""

    image_index: int
    x: int
    y: int
    w: int
    h: int
    score: float = float("nan")
    cost: int = 0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)

    @property
    def area(self) -> int:
        return self.w * self.h

    def to_dict(self) -> dict:
        return asdict(self)


def _labelled_bool(labelled, shape: tuple[int, int]) -> np.ndarray:
    """A labelled-pixel mask from a bool mask, or from a label mask (255 = not labelled)."""
    if labelled is None:
        return np.zeros(shape, dtype=bool)
    if isinstance(labelled, torch.Tensor):
        labelled = labelled.cpu().numpy()
    labelled = np.asarray(labelled)
    if labelled.shape != shape:
        raise ValueError(f"labelled mask {labelled.shape} does not match the scores {shape}")
    return labelled if labelled.dtype == bool else labelled != IGNORE_INDEX


def _block_sum(values: np.ndarray, block: int) -> np.ndarray:
    h, w = values.shape
    rows, cols = -(-h // block), -(-w // block)
    padded = np.zeros((rows * block, cols * block), dtype=values.dtype)
    padded[:h, :w] = values
    return padded.reshape(rows, block, cols, block).sum(axis=(1, 3))


@dataclass
class BlockGrid:
    """Block scores of one image: ``scores[r, c]`` is the mean score of the block at row r,
    column c over its not-yet-labelled pixels (``-inf`` = excluded); ``costs[r, c]`` the
    number of pixels that labelling it would add."""

    scores: np.ndarray
    costs: np.ndarray
    block: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.scores.shape

    def region(self, image_index: int, row: int, col: int) -> Region:
        y, x = row * self.block, col * self.block
        return Region(
            image_index=int(image_index),
            x=int(x),
            y=int(y),
            w=int(min(self.block, self.width - x)),
            h=int(min(self.block, self.height - y)),
            score=float(self.scores[row, col]),
            cost=int(self.costs[row, col]),
        )


def block_scores(
    score_map,
    block: int,
    labelled=None,
    cost_mask=None,
    max_labelled_fraction: float = 0.0,
) -> BlockGrid:
    """Mean score over square ``block x block`` blocks anchored at (0, 0).

    - Partial blocks at the right/bottom borders are blocks of their real (clipped) size.
    - ``labelled``: bool mask of labelled pixels, or a label mask (255 = not labelled).
      Labelled pixels do not enter a block's mean or cost; a block whose labelled share is
      above ``max_labelled_fraction`` (default 0: any labelled pixel) is excluded, so a block
      is never selected twice.
    - ``cost_mask``: bool mask of the pixels that count in the cost (ignore-aware cost:
      pass the pixels that will carry a usable label); default every pixel.
    - A block with a non-finite score (NaN from a broken model) is excluded, never first.
    """
    if block < 1:
        raise ValueError("block must be >= 1")
    if isinstance(score_map, torch.Tensor):
        score_map = score_map.detach().cpu().numpy()
    scores = np.asarray(score_map, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"score map must be H x W, got {scores.shape}")
    height, width = scores.shape
    open_ = ~_labelled_bool(labelled, scores.shape)
    finite = np.isfinite(scores)
    total = _block_sum(np.where(open_ & finite, scores, 0.0), block)
    n_open = _block_sum(open_.astype(np.int64), block)
    n_finite = _block_sum((open_ & finite).astype(np.int64), block)
    area = _block_sum(np.ones(scores.shape, dtype=np.int64), block)
    if cost_mask is None:
        costs = n_open
    else:
        cost_mask = _labelled_bool(cost_mask, scores.shape)
        costs = _block_sum((open_ & cost_mask).astype(np.int64), block)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n_finite
    labelled_share = 1.0 - n_open / area
    excluded = (n_open == 0) | (n_finite < n_open) | (labelled_share > max_labelled_fraction)
    mean[excluded] = -np.inf
    return BlockGrid(mean, costs.astype(np.int64), block, height, width)


def prioritise(score_map, priority, weight: float):
    """``score_map`` with ``weight`` added on the ``priority`` pixels (bool ``H x W``): PLAR's
    queued pixels, which the paper labels first. With ``weight`` at least the heuristic's
    range (``log C`` for entropy, 1 for margin, least confidence and random), a block
    entirely queued outranks any unqueued one, and blocks with equal queued shares keep
    the heuristic's order."""
    if priority is None:
        return score_map
    if isinstance(score_map, torch.Tensor):
        score_map = score_map.detach().cpu().numpy()
    priority = np.asarray(priority, dtype=bool)
    if priority.shape != np.shape(score_map):
        raise ValueError(f"priority map {priority.shape} != score map {np.shape(score_map)}")
    return np.asarray(score_map, dtype=np.float64) + weight * priority


def regions_mask(shape: tuple[int, int], regions: Iterable[Region]) -> np.ndarray:
    """Bool mask of the pixels covered by ``regions`` (all of one image)."""
    mask = np.zeros(shape, dtype=bool)
    for region in regions:
        mask[region.slices] = True
    return mask


# --------------------------------------------------------------------------- selection
class BlockSelector:
    """Streaming block selection over images.

    ``per_image``: at most this many blocks per image (the paper: 4). ``budget``: at most this
    many newly labelled pixels in total, filled with the best blocks across all images in
    score order (stopping at the first block that does not fit). Either or both.

    Candidates live in a min-heap that is pruned as soon as better candidates already cover
    the budget, so memory is bounded by the budget (or ``per_image`` x images), never by the
    pool. Ties break by image index, then block position (row-major), lowest first.
    """

    def __init__(self, per_image: int | None = None, budget: int | None = None):
        if per_image is None and budget is None:
            raise ValueError("give per_image, budget, or both")
        if per_image is not None and per_image < 0:
            raise ValueError("per_image must be >= 0")
        if budget is not None and budget < 0:
            raise ValueError("budget must be >= 0")
        self.per_image = per_image
        self.budget = budget
        self._heap: list[tuple[float, int, int, Region]] = []
        self._heap_cost = 0
        self._seen: set[int] = set()

    def add(self, image_index: int, grid: BlockGrid) -> None:
        if image_index in self._seen:
            raise ValueError(f"image {image_index} added twice")
        self._seen.add(image_index)
        flat = grid.scores.ravel()
        candidates = np.flatnonzero(np.isfinite(flat))
        if candidates.size == 0:
            return
        order = np.lexsort((candidates, -flat[candidates]))  # score desc, position asc
        candidates = candidates[order]
        if self.per_image is not None:
            candidates = candidates[: self.per_image]
        cols = grid.scores.shape[1]
        for flat_index in candidates:
            row, col = divmod(int(flat_index), cols)
            region = grid.region(image_index, row, col)
            # min-heap: the worst candidate on top (lowest score, then latest position)
            heapq.heappush(self._heap, (region.score, -image_index, -int(flat_index), region))
            self._heap_cost += region.cost
            self._prune()

    def _prune(self) -> None:
        if self.budget is None:
            return
        while self._heap and self._heap_cost - self._heap[0][3].cost >= self.budget:
            self._heap_cost -= heapq.heappop(self._heap)[3].cost

    def regions(self) -> list[Region]:
        """The selection, best first. Its total cost never exceeds ``budget``."""
        ranked = [item[3] for item in sorted(self._heap, reverse=True)]
        if self.budget is None:
            return ranked
        chosen, spent = [], 0
        for region in ranked:
            if spent + region.cost > self.budget:
                break
            chosen.append(region)
            spent += region.cost
        return chosen


def select_blocks(
    grids: Iterable[BlockGrid] | Iterable[tuple[int, BlockGrid]],
    per_image: int | None = None,
    budget: int | None = None,
) -> list[Region]:
    """Select blocks from grids (``grids[i]`` is image i, or ``(image_index, grid)`` pairs)."""
    selector = BlockSelector(per_image=per_image, budget=budget)
    for position, item in enumerate(grids):
        index, grid = item if isinstance(item, tuple) else (position, item)
        selector.add(index, grid)
    return selector.regions()


def image_score(score_map, labelled=None) -> float:
    """Mean score over an image's not-yet-labelled, finite pixels (``-inf`` if none)."""
    if isinstance(score_map, torch.Tensor):
        score_map = score_map.detach().cpu().numpy()
    scores = np.asarray(score_map, dtype=np.float64)
    keep = ~_labelled_bool(labelled, scores.shape) & np.isfinite(scores)
    return float(scores[keep].mean()) if keep.any() else -math.inf


def select_images(
    scores: Sequence[float],
    count: int | None = None,
    budget: int | None = None,
    costs: Sequence[int] | None = None,
) -> list[int]:
    """Image-level selection: indices in descending score (ties: lower index first), at most
    ``count`` of them and/or as many as fit in ``budget`` pixels (``costs[i]`` = pixels that
    labelling image i adds). Images scoring ``-inf`` (nothing left to label) are skipped."""
    if count is None and budget is None:
        raise ValueError("give count, budget, or both")
    values = np.asarray(scores, dtype=np.float64)
    order = [int(i) for i in np.lexsort((np.arange(values.size), -values))]
    chosen, spent = [], 0
    for index in order:
        if not np.isfinite(values[index]) or (count is not None and len(chosen) >= count):
            break
        if budget is not None:
            cost = int(costs[index]) if costs is not None else 0
            if spent + cost > budget:
                break
            spent += cost
        chosen.append(index)
    return chosen


# --------------------------------------------------------------------------- pool scoring
@dataclass
class PoolScores:
    """What scoring a pool keeps: per image a block grid and a mean score, in pool order."""

    grids: list[BlockGrid]
    image_scores: np.ndarray
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.grids) / self.seconds if self.seconds > 0 else float("inf")


def _image_of(sample) -> np.ndarray:
    return sample.image if hasattr(sample, "image") else sample


def _per_image(values: Sequence | None, n: int, what: str) -> Sequence:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"{what} needs one entry per sample ({len(values)} for {n})")
    return values


def _probabilities(model, samples, heuristic, batch_size, device, amp) -> Iterator:
    """Per sample, the model's probabilities, or None for a heuristic that needs none."""
    from model import inference  # imported here: acquisition alone needs no network code

    if not heuristic.needs_model:
        return iter([None] * len(samples))
    if model is None:
        raise ValueError(f"{heuristic!r} needs a model")
    images = (_image_of(sample) for sample in samples)
    return inference.predict_probabilities(model, images, batch_size, device, amp=amp)


def _score_map(heuristic, probs, shape, labelled, priority_maps, index, priority_weight):
    """One image's score map, queued pixels raised; zeros, without asking the heuristic or
    the priority map, when nothing is left to label (every block is excluded anyway)."""
    if labelled.all():
        return np.zeros(shape)
    score = heuristic.compute_score(placeholder(*shape) if probs is None else probs)
    return prioritise(score, priority_maps[index], priority_weight)


def score_pool(
    model: torch.nn.Module | None,
    samples: Sequence,
    heuristic: AbstractHeuristic,
    block: int | Sequence[int],
    labelled_masks: Sequence | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    *,
    cost_masks: Sequence | None = None,
    max_labelled_fraction: float = 0.0,
    priority_maps: Sequence | None = None,
    priority_weight: float = 0.0,
    amp: bool | str = False,
    on_image: Callable[[int, torch.Tensor | None], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PoolScores:
    """Score every image of a pool, streaming: the one scorer of the simulator and the
    service.

    ``samples``: ``Sample``s (their ``.image``) or ``uint8 H x W x 3`` arrays. Per image
    (sequences with one entry per sample; they may compute entries on demand):
    ``block`` the block side (or one int for all), ``labelled_masks[i]`` its labelled
    pixels (bool) or partial label (255 = not labelled), or None; ``priority_maps[i]``
    (bool, or None): pixels to label first, ``priority_weight`` added to their score (see
    ``prioritise``); ``cost_masks[i]`` see ``block_scores``. An image with nothing left to
    label is not scored (its grid is all excluded; neither the heuristic nor its priority
    map is asked). ``on_image(i, probs)`` receives each image's probabilities
    (``C x H x W``; None for a heuristic with ``needs_model = False``, which skips the
    network), e.g. to push predictions while scoring. Probabilities come from
    ``model.inference.predict_probabilities`` and are dropped once reduced to a block grid
    and an image score, so memory does not grow with the pool. Logs images per second.
    """
    n = len(samples)
    blocks = [block] * n if isinstance(block, int) else _per_image(block, n, "block")
    labelled_masks = _per_image(labelled_masks, n, "labelled_masks")
    cost_masks = _per_image(cost_masks, n, "cost_masks")
    priority_maps = _per_image(priority_maps, n, "priority_maps")
    log = log or (lambda message: print(message, file=sys.stderr))
    stream = _probabilities(model, samples, heuristic, batch_size, device, amp)
    grids: list[BlockGrid] = []
    image_scores = np.empty(n, dtype=np.float64)
    start = time.perf_counter()
    bar = _progress(n, f"scoring ({heuristic.name})", progress)
    for index, probs in enumerate(stream):
        if on_image is not None:
            on_image(index, probs)
        shape = _image_of(samples[index]).shape[:2]
        labelled = _labelled_bool(labelled_masks[index], shape)
        score = _score_map(heuristic, probs, shape, labelled, priority_maps, index, priority_weight)
        grids.append(
            block_scores(score, blocks[index], labelled, cost_masks[index], max_labelled_fraction)
        )
        image_scores[index] = image_score(score, labelled)
        del score, probs
        bar.update(1)
    bar.close()
    if len(grids) != n:
        raise RuntimeError(f"predict_probabilities returned {len(grids)} maps for {n} images")
    result = PoolScores(grids, image_scores, time.perf_counter() - start)
    log(f"scored {n} images in {result.seconds:.1f} s ({result.images_per_s:.1f} images/s)")
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: a bar on a terminal only, not in a redirected log
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)
