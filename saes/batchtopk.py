"""batchtopk: in training, the k x rows largest activations of the whole batch (every rank's rows
together), so that rows share the budget (Bussmann et al. 2024); in use, those above `threshold`, a
running average of the smallest value training kept, so that an SAE in use does not depend on its
batch. Dead features are trained by AuxK."""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from saes.base import SparseAutoencoder, register


@register
class BatchTopKSAE(SparseAutoencoder):
    name = "batchtopk"
    summary = "k x rows across the batch; a learned threshold in use"
    uses_k = True
    batch_training = True
    saelens_architecture = "jumprelu"  # in use it is a JumpReLU SAE with one threshold, as SAELens saves it

    def __init__(self, d: int, dict_size: int, **settings):
        super().__init__(d, dict_size, **settings)
        # float64: an average over thousands of steps (SAELens keeps it so too)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.smallest_kept = None  # set by each batch forward, read by after_step

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        positive = F.relu(pre)
        if not batch:
            return positive * (positive > self.threshold.to(pre.dtype))
        cut, self.smallest_kept = batch_topk_cut(positive, self.k * len(pre))
        return positive * (positive >= cut)

    def add_penalties(self, loss, x, f, pre, error, cfg, l1_weight, dead, parts):
        return self.add_auxk(loss, pre, error, cfg, dead, parts)

    @torch.no_grad()
    def after_step(self, cfg) -> None:
        """Unit decoder rows, and the threshold in use moved towards the smallest activation the
        step's batch forward kept, over every rank (batch_topk_cut found it), by --threshold_lr."""
        super().after_step(cfg)
        if self.smallest_kept is not None:
            self.threshold.mul_(1 - cfg.threshold_lr).add_(cfg.threshold_lr * self.smallest_kept)

    def saelens_weights(self) -> dict[str, torch.Tensor]:
        return {"threshold": torch.full((self.dict_size,), float(self.threshold))}


def batch_topk_cut(positive: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the keep-th largest value of `positive` [B, n] over the whole batch, every rank's rows
    together; the smallest positive value at or above it, in float64, None if none is positive).
    Each rank's keep largest values are gathered and the cut found among them, so that N ranks choose
    exactly what one process would from the same rows. Ties at the cut keep them all. Every positive
    value kept is among the candidates (a cut of 0 means fewer than keep are positive, all gathered),
    so the smallest one needs no further exchange."""
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    keep *= world  # k x the global batch's rows (each rank has an equal share)
    with torch.no_grad():
        top = largest(positive.detach().flatten(), keep, positive.shape[-1])  # one rank may hold all of the global top
        if world > 1:
            padded = torch.full((keep,), -math.inf, dtype=top.dtype, device=top.device)
            padded[:len(top)] = top
            gathered = [torch.empty_like(padded) for _ in range(world)]
            torch_dist.all_gather(gathered, padded)
            top = largest(torch.cat(gathered), keep)
        cut = top.min()
        positive_top = top[top > 0]
        return cut, (positive_top.min().double() if len(positive_top) else None)


def largest(values: torch.Tensor, keep: int, width: int = 1) -> torch.Tensor:
    """The `keep` largest of a 1-D tensor of values 0 or more (rows of `width` features, flattened),
    in no order, exactly. A strided sample first guesses a value below the cut (about twice keep's
    share of the sample lies above it); only the values above the guess go to topk, a small fraction
    of them when keep is too (the batch kinds: k of n). The stride shares no factor with the width, so
    the sample visits every feature, not the same few columns of each row."""
    if keep >= len(values):
        return values
    stride = max(1, len(values) // 65536)
    while math.gcd(stride, width) != 1:
        stride += 1
    sample = values[::stride]
    guess = sample.topk(min(len(sample), 2 * keep // stride + 16)).values[-1]
    candidates = values[values >= guess] if guess > 0 else values[values > 0]
    if len(candidates) < keep:  # the guess was too high, or fewer than keep are positive: every value
        candidates = values
    return candidates.topk(keep, sorted=False).values
