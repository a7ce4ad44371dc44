"""GPU efficiency switches: mixed precision, channels_last, torch.compile, loader options.

Every helper is correct on CPU too (autocast and GradScaler exist for the CPU), so the
training code uses them unconditionally and the settings decide what happens.

Mixed precision (``amp`` setting)
    ``"off"``  fp32 everywhere.
    ``"auto"`` CUDA with native bf16 (Ampere and newer): bf16 autocast, no scaler (bf16
               has fp32's exponent range, gradients do not underflow). Older CUDA GPUs:
               fp16 autocast with a dynamic GradScaler. CPU: bf16 autocast when the CPU
               has native bf16 units (AMX or AVX512-BF16, :func:`cpu_native_bf16`), where
               it is 1.6x (training) to 3.6x (inference) faster than fp32 on this model;
               fp32 on other CPUs, where bf16 is emulated and slower.
    ``"bf16"`` / ``"fp16"`` forced; fp16 always comes with a GradScaler.
    Autocast keeps reductions, softmax and losses in fp32, so losses and confidence
    weights are computed at full precision; only convolutions/matmuls run in 16 bits.
    With DDP the gradients are all-reduced before GradScaler looks for inf/NaN, so every
    rank skips (or takes) the same steps and the EMA teachers stay identical.

channels_last
    Convolutions on tensor cores prefer NHWC. Convert the model once
    (:func:`to_channels_last`) and move each input batch with :func:`to_device`
    (``channels_last=True``); outputs and losses do not care about the layout.

torch.compile
    Behind a setting (the first call costs ~1-2 minutes on this model).
    With DDP, compile the DDP-wrapped module (TorchDynamo's DDPOptimizer splits graphs at
    bucket boundaries so communication still overlaps). ``unwrap_model`` in
    model.distributed sees through both wrappers for checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "AMP_CHOICES",
    "Precision",
    "bf16_supported",
    "configure_backends",
    "cpu_native_bf16",
    "loader_options",
    "maybe_compile",
    "optimizer_step",
    "resolve_precision",
    "to_channels_last",
    "to_device",
]

AMP_CHOICES = ("off", "auto", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of native bf16 math (Sapphire Rapids AMX, Cooper Lake / Zen 4 AVX512)
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_bf16_flags(cpuinfo: str) -> set[str]:
    """The native-bf16 flags that a /proc/cpuinfo text lists."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            flags.update(_BF16_FLAGS.intersection(value.split()))
    return flags


@functools.cache
def cpu_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """This CPU has native bf16 units (AMX or AVX512-BF16) and torch's oneDNN can use
    them. False where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        flags = cpu_bf16_flags(cpuinfo.read_text())
    except OSError:
        return False
    return bool(flags) and torch.backends.mkldnn.is_available()


def bf16_supported(device: torch.device | str) -> bool:
    """bf16 math on this device (CUDA: native, compute capability >= 8.0; CPU: always
    supported by autocast, fast only with AVX512-BF16/AMX: :func:`cpu_native_bf16`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


@dataclass(frozen=True)
class Precision:
    """A resolved precision policy: ``mode`` is "fp32", "bf16" or "fp16"."""

    mode: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES[self.mode]

    @property
    def enabled(self) -> bool:
        return self.mode != "fp32"

    @property
    def needs_scaler(self) -> bool:
        return self.mode == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context manager for the forward pass and the loss (not for backward)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (a disabled one is a pass-through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def resolve_precision(amp: str | bool | None, device: torch.device | str) -> Precision:
    """Turn the ``amp`` setting into a :class:`Precision` for ``device``.

    ``amp``: "off"/False/None, "auto"/True, "bf16" or "fp16" (see the module docstring).
    Raises ValueError for an unknown value or bf16 on a GPU without native bf16.
    """
    device = torch.device(device)
    if amp is None or amp is False:
        amp = "off"
    elif amp is True:
        amp = "auto"
    amp = str(amp).lower()
    if amp in ("off", "fp32", "no", "none", "false", "0"):
        return Precision("fp32", device.type)
    if amp in ("auto", "on", "true", "1", "yes"):
        if device.type == "cuda":
            return Precision("bf16" if bf16_supported(device) else "fp16", "cuda")
        native = device.type == "cpu" and cpu_native_bf16()
        return Precision("bf16" if native else "fp32", device.type)
    if amp in ("bf16", "bfloat16"):
        if device.type == "cuda" and not bf16_supported(device):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"amp='bf16' but {name} has no native bf16; use 'fp16' or 'auto'")
        return Precision("bf16", device.type)
    if amp in ("fp16", "float16", "half"):
        return Precision("fp16", device.type)
    raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
) -> bool:
    """Backward + step with an optional GradScaler and gradient clipping.

    Returns False when the scaler skipped the step (inf/NaN gradients in fp16), which is
    the same decision on every DDP rank. Zero the gradients before the next forward.
    """
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(_params(optimizer, parameters), clip_grad_norm)
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(_params(optimizer, parameters), clip_grad_norm)
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before


def _params(optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter] | None):
    if parameters is not None:
        return list(parameters)
    return [p for group in optimizer.param_groups for p in group["params"]]


def to_channels_last(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Convert a model's 4-D weights to NHWC in place (no-op when not enabled)."""
    if enabled:
        module.to(memory_format=torch.channels_last)
    return module


def to_device(
    tensor: torch.Tensor, device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    """Move a batch to ``device`` (asynchronously when it sits in pinned memory), NHWC
    for 4-D float tensors when ``channels_last``."""
    device = torch.device(device)
    non_blocking = device.type == "cuda" and tensor.device.type == "cpu" and tensor.is_pinned()
    out = tensor.to(device, non_blocking=non_blocking)
    if channels_last and out.dim() == 4 and out.is_floating_point():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def loader_options(
    device: torch.device | str, num_workers: int = 0, pin_memory: bool | None = None
) -> dict[str, Any]:
    """DataLoader keyword arguments: pinned memory on CUDA, persistent prefetching workers.

    Workers are seeded by the DataLoader from the main process's RNG, so per-rank seeding
    of the main process (model.distributed.rank_seed) gives every rank different crops.
    """
    device = torch.device(device)
    if num_workers < 0:
        raise ValueError("num_workers must be >= 0")
    opts: dict[str, Any] = {
        "num_workers": int(num_workers),
        "pin_memory": device.type == "cuda" if pin_memory is None else bool(pin_memory),
    }
    if num_workers > 0:
        opts["persistent_workers"] = True
        opts["prefetch_factor"] = 4
    return opts


def maybe_compile(
    module: nn.Module, enabled: bool = False, mode: str | None = None, dynamic: bool | None = None
) -> nn.Module:
    """``torch.compile(module)`` behind a setting; the module itself when not enabled."""
    if not enabled:
        return module
    return torch.compile(module, mode=mode, dynamic=dynamic)  # type: ignore[return-value]


def configure_backends(
    device: torch.device | str, cudnn_benchmark: bool = True, tf32: bool = True
) -> None:
    """Process-wide CUDA switches: cuDNN autotuning for fixed crop sizes, TF32 matmuls
    and convolutions for the fp32 parts (Ampere+). Nothing happens on CPU."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
