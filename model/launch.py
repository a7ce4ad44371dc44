"""Starting training on N processes with torchrun (docs/DISTRIBUTED.md).

:func:`torchrun_command` builds the command line for N local processes (or one node of a
multi-node job with a rendezvous endpoint). :func:`launch_train_cycle` is the service's
NUM_GPUS > 1 path: ``model.train.train_cycle`` on N processes, its inputs handed over in
a payload file and its result read back; ``python -m model.launch run-cycle`` is the
per-rank entry point that runs it. The collectives themselves are in model.distributed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model.atomic import atomic_write
from model.config import TrainConfig
from model.distributed import (
    assert_same_on_all_ranks,
    barrier,
    cleanup_distributed,
    init_distributed,
    unwrap_model,
)
from model.network import network_from_weights
from model.train import TrainResult, train_cycle


def torchrun_command(
    args: Sequence[str],
    nproc_per_node: int,
    *,
    module: str | None = None,
    nnodes: int | str = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    rdzv_backend: str = "c10d",
    max_restarts: int = 0,
    python: str | None = None,
) -> list[str]:
    """``python -m torch.distributed.run ...`` for ``python -m module args``.

    One node: ``--standalone`` (a local rendezvous on a free port). Several nodes: give
    ``nnodes`` (e.g. 2 or "1:4") and ``rdzv_endpoint`` ("host:port" of any one node) and
    the same ``rdzv_id`` on every node (docs/DISTRIBUTED.md).
    """
    if nproc_per_node < 1:
        raise ValueError("nproc_per_node must be >= 1")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None:
        if str(nnodes) not in ("1", "1:1"):
            raise ValueError("several nodes need rdzv_endpoint='host:port'")
        cmd.append("--standalone")
    else:
        cmd += [
            f"--rdzv-backend={rdzv_backend}",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id or 's4al'}",
        ]
    cmd += [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
    ]
    if module is not None:
        cmd += ["-m", module]
    cmd += list(args)
    return cmd


PROGRESS_PREFIX = "S4AL_PROGRESS "
_REPO_ROOT = Path(__file__).resolve().parents[1]


def launch_train_cycle(
    nproc_per_node: int,
    config: TrainConfig,
    labelled: Sequence[Any],
    unlabelled: Sequence[Any],
    num_classes: int,
    val: Sequence[Any] | None = None,
    init_state: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    *,
    workdir: str | Path | None = None,
    timeout_s: float | None = None,
    log: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    nnodes: int | str = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> TrainResult:
    """``model.train.train_cycle`` on ``nproc_per_node`` processes started by torchrun.

    Same arguments and result (a ``TrainResult``) as ``train_cycle``. The inputs go to the
    ranks through a payload file in ``workdir`` (a temporary folder by default; on several
    nodes it must be on a filesystem every node sees, and the other nodes run
    :func:`torchrun_command` with the same rendezvous themselves). Rank 0 reports progress
    as ``S4AL_PROGRESS {json}`` lines on stdout, forwarded to ``progress``; every other
    output line goes to ``log``. A failed rank fails the whole launch (RuntimeError with
    the output's tail); ``timeout_s`` kills the process group.
    """
    owned = tempfile.TemporaryDirectory(prefix="s4al-ddp-") if workdir is None else None
    with owned or contextlib.nullcontext(workdir) as name:
        folder = Path(name)
        folder.mkdir(parents=True, exist_ok=True)
        payload, result_path = folder / "payload.pt", folder / "result.pt"
        inputs = {
            "config": config.to_dict(),
            "labelled": list(labelled),
            "unlabelled": list(unlabelled),
            "num_classes": int(num_classes),
            "val": list(val) if val else None,
            "init_state": init_state,
        }
        torch.save(inputs, payload)
        result_path.unlink(missing_ok=True)
        cmd = torchrun_command(
            ["run-cycle", "--payload", str(payload), "--result", str(result_path)],
            nproc_per_node,
            module="model.launch",
            nnodes=nnodes,
            rdzv_endpoint=rdzv_endpoint,
            rdzv_id=rdzv_id,
        )
        rc, tail = _run_ranks(cmd, _child_env(env), progress, log, timeout_s)
        if rc != 0 or not result_path.is_file():
            raise RuntimeError(
                f"distributed training on {nproc_per_node} process(es) failed (exit {rc}):\n"
                + "\n".join(tail[-20:])
            )
        return _load_result(result_path, num_classes)


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment and `env`, with the repository importable, one torch
    thread per rank unless set, and unbuffered output (progress lines arrive as written)."""
    child = {**os.environ, **(env or {})}
    child["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO_ROOT), child.get("PYTHONPATH", "")) if p
    )
    child.setdefault("OMP_NUM_THREADS", "1")
    child["PYTHONUNBUFFERED"] = "1"
    return child


def _run_ranks(
    cmd: list[str],
    env: dict[str, str],
    progress: Callable[[dict], None] | None,
    log: Callable[[str], None] | None,
    timeout_s: float | None,
) -> tuple[int, list[str]]:
    """Run torchrun in its own process group, forward progress and log lines; returns the
    exit status and the output's last 40 lines. The group is killed after `timeout_s`,
    and on any exception here (e.g. the job's own timeout)."""
    tail: list[str] = []
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=_REPO_ROOT,
        start_new_session=True,  # one process group: torchrun and its ranks
    )

    def kill() -> None:
        if proc.poll() is None:
            tail.append(f"[killed after {timeout_s:.0f} s]")
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill) if timeout_s is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                if progress is not None:
                    progress(json.loads(line[len(PROGRESS_PREFIX) :]))
                continue
            tail[:] = (tail + [line])[-40:]
            if log is not None:
                log(line)
        return proc.wait(), tail
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank
            proc.wait()


