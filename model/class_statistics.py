"""Per-class feature statistics for PLAR's Mahalanobis vote (papers/tsf-plar.md Sec. 3.2.2):
`class_statistics` of a set of labelled features, `merge_statistics` (an image's completed
by the pool's), `RunningClassStatistics` (the labelled pool's exponentially decayed
moments). Means, and inverse covariances shrunk towards a scaled identity, with an
isotropic (Euclidean) fallback for a class with too few pixels or a covariance that will
not factorise: never a singular-matrix error. model.plar's notes measure the choices.

Pure torch; under torchrun the caller passes `reduce` (e.g.
`model.distributed.all_reduce_sum`) so the pool statistics add every rank's batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over processes in place (or not at all)


def no_reduce(tensor: Tensor) -> Tensor:
    return tensor




@dataclass
class ClassStatistics:
    """Per-class feature statistics of one feature level.

    `mean` C x D, `inv_cov` C x D x D (the isotropic `I / pooled_var` for a fallback class),
    `count` C (pixels), `full_cov` C bool (False: Euclidean fallback), `present` C bool;
    `tied`: every present class has the same `inv_cov` (distances then whiten once)."""

    mean: Tensor
    inv_cov: Tensor
    count: Tensor
    full_cov: Tensor
    tied: bool = False

    @property
    def present(self) -> Tensor:
        return self.count > 0

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]


COVARIANCES = ("tied", "class")


def _shrunk_inverse(cov: Tensor, n: Tensor, shrinkage: float | None, floor: float):
    """Batched `K x D x D` covariances (from `n` K pixels each) shrunk towards
    `(trace / D) I` and inverted: `(inverse K x D x D, ok K bool)`."""
    dim = cov.shape[-1]
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    target = (torch.diagonal(cov, dim1=1, dim2=2).sum(-1) / dim).clamp_min(floor)
    g = dim / (dim + n) if shrinkage is None else torch.full_like(n, float(shrinkage))
    shrunk = (1.0 - g)[:, None, None] * cov + (g * target + floor)[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(shrunk)
    ok = (info == 0) & torch.isfinite(chol).flatten(1).all(1)
    inverse = torch.zeros_like(cov)
    if bool(ok.any()):
        inverse[ok] = torch.cholesky_inverse(chol[ok])
    return inverse, ok


def statistics_from_moments(
    count: Tensor,
    total: Tensor,
    outer: Tensor,
    shrinkage: float | None = None,
    min_cov_pixels: int = 16,
    covariance: str = "tied",
) -> ClassStatistics:
    """Statistics from (possibly decayed) moments: `count` C, `total` C x D (sum of vectors),
    `outer` C x D x D (sum of outer products).

    `covariance="class"` (the paper's Eq. 8): each class its own sample covariance;
    `"tied"`: one pooled within-class covariance for every class (as in LDA). Without a
    log-determinant term, per-class covariances favour broad classes: on CamVid, thin and
    rare classes (pole, bicyclist), whose stride-4 features blend with their surroundings,
    won nearly every vote. The tied covariance has no such bias and uses every pixel for one
    estimate, so even a class with a single pixel gets a proper Mahalanobis distance.

    Covariances are unbiased sample covariances shrunk towards `(trace / D) * I`:
    `(1 - g) S + g (tr S / D) I`, with `g = shrinkage`, or `D / (D + n)` when `shrinkage`
    is None (strong for few pixels, weak for many). A covariance from fewer than
    `min_cov_pixels` pixels (at least 2 for a class's own), or one that fails to factorise,
    falls back to the isotropic `I / v`, `v` the pooled within-class variance per
    dimension: that class's "Mahalanobis" distance is the Euclidean one on the same scale.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    count = count.double()
    total = total.double()
    outer = outer.double()
    num_classes, dim = total.shape
    present = count > 0
    n = count.clamp_min(1e-12)
    mean = total / n[:, None]
    scatter = outer - n[:, None, None] * mean[:, :, None] * mean[:, None, :]
    scatter = 0.5 * (scatter + scatter.transpose(1, 2)) * present[:, None, None]
    trace = torch.diagonal(scatter, dim1=1, dim2=2).sum(-1).clamp_min(0.0)

    # pooled within-class variance per dimension, the scale of every fallback
    dof = float((count - present.double()).clamp_min(0).sum())
    if dof > 0 and float(trace.sum()) > 0:
        pooled_var = float(trace.sum()) / (dof * dim)
    else:
        pooled_var = 1.0
    eye = torch.eye(dim, dtype=torch.float64, device=total.device)
    inv_cov = (eye / pooled_var).expand(num_classes, dim, dim).clone()
    full_cov = torch.zeros(num_classes, dtype=torch.bool, device=total.device)
    floor = 1e-6 * pooled_var

    covariances = _tied_covariance if covariance == "tied" else _class_covariances
    covariances(inv_cov, full_cov, scatter, count, dof, min_cov_pixels, shrinkage, floor)
    return ClassStatistics(
        mean=mean.float(),
        inv_cov=inv_cov.float(),
        count=count.float(),
        full_cov=full_cov,
        tied=covariance == "tied",
    )


def _tied_covariance(inv_cov, full_cov, scatter, count, dof, min_cov_pixels, shrinkage, floor):
    """One pooled within-class covariance for every present class, in place (when there
    are enough pixels and it factorises; else the Euclidean fallback stays)."""
    if dof < max(min_cov_pixels - 1, 1):
        return
    present = count > 0
    tied = scatter.sum(0, keepdim=True) / dof
    n_tied = torch.full((1,), dof, dtype=torch.float64, device=scatter.device)
    inverse, ok = _shrunk_inverse(tied, n_tied, shrinkage, floor)
    if bool(ok[0]):
        inv_cov[present] = inverse[0]
        full_cov[present] = True


def _class_covariances(inv_cov, full_cov, scatter, count, dof, min_cov_pixels, shrinkage, floor):
    """Each class with enough pixels its own covariance, in place, all in one batched
    factorisation; the others keep the Euclidean fallback."""
    idx = torch.nonzero(count >= max(min_cov_pixels, 2)).flatten()
    if not len(idx):
        return
    nc = count[idx]
    cov = scatter[idx] / (nc - 1.0)[:, None, None]
    inverse, ok = _shrunk_inverse(cov, nc, shrinkage, floor)
    inv_cov[idx[ok]] = inverse[ok]
    full_cov[idx[ok]] = True


def class_moments(
    features: Tensor, labels: Tensor, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`(count C, sum C x D, outer C x D x D)` in float64 of `features` `P x D` grouped by
    `labels` `P` (values outside `0..C-1`, e.g. 255, are skipped). The scatter is computed
    around each class's batch mean in the features' own precision (float32 matmuls, no
    cancellation) and returned as raw float64 moments."""
    features = features.detach()
    labels = labels.detach().long()
    keep = (labels >= 0) & (labels < num_classes)
    f, y = features[keep], labels[keep]
    dim = features.shape[1]
    count = torch.bincount(y, minlength=num_classes).double()
    total = torch.zeros(num_classes, dim, dtype=torch.float64, device=features.device)
    total.index_add_(0, y, f.double())
    outer = torch.zeros(num_classes, dim, dim, dtype=torch.float64, device=features.device)
    for c in torch.nonzero(count).flatten().tolist():
        mean = total[c] / count[c]
        centred = f[y == c] - mean.to(f.dtype)
        outer[c] = (centred.T @ centred).double() + count[c] * torch.outer(mean, mean)
    return count, total, outer


def class_statistics(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    shrinkage: float | None = None,
    min_cov_pixels: int = 16,
    covariance: str = "tied",
) -> ClassStatistics:
    """Statistics of `features` `P x D` per class in `labels` `P` (255 ignored); see
    `statistics_from_moments`."""
    count, total, outer = class_moments(features, labels, num_classes)
    return statistics_from_moments(count, total, outer, shrinkage, min_cov_pixels, covariance)


def merge_statistics(
    image: ClassStatistics, pool: ClassStatistics, min_pixels: int = 1, tied: bool = False
) -> ClassStatistics:
    """One image's statistics completed by the pool's, class by class: a class with at least
    `min_pixels` labelled pixels in the image takes the image's mean, every other class is
    the pool's.

    Covariances: `tied` (both computed with `covariance="tied"`): one for every class, the
    pool's when it has one (better estimated than from a few regions of one image), else
    the image's. Per class: the image's own when it has a full one (or the pool lacks the
    class), else the pool's around the image's mean."""
    own = image.count >= max(min_pixels, 1)
    mean = torch.where(own[:, None], image.mean, pool.mean)
    count = torch.where(own, image.count, pool.count)
    if tied:
        source = pool if bool(pool.full_cov.any()) else image
        k = int(torch.argmax(source.full_cov.int()))  # a class holding the shared matrix
        inv_cov = source.inv_cov[k].expand_as(source.inv_cov).clone()
        full_cov = (own | pool.present) & bool(source.full_cov[k])
        return ClassStatistics(mean, inv_cov, count, full_cov, tied=True)
    own_cov = own & (image.full_cov | ~pool.present)
    return ClassStatistics(
        mean=mean,
        inv_cov=torch.where(own_cov[:, None, None], image.inv_cov, pool.inv_cov),
        count=count,
        full_cov=torch.where(own_cov, image.full_cov, pool.full_cov),
    )


class RunningClassStatistics:
    """The labelled pool's class statistics as exponentially decayed moments: each `update`
    multiplies the old moments by `momentum` and adds the batch's (under torchrun the global
    batch's: every rank must call it, and every rank keeps the same moments). Plain tensors
    (not a module); `state_dict` / `load_state_dict` for warm starts."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        momentum: float = 0.99,
        shrinkage: float | None = None,
        min_cov_pixels: int = 16,
        covariance: str = "tied",
        reduce: Reduce = no_reduce,
    ):
        self.num_classes, self.dim = num_classes, dim
        self.reduce = reduce
        self.momentum, self.shrinkage, self.min_cov_pixels = momentum, shrinkage, min_cov_pixels
        self.covariance = covariance
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.total = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.outer = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
        self._cache: ClassStatistics | None = None

    def update(self, features: Tensor, labels: Tensor) -> None:
        count, total, outer = class_moments(features, labels, self.num_classes)
        for moment in (count, total, outer):
            self.reduce(moment)
        if not bool(count.any()):  # nothing labelled anywhere: no decay either
            return
        if self.count.device != count.device:
            self.to(count.device)
        m = self.momentum
        self.count = m * self.count + count
        self.total = m * self.total + total
        self.outer = m * self.outer + outer
        self._cache = None

    def statistics(self) -> ClassStatistics:
        if self._cache is None:
            self._cache = statistics_from_moments(
                self.count,
                self.total,
                self.outer,
                self.shrinkage,
                self.min_cov_pixels,
                self.covariance,
            )
        return self._cache

    @property
    def present(self) -> Tensor:
        return self.count > 0

    def to(self, device) -> RunningClassStatistics:
        self.count, self.total, self.outer = (
            t.to(device) for t in (self.count, self.total, self.outer)
        )
        self._cache = None
        return self

    def state_dict(self) -> dict:
        return {"count": self.count.cpu(), "total": self.total.cpu(), "outer": self.outer.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.count.device
        self.count = state["count"].to(device, torch.float64)
        self.total = state["total"].to(device, torch.float64)
        self.outer = state["outer"].to(device, torch.float64)
        self._cache = None


