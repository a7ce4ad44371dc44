"""A geometry of the student's own (issue 12, item 4): the strong view zoomed against the weak
one, with the teacher's targets warped the same way.

The paper perturbs the strong view with scaling as well as colour; `UnlabelledDataset` gives
both views one scale, crop and flip, so the pseudo-label lines up without a warp. Here each
strong image is resampled by its own zoom `z` (drawn from `zoom_range`, > 1 zooms in) about
a random centre that keeps the window inside the crop when zooming in, and every target map
is resampled by the same grid: labels with nearest neighbour, and pixels the grid takes from
outside the weak crop get no target (label 255, weight and confidence 0), as padding does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def zoom_grids(
    n: int, size: tuple[int, int], zoom_range: tuple[float, float], generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """n sampling grids (N x H x W x 2, grid_sample's normalised coordinates into the weak
    view), one zoom and centre per image, drawn from `generator` (CPU) so runs repeat."""
    low, high = zoom_range
    zoom = low + (high - low) * torch.rand(n, generator=generator)
    half_span = 1.0 / zoom  # the window's half width in normalised coordinates
    room = (1.0 - half_span).abs()  # zoomed in: the window moves within the crop
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * room[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = half_span
    theta[:, :, 2] = shift
    return F.affine_grid(theta, [n, 1, *size], align_corners=False).to(device)


def warp_image(image: Tensor, grid: Tensor) -> Tensor:
    """Bilinear resampling of N x C x H x W images (0 outside the weak crop)."""
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", align_corners=False)


def warp_map(values: Tensor, grid: Tensor, outside: float) -> Tensor:
    """Nearest-neighbour resampling of an N x H x W map; `outside` where the grid leaves the
    weak crop. Integer maps (labels) stay integers."""
    dtype = values.dtype
    stacked = torch.stack([values.float(), torch.ones_like(values, dtype=torch.float)], dim=1)
    sampled = F.grid_sample(stacked, grid.float(), mode="nearest", align_corners=False)
    inside = sampled[:, 1] > 0.5
    warped = torch.where(inside, sampled[:, 0], torch.full_like(sampled[:, 0], outside))
    return warped.round().to(dtype) if not dtype.is_floating_point else warped.to(dtype)

