"""jumprelu: f = pre where pre > threshold, one threshold per feature, trained with an L0 penalty
through straight-through estimators (Rajamanoharan et al. 2024), and dead features pulled up to
their thresholds (Anthropic's pre-activation loss, as SAELens has it)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from saes.base import SparseAutoencoder, register


@register
class JumpReLUSAE(SparseAutoencoder):
    name = "jumprelu"
    summary = "per-feature thresholds, L0 penalty"
    saelens_architecture = "jumprelu"

    def __init__(self, d: int, dict_size: int, jumprelu_init_threshold: float = 0.01,
                 jumprelu_bandwidth: float = 0.05, **settings):
        super().__init__(d, dict_size, **settings)
        self.bandwidth = jumprelu_bandwidth
        self.threshold = nn.Parameter(torch.full((dict_size,), float(jumprelu_init_threshold)))  # kept >= 0

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        return JumpReLU.apply(pre, self.threshold, self.bandwidth)

    def add_penalties(self, loss, x, f, pre, error, cfg, l1_weight, dead, parts):
        """l0_coefficient times the features active per row (its gradient through the thresholds'
        estimator) and, for dead features, pre_act_coefficient · Σ relu(threshold - pre) ‖W_dec,i‖."""
        loss = loss + cfg.l0_coefficient * Step.apply(pre, self.threshold, self.bandwidth).sum(-1).mean()
        if dead is not None and bool(dead.any()) and cfg.pre_act_coefficient:
            pull = (F.relu(self.threshold - pre) * self.W_dec.norm(dim=1))[:, dead].sum(-1)
            loss = loss + cfg.pre_act_coefficient * pull.mean()
            parts["pre_act_sum"] = pull.sum().detach()
        return loss

    @torch.no_grad()
    def after_step(self, cfg) -> None:
        super().after_step(cfg)
        self.threshold.clamp_(min=0)

    def saelens_weights(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}


def rectangle_window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float, dtype) -> torch.Tensor:
    """rect((pre - threshold) / bandwidth) / bandwidth: the kernel both straight-through estimators use."""
    return ((pre - threshold).abs() < bandwidth / 2).to(dtype) / bandwidth


class JumpReLU(torch.autograd.Function):
    """pre where pre > threshold, else 0. Backward: to pre where it passed, and to the threshold a
    straight-through estimate of the jump, -(threshold / bandwidth) * rect((pre - threshold) /
    bandwidth) per row (Rajamanoharan et al. 2024; SAELens's JumpReLU)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = rectangle_window(pre, threshold, ctx.bandwidth, grad.dtype)
        return (pre > threshold) * grad, (-threshold * window * grad).sum(0), None


class Step(torch.autograd.Function):
    """1 where pre > threshold, else 0 (an L0 count). Backward: only to the threshold,
    -(1 / bandwidth) * rect((pre - threshold) / bandwidth) (DeepMind's L0 estimator)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        return None, (-rectangle_window(pre, threshold, ctx.bandwidth, grad.dtype) * grad).sum(0), None
