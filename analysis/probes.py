"""Linear probes on the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.residual import residual_stack
from analysis.runs import model_of


@dataclass
class Probe:
    train_accuracy: float
    heldout_accuracy: float
    weight: torch.Tensor  # [classes, d]
    bias: torch.Tensor  # [classes]


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                heldout_frac: float = 0.2, steps: int = 300, weight_decay: float = 1e-4, seed: int = 0) -> Probe:
    """A linear (softmax) probe from features [N, d] to labels [N], trained full-batch with AdamW
    on a random (1 - heldout_frac) of the rows; accuracy on both parts."""
    features, labels = features.detach().float(), labels.detach().long().to(features.device)
    num_classes = num_classes or int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).to(features.device)
    cut = int(len(labels) * (1 - heldout_frac))
    train, heldout = order[:cut], order[cut:]
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6  # standardised inputs
    x = (features - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=0.05, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(linear(x[train]), labels[train]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = linear(x).argmax(-1)

    def accuracy(rows):
        return (predicted[rows] == labels[rows]).float().mean().item() if len(rows) else float("nan")

    # Fold the standardisation into the weights, so the probe applies to raw features.
    weight = linear.weight.detach() / std
    bias = linear.bias.detach() - weight @ mean
    return Probe(accuracy(train), accuracy(heldout), weight, bias)


@torch.no_grad()
def probe_residual(model, tokens: torch.Tensor, labels: torch.Tensor, position: int = -1, **probe_args
                   ) -> dict[str, Probe]:
    """A probe for `labels` on the residual stream before each block and at the end, at `position`."""
    model = model_of(model)
    _, cache = model.run_with_cache(tokens, lambda n: n.endswith(("hook_resid_pre", "hook_resid_final")))
    stack, names = residual_stack(model, cache, accumulated=True)
    return {name: train_probe(stack[i][:, position], labels, **probe_args) for i, name in enumerate(names)}
