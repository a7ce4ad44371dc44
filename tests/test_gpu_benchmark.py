"""benchmarks/gpu.py (run on CPU with --quick) and the precision helpers it uses."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model import precision as mp

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmarks_gpu", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def test_quick_benchmark_runs_on_cpu_and_writes_its_schema(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--device", "cpu"]
        + ["--sizes", "camvid", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,  # the script finds the package from its own path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| camvid 48x64 | inference | fp32 |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["schema"] == gpu.SCHEMA
    dev = report["device"]
    assert dev["type"] == "cpu" and dev["name"] and dev["torch"] == torch.__version__
    assert dev["threads"] == 1 and dev["peak_rss_mb"] > 0
    assert report["model"]["parameters"] > 5_000_000
    assert report["settings"]["quick"] is True and report["settings"]["amp"] == "bf16"
    (res,) = report["results"]
    assert (res["name"], res["height"], res["width"], res["num_classes"]) == (
        "camvid",
        48,
        64,
        11,
    )
    assert res["paper_size"] == [360, 480]
    runs = {(r["task"], r["precision"]): r for r in res["runs"]}
    assert set(runs) == {(t, p) for t in ("inference", "train") for p in ("fp32", "bf16")}
    for (task, _), r in runs.items():
        assert r["batch"] == 2 and r["iters"] == 1 and r["seconds"] > 0
        assert r["images_per_s"] > 0 and r["achieved_tflops"] > 0
        assert r["utilisation_16bit_peak"] is None  # no known peak for a CPU
        if task == "train":
            assert math.isclose(r["images_per_s"], r["steps_per_s"] * r["batch"])
    for key in ("gflops_per_image", "gflops_per_image_paper_size"):
        f = res[key]
        # fwd + grad_input + grad_weight: ~3x a forward (less: no grad for the image)
        assert 2.5 < f["train_step"] / f["inference"] < 3.05, f
    # FLOPs grow with the pixel count (the network is fully convolutional)
    ratio = res["gflops_per_image_paper_size"]["inference"] / res["gflops_per_image"]["inference"]
    assert 0.8 < ratio / ((360 * 480) / (48 * 64)) < 1.25


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_conv_backward_flops_count_groups(groups):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    mapping = {torch.ops.aten.convolution_backward: gpu._conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        conv(x).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    forward = 2 * 2 * 5 * 6 * 8 * (8 // groups) * 9  # 2 x batch x HW x Cout x Cin/g x k^2
    assert counts["aten.convolution"] == forward
    assert counts["aten.convolution_backward"] == 2 * forward  # grad_input + grad_weight


def test_resolve_precision_choices_on_cpu():
    assert mp.resolve_precision("off", "cpu").mode == "fp32"
    assert mp.resolve_precision(None, "cpu").mode == "fp32"
    native = "bf16" if mp.cpu_native_bf16() else "fp32"  # auto on CPU: bf16 where native
    assert mp.resolve_precision("auto", "cpu").mode == native
    assert mp.resolve_precision(True, "cpu").mode == native
    bf16 = mp.resolve_precision("bf16", "cpu")
    assert (bf16.dtype, bf16.enabled, bf16.needs_scaler) == (torch.bfloat16, True, False)
    fp16 = mp.resolve_precision("fp16", "cpu")
    assert fp16.dtype == torch.float16 and fp16.needs_scaler
    assert fp16.grad_scaler().is_enabled() and not bf16.grad_scaler().is_enabled()
    with pytest.raises(ValueError, match="amp must be one of"):
        mp.resolve_precision("fp8", "cpu")


def test_bf16_autocast_on_cpu_runs_convs_in_bf16_and_keeps_losses_fp32():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with mp.resolve_precision("bf16", "cpu").autocast():
        y = conv(x)
        loss = nn.functional.cross_entropy(y, torch.zeros(2, 6, 6, dtype=torch.long))
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32
    with mp.resolve_precision("off", "cpu").autocast():
        assert conv(x).dtype == torch.float32


def test_optimizer_step_with_fp16_scaler_skips_inf_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = mp.resolve_precision("fp16", "cpu")
    scaler = prec.grad_scaler()
    before = model.weight.detach().clone()
    with prec.autocast():
        loss = model(torch.randn(3, 4)).float().pow(2).mean()
    assert mp.optimizer_step(loss, opt, scaler, clip_grad_norm=1.0) is True
    assert not torch.equal(model.weight, before)

    opt.zero_grad()
    after_good = model.weight.detach().clone()
    bad = model(torch.full((1, 4), float("inf"))).sum()
    assert mp.optimizer_step(bad, opt, scaler) is False  # inf gradients: step skipped
    assert torch.equal(model.weight, after_good)
    assert mp.optimizer_step(model(torch.randn(1, 4)).sum(), opt, None) is True  # fp32 path


def test_channels_last_loader_options_and_compile_switch():
    model = mp.to_channels_last(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = mp.to_device(torch.randn(2, 3, 8, 8), "cpu", channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert mp.to_device(torch.zeros(2, 8, 8, dtype=torch.long), "cpu", True).is_contiguous()
    assert mp.loader_options("cpu") == {"num_workers": 0, "pin_memory": False}
    cuda = mp.loader_options("cuda", num_workers=2)
    assert cuda["pin_memory"] and cuda["persistent_workers"] and cuda["num_workers"] == 2
    assert mp.maybe_compile(model, enabled=False) is model  # compile itself is not run in CI
    mp.configure_backends("cpu")  # a no-op off CUDA


def test_train_cycle_with_amp_and_channels_last_on_cpu(camvid_root):
    """The GPU switches of TrainConfig run through model.train on CPU (bf16 autocast): the
    losses are finite and the teacher's weights stay fp32 and NHWC. (fp16 convolutions
    take ~30x longer on this CPU; the GradScaler path is tested above.)"""
    amp = "bf16"
    from model.config import TrainConfig
    from model.data import load_folder
    from model.train import Trainer

    samples = load_folder(camvid_root, "train", downscale=2)[:4]
    config = TrainConfig(
        method="mean-teacher",
        iterations=3,
        cold_start_iterations=1,
        batch_labelled=2,
        batch_unlabelled=2,
        crop_size=(48, 64),
        eval_every=0,
        backbone_weights=None,
        device="cpu",
        amp=amp,
        channels_last=True,
    )
    trainer = Trainer(config, samples[:2], samples[2:], 11)
    assert trainer.precision.mode == amp and trainer.scaler.is_enabled() == (amp == "fp16")
    result = trainer.fit()
    assert all(math.isfinite(v) for v in result.history[-1].values())
    weight = result.teacher.encoder[0][0].weight
    assert weight.dtype == torch.float32
    assert weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")


def test_label_efficiency_plan_runs_the_key_rows_within_its_budget(camvid_root, tmp_path):
    """The GPU script's whole plan (calibrate, scale, four parallel simulator processes) on
    the CPU with the smoke protocol; on a GPU the same command runs camvid-gpu."""
    from benchmarks import gpu_label_efficiency as plan

    out = tmp_path / "run"
    argv = [
        "--data", str(camvid_root), "--split", str(camvid_root / "splits/labeled_seed0.txt"),
        "--out", str(out), "--protocol", "smoke", "--device", "cpu", "--budget-s", "0.5",
    ]  # fmt: skip
    assert plan.main(argv) == 0
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert sorted(rows) == sorted(plan.ROWS) and all(r["complete"] for r in rows.values())
    # a budget far below the full schedule scales it down, never below one iteration
    iterations = rows["full"]["protocol"]["iterations"]
    assert all(1 <= i <= 3 for i in iterations)
    # the two acquisition rows trained cycle 0 once, whichever came first
    shared = [rows[r]["cycles"][0]["cycle0_shared"] for r in ("entropy-regions", "random-regions")]
    assert sorted(shared) == [False, True]


CPUINFO = """processor\t: 0
flags\t\t: fpu sse avx2 avx512f {extra}
processor\t: 1
flags\t\t: fpu sse avx2 avx512f {extra}
"""


def test_native_bf16_read_from_cpuinfo_flags(tmp_path):
    assert mp.cpu_bf16_flags(CPUINFO.format(extra="amx_tile amx_bf16 avx512_bf16")) == {
        "amx_bf16", "avx512_bf16"}
    assert mp.cpu_bf16_flags(CPUINFO.format(extra="avx512_vnni")) == set()
    plain = tmp_path / "cpuinfo"
    plain.write_text(CPUINFO.format(extra=""))
    assert mp.cpu_native_bf16(plain) is False
    native = tmp_path / "cpuinfo-amx"
    native.write_text(CPUINFO.format(extra="amx_bf16"))
    assert mp.cpu_native_bf16(native) is torch.backends.mkldnn.is_available()
    assert mp.cpu_native_bf16(tmp_path / "absent") is False


def test_auto_is_bf16_on_a_native_cpu_only(monkeypatch):
    monkeypatch.setattr(mp, "cpu_native_bf16", lambda: True)
    assert mp.resolve_precision("auto", "cpu").mode == "bf16"
    assert mp.resolve_precision("off", "cpu").mode == "fp32"  # the off switch
    monkeypatch.setattr(mp, "cpu_native_bf16", lambda: False)
    assert mp.resolve_precision("auto", "cpu").mode == "fp32"
