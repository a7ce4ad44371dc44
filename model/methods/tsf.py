"""Teacher-Student-Friend with the Error Mask Decoder and PLAR (papers/tsf-plar.md Sec. 3).

The training step `TsfStep` is S4AL's step (model.methods.s4al.S4ALStep: ClassMix in the batch,
Balanced ClassMix on replayed images, confidence weighting, eta) with three additions:

- **Friend** (TSF, Sec. 3.1): a second DeepLabv3+ of the same architecture, initialised
  separately (same backbone weights, its own random head), in the trainer's SGD optimiser.
  It learns the labelled batch (also during the cold start) and, with the student, the
  mixed unlabelled views by cross pseudo supervision both ways (Eq. 3). The EMA teacher
  supervises the student only.
- **Error mask** (Sec. 3.2.1): teacher confidence < `tsf_error_confidence`, OR the Error
  Mask Decoder's prediction, which is trained every step on the labelled batch (the
  teacher's pseudo-label against the ground truth, BCE) with its own Adam optimiser.
- **PLAR** (Sec. 3.2.2): `model.plar.PseudoLabelRefiner` corrects error pixels whose
  Euclidean and Mahalanobis votes agree, queues disagreeing ones (within a budget) for
  manual labelling, and drops the rest from the loss. Its pool statistics and trade-off
  weight module are updated from the teacher's features of the labelled batch.

Reliable pixels (outside the error mask) and corrected ones train the student as in S4AL's
Eq. 5 (a corrected pixel weighted by the teacher's probability of its new class, or by
`tsf_plar_corrected_weight`); the rest are ignored.

Methods (the ablation rows of the paper's Table 5; `VARIANTS`):
  tsf             TSF only: every pseudo-label used, as in s4al, plus the friend
  tsf-conf        + confidence error mask ("AL" in the paper: error pixels dropped/queued)
  tsf-emd         + EMD (error mask = EMD OR confidence)
  tsf-plar-conf   confidence error mask + PLAR (no EMD)
  tsf-plar        everything

A finished cycle's state warm-starts the next (`TsfStep.warm_start`): friend, EMD and PLAR
continue like the student and the teacher. The cold start trains the friend as well. The
friend trains through `Trainer.distribute` (DDP under torchrun, like the student); under
torchrun the EMD and the trade-off module start from rank 0's weights and average their
gradients, and the pool statistics add the global labelled batch, so every rank keeps the
same ones. They run in fp32 whatever the trainer's mixed precision.

Manual labelling happens where this project already does it: the active-learning cycle's
region acquisition. During training, queued pixels are counted (and ignored by the loss);
after the cycle, `model.refinement.queued_maps` recomputes them on whole pool images and
acquisition offers the blocks holding them first (`model.acquisition.prioritise`; in the
simulator and the service alike).

Per-iteration counters (`TsfStep.metrics`, in the training history): shares of unlabelled
pixels in the error mask, corrected, changed by the correction and queued, and the EMD's
loss, precision and recall on the labelled batch. Totals in pixels are kept in the step's
state (`state["step"]["counters"]`). `model.refinement.plar_audit` replays it on images whose
ground truth is known (the simulator's pool) and counts how many corrections were right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model import distributed
from model.config import TrainConfig
from model.data import IGNORE_INDEX
from model.methods.base import Batch, Host, SupervisedStep, TrainStep
from model.methods.base import Targets as MixTargets
from model.methods.s4al import S4ALStep
from model.network import (
    ASPP_CHANNELS,
    DECODER_CHANNELS,
    DeepLabV3Plus,
    resolve_backbone_weights,
)
from model.plar import ErrorMaskDecoder, PseudoLabelRefiner, emd_loss, error_mask
from model.precision import to_channels_last
from model.ssl import cross_pseudo_supervision_loss, weighted_ce


@dataclass(frozen=True)
class Variant:
    """Which parts of the method run."""

    confidence_mask: bool  # error mask from teacher confidence < tsf_error_confidence
    emd: bool  # error mask also from the Error Mask Decoder
    plar: bool  # error pixels corrected by voting (else ignored)

    @property
    def uses_features(self) -> bool:
        return self.emd or self.plar

    @property
    def masks_errors(self) -> bool:
        return self.confidence_mask or self.emd


VARIANTS: dict[str, Variant] = {
    "tsf": Variant(confidence_mask=False, emd=False, plar=False),
    "tsf-conf": Variant(confidence_mask=True, emd=False, plar=False),
    "tsf-emd": Variant(confidence_mask=True, emd=True, plar=False),
    "tsf-plar-conf": Variant(confidence_mask=True, emd=False, plar=True),
    "tsf-plar": Variant(confidence_mask=True, emd=True, plar=True),
}

COUNTERS = (
    "unlabelled_pixels",
    "error_pixels",
    "corrected_pixels",
    "changed_pixels",
    "queued_pixels",
)


def build_emd(config: TrainConfig, num_classes: int) -> ErrorMaskDecoder:
    in_channels = ASPP_CHANNELS + DECODER_CHANNELS + num_classes  # the paper's 531 on 19
    return ErrorMaskDecoder(in_channels, hidden=config.tsf_emd_hidden)


def build_refiner(config: TrainConfig, num_classes: int) -> PseudoLabelRefiner:
    return PseudoLabelRefiner(
        num_classes,
        ASPP_CHANNELS,
        DECODER_CHANNELS,
        grid_stride=config.tsf_plar_grid_stride,
        momentum=config.tsf_plar_momentum,
        shrinkage=config.tsf_plar_shrinkage,
        min_cov_pixels=config.tsf_plar_min_cov_pixels,
        min_image_pixels=config.tsf_plar_min_image_pixels,
        covariance=config.tsf_plar_covariance,
        candidates=config.tsf_plar_candidates,
        queue_budget=config.tsf_plar_queue_budget,
        keep_uncorrected=config.tsf_plar_keep_uncorrected,
        reduce=distributed.all_reduce_sum,  # pool statistics of the global batch
    )


@dataclass
class Targets(MixTargets):
    """Pseudo-label targets for a batch of unlabelled views, all `N x H x W`: `label` the
    refined pseudo-label (255 = not trained on), `weight` the teacher's confidence
    (corrected pixels their own), `raw` and `confidence` as in the base class, and:"""

    unlabelled: Tensor  # bool: not labelled by a person
    error: Tensor  # bool: in the error mask
    corrected: Tensor  # bool: corrected by PLAR (its votes agree)
    changed: Tensor  # bool: corrected to another class than the pseudo-label's
    queued: Tensor  # bool: awaiting manual labelling (ignored by the loss)

    def outside(self, padding: Tensor) -> Targets:
        """No target on `padding` pixels (crop padding: no image there), nothing counted."""
        label, raw = (t.masked_fill(padding, IGNORE_INDEX) for t in (self.label, self.raw))
        weight, confidence = (t.masked_fill(padding, 0.0) for t in (self.weight, self.confidence))
        flags = (self.unlabelled, self.error, self.corrected, self.changed, self.queued)
        return Targets(label, weight, raw, confidence, *(f & ~padding for f in flags))

    def counts(self) -> dict[str, int]:
        maps = (self.unlabelled, self.error, self.corrected, self.changed, self.queued)
        return {key: int(m.sum()) for key, m in zip(COUNTERS, maps, strict=True)}


def make_targets(
    variant: Variant,
    config: TrainConfig,
    probs: Tensor,
    aspp: Tensor | None,
    decoder: Tensor | None,
    partial_mask: Tensor,
    emd: ErrorMaskDecoder | None,
    refiner: PseudoLabelRefiner | None,
    emd_logits: Tensor | None = None,
) -> Targets:
    """Error mask, PLAR and pixel weights for the teacher's view of unlabelled images.

    `probs` `N x C x H x W` (teacher softmax), `aspp`/`decoder` its features (needed for
    the EMD and PLAR), `partial_mask` `N x H x W` (acquired labels, 255 elsewhere).
    `emd_logits` may be passed when already computed. Without PLAR the whole error mask is
    queued (the paper's "AL" row: a person would label it); with PLAR only the disagreeing
    pixels within the budget are.
    """
    confidence, raw = probs.max(dim=1)
    unlabelled = partial_mask == IGNORE_INDEX
    raw = torch.where(unlabelled, raw, partial_mask)
    confidence = torch.where(unlabelled, confidence, torch.ones_like(confidence))
    label, weight = raw.clone(), confidence.clone()
    none = torch.zeros_like(unlabelled)
    if not variant.masks_errors:
        return Targets(label, weight, raw, confidence, unlabelled, none, none, none, none)

    if variant.emd and emd_logits is None:
        emd_logits = emd(ErrorMaskDecoder.inputs(aspp, decoder, probs, refiner_stride(refiner)))
    threshold = config.tsf_error_confidence if variant.confidence_mask else None
    errors = error_mask(
        confidence, emd_logits if variant.emd else None, threshold, config.tsf_emd_threshold
    )
    errors &= unlabelled
    if not variant.plar:
        label[errors] = IGNORE_INDEX
        return Targets(label, weight, raw, confidence, unlabelled, errors, none, none, errors)
    refined = refiner.refine(aspp, decoder, raw, confidence, errors, partial_mask, probs)
    if config.tsf_plar_corrected_weight is None:  # Eq. 5's p, for the corrected class
        index = refined.label.clamp(max=probs.shape[1] - 1)[:, None]
        corrected_weight = probs.gather(1, index)[:, 0]
    else:
        corrected_weight = torch.full_like(weight, config.tsf_plar_corrected_weight)
    weight = torch.where(refined.corrected, corrected_weight, weight)
    return Targets(
        refined.label,
        weight,
        raw,
        confidence,
        unlabelled,
        refined.error,
        refined.corrected,
        refined.changed,
        refined.queued,
    )


def refiner_stride(refiner: PseudoLabelRefiner | None) -> int:
    return refiner.grid_stride if refiner is not None else 4


class FriendColdStart(SupervisedStep):
    """The cold start of a TSF cycle: student and friend both learn the labelled batch."""

    def __init__(self, trainer: Host, friend_train: torch.nn.Module):
        super().__init__(trainer)
        self.friend_train = friend_train

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        out = super().losses(batch)
        out["friend_supervised"] = weighted_ce(self.friend_train(batch.images), batch.masks)
        return out


class TsfStep(S4ALStep):
    """One TSF (+ EMD, + PLAR) iteration; which parts run is `VARIANTS[config.method]`.
    S4AL's iteration (`model.methods.base.MixingStep.losses`) with refined targets
    (`targets`) and the friend's losses (`extra_losses`)."""

    def __init__(self, trainer: Host):
        super().__init__(trainer)
        config, num_classes = trainer.config, trainer.num_classes
        self.variant = VARIANTS[config.method]
        # separately initialised: same backbone weights, a head of its own (the trainer
        # seeded torch before building the student, so these draws differ from its)
        weights = resolve_backbone_weights(config.backbone_weights)
        self.friend = DeepLabV3Plus(num_classes, weights).to(trainer.device).train()
        to_channels_last(self.friend, config.channels_last)
        trainer.optimizer.add_param_group({"params": list(self.friend.parameters())})
        self.friend_train = trainer.distribute(self.friend)  # DDP / compiled, as the student
        self.emd = build_emd(config, num_classes).to(trainer.device) if self.variant.emd else None
        self.refiner = (
            build_refiner(config, num_classes).to(trainer.device) if self.variant.plar else None
        )
        aux = [m for m in (self.emd, self.refiner) if m is not None]
        for module in aux:  # rank 0's initial weights everywhere; gradients averaged below
            distributed.broadcast_module(module)
        params = [p for m in aux for p in m.parameters()]
        self.aux_params = params
        self.aux_optimizer = torch.optim.Adam(params, lr=config.tsf_emd_lr) if params else None
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.last: dict[str, float] = {}

    def cold_start(self) -> TrainStep:
        return FriendColdStart(self.trainer, self.friend_train)

    # -- the step --

    def targets(self, batch: Batch, weak: Tensor, partial: Tensor, valid: Tensor) -> Targets:
        """The teacher's pseudo-labels through the error mask and PLAR; trains the EMD and
        PLAR's statistics on the labelled batch first (`train_aux`)."""
        trainer = self.trainer
        n_u = len(weak)
        with torch.no_grad():
            if self.variant.uses_features:
                out = trainer.teacher.model(torch.cat([weak, batch.images]), return_features=True)
                probs_all = out.logits.float().softmax(dim=1)
                aspp, decoder = out.aspp.float(), out.decoder.float()
            else:
                probs_all = trainer.teacher.model(weak).float().softmax(dim=1)
                aspp = decoder = None
        self.last = {}
        # the EMD, the statistics and the distances in fp32 whatever the trainer's precision
        with torch.autocast(trainer.device.type, enabled=False):
            emd_logits = self.train_aux(probs_all, aspp, decoder, batch.masks, n_u)
            targets = make_targets(
                self.variant,
                trainer.config,
                probs_all[:n_u],
                None if aspp is None else aspp[:n_u],
                None if decoder is None else decoder[:n_u],
                partial,
                self.emd,
                self.refiner,
                emd_logits,
            )
        targets = targets.outside(~valid)
        self.count(targets.counts())
        return targets

    def extra_losses(
        self, batch: Batch, inputs: list[Tensor], logits: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """The friend learns the labelled batch, and the mixed views with the student by
        cross pseudo supervision both ways (Eq. 3)."""
        friend = self.friend_train(torch.cat(inputs)).split([len(x) for x in inputs])
        cps = cross_pseudo_supervision_loss(torch.cat(logits[1:]), torch.cat(friend[1:]))
        return {
            "friend_supervised": weighted_ce(friend[0], batch.masks),
            "cps": self.trainer.config.tsf_cps_weight * cps,
        }

    def train_aux(
        self,
        probs: Tensor,
        aspp: Tensor | None,
        decoder: Tensor | None,
        masks: Tensor,
        n_u: int,
    ) -> Tensor | None:
        """One Adam step of the EMD (BCE on the labelled batch) and of PLAR's trade-off
        module (after adding the labelled batch to the pool statistics). Returns the EMD's
        logits for the unlabelled views (from the same forward pass), or None."""
        if self.aux_optimizer is None:
            return None
        loss = 0.0
        emd_logits = None
        if self.emd is not None:
            x = ErrorMaskDecoder.inputs(aspp, decoder, probs, refiner_stride(self.refiner))
            logits = self.emd(x)
            labelled_pl = probs[n_u:].argmax(dim=1)
            bce = emd_loss(logits[n_u:], labelled_pl, masks)
            loss = loss + bce
            emd_logits = logits[:n_u].detach()
            self.last.update(self.emd_quality(logits[n_u:].detach(), labelled_pl, masks))
            self.last["emd_loss"] = bce.item()
        if self.refiner is not None:
            weight_loss = self.refiner.observe(aspp[n_u:], decoder[n_u:], masks)
            loss = loss + weight_loss
            self.last["plar_weight_loss"] = weight_loss.item()
        self.aux_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.aux_params)
        self.aux_optimizer.step()
        return emd_logits

    def emd_quality(self, logits: Tensor, pseudo: Tensor, masks: Tensor) -> dict[str, float]:
        predicted = error_mask(
            torch.ones_like(masks, dtype=torch.float),
            logits,
            None,
            self.trainer.config.tsf_emd_threshold,
        )
        valid = masks != IGNORE_INDEX
        wrong = (pseudo != masks) & valid
        hit = int((predicted & wrong).sum())
        return {
            "emd_precision": hit / max(int((predicted & valid).sum()), 1),
            "emd_recall": hit / max(int(wrong.sum()), 1),
        }

    def count(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.totals[key] += value
        total = max(counts["unlabelled_pixels"], 1)
        for key in COUNTERS[1:]:
            self.last[f"{key.removesuffix('_pixels')}_share"] = counts[key] / total

    def metrics(self) -> dict[str, float]:
        """This iteration's counters, merged into the trainer's history."""
        return dict(self.last)

    # -- state --

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            method=self.trainer.config.method,
            friend=self.friend.state_dict(),
            emd=None if self.emd is None else self.emd.state_dict(),
            refiner=None if self.refiner is None else self.refiner.state_dict(),
            aux_optimizer=None if self.aux_optimizer is None else self.aux_optimizer.state_dict(),
            counters=dict(self.totals),
        )
        return state

    def warm_start(self, state: dict) -> None:
        """A new cycle after a finished one (`Trainer.load_state`): the friend, the EMD and
        PLAR's statistics and weight module continue where they were, like the student and
        the teacher; optimiser, replay buffer and counters start afresh. Parts the previous
        cycle's method did not have (e.g. an s4al state) stay freshly initialised."""
        if state.get("friend") is not None:
            self.friend.load_state_dict(state["friend"])
        if self.emd is not None and state.get("emd") is not None:
            self.emd.load_state_dict(state["emd"])
        if self.refiner is not None and state.get("refiner") is not None:
            self.refiner.load_state_dict(state["refiner"])

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.friend.load_state_dict(state["friend"])
        if self.emd is not None and state.get("emd") is not None:
            self.emd.load_state_dict(state["emd"])
        if self.refiner is not None and state.get("refiner") is not None:
            self.refiner.load_state_dict(state["refiner"])
        if self.aux_optimizer is not None and state.get("aux_optimizer") is not None:
            self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.totals.update(state.get("counters", {}))
