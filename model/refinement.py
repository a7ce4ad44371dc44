"""A finished tsf cycle's error mask and PLAR on whole images, after training: the pixels
it queues for manual labelling (which acquisition labels first, in the simulator and the
service alike) and the audit of its decisions against known ground truth (the simulator).

`PoolRefinement(state)` rebuilds the cycle's teacher, EMD and PLAR (with the cycle's final
statistics) from `TrainResult.state`; `queue_refinement` / `queued_maps` give the queued
pixels; `plar_audit` counts how many corrections were right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.config import TrainConfig
from model.data import IGNORE_INDEX, Sample, normalize
from model.methods.tsf import VARIANTS, Targets, build_emd, build_refiner, make_targets
from model.network import network_from_weights


class PoolRefinement:
    """A finished tsf cycle's teacher, EMD and PLAR applied to whole images, as in training
    (with the cycle's final statistics): the audit's view of PLAR, and the source of the
    queued pixels that region acquisition labels first.

    `state` is `TrainResult.state`; `queue_budget` overrides PLAR's per-image budget
    ("config": the cycle's own; None: every disagreement is queued).
    """

    def __init__(
        self,
        state: dict,
        device: str | torch.device = "cpu",
        queue_budget: float | None | str = "config",
    ):
        self.config = TrainConfig.from_dict(state["config"])
        self.variant = VARIANTS.get(self.config.method)
        if self.variant is None:
            raise ValueError(f"PoolRefinement needs a tsf method, not {self.config.method!r}")
        self.device = torch.device(device)
        num_classes = state["num_classes"]
        self.teacher = network_from_weights(state["teacher"]["model"], num_classes, self.device)
        step = state.get("step") or {}
        self.emd = self.refiner = None
        if self.variant.emd:
            self.emd = build_emd(self.config, num_classes)
            self.emd.load_state_dict(step["emd"])
            self.emd.to(self.device).eval()
        if self.variant.plar:
            self.refiner = build_refiner(self.config, num_classes)
            self.refiner.load_state_dict(step["refiner"])
            self.refiner.to(self.device).eval()
            if queue_budget != "config":
                self.refiner.queue_budget = queue_budget

    @torch.no_grad()
    def __call__(self, image: np.ndarray, partial: np.ndarray | None = None) -> Targets:
        """Targets of one `H x W x 3` uint8 image; `partial`: its labels, 255 = unlabelled."""
        x = normalize(image)[None].to(self.device)
        if partial is None:
            partial = np.full(image.shape[:2], IGNORE_INDEX)
        mask = torch.as_tensor(partial, dtype=torch.long, device=self.device)[None]
        out = self.teacher(x, return_features=True)
        probs = out.logits.float().softmax(1)
        return make_targets(
            self.variant, self.config, probs, out.aspp, out.decoder, mask, self.emd, self.refiner
        )


def queue_refinement(
    state: dict | None, device: str | torch.device = "cpu"
) -> PoolRefinement | None:
    """`PoolRefinement` of a finished cycle whose method queues pixels for manual labelling;
    None for any other state (no state, s4al, tsf alone: it masks no errors)."""
    variant = VARIANTS.get(((state or {}).get("config") or {}).get("method"))
    if variant is None or not variant.masks_errors:
        return None
    return PoolRefinement(state, device)


def queued_maps(
    state: dict | None, samples: Sequence[Sample], device: str | torch.device = "cpu"
) -> list[np.ndarray] | None:
    """Per sample, the `H x W` bool pixels a finished tsf cycle queues for manual labelling
    (PLAR's disagreements within its budget; the whole error mask without PLAR); None for
    a state that queues nothing (`queue_refinement`). Samples carry their partial masks."""
    refinement = queue_refinement(state, device)
    if refinement is None:
        return None
    return [refinement(s.image, s.mask).queued[0].cpu().numpy() for s in samples]


# --------------------------------------------------------------------------- audit
AUDIT_KEYS = (
    "pixels",
    "pl_right",
    "wrong",
    "error",
    "error_wrong",
    "corrected",
    "corrected_right",
    "corrected_pl_right",
    "changed",
    "changed_right",
    "queued",
    "queued_pl_wrong",
    "trained",
    "trained_right",
)


def audit_maps(targets: Targets, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """The audit's pixel sets of one image (bool `1 x H x W`) from its refinement `targets`
    and its ground truth `truth` (`1 x H x W`, 255 = void): only pixels nobody labelled and
    whose truth is a class count."""
    t = targets
    known = (truth != IGNORE_INDEX) & t.unlabelled
    pl_right = t.raw == truth
    right = t.label == truth
    trained = known & (t.label != IGNORE_INDEX)
    return {
        "pixels": known,
        "pl_right": known & pl_right,
        "wrong": known & ~pl_right,
        "error": known & t.error,
        "error_wrong": known & t.error & ~pl_right,
        "corrected": known & t.corrected,
        "corrected_right": known & t.corrected & right,
        "corrected_pl_right": known & t.corrected & pl_right,
        "changed": known & t.changed,
        "changed_right": known & t.changed & right,
        "queued": known & t.queued,
        "queued_pl_wrong": known & t.queued & ~pl_right,
        "trained": trained,
        "trained_right": trained & right,
    }


def plar_audit(
    state: dict,
    samples: Sequence[Sample],
    truth: Sequence[np.ndarray],
    device: str | torch.device = "cpu",
    limit: int | None = None,
) -> dict:
    """How the error mask and PLAR of a finished tsf cycle treat images whose ground truth
    is known (the simulator's pool): `PoolRefinement` of each whole image, every decision
    checked against `truth` (`H x W` masks, 255 = void, not counted).

    `samples` carry their partial masks (labelled pixels are not pseudo-labelled and not
    counted); PLAR's budget is lifted to show every disagreement. Returns pixel counts and
    rates: `error` (flagged), `error_precision` / `error_recall` (flagged pixels whose
    pseudo-label is wrong / wrong pseudo-labels flagged), `corrected`, `corrected_right`,
    `corrected_pl_right` (the old pseudo-label was right there), `changed`,
    `changed_right`, `queued`, `queued_pl_wrong`, `pl_accuracy` before and
    `target_accuracy` after refinement (over trained pixels).
    `limit`: audit at most this many images, evenly spaced.
    """
    if len(samples) != len(truth):
        raise ValueError(f"{len(samples)} samples but {len(truth)} truth masks")
    if limit is not None and len(samples) > limit:
        keep = np.linspace(0, len(samples) - 1, limit).round().astype(int)
        samples, truth = [samples[i] for i in keep], [truth[i] for i in keep]
    refinement = PoolRefinement(state, device, queue_budget=None)
    c = dict.fromkeys(AUDIT_KEYS, 0)
    for sample, gt in zip(samples, truth, strict=True):
        gt = torch.as_tensor(gt, dtype=torch.long, device=refinement.device)[None]
        for key, m in audit_maps(refinement(sample.image, sample.mask), gt).items():
            c[key] += int(m.sum())

    def rate(a: str, b: str) -> float | None:
        return c[a] / c[b] if c[b] else None

    return {
        "method": refinement.config.method,
        "images": len(samples),
        **c,
        "pl_accuracy": rate("pl_right", "pixels"),
        "error_precision": rate("error_wrong", "error"),
        "error_recall": rate("error_wrong", "wrong"),
        "corrected_accuracy": rate("corrected_right", "corrected"),
        "corrected_pl_accuracy": rate("corrected_pl_right", "corrected"),
        "changed_accuracy": rate("changed_right", "changed"),
        "target_accuracy": rate("trained_right", "trained"),
    }
