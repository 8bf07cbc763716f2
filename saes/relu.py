"""relu: f = ReLU(pre), trained with an L1 penalty on f weighted by each feature's decoder norm
(warmed up linearly over --l1_warmup_steps), and dead features resampled (Anthropic 2023)."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from saes.base import SparseAutoencoder, register


@register
class ReLUSAE(SparseAutoencoder):
    name = "relu"
    summary = "L1 penalty"
    saelens_architecture = "standard"
    logged = ("l1_sum",)

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        return F.relu(pre)

    def add_penalties(self, loss, x, f, pre, error, cfg, l1_weight, dead, parts):
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1)
        parts["l1_sum"] = l1.sum().detach()
        return loss + l1_weight * l1.mean()

    def extra_record(self, sums: dict, rows: float, weight: float) -> dict:
        return {"train_l1": sums["l1_sum"] / rows, "l1_weight": weight}

    def extra_log(self, record: dict) -> str:
        return f" | l1 {record['train_l1']:.4g} (weight {record['l1_weight']:.3g})"

    def penalty_weight(self, step: int, cfg) -> float:
        return cfg.l1_coefficient * min(1.0, (step + 1) / max(cfg.l1_warmup_steps, 1))

    def maintain(self, step: int, cfg, optimizer, x: torch.Tensor, dead: torch.Tensor, distributed: bool) -> int:
        """Every --resample_every steps in the first half of training: resample the dead features."""
        if cfg.resample_every and step % cfg.resample_every == 0 and step <= cfg.max_steps // 2:
            return resample_dead(self, optimizer, x, dead, distributed)
        return 0


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, optimizer, x: torch.Tensor, dead: torch.Tensor, distributed: bool) -> int:
    """Anthropic's resampling: each dead feature gets, as its decoder direction, an input drawn with
    probability ∝ its squared reconstruction loss (centred by b_dec, unit norm); its encoder row is
    that direction scaled to 0.2 x the mean live encoder norm; its bias 0; its Adam moments reset. A
    transcoder's decoder takes the row's target and its encoder the row's input (unit norm).
    Rank 0 draws from its batch and every rank takes its choice."""
    count = int(dead.sum())
    if not count:
        return 0
    indices = dead.nonzero().squeeze(1)
    x_hat, _, _ = sae(x)
    target = sae.targets(x)
    loss = ((target - x_hat) / sae.target_scale).pow(2).sum(-1)
    # Distinct inputs while there are enough, so that no two new features start on the same one.
    weights = loss.pow(2) + 1e-12
    picks = torch.multinomial(weights, count, replacement=count > len(x))
    directions = target[picks] / sae.target_scale - sae.b_dec
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if distributed:
        torch_dist.broadcast(directions, src=0)
    reads = directions  # an SAE reads what it writes; a transcoder reads its rows' inputs
    if sae.transcoder:
        reads = sae.inputs(x)[picks] / sae.scale
        reads /= reads.norm(dim=1, keepdim=True).clamp_min(1e-8)
        if distributed:
            torch_dist.broadcast(reads, src=0)
    alive = ~dead
    encoder_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[indices] = directions
    sae.W_enc[:, indices] = reads.t() * 0.2 * encoder_norm
    sae.b_enc[indices] = 0
    for param, rows in ((sae.W_dec, (indices, slice(None))), (sae.W_enc, (slice(None), indices)),
                        (sae.b_enc, (indices,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows] = 0
    return count
