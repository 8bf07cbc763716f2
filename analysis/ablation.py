"""Zero and mean ablation of heads, MLPs and single neurons, ranked by what the loss loses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.runs import model_of
from data import loss_and_accuracy


def ablation_hook(kind: str, index=None, mean: torch.Tensor | None = None):
    """A hook that zeroes (kind="zero") or replaces by `mean` (kind="mean", e.g. the activation's
    mean over a batch) its activation: all of it, or only `index` on the axis heads or neurons
    live on (axis 2 of [B, T, H, Dh], the last axis of [B, T, M])."""
    if kind not in ("zero", "mean"):
        raise ValueError(f"kind must be 'zero' or 'mean', got {kind!r}")

    def hook(x, hook_point):
        replacement = torch.zeros_like(x) if kind == "zero" else mean.to(x.dtype).expand_as(x)
        if index is None:
            return replacement
        x = x.clone()
        if x.dim() == 4:  # [B, T, H, Dh]: a head
            x[:, :, index] = replacement[:, :, index]
        else:  # [B, T, M]: a neuron
            x[..., index] = replacement[..., index]
        return x

    return hook


@dataclass
class Ablation:
    component: str  # "L0H3" (a head), "L0 MLP", "L0 N17" (a neuron)
    hook: str
    loss: float
    accuracy: float
    loss_change: float  # ablated minus clean: how much the model needs this component
    accuracy_change: float


@torch.no_grad()
def ablation_sweep(model, tokens: torch.Tensor, targets: torch.Tensor, kind: str = "mean",
                   neurons: bool = False) -> tuple[tuple[float, float], list[Ablation]]:
    """Ablates every head (its hook_z), every MLP (hook_mlp_out) and, with neurons=True, every MLP
    neuron (hook_post) one at a time; returns the clean (loss, accuracy) and the ablations ranked
    by loss change, most important first. Mean ablation uses the batch mean at each position."""
    model = model_of(model)
    names = [n for n in model.hook_names if n.endswith(("attn.hook_z", "hook_mlp_out", "mlp.hook_post"))]
    clean_logits, cache = model.run_with_cache(tokens, names)
    clean = loss_and_accuracy(clean_logits, targets)
    plan = []
    for i, block in enumerate(model.blocks):
        plan += [(f"L{i}H{h}", f"blocks.{i}.attn.hook_z", h) for h in range(model.cfg.num_heads)]
        if block.mlp is not None:
            plan.append((f"L{i} MLP", f"blocks.{i}.hook_mlp_out", None))
            if neurons:
                width = cache[f"blocks.{i}.mlp.hook_post"].shape[-1]
                plan += [(f"L{i} N{n}", f"blocks.{i}.mlp.hook_post", n) for n in range(width)]
    means = {hook: cache[hook].mean(0, keepdim=True) for _, hook, _ in plan} if kind == "mean" else {}
    results = []
    for label, hook, index in plan:
        mean = means.get(hook)
        loss, accuracy = loss_and_accuracy(model.run_with_hooks(tokens, [(hook, ablation_hook(kind, index, mean))]),
                                           targets)
        results.append(Ablation(label, hook, loss, accuracy, loss - clean[0], accuracy - clean[1]))
    return clean, sorted(results, key=lambda r: -r.loss_change)
