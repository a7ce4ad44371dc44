"""What one comparison of the simulator holds equal (`Protocol`, the named `PROTOCOLS`), and
its rows: `parse_row(name) -> RowSpec` (what a row trains and how it acquires; the grammar
is in model.simulate's help)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model import acquisition as acq
from model.config import METHODS
from model.report import ROW_ORDER

ACQUISITION_METHOD = "s4al"  # the training method of an acquisition row without @method


@dataclass
class Protocol:
    """Everything that must be equal across the rows of one comparison."""

    name: str
    description: str
    downscale: int  # images and masks shrink by this factor (area / nearest)
    crop: int  # training crop height (and width, unless crop_width)
    iterations: tuple[int, ...]  # one entry per cycle; cycle 0 = the start set
    cold_start_fraction: float = 0.1  # supervised-only share of each SSL cycle (paper: 10%)
    regions_per_image: int = 4
    block: int | None = None  # None: region_size_for(training height), 30 px per 360
    selection: str = "per-image"  # per-image top-k, or "global": the same budget, best blocks
    batch_size: int = 4  # labelled, and as many unlabelled
    eval_batch_size: int = 8
    score_batch_size: int = 8
    score_with: str = "student"  # network that scores the pool
    eval_with: str = "teacher"  # network whose mIoU is the row's headline figure
    replay_size: int = 50
    lr: float = 1e-2
    backbone_weights: str | None = "auto"
    warm_start: bool = True
    ignore_aware_cost: bool = False
    amp: str = "off"  # model.precision: "bf16" where the CPU or GPU has it
    channels_last: bool = False
    eval_every: int = 0  # > 0: val mIoU every N iterations, the cycle's curve in the JSON
    crop_width: int | None = None
    strong_zoom: tuple[float, float] | None = None  # TrainConfig.strong_zoom (issue 12 item 4)
    rows: tuple[str, ...] = ROW_ORDER

    @property
    def cycles(self) -> int:
        return len(self.iterations)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "camvid-cpu": Protocol(
        name="camvid-cpu",
        description="CamVid at 180x240 (downscale 2), crop 128, 15 px blocks, 4 per image, "
        "cold start + 2 acquisitions; one seed of the 6 rows in about 60-70 min as 2 "
        "processes on 2 idle cores (docs/BENCHMARKS.md)",
        downscale=2,
        crop=128,
        iterations=(250, 250, 500),
    ),
    "camvid-lab": Protocol(
        name="camvid-lab",
        description="the label-efficiency protocol (docs/BENCHMARKS.md): CamVid at 180x240, "
        "crop 128, a 3% start (11 images, benchmarks/splits/camvid), 15 px blocks, 10 per "
        "image, cold start + 2 acquisitions of 4000 + 2000 + 4000 iterations (~13% of the "
        "pixels labelled at the end), bf16 + channels_last, a val curve every 500 iterations; "
        "about 50 min per supervised and 2 h per S4AL row on one idle core",
        downscale=2,
        crop=128,
        iterations=(4000, 2000, 4000),
        regions_per_image=10,
        amp="bf16",
        channels_last=True,
        eval_every=500,
    ),
    "camvid-gpu": Protocol(
        name="camvid-gpu",
        description="the paper's CamVid scale: 360x480 images and crops, the 10% start, "
        "30 px blocks, 4 per image, 5000 + 5000 + 10000 iterations (50 per epoch x 100, 100, "
        "200 epochs), AMP + channels_last on a GPU (benchmarks/gpu_label_efficiency.py "
        "scales the iterations to a time budget)",
        downscale=1,
        crop=360,
        crop_width=480,
        iterations=(5000, 5000, 10000),
        amp="auto",
        channels_last=True,
        eval_every=1000,
        eval_batch_size=16,
        score_batch_size=16,
    ),
    "smoke": Protocol(
        name="smoke",
        description="seconds-long mechanics check on tests/fixtures/camvid (120x160)",
        downscale=1,
        crop=64,
        iterations=(3, 3),
        regions_per_image=2,
        batch_size=2,
        eval_batch_size=4,
        score_batch_size=4,
        replay_size=4,
        backbone_weights=None,
    ),
}


@dataclass(frozen=True)
class RowSpec:
    name: str
    method: str
    start: str  # "all": every train image labelled; "split": the split file's images
    acquisition: str | None = None  # None, "regions" or "images"
    heuristic: str | None = None


def parse_row(name: str) -> RowSpec:
    """A row name -> what it trains and acquires (see the module docstring)."""
    base, _, method = name.partition("@")
    if method and method not in METHODS:
        raise ValueError(f"row {name!r}: unknown method {method!r}; choose from {METHODS}")
    if base == "full":
        return RowSpec(name, method or "supervised", "all")
    if base == "initial-only":
        return RowSpec(name, method or "supervised", "split")
    if base in METHODS and not method:
        return RowSpec(name, base, "split")
    for kind, heuristic in (
        ("regions", base.removesuffix("-regions") if base.endswith("-regions") else None),
        ("images", base.removeprefix("image-") if base.startswith("image-") else None),
    ):
        if heuristic is not None:
            if heuristic not in acq.HEURISTICS:
                raise ValueError(
                    f"row {name!r}: unknown heuristic {heuristic!r}; "
                    f"choose from {sorted(acq.HEURISTICS)}"
                )
            return RowSpec(name, method or ACQUISITION_METHOD, "split", kind, heuristic)
    raise ValueError(
        f"unknown row {name!r}: use full, initial-only, a method ({', '.join(METHODS)}), "
        "<heuristic>-regions, image-<heuristic>, optionally @<method>"
    )


