"""The figures of interp: attention patterns, ablation, patching, residual norms, probes. Each returns
its matplotlib figure (a notebook shows it inline) and saves it when given a path."""

from __future__ import annotations

import torch

from analysis.ablation import Ablation
from analysis.probes import Probe
from analysis.residual import residual_stack
from utils import figure, finish_figure


def plot_attention(pattern: torch.Tensor, token_labels: list[str] | None = None, head: int | None = None,
                   title: str = "", path: str | None = None):
    """Attention patterns [head, query, key] (or [batch, head, query, key], averaged over the
    batch) as heat maps: one head, or all heads side by side."""
    if pattern.dim() == 4:
        pattern = pattern.float().mean(0)
    heads = [head] if head is not None else list(range(pattern.shape[0]))
    fig, axes = figure(1, len(heads), figsize=(3.2 * len(heads), 3.2), squeeze=False)
    for ax, h in zip(axes[0], heads):
        image = ax.imshow(pattern[h].detach().cpu().numpy(), vmin=0, vmax=1, cmap="Blues")
        ax.set(title=f"head {h}", xlabel="key", ylabel="query")
        if token_labels:
            ax.set_xticks(range(len(token_labels)), token_labels)
            ax.set_yticks(range(len(token_labels)), token_labels)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_ablation(results: list[Ablation], clean_loss: float, title: str = "", path: str | None = None):
    """Loss change when each component is ablated, largest first."""
    fig, ax = figure(figsize=(6, 0.35 * len(results) + 1.2))
    names = [r.component for r in results][::-1]
    ax.barh(names, [r.loss_change for r in results][::-1])
    ax.set(xlabel=f"loss change (clean loss {clean_loss:.3f})", title=title or "ablation")
    return finish_figure(fig, path)


def plot_patching(recovery: torch.Tensor, row_labels: list[str], column_labels: list[str], title: str = "",
                  path: str | None = None):
    """A heat map of normalised logit-difference recovery (0: corrupted, 1: clean)."""
    fig, ax = figure(figsize=(1.2 * len(column_labels) + 3, 0.5 * len(row_labels) + 1.5))
    image = ax.imshow(recovery.detach().cpu().numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(column_labels)), column_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set(title=title or "activation patching: recovery")
    fig.colorbar(image, ax=ax)
    return finish_figure(fig, path)


def plot_residual_norms(model, cache: dict, token_labels: list[str] | None = None, title: str = "",
                        path: str | None = None):
    """The residual stream's mean norm before each block and at the end, one line per position."""
    stack, names = residual_stack(model, cache, accumulated=True)
    norms = stack.float().norm(dim=-1).mean(1).cpu()  # [layers, positions]
    fig, ax = figure(figsize=(1.0 * len(names) + 4, 3.5))
    for position in range(norms.shape[1]):
        label = token_labels[position] if token_labels else f"position {position}"
        ax.plot(range(len(names)), norms[:, position].numpy(), marker="o", label=label)
    ax.set_xticks(range(len(names)), [n.replace(".hook_resid_pre", "").replace("hook_", "") for n in names])
    ax.set(ylabel="mean norm", title=title or "residual stream norm by layer")
    if norms.shape[1] <= 12:
        ax.legend()
    return finish_figure(fig, path)


def plot_probes(accuracies: dict[str, dict[str, Probe]], title: str = "", path: str | None = None):
    """Held-out probe accuracy by layer, one line per label: {label: probe_residual(...)}."""
    fig, ax = figure(figsize=(6, 3.5))
    for label, probes in accuracies.items():
        names = list(probes)
        ax.plot(range(len(names)), [probes[n].heldout_accuracy for n in names], marker="o", label=label)
    ax.set_xticks(range(len(names)), [n.replace(".hook_resid_pre", "").replace("hook_", "") for n in names])
    ax.set(ylabel="held-out accuracy", ylim=(-0.02, 1.02), title=title or "linear probes by layer")
    ax.legend()
    return finish_figure(fig, path)
