import torch
from torch import nn

from model.data import load_folder
from model.inference import predict_probabilities
from model.network import DeepLabV3Plus


class RecordingModel(nn.Module):
    """A real (tiny) segmentation model that notes the batch shapes it is given."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.conv(x)


def _mixed_images(camvid_root):
    full = [s.image for s in load_folder(camvid_root, "val")]
    half = [s.image for s in load_folder(camvid_root, "val", downscale=2)]
    return full[:3] + half[:2] + full[3:]


def test_maps_are_probabilities_at_each_image_size(camvid_root):
    images = _mixed_images(camvid_root)
    model = DeepLabV3Plus(11).eval()
    maps = list(predict_probabilities(model, images, batch_size=2))
    assert len(maps) == len(images)
    for image, probabilities in zip(images, maps, strict=True):
        assert probabilities.shape == (11, *image.shape[:2])
        assert probabilities.dtype == torch.float32 and probabilities.device.type == "cpu"
        assert probabilities.min() >= 0
        assert torch.allclose(probabilities.sum(dim=0), torch.ones(image.shape[:2]), atol=1e-5)


def test_consecutive_same_size_images_share_a_batch(camvid_root):
    model = RecordingModel()
    list(predict_probabilities(model, _mixed_images(camvid_root), batch_size=2))
    assert model.shapes == [
        (2, 3, 120, 160),
        (1, 3, 120, 160),
        (2, 3, 60, 80),
        (1, 3, 120, 160),
    ]


def test_batching_does_not_change_the_answer(camvid_root):
    images = _mixed_images(camvid_root)
    model = DeepLabV3Plus(11)
    one_by_one = list(predict_probabilities(model, images, batch_size=1))
    batched = list(predict_probabilities(model, images, batch_size=4))
    for a, b in zip(one_by_one, batched, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_streams_lazily(camvid_root):
    images = _mixed_images(camvid_root)
    consumed = []

    def source():
        for image in images:
            consumed.append(image)
            yield image

    stream = predict_probabilities(RecordingModel(), source(), batch_size=2)
    next(stream)
    assert len(consumed) == 2  # a full batch runs without waiting for the next image


def test_eval_mode_during_and_mode_restored_after(camvid_root):
    model = DeepLabV3Plus(11).train()
    images = _mixed_images(camvid_root)[:2]
    stream = predict_probabilities(model, images)
    next(stream)
    assert not model.training
    list(stream)
    assert model.training


def test_amp_off_is_fp32_and_bf16_agrees_on_cpu(camvid_root):
    images = _mixed_images(camvid_root)[:2]
    model = DeepLabV3Plus(11).eval()
    plain = list(predict_probabilities(model, images))
    assert all(torch.equal(a, b) for a, b in zip(plain, predict_probabilities(
        model, images, amp="off"), strict=True))
    bf16 = list(predict_probabilities(model, images, amp="bf16"))
    first_conv = model.encoder[0][0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, bf16, strict=True):
        assert b.dtype == torch.float32 and not torch.equal(a, b)  # bf16 really ran
        agreement = (a.argmax(0) == b.argmax(0)).float().mean().item()
        assert agreement >= 0.95, agreement
