"""Fourier analysis over Z_p, for models that learned modular addition (Nanda et al. 2023).

A grokked model embeds each number a as cos(w_k a) and sin(w_k a) for a few key frequencies
w_k = 2πk/p and reads the answer off cos(w_k (a + b - c)). These functions find those frequencies
and measure how much of the model's loss they carry. They live on the lower floor (torch only) so
that both train.py (`--track_progress`) and interp.py use them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fourier_basis(p: int, device=None) -> tuple[torch.Tensor, list[str]]:
    """The orthonormal Fourier basis over Z_p as rows [p, p]: a constant, then cos and sin of
    2πkx/p for k = 1 .. p//2 (for even p the last frequency has only its cosine)."""
    x = torch.arange(p, device=device, dtype=torch.float64)
    rows, labels = [torch.ones(p, device=device, dtype=torch.float64)], ["const"]
    for k in range(1, p // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / p))
        labels.append(f"cos {k}")
        if 2 * k != p:
            rows.append(torch.sin(2 * math.pi * k * x / p))
            labels.append(f"sin {k}")
    basis = torch.stack(rows)
    return (basis / basis.norm(dim=1, keepdim=True)).float(), labels


def frequency_rows(p: int, k: int) -> slice:
    """The rows of fourier_basis(p) that belong to frequency k (its cos and, if it has one, its sin)."""
    return slice(2 * k - 1, min(2 * k + 1, p))


def frequency_norms(table: torch.Tensor) -> torch.Tensor:
    """A table whose rows are indexed by the numbers 0..p-1 (an embedding [p, D]) -> its norm in
    each frequency k = 1 .. p//2, cos and sin together [p//2]; index k-1 is frequency k."""
    p = table.shape[0]
    basis, _ = fourier_basis(p, table.device)
    coefficients = basis @ table.detach().float()  # [p, D]: const, cos 1, sin 1, ...
    return torch.stack([coefficients[frequency_rows(p, k)].norm() for k in range(1, p // 2 + 1)])


def key_frequencies(norms: torch.Tensor, fraction: float = 0.25) -> list[int]:
    """Frequencies whose norm is at least `fraction` of the largest: the few that a grokked model's
    embedding concentrates on (Nanda et al. find about five), in decreasing order of norm."""
    order = torch.argsort(norms, descending=True)
    return [int(k) + 1 for k in order if norms[k] >= fraction * norms.max()]


def gini(values: torch.Tensor) -> float:
    """The Gini coefficient of non-negative values: 0 when all are equal, near 1 when one holds
    everything. Of the embedding's frequency norms, it rises as the model settles on a few."""
    x = values.detach().double().flatten().sort().values
    n, total = x.numel(), x.sum()
    if total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return float(((2 * ranks - n - 1) * x).sum() / (n * total))


def sum_directions(p: int, frequencies: list[int], device=None) -> torch.Tensor:
    """Orthonormal directions over the p² inputs (a, b), ordered a*p + b: the constant, then cos
    and sin of 2πk(a+b)/p for each frequency [2·len + 1, p²]."""
    a, b = torch.meshgrid(torch.arange(p, device=device), torch.arange(p, device=device), indexing="ij")
    s = (a + b).flatten().double()
    rows = [torch.ones_like(s)]
    for k in frequencies:
        # For even p, sin(π(a+b)) is 0 at every pair; computed, it is rounding noise, which normalising
        # would blow up into a spurious unit direction. It stays exactly 0.
        sine = torch.sin(2 * math.pi * k * s / p) if 2 * k != p else torch.zeros_like(s)
        rows += [torch.cos(2 * math.pi * k * s / p), sine]
    rows = torch.stack(rows)
    return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


def logit_frequency_norms(logits: torch.Tensor, p: int) -> torch.Tensor:
    """logits [p², n] over all pairs (a*p + b order) -> the norm of their part along cos and sin of
    2πk(a+b)/p for each k = 1 .. p//2 [p//2]. A model that computes a+b with a few frequencies
    has logits in those directions only, even while its embedding still carries others."""
    coefficients = sum_directions(p, list(range(1, p // 2 + 1)), logits.device)[1:] @ logits.float()
    return coefficients.view(p // 2, 2, -1).norm(dim=(1, 2))


def restrict_to_frequencies(logits: torch.Tensor, p: int, frequencies: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [p², n] over all pairs (a*p + b order) -> (kept only along the constant and cos/sin
    of 2πk(a+b)/p for the given frequencies, with those frequencies' directions removed)."""
    directions = sum_directions(p, frequencies, logits.device)  # [2K+1, p²]
    restricted = directions.T @ (directions @ logits)
    excluded = logits - directions[1:].T @ (directions[1:] @ logits)  # the constant stays
    return restricted, excluded


def restricted_and_excluded(logits: torch.Tensor, p: int, frequencies: list[int], rows: torch.Tensor,
                            answers: torch.Tensor) -> dict[str, float]:
    """Loss and accuracy on `rows` (e.g. the training pairs) of the full logits [p², p], of the logits
    restricted to `frequencies` and of the logits with them excluded."""
    restricted, excluded = restrict_to_frequencies(logits.float(), p, frequencies)
    out = {}
    for name, values in (("full", logits.float()), ("restricted", restricted), ("excluded", excluded)):
        picked = values[rows]
        out[f"{name}_loss"] = F.cross_entropy(picked, answers[rows]).item()
        out[f"{name}_acc"] = (picked.argmax(-1) == answers[rows]).float().mean().item()
    return out


def fourier_measures(logits: torch.Tensor, p: int, rows: torch.Tensor, answers: torch.Tensor,
                     frequencies: list[int] | None = None, max_keys: int | None = None) -> dict:
    """The logits [p², p] of a modular addition model over all pairs -> their key frequencies (given,
    or norm along cos/sin of w(a+b) >= 1/4 of the largest, at most `max_keys`) and the loss and
    accuracy on `rows` in full, restricted to those frequencies and with them excluded."""
    if frequencies is None:
        frequencies = key_frequencies(logit_frequency_norms(logits, p))[:max_keys]
    return {"key_frequencies": frequencies, **restricted_and_excluded(logits, p, frequencies, rows, answers)}


@torch.no_grad()
def progress_measures(model, data, p: int, max_keys: int = 10) -> dict[str, float]:
    """Nanda et al.'s progress measures for a modular addition model, on its training pairs:
    restricted and excluded loss for the logits' current key frequencies (at most `max_keys`; the
    same choice as interp.fourier_losses), the Gini coefficient of the embedding's frequency norms,
    and the weights' total L2 norm. `data` is the run's modular TaskData (all p² pairs in
    `tokens`, `train_idx`, `answer`)."""
    was_training = model.training
    model.eval()
    logits = model(data.tokens, 1)[:, -1, :p]  # only the `=` position is needed
    model.train(was_training)
    measures = fourier_measures(logits, p, data.train_idx.to(logits.device), data.answer.to(logits.device),
                                max_keys=max_keys)
    weight_norm = torch.sqrt(sum(w.detach().float().pow(2).sum() for w in model.parameters()))
    return {"restricted_loss": measures["restricted_loss"], "excluded_loss": measures["excluded_loss"],
            "fourier_gini": gini(frequency_norms(model.embed.weight[:p])),
            "key_frequencies": float(len(measures["key_frequencies"])), "weight_norm": weight_norm.item()}