def _load_result(path: Path, num_classes: int) -> TrainResult:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    student = network_from_weights(saved["student"], num_classes).train()
    teacher = network_from_weights(saved["teacher"], num_classes).requires_grad_(False)
    return TrainResult(student, teacher, saved["history"], saved["metrics"], saved["state"])


def run_cycle_worker(payload_path: str | Path, result_path: str | Path) -> int:
    """One rank of :func:`launch_train_cycle` (``python -m model.launch run-cycle``)."""
    payload = torch.load(payload_path, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(payload["config"])
    ctx = init_distributed(device=config.device)
    try:

        def report(info: dict) -> None:
            print(PROGRESS_PREFIX + json.dumps(info), flush=True)

        result = train_cycle(
            config,
            payload["labelled"],
            payload["unlabelled"],
            payload["num_classes"],
            payload["val"],
            payload["init_state"],
            report if ctx.is_main else None,
        )
        # ranks that drifted apart would make rank 0's result meaningless: fail loudly
        teacher_digest = assert_same_on_all_ranks(unwrap_model(result.teacher), "teacher")
        student = unwrap_model(result.student)
        assert_same_on_all_ranks(dict(student.named_parameters()), "student parameters")
        if ctx.is_main:
            saved = {
                "student": student.state_dict(),
                "teacher": unwrap_model(result.teacher).state_dict(),
                "history": result.history,
                "metrics": result.metrics,
                "state": result.state,
                "world_size": ctx.world_size,
                "teacher_digest": teacher_digest,
            }
            atomic_write(Path(result_path), lambda file: torch.save(saved, file))
        barrier()
    finally:
        cleanup_distributed(ctx)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m model.launch",
        description="Per-rank entry points for torchrun (see docs/DISTRIBUTED.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-cycle", help="one train_cycle from a launch_train_cycle payload")
    run.add_argument("--payload", required=True, type=Path)
    run.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return run_cycle_worker(args.payload, args.result)


if __name__ == "__main__":
    sys.exit(main())
