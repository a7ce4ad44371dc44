"""Model checkpoints: one file holding weights, class names and metadata, written atomically."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from model.atomic import atomic_write
from model.network import DeepLabV3Plus, network_from_weights

FORMAT = "s4al-checkpoint"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format", "state_dict", "num_classes", "classes", "meta")


class CheckpointError(ValueError):
    """The file is not a readable s4al checkpoint."""


def save_checkpoint(
    path: str | Path, model: DeepLabV3Plus, classes: list[str], meta: dict[str, Any]
) -> None:
    """Writes a temp file beside `path`, fsyncs it, then renames it over `path`: readers see
    the old file or the new one, never half of one. `meta` must hold plain Python values
    and tensors (the loader refuses pickled objects); `created` is added when absent."""
    path = Path(path)
    num_classes = model.num_classes
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a {num_classes}-class model")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": model.state_dict(),
        "num_classes": num_classes,
        "classes": list(classes),
        "meta": {"created": datetime.now(timezone.utc).isoformat(), **meta},
    }
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[DeepLabV3Plus, dict[str, Any]]:
    """The model (eval mode, on `device`; nothing downloaded) and its meta, with `classes`.
    Tensors inside `meta` (e.g. optimizer state) stay on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint file
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} file")
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    try:
        model = network_from_weights(payload["state_dict"], payload["num_classes"], device)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} weights do not fit DeepLabV3Plus: {exc}") from exc
    meta = {**payload["meta"], "classes": payload["classes"]}
    return model, meta
