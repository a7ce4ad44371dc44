"""Folder datasets, the ignore index and joint image/mask augmentation.

Folder layout (CamVid's): `root/<split>/*.png` images, `root/<split>annot/*.png` masks with
the same names, `root/classes.json` = {"classes": [...], "ignore_index": k}. Mask value k
becomes IGNORE_INDEX (255), the value every other module treats as "unlabelled pixel".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from model.ignore import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALE = (0.75, 1.25)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class Sample:
    name: str
    image: np.ndarray  # uint8 H x W x 3, RGB
    mask: np.ndarray | None  # int64 H x W, 255 = ignore; None = unlabelled


# --- reading ---------------------------------------------------------------------------


def read_classes(root: str | Path) -> list[str]:
    return list(_read_classes_file(root)["classes"])


def read_split(path: str | Path) -> list[str]:
    """File names, one a line; blank lines skipped."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def load_folder(
    root: str | Path, split: str, downscale: int = 1, names: Sequence[str] | None = None
) -> list[Sample]:
    """Samples of `root/split` in name order (or in the order of `names`); masks are None
    when `root/<split>annot` does not exist."""
    if downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    root = Path(root)
    image_dir, mask_dir = root / split, root / f"{split}annot"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no image folder {image_dir}")
    if names is None:
        names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    classes = _read_classes_file(root)
    num_classes, ignore = len(classes["classes"]), classes.get("ignore_index")
    samples = []
    for name in names:
        image = _downscale(read_image(image_dir / name), downscale, cv2.INTER_AREA)
        mask = None
        if mask_dir.is_dir():
            mask = read_mask(mask_dir / name, num_classes, ignore)
            mask = _downscale(mask, downscale, cv2.INTER_NEAREST)
        samples.append(Sample(name, image, mask))
    return samples


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """int64 class indices; `ignore_index` -> 255; any other value outside 0..C-1 is an error."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise FileNotFoundError(f"cannot read mask {path}")
    if raw.ndim != 2:
        raise ValueError(f"mask {path} must be single-channel, got shape {raw.shape}")
    mask = raw.astype(np.int64)
    if ignore_index is not None:
        mask[mask == ignore_index] = IGNORE_INDEX
    invalid = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if invalid.any():
        raise ValueError(
            f"mask {path} has values {np.unique(mask[invalid])[:5].tolist()} outside "
            f"0..{num_classes - 1} and the ignore index"
        )
    return mask


def _read_classes_file(root: str | Path) -> dict[str, Any]:
    path = Path(root) / "classes.json"
    return json.loads(path.read_text())


def _downscale(array: np.ndarray, factor: int, interpolation: int) -> np.ndarray:
    if factor == 1:
        return array
    height, width = array.shape[:2]
    size = (width // factor, height // factor)
    if array.dtype == np.int64:  # cv2 cannot resize int64; labels fit in int32
        return cv2.resize(array.astype(np.int32), size, interpolation=interpolation).astype(
            np.int64
        )
    return cv2.resize(array, size, interpolation=interpolation)


# --- tensors ---------------------------------------------------------------------------


def normalize(images: np.ndarray | Tensor) -> Tensor:
    """uint8 H x W x 3 (or N x H x W x 3) RGB -> float32 3 x H x W (N x 3 x H x W),
    ImageNet-normalised."""
    tensor = torch.as_tensor(images)
    return normalize_chw(tensor.movedim(-1, -3))


def normalize_chw(images: Tensor) -> Tensor:
    """uint8 ... x 3 x H x W -> float32, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _to_tv(image: np.ndarray, mask: np.ndarray | None) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    if mask is None:
        mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.int64)
    return (
        tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)),
        tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)).long()),
    )


# --- augmentation ----------------------------------------------------------------------


class RandomScale(v2.Transform):
    """Resizes image and mask together by one factor drawn from `scale` (relative to the
    input's own size; masks use nearest-neighbour so labels stay integers)."""

    def __init__(self, scale: tuple[float, float] = DEFAULT_SCALE):
        super().__init__()
        self.scale = scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = torch.empty(()).uniform_(*self.scale).item()  # torch RNG: one seed for all
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


def colour_jitter(p: float = 0.5) -> v2.Transform:
    return v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=p)


def weak_transform(
    crop: int | tuple[int, int], scale: tuple[float, float] = DEFAULT_SCALE
) -> v2.Transform:
    """Random scale, pad (image 0, mask 255) to at least `crop`, random crop, h-flip."""
    return v2.Compose(
        [
            RandomScale(scale),
            v2.RandomCrop(
                crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            ),
            v2.RandomHorizontalFlip(),
        ]
    )


def strong_transform(
    crop: int | tuple[int, int], scale: tuple[float, float] = DEFAULT_SCALE
) -> v2.Transform:
    """The weak geometry plus colour jitter (image only)."""
    return v2.Compose([weak_transform(crop, scale), colour_jitter()])


def eval_transform() -> v2.Transform:
    return v2.Identity()


class SegmentationDataset(Dataset):
    """(normalised float image 3 x H x W, int64 mask H x W); a None mask is all-ignore."""

    def __init__(self, samples: Sequence[Sample], transform: v2.Transform | None = None):
        self.samples = samples
        self.transform = transform or eval_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        sample = self.samples[index]
        image, mask = self.transform(*_to_tv(sample.image, sample.mask))
        return normalize_chw(image.as_subclass(Tensor)), mask.as_subclass(Tensor)


class UnlabelledDataset(Dataset):
    """(weak image, strong image, mask, valid, index) for the teacher/student pair.

    Both views share one scale/crop/flip, so a pseudo-label made on the weak view lines up
    pixel for pixel with the strong view; they differ only by colour jitter. `mask` is the
    sample's (possibly partial) label under the same geometry, all-255 when it has none, so
    labelled pixels can override pseudo-labels. `valid` (bool H x W) is False on the
    padding a crop larger than the scaled image adds: those pixels show no image, so they
    get no pseudo-label (without it, 11.7% of the pixels of a 360x480 crop of full-size
    CamVid were trained on, on average).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        crop: int | tuple[int, int],
        scale: tuple[float, float] = DEFAULT_SCALE,
    ):
        self.samples = samples
        self.geometry = weak_transform(crop, scale)
        self.jitter = colour_jitter()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        sample = self.samples[index]
        image, mask = _to_tv(sample.image, sample.mask)
        inside = tv_tensors.Mask(torch.zeros(mask.shape, dtype=torch.uint8))  # padding: 255
        weak, mask, inside = self.geometry(image, mask, inside)
        strong = self.jitter(weak)
        return (
            normalize_chw(weak.as_subclass(Tensor)),
            normalize_chw(strong.as_subclass(Tensor)),
            mask.as_subclass(Tensor),
            inside.as_subclass(Tensor) == 0,
            index,
        )
