"""The networks' side of distributed training (model.distributed has the process group and
the collectives; docs/DISTRIBUTED.md the why): `wrap_ddp` (DistributedDataParallel when
distributed, the module itself otherwise) and `convert_sync_batchnorm` with
`PortableSyncBatchNorm`, a SyncBatchNorm that also runs on CPU (gloo) so the global-batch
statistics are testable without GPUs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.distributed import DistContext, current_context, is_distributed


def wrap_ddp(
    module: nn.Module,
    ctx: DistContext | None = None,
    *,
    find_unused_parameters: bool = False,
    broadcast_buffers: bool | None = None,
    static_graph: bool = False,
) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed, else ``module`` itself.

    Wrapping broadcasts rank 0's parameters and buffers. ``broadcast_buffers`` defaults to
    False when the module already uses SyncBatchNorm (its statistics are global) and True
    otherwise (rank 0's running statistics are re-broadcast at each forward).
    Several forward calls before one backward are fine (labelled + unlabelled + replay),
    as long as every parameter gets a gradient each step or ``find_unused_parameters``.
    """
    if not is_distributed():
        return module
    ctx = ctx or current_context()
    if broadcast_buffers is None:
        broadcast_buffers = not has_sync_batchnorm(module)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # torch >= 2.14 renamed broadcast_buffers (per-forward buffer sync) forward_sync_buffers
    ddp_params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    sync_kw = (
        "forward_sync_buffers" if "forward_sync_buffers" in ddp_params else "broadcast_buffers"
    )
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=device_ids,
        output_device=device_ids[0] if device_ids else None,
        **{sync_kw: broadcast_buffers},
        find_unused_parameters=find_unused_parameters,
        gradient_as_bucket_view=True,
        static_graph=static_graph,
    )


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks of the gradients (every
    rank's loss depends on every rank's input through the global statistics)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class PortableSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the whole distributed batch, on any device.

    torch's SyncBatchNorm only runs on GPUs; this one is written with an autograd-aware
    all-reduce and so also works with gloo on CPU (two small collectives per layer: the
    sums and counts, then the squared deviations; fp16/bf16 inputs are reduced in fp32).
    It computes exactly what one process would compute on the concatenated batch
    (unbiased variance for the running estimate), up to floating-point summation order.
    In eval mode or a world of one it is plain BN.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_distributed()):
            return super().forward(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = x.new_full((1,), float(x.numel() // x.size(1)))
        stats = _AllReduceSum.apply(torch.cat([x.sum(dim=dims), local_count]))
        count = stats[-1:].detach()
        mean = stats[:-1] / count
        centred = x - mean.reshape(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dim=dims)) / count
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.to(x.dtype).reshape(shape) + self.bias.to(x.dtype).reshape(
                shape
            )
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                n = float(count.item())
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out.to(input.dtype)


def has_sync_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.SyncBatchNorm, PortableSyncBatchNorm)) for m in module.modules())


def _swap_batchnorm(module: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace BatchNorm layers by ``make(layer)``, which takes over the layer's very
    parameter and buffer objects (an optimiser built before the swap keeps working)."""
    new = make(module)
    if new is not None:
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        for name, buf in module.named_buffers(recurse=False):
            setattr(new, name, buf)
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child, make))
    return module


def convert_sync_batchnorm(
    module: nn.Module, device: torch.device | str | None = None, enabled: bool = True
) -> nn.Module:
    """Synchronise every BatchNorm over the process group (the SyncBatchNorm setting).

    CUDA: ``torch.nn.SyncBatchNorm``; other devices: :class:`PortableSyncBatchNorm`. A
    no-op when ``enabled`` is False or the world has one process. State-dict keys do not
    change, so checkpoints load into the plain network. Call it before :func:`wrap_ddp`.
    """
    if not enabled or not is_distributed():
        return module
    if device is None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def make(m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(
            m, (PortableSyncBatchNorm, nn.SyncBatchNorm)
        ):
            return PortableSyncBatchNorm(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
            )
        return None

    return _swap_batchnorm(module, make)
