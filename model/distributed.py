"""Distributed training helpers: one process per device, launched by ``torchrun``.

Everything here is a no-op (or the identity) in a plain single process, so training code
calls these helpers unconditionally and the same code runs on 1 CPU, 1 GPU or N GPUs.

Ranks, devices, backends
    ``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), picks ``nccl`` when the process trains on CUDA and ``gloo``
    otherwise, binds the process to ``cuda:LOCAL_RANK`` and returns a :class:`DistContext`.
    Without WORLD_SIZE > 1 it starts nothing and returns a world of one.

What stays identical on every rank, and why
    - Student (and any network the main optimiser trains): DDP broadcasts rank 0's
      parameters and buffers when it wraps the module and averages gradients every step,
      so the optimiser steps are identical.
      Gloo's and NCCL's all-reduce hand every rank the same bits, so the student's
      parameters stay bitwise equal.
    - EMA teacher: it is built from the (broadcast) student, or broadcast explicitly with
      :func:`broadcast_module`, and each update is a deterministic function of the
      student's parameters, so it stays bitwise identical too. BatchNorm *buffers* are the
      exception: each rank's running statistics see only its own shard. With SyncBatchNorm
      (:func:`convert_sync_batchnorm`) they are computed from the global batch and are
      equal everywhere; without it, call :func:`sync_buffers` on the teacher after its EMA
      update (rank 0's buffers win, which is also what rank 0 checkpoints).
    - Data: :class:`InfiniteShardedSampler` cuts one seeded global index stream into
      strided per-rank shards, so the union of the ranks' batches at step t is exactly the
      batch a single process with the global batch size draws at step t.

Per-rank state, on purpose
    - Replay buffers (Balanced ClassMix) are per rank. A shared one would cost a
      collective every iteration for no statistical gain: each rank only adds images from
      its own disjoint shard of the stream, so the union of the per-rank buffers is a
      uniform sample of the recently seen pool, as one buffer is. Give each rank
      ``split_evenly(M)`` slots: together they hold M images covering the same M / (global
      batch) iterations of history as one process's buffer of M.
    - Random augmentation and ClassMix draws: seed each rank differently
      (:func:`rank_seed`), otherwise every rank applies the same crops and class picks.

Writes
    Only rank 0 writes checkpoints, metrics and progress (:func:`is_main_process`,
    :func:`main_process_only`); the others wait at :func:`barrier` where they must.

Launching
    torchrun's command line and the service's N-process cycle are in model.launch.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

T = TypeVar("T")

__all__ = [
    "DistContext",
    "InfiniteShardedSampler",
    "all_reduce_mean",
    "all_reduce_sum",
    "assert_same_on_all_ranks",
    "average_gradients",
    "barrier",
    "broadcast_module",
    "cleanup_distributed",
    "current_context",
    "default_backend",
    "env_world",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "main_process_only",
    "rank_seed",
    "split_evenly",
    "state_digest",
    "sync_buffers",
    "unwrap_model",
]


# ---------------------------------------------------------------------------------------
# Process group and rank helpers


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A world of one when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed started the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world(environ: dict[str, str] | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's variables."""
    env = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not an integer") from exc

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank)
    local_world = read("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local_rank, local_world


def default_backend(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for everything else (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def rank_seed(seed: int, rank: int | None = None) -> int:
    """Seed for this rank's random augmentation / mixing (rank 0 keeps ``seed``)."""
    return int(seed) + 1_000_003 * (get_rank() if rank is None else rank)


def _resolve_device(
    device: torch.device | str | None, local_rank: int, distributed: bool = False
) -> torch.device:
    """cuda:LOCAL_RANK under torchrun (an explicit index is ignored there: choose GPUs
    with CUDA_VISIBLE_DEVICES), the given device otherwise; "auto"/None picks CUDA."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        index = local_rank if distributed or device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} needs cuda:{index} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def current_context(device: torch.device | str | None = None) -> DistContext:
    """The context of an already initialised process group (or a world of one)."""
    rank, world, local_rank, local_world = env_world()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    else:
        rank, world, backend = 0, 1, None
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank if world > 1 else 0,
        local_world_size=local_world if world > 1 else 1,
        backend=backend,
        device=_resolve_device(device, local_rank if world > 1 else 0, world > 1),
    )


def init_distributed(
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout_s: float = 1800.0,
) -> DistContext:
    """Join the job torchrun started; a world of one when WORLD_SIZE is unset or 1.

    ``device``: None/"auto" (CUDA when available), "cpu" (forces gloo) or "cuda".
    ``backend``: None picks nccl on CUDA, gloo otherwise.
    """
    rank, world, local_rank, local_world = env_world()
    if dist.is_available() and dist.is_initialized():
        return current_context(device)
    if world == 1:
        return DistContext(device=_resolve_device(device, 0))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = _resolve_device(device, local_rank, distributed=True)
    backend = backend or default_backend(dev)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev  # eager NCCL communicator bound to this GPU
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        backend=backend,
        device=dev,
        owns_group=True,
    )


def cleanup_distributed(ctx: DistContext | None = None) -> None:
    """Destroy the process group if ``ctx`` started it (or, with no ctx, if one exists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ctx is None or ctx.owns_group:
        # every rank past its last collective first: a gloo peer that closes its sockets
        # while the other still reads the last message aborts that process (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks get None (no barrier)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        if is_main_process():
            return fn(*args, **kwargs)
        return None

    return wrapper


# ---------------------------------------------------------------------------------------
# Collectives on tensors and modules


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Mean of a scalar over ranks, for logging (one collective)."""
    if not is_distributed():
        return float(value)
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if (dist.get_backend() == "nccl")
            else torch.device("cpu")
        )
    t = torch.as_tensor(value, dtype=torch.float64, device=device).detach().clone().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


@torch.no_grad()
def average_gradients(parameters: Any) -> None:
    """Average ``.grad`` over ranks in place (one coalesced all-reduce per dtype), for
    networks trained outside DDP (e.g. with their own optimiser on a side loss). Every
    rank must call it with the same parameters; a missing gradient counts as zero."""
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)

    _coalesced([p.grad for p in params], mean)


def _module_tensors(module: nn.Module, params: bool, buffers: bool) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if params:
        out.extend(p.data for p in module.parameters())
    if buffers:
        out.extend(b for b in module.buffers())
    return out


def _coalesced(tensors: list[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
    """Apply a collective to tensors grouped by (device, dtype) in one flat buffer each."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        op(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


@torch.no_grad()
def broadcast_module(
    module: nn.Module, src: int = 0, params: bool = True, buffers: bool = True
) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers to every rank (in place); returns module.

    Use it for modules DDP does not own (the EMA teacher, a frozen friend), right after
    they are built, so every rank starts from the same weights.
    """
    if is_distributed():
        _coalesced(
            _module_tensors(unwrap_model(module), params, buffers),
            lambda flat: dist.broadcast(flat, src=src),
        )
    return module


@torch.no_grad()
def sync_buffers(module: nn.Module, mode: str = "broadcast", src: int = 0) -> nn.Module:
    """Make BatchNorm running statistics (all buffers) equal on every rank.

    ``mode="broadcast"``: rank ``src``'s buffers everywhere (what rank 0 checkpoints).
    ``mode="mean"``: average floating-point buffers; integer ones (num_batches_tracked)
    are broadcast. Needed for the EMA teacher when BatchNorm is not synchronised.
    """
    if not is_distributed():
        return module
    if mode not in ("broadcast", "mean"):
        raise ValueError(f"mode must be 'broadcast' or 'mean', got {mode!r}")
    bufs = _module_tensors(unwrap_model(module), params=False, buffers=True)
    if mode == "broadcast":
        _coalesced(bufs, lambda flat: dist.broadcast(flat, src=src))
        return module
    world = dist.get_world_size()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)

    _coalesced([b for b in bufs if b.is_floating_point()], mean)
    _coalesced([b for b in bufs if not b.is_floating_point()], lambda f: dist.broadcast(f, src=src))
    return module


def state_digest(module: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's bytes in state_dict order: equal digests = bitwise equal.
    Pass ``dict(module.named_parameters())`` to leave the buffers out."""
    state = module if isinstance(module, dict) else unwrap_model(module).state_dict()
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def assert_same_on_all_ranks(
    module: nn.Module | dict[str, torch.Tensor], what: str = "module"
) -> str:
    """Raise RuntimeError unless ``module``'s state (or a dict of tensors) is bitwise
    equal on every rank; returns the digest. One small all-gather."""
    digest = state_digest(module)
    if not is_distributed():
        return digest
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"{what} differs between rank 0 and rank(s) {differing}")
    return digest


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


# ---------------------------------------------------------------------------------------
# Data sharding


class InfiniteShardedSampler(Sampler[int]):
    """Endless indices for one rank: a strided slice of one seeded global stream.

    The global stream is the concatenation of per-epoch permutations of ``range(size)``
    (seeded by ``seed`` and the epoch, identical on every rank, so no epoch padding is
    ever needed). Rank r yields stream positions r, r + W, r + 2W, ... With a per-rank
    batch b, the ranks' batches at step t together are exactly positions
    [t*W*b, (t+1)*W*b) of the stream: what one process with batch W*b draws at step t.
    ``start`` resumes at a global stream position (rank r then starts at start + r).
    ``shuffle=False`` uses ``range(size)`` for every epoch. ``weights`` (one per item) draw
    each epoch's ``size`` items with replacement in proportion to them instead of a
    permutation.
    """

    def __init__(
        self,
        size: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        weights: Sequence[float] | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError("InfiniteShardedSampler needs a non-empty dataset")
        self.size = int(size)
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.start = int(start)  # global stream position to resume from
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and (len(self.weights) != size or self.weights.sum() <= 0):
            raise ValueError("InfiniteShardedSampler weights: one per item, not all zero")

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=g)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        epoch, order = -1, []
        while True:
            e, i = divmod(position, self.size)
            if e != epoch:
                epoch, order = e, self.epoch_order(e).tolist()
            yield order[i]
            position += self.world_size


def split_evenly(total: int, rank: int | None = None, world_size: int | None = None) -> int:
    """This rank's share of ``total`` (e.g. replay-buffer slots): shares sum to ``total``."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    base, extra = divmod(int(total), world)
    return base + (1 if rank < extra else 0)
