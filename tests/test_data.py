import shutil

import cv2
import numpy as np
import pytest
import torch

from model.data import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Sample,
    SegmentationDataset,
    UnlabelledDataset,
    eval_transform,
    load_folder,
    normalize,
    normalize_chw,
    read_classes,
    read_split,
    strong_transform,
    weak_transform,
)
from model.ssl import eta, pseudo_labels

LABEL_STEP = 20  # synthetic images encode label k as grey level 20 * (k + 1): never black


def test_read_classes_and_split(camvid_root):
    classes = read_classes(camvid_root)
    assert len(classes) == 11 and classes[0] == "Sky" and classes[-1] == "Bicyclist"
    assert read_split(camvid_root / "splits/labeled_seed0.txt") == [
        "0001TP_007290.png",
        "0001TP_007800.png",
    ]


def test_load_folder_maps_ignore_to_255(camvid_root):
    samples = load_folder(camvid_root, "train")
    assert len(samples) == 8
    assert [s.name for s in samples] == sorted(s.name for s in samples)
    for sample in samples:
        assert sample.image.shape == (120, 160, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (120, 160) and sample.mask.dtype == np.int64
        raw = cv2.imread(str(camvid_root / "trainannot" / sample.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(sample.mask == IGNORE_INDEX, raw == 11)
        assert np.array_equal(sample.mask[raw != 11], raw[raw != 11])
    assert any((s.mask == IGNORE_INDEX).any() for s in samples)


def test_images_are_rgb(camvid_root):
    sample = load_folder(camvid_root, "val", names=["0016E5_07959.png"])[0]
    bgr = cv2.imread(str(camvid_root / "val" / sample.name))
    assert np.array_equal(sample.image, bgr[:, :, ::-1])


def test_names_select_and_order(camvid_root):
    names = ["0016E5_08109.png", "0016E5_07959.png"]
    assert [s.name for s in load_folder(camvid_root, "val", names=names)] == names


def test_downscale(camvid_root):
    full = load_folder(camvid_root, "val")
    half = load_folder(camvid_root, "val", downscale=2)
    for big, small in zip(full, half, strict=True):
        assert small.image.shape == (60, 80, 3) and small.mask.shape == (60, 80)
        # Nearest neighbour at factor 2 keeps every other label: no invented classes.
        assert np.array_equal(small.mask, big.mask[::2, ::2])
        # Area averaging: each small pixel is the mean of its 2x2 block.
        blocks = big.image.reshape(60, 2, 80, 2, 3).mean(axis=(1, 3))
        assert np.abs(small.image - blocks).max() <= 1


def test_folder_without_annotations_gives_no_masks(camvid_root, tmp_path):
    shutil.copytree(camvid_root / "val", tmp_path / "pool")
    shutil.copy(camvid_root / "classes.json", tmp_path)
    samples = load_folder(tmp_path, "pool")
    assert len(samples) == 4 and all(s.mask is None for s in samples)


def test_invalid_mask_value_is_an_error(camvid_root, tmp_path):
    for folder in ("val", "valannot"):
        shutil.copytree(camvid_root / folder, tmp_path / folder)
    shutil.copy(camvid_root / "classes.json", tmp_path)
    cv2.imwrite(str(tmp_path / "valannot/0016E5_07959.png"), np.full((120, 160), 40, np.uint8))
    with pytest.raises(ValueError, match="0016E5_07959.png.*40"):
        load_folder(tmp_path, "val")


def test_normalize_known_values():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = 255
    out = normalize(image)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    for c in range(3):
        assert out[c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        assert out[c, 1, 1].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c])
    batch = normalize(np.stack([image, image]))
    assert batch.shape == (2, 3, 2, 3) and torch.equal(batch[1], out)


def _encoded_sample(height=96, width=128, block=16, seed=0) -> Sample:
    """Blocks of labels 0..10 (one ignored); every channel of the image is 20 * (label + 1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 11, size=(height // block, width // block))
    mask = np.kron(labels, np.ones((block, block), np.int64))
    image = np.repeat(((mask + 1) * LABEL_STEP).astype(np.uint8)[:, :, None], 3, axis=2)
    mask[:block, :block] = IGNORE_INDEX  # a partially labelled image
    return Sample("synthetic", image, mask)


def _interior(mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood has one label (resampling blends only at edges)."""
    m = mask[None, None].float()
    size = 2 * radius + 1
    high = torch.nn.functional.max_pool2d(m, size, stride=1, padding=radius)
    low = -torch.nn.functional.max_pool2d(-m, size, stride=1, padding=radius)
    return (high == low)[0, 0]


def _denormalize_grey(image: torch.Tensor) -> torch.Tensor:
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return ((image * std + mean) * 255).round()


@pytest.mark.parametrize("seed", range(8))
def test_weak_transform_keeps_image_and_mask_aligned(seed):
    torch.manual_seed(seed)
    sample = _encoded_sample(seed=seed)
    image, mask = SegmentationDataset([sample], weak_transform(80, scale=(0.5, 1.5)))[0]
    assert image.shape == (3, 80, 80) and mask.shape == (80, 80) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(np.unique(sample.mask).tolist())
    grey = _denormalize_grey(image)
    labelled = _interior(mask) & (mask != IGNORE_INDEX)
    assert labelled.sum() > 100
    expected = ((mask + 1) * LABEL_STEP).float()
    assert (grey[:, labelled] - expected[labelled]).abs().max() <= 1


def test_padding_fills_image_with_zero_and_mask_with_ignore():
    torch.manual_seed(0)
    sample = _encoded_sample(height=48, width=64)
    image, mask = SegmentationDataset([sample], weak_transform(96, scale=(1.0, 1.0)))[0]
    assert image.shape == (3, 96, 96)
    assert (mask == IGNORE_INDEX).sum() >= 96 * 96 - 48 * 64
    grey = _denormalize_grey(image)
    black = (grey == 0).all(dim=0)
    assert black.sum() >= 96 * 96 - 48 * 64
    assert (mask[black & _interior(mask)] == IGNORE_INDEX).all()


@pytest.mark.parametrize("seed", range(8))
def test_strong_transform_keeps_each_label_one_colour(seed):
    torch.manual_seed(seed)
    sample = _encoded_sample(seed=seed)
    image, mask = SegmentationDataset([sample], strong_transform((64, 96)))[0]
    assert image.shape == (3, 64, 96) and mask.shape == (64, 96)
    colours = _denormalize_grey(image)
    interior = _interior(mask) & (mask != IGNORE_INDEX)
    for label in mask[interior].unique():
        pixels = colours[:, interior & (mask == label)]
        # Colour jitter maps one input colour to one output colour (up to rounding, and
        # brightness x contrast <= 1.96 times a 1-level resampling error); a misaligned mask
        # would cover two labels, at least 20 x 0.6 x 0.6 = 7.2 levels apart.
        assert (pixels.max(dim=1).values - pixels.min(dim=1).values).max() <= 4


def test_eval_transform_is_identity(camvid_root):
    sample = load_folder(camvid_root, "val")[0]
    image, mask = SegmentationDataset([sample], eval_transform())[0]
    assert torch.equal(image, normalize(sample.image))
    assert torch.equal(mask, torch.from_numpy(sample.mask))


def test_missing_mask_is_all_ignore(camvid_root):
    sample = load_folder(camvid_root, "val")[0]
    _, mask = SegmentationDataset([Sample(sample.name, sample.image, None)])[0]
    assert mask.shape == (120, 160) and (mask == IGNORE_INDEX).all()


@pytest.mark.parametrize("seed", range(8))
def test_unlabelled_views_share_geometry(camvid_root, seed):
    torch.manual_seed(seed)
    samples = load_folder(camvid_root, "train")
    weak, strong, mask, _, index = UnlabelledDataset(samples, crop=96, scale=(0.5, 1.5))[seed]
    assert index == seed and weak.shape == strong.shape == (3, 96, 96)
    # Same geometry => strong is a per-pixel function of weak: equal weak colours stay equal.
    weak_rgb = _denormalize_grey(weak).reshape(3, -1).T
    strong_rgb = _denormalize_grey(strong).reshape(3, -1).T
    colours, groups = torch.unique(weak_rgb, dim=0, return_inverse=True)
    assert len(colours) < len(weak_rgb)  # the test has repeated colours to compare
    for group in range(len(colours)):
        members = strong_rgb[groups == group]
        assert (members.max(dim=0).values - members.min(dim=0).values).max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_unlabelled_mask_follows_the_geometry(seed):
    torch.manual_seed(seed)
    sample = _encoded_sample(seed=seed)
    weak, _, mask, _, _ = UnlabelledDataset([sample], crop=80, scale=(0.5, 1.5))[0]
    labelled = _interior(mask) & (mask != IGNORE_INDEX)
    assert labelled.sum() > 100
    grey = _denormalize_grey(weak)
    assert (grey[:, labelled] - ((mask + 1) * LABEL_STEP).float()[labelled]).abs().max() <= 1


def test_unlabelled_without_mask_is_all_ignore(camvid_root):
    sample = load_folder(camvid_root, "val")[0]
    _, _, mask, _, _ = UnlabelledDataset([Sample(sample.name, sample.image, None)], crop=64)[0]
    assert mask.shape == (64, 64) and (mask == IGNORE_INDEX).all()


@pytest.mark.parametrize("seed", range(4))
def test_unlabelled_valid_is_false_exactly_on_crop_padding(camvid_root, seed):
    # a 120x160 image scaled by 0.5-1.0 and cropped to 128x192 is always padded
    torch.manual_seed(seed)
    sample = load_folder(camvid_root, "train")[seed]
    dataset = UnlabelledDataset([sample], crop=(128, 192), scale=(0.5, 1.0))
    weak, strong, mask, valid, _ = dataset[0]
    assert valid.dtype == torch.bool and valid.shape == mask.shape == (128, 192)
    assert 0 < valid.sum() < valid.numel()
    padding_value = normalize_chw(torch.zeros(3, 1, 1, dtype=torch.uint8))[:, 0, 0]
    assert torch.allclose(weak[:, ~valid].T, padding_value.expand(int((~valid).sum()), 3))
    # the image is a rectangle at the crop's corner: its side lengths multiply to the count
    rows, cols = valid.any(dim=1).sum(), valid.any(dim=0).sum()
    assert valid.sum() == rows * cols
    assert (mask[~valid] == IGNORE_INDEX).all()


def test_pseudo_labels_leave_padding_unlabelled_and_out_of_eta():
    logits = torch.zeros(1, 3, 2, 4)
    logits[:, 1] = 10.0  # confident class 1 everywhere, padding included
    valid = torch.tensor([[[True, True, False, False], [True, True, False, False]]])
    partial = torch.full((1, 2, 4), IGNORE_INDEX)
    partial[0, 0, 0] = 2
    labels, confidence = pseudo_labels(logits, partial, valid)
    assert labels.tolist() == [[[2, 1, 255, 255], [1, 1, 255, 255]]]
    assert (confidence[~valid] == 0).all()
    assert eta(confidence, labels, 0.97).tolist() == [1.0]  # 4 of 4 valid pixels, not 4 of 8
