"""Fourier analysis over Z_p, for models that learned modular addition (Nanda et al. 2023).

A grokked model embeds each number a as cos(w_k a) and sin(w_k a) for a few key frequencies
w_k = 2πk/p and reads the answer off cos(w_k (a + b - c)). These functions find those frequencies
and measure how much of the model's loss they carry, and read a trained run through them: its
restricted and excluded loss, its neurons by frequency, its embedding with frequencies removed.
They live beside the task (torch only), so train.py (`--track_progress`), the modular task's
report sections and the notebooks use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import loss_and_accuracy
from utils import figure, finish_figure


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


# ---------------------------------------------------------------- a trained modular-addition run


def embedding_frequency_norms(model, p: int) -> torch.Tensor:
    """The norm of the number tokens' embedding (tokens 0..p-1) in each frequency k = 1 .. p//2
    (cos and sin together) [p//2]; index k-1 is frequency k."""
    return frequency_norms(getattr(model, "model", model).embed.weight[:p])  # a model or a run


@dataclass
class FourierLosses:
    key_frequencies: list[int]
    full_loss: float  # the model's loss on the training pairs
    restricted_loss: float  # logits kept only along the key frequencies' cos/sin(w(a+b)) directions
    excluded_loss: float  # logits with those directions removed
    full_accuracy: float
    restricted_accuracy: float


@torch.no_grad()
def fourier_losses(run, frequencies: list[int] | None = None) -> FourierLosses:
    """Restricted and excluded loss on the training pairs (Nanda et al. 2023, section 5.1).

    The logits over all p² pairs, as functions of (a, b), are projected onto (restricted) or away
    from (excluded) the directions cos(w_k(a+b)) and sin(w_k(a+b)) of the key frequencies w_k, plus
    the constant for the restricted one. A model that computes a+b with those frequencies keeps
    its loss under restriction and loses it under exclusion. The key frequencies default to those
    of the logits (norm >= 1/4 of the largest, `logit_frequency_norms`); pass the embedding's
    (`key_frequencies(embedding_frequency_norms(...))`) or any others instead.
    """
    cfg, data = run.cfg, run.data
    if cfg.task != "modular" or cfg.operation != "add":
        raise ValueError("fourier_losses needs a modular addition run")
    p = cfg.modulus
    logits = run.model(data.tokens, 1)[:, -1, :p].float()  # [p², p], all pairs in a*p + b order
    m = fourier_measures(logits, p, data.train_idx.to(logits.device), data.answer.to(logits.device), frequencies)
    return FourierLosses(m["key_frequencies"], m["full_loss"], m["restricted_loss"], m["excluded_loss"],
                         m["full_acc"], m["restricted_acc"])


@torch.no_grad()
def neuron_grid(run, layer: int = -1) -> torch.Tensor:
    """The MLP neurons' activations (`hook_post`) at `=` over every pair: [p (a), p (b), d_mlp]."""
    p = run.cfg.modulus
    layer = layer % run.cfg.num_blocks
    name = f"blocks.{layer}.mlp.hook_post"
    _, cache = run.model.run_with_cache(run.data.tokens, [name])
    return cache[name][:, -1].float().reshape(p, p, -1)


def fourier_2d(grid: torch.Tensor) -> torch.Tensor:
    """A function of (a, b) per channel [p, p, n] -> its coefficients in the 2-D Fourier basis
    [p, p, n]: rows index a's basis function, columns b's (const, cos 1, sin 1, ...)."""
    basis, _ = fourier_basis(grid.shape[0], grid.device)
    return torch.einsum("ia,abn,jb->ijn", basis, grid.float(), basis)


@dataclass
class NeuronFrequencies:
    frequency: torch.Tensor  # [d_mlp]: the frequency k whose terms explain most of each neuron
    explained: torch.Tensor  # [d_mlp]: the fraction of the neuron's variance (over pairs) they explain
    spectrum: torch.Tensor  # [p, p]: mean squared 2-D Fourier coefficient over neurons, constant removed
    shares: torch.Tensor  # [p//2, n]: every frequency's share of each neuron's variance (row k-1: frequency k)


def neuron_frequencies(grid: torch.Tensor) -> NeuronFrequencies:
    """Clusters neurons by frequency (Nanda et al. 2023, section 4.3) from their activations over
    all pairs, grid [p, p, n] (neuron_grid(run)): for each neuron, the share of its variance that
    lies in the 2-D Fourier terms of one frequency k (1, cos kx, sin kx in a times the same in b,
    less the constant), and the k with the largest share."""
    p = grid.shape[0]
    power = fourier_2d(grid).pow(2)  # [p, p, n]
    power[0, 0] = 0  # the mean is not variance
    total = power.sum((0, 1)).clamp_min(1e-12)
    shares = []
    for k in range(1, p // 2 + 1):
        rows = [0] + list(range(p))[frequency_rows(p, k)]
        shares.append(power[rows][:, rows].sum((0, 1)) / total)
    shares = torch.stack(shares)  # [p//2, n]
    explained, best = shares.max(0)
    return NeuronFrequencies(best + 1, explained, power.mean(-1), shares)


@dataclass
class FourierAblation:
    clean_loss: float  # over all pairs
    clean_acc: float
    key_loss: float  # with the given frequencies removed from the embedding
    key_acc: float
    random_loss: float  # mean over random sets of as many other frequencies (nan: none asked for)
    random_acc: float
    random_sets: list[list[int]]


@torch.no_grad()
def fourier_ablation(run, frequencies: list[int], compare_random: int = 5, seed: int = 0) -> FourierAblation:
    """Removes the given frequencies from the embedding of the numbers 0..p-1 (its cos/sin
    components over the number axis) and measures loss and accuracy over all pairs; does the same
    for `compare_random` random sets of as many other frequencies. A model that computes with those
    frequencies breaks when they go and barely notices the others going."""
    model, p = run.model, run.cfg.modulus
    basis, _ = fourier_basis(p, run.device)
    embed = model.embed.weight[:p].detach().float()

    def ablated_metrics(ks: list[int]) -> tuple[float, float]:
        rows = torch.cat([basis[frequency_rows(p, k)] for k in ks]) if ks else basis[:0]
        removed = (embed - rows.T @ (rows @ embed)).to(model.embed.weight.dtype)

        def hook(x, hook_point):
            numbers = run.data.tokens < p
            x = x.clone()
            x[numbers] = removed[run.data.tokens[numbers]]
            return x

        logits = model.run_with_hooks(run.data.tokens, [("hook_embed", hook)])
        return loss_and_accuracy(logits, run.data.targets)

    clean = loss_and_accuracy(model(run.data.tokens), run.data.targets)
    others = [k for k in range(1, p // 2 + 1) if k not in frequencies]
    generator = torch.Generator().manual_seed(seed)
    random_sets = [[others[i] for i in torch.randperm(len(others), generator=generator)[:len(frequencies)]]
                   for _ in range(compare_random)]
    random_results = [ablated_metrics(ks) for ks in random_sets]
    key = ablated_metrics(frequencies)
    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    return FourierAblation(*clean, *key, mean([r[0] for r in random_results]), mean([r[1] for r in random_results]),
                           random_sets)


# ---------------------------------------------------------------- figures


def plot_frequency_norms(norms: torch.Tensor, key: list[int] | None = None, title: str = "",
                         path: str | None = None):
    """The embedding's norm in each frequency k = 1 .. p//2, key frequencies highlighted."""
    fig, ax = figure(figsize=(8, 3))
    ks = list(range(1, len(norms) + 1))
    colours = ["tab:red" if key and k in key else "tab:blue" for k in ks]
    ax.bar(ks, norms.detach().cpu().numpy(), color=colours)
    ax.set(xlabel="frequency k", ylabel="norm", title=title or "token embedding by Fourier frequency")
    return finish_figure(fig, path)


def plot_neuron_frequencies(neurons: NeuronFrequencies, threshold: float = 0.5, title: str = "",
                            path: str | None = None):
    """Left: the neurons' mean power in each 2-D Fourier term (a's basis down, b's across, log
    scale). Right: how many neurons each frequency explains (share of variance >= threshold)."""
    import matplotlib.colors

    fig, (spectrum_ax, count_ax) = figure(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    spectrum = neurons.spectrum.detach().cpu().clone()
    spectrum[0, 0] = float("nan")  # removed before the mean; keep it out of the colour scale
    image = spectrum_ax.imshow(spectrum.numpy(), cmap="viridis", norm=matplotlib.colors.LogNorm())
    p = spectrum.shape[0]
    ticks = list(range(1, p, max(1, (p // 2) // 8) * 2))
    spectrum_ax.set_xticks(ticks, [f"{(t + 1) // 2}" for t in ticks])
    spectrum_ax.set_yticks(ticks, [f"{(t + 1) // 2}" for t in ticks])
    spectrum_ax.set(xlabel="frequency in b (cos, sin)", ylabel="frequency in a (cos, sin)",
                    title="neuron power in the 2-D Fourier basis")
    fig.colorbar(image, ax=spectrum_ax, shrink=0.8)
    clear = neurons.explained >= threshold
    counts = torch.bincount(neurons.frequency[clear].cpu(), minlength=p // 2 + 1)[1:]
    count_ax.bar(range(1, len(counts) + 1), counts.numpy())
    count_ax.set(xlabel="frequency k", ylabel="neurons",
                 title=f"{int(clear.sum())} of {len(clear)} neurons have >= {threshold:.0%} of their variance "
                       f"in one frequency")
    if title:
        fig.suptitle(title)
    return finish_figure(fig, path)
