"""Look inside a trained run: residual-stream decompositions, logit lens, direct logit attribution,
ablations, and the Fourier analysis of grokked modular arithmetic (Nanda et al. 2023).

    from interp import load_run
    run = load_run("runs/add113-20261122-061450")       # model in eval mode, config, data
    logits, cache = run.model.run_with_cache(run.data.val_x)

Everything takes a loaded model (or a Run) and returns tensors or small dataclasses; every plot
function returns a matplotlib figure (pass `path=` to also save it).

    python interp.py runs/<run>        # writes runs/<run>/interp/: plots and report.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from config import ConfigError, config_from_dict
from data import IGNORE, build_data
from model import Transformer
from utils import CheckpointError, Dist, find_checkpoint, load_checkpoint, pick_device

# ---------------------------------------------------------------- loading


@dataclass
class Run:
    model: Transformer  # in eval mode
    cfg: object  # config.Config
    data: object  # data.TaskData of the run's task
    device: torch.device
    checkpoint_path: str
    step: int


def load_run(path: str, device: str = "auto", prefer: str = "best") -> Run:
    """A run directory (its best.pt, else last.pt; prefer="last" for the other order) or a
    checkpoint file -> the model in eval mode, its config and its data, on the best device."""
    if os.path.isdir(path):
        names = ("best.pt", "last.pt") if prefer == "best" else ("last.pt", "best.pt")
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        path = found[0] if found else find_checkpoint(path)  # find_checkpoint names what is missing
    checkpoint = load_checkpoint(path)  # weights_only=True
    cfg = config_from_dict(checkpoint["config"], {})
    torch_device = pick_device(device)
    data = build_data(cfg, Dist(), torch_device)
    model = Transformer(cfg, data.vocab_size).to(torch_device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return Run(model, cfg, data, torch_device, path, checkpoint["step"])


def _model(model_or_run) -> Transformer:
    return model_or_run.model if isinstance(model_or_run, Run) else model_or_run


# ---------------------------------------------------------------- the residual stream


def residual_stack(model, cache: dict, accumulated: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The residual stream as a stack [components, batch, pos, d_model] and its labels.

    accumulated=True: the stream before each block, then at the end (`hook_resid_final`).
    accumulated=False: what each part wrote into it — token and position embeddings, every
    head's result, each attention output bias, every MLP — which sums to `hook_resid_final`.
    The cache must hold the hooks named here (run_with_cache with no filter holds them all).
    """
    model = _model(model)
    layers = range(model.cfg.num_blocks)
    if accumulated:
        labels = [f"blocks.{i}.hook_resid_pre" for i in layers] + ["hook_resid_final"]
        return torch.stack([cache[n] for n in labels]), labels
    parts, labels = [cache["hook_embed"], cache["hook_pos_embed"]], ["embed", "pos_embed"]
    for i in layers:
        result = cache[f"blocks.{i}.attn.hook_result"]  # [B, T, H, D]
        for h in range(result.shape[2]):
            parts.append(result[:, :, h])
            labels.append(f"L{i}H{h}")
        bias = model.blocks[i].attn.out.bias
        if bias is not None:
            parts.append(bias.expand_as(result[:, :, 0]))
            labels.append(f"L{i} attn bias")
        if f"blocks.{i}.hook_mlp_out" in cache:
            parts.append(cache[f"blocks.{i}.hook_mlp_out"])
            labels.append(f"L{i} MLP")
    return torch.stack(parts), labels


def _final_norm(model: Transformer, stack: torch.Tensor, resid_final: torch.Tensor) -> torch.Tensor:
    """ln_final applied to each component linearly, with the scale of the real final stream frozen
    (TransformerLens's apply_ln_to_stack). Without a final norm: the stack itself."""
    norm = model.ln_final
    if isinstance(norm, torch.nn.Identity):
        return stack
    inner = norm.norm
    if isinstance(inner, torch.nn.LayerNorm):
        centred = stack - stack.mean(-1, keepdim=True)
        scale = (resid_final.var(-1, unbiased=False, keepdim=True) + inner.eps).sqrt()
    else:  # RMSNorm
        centred = stack
        eps = inner.eps if inner.eps is not None else torch.finfo(stack.dtype).eps
        scale = (resid_final.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    out = centred / scale
    return out * inner.weight if inner.weight is not None else out


@torch.no_grad()
def logit_lens(model, cache: dict) -> tuple[torch.Tensor, list[str]]:
    """Logits read off the residual stream before each block and at the end
    [components, batch, pos, vocab]; the last entry is the model's own logits."""
    model = _model(model)
    stack, labels = residual_stack(model, cache, accumulated=True)
    if isinstance(model.ln_final, torch.nn.Identity):
        return model.unembed(stack), labels
    return model.unembed(model.ln_final(stack)), labels


@torch.no_grad()
def direct_logit_attribution(model, cache: dict, targets: torch.Tensor, position: int = -1
                             ) -> tuple[torch.Tensor, list[str]]:
    """How much each component of the residual stream (residual_stack(accumulated=False)) adds
    directly to the logit of `targets` [batch] at `position`: [components, batch]. With no final
    norm the components sum to the logit exactly; with one, its scale is frozen at the real
    stream's (and a LayerNorm's bias is left out), as in TransformerLens."""
    model = _model(model)
    stack, labels = residual_stack(model, cache, accumulated=False)
    stack = stack[:, :, position]  # [C, B, D]
    normed = _final_norm(model, stack, cache["hook_resid_final"][:, position])
    directions = model.unembed.weight[targets]  # [B, D]
    return (normed * directions).sum(-1), labels


# ---------------------------------------------------------------- ablation


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


def loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy where targets are set (targets [B, n] cover the last n
    positions of logits [B, T, vocab]; data.IGNORE marks positions without a target)."""
    logits = logits[:, -targets.shape[1]:]
    keep = targets != IGNORE
    picked = logits[keep].float()
    loss = F.cross_entropy(picked, targets[keep]).item()
    accuracy = (picked.argmax(-1) == targets[keep]).float().mean().item()
    return loss, accuracy


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
    model = _model(model)
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
    results = []
    for label, hook, index in plan:
        mean = cache[hook].mean(0, keepdim=True) if kind == "mean" else None
        loss, accuracy = loss_and_accuracy(model.run_with_hooks(tokens, [(hook, ablation_hook(kind, index, mean))]),
                                           targets)
        results.append(Ablation(label, hook, loss, accuracy, loss - clean[0], accuracy - clean[1]))
    return clean, sorted(results, key=lambda r: -r.loss_change)


# ---------------------------------------------------------------- activation patching


def corrupt(run: Run, tokens: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
    """A corrupted copy of tokens [B, T] that differs at one position, and that position.

    Modular runs: `a` (position 0) becomes another number, so the answer changes. Other tasks:
    the second-to-last token becomes another token of the vocabulary (never the same one).
    """
    generator = torch.Generator().manual_seed(seed)
    corrupted = tokens.clone()
    if run.cfg.task == "modular":
        position, span = 0, run.cfg.modulus
    else:
        position, span = tokens.shape[1] - 2, run.data.vocab_size
    shift = torch.randint(1, span, (tokens.shape[0],), generator=generator).to(tokens.device)
    corrupted[:, position] = (tokens[:, position] + shift) % span
    return corrupted, position


def logit_difference(logits: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of logit[right] - logit[wrong] at the last position."""
    last = logits[:, -1].float()
    return (last.gather(1, right[:, None]) - last.gather(1, wrong[:, None])).mean()


def _patching(model: Transformer, clean, corrupted, right, wrong, names: list[str]):
    """The clean cache of `names` and a function: hooks -> normalised recovery of the logit
    difference when the corrupted input runs with those hooks (0: as corrupted, 1: as clean)."""
    clean_logits, cache = model.run_with_cache(clean, names)
    clean_diff = logit_difference(clean_logits, right, wrong)
    corrupted_diff = logit_difference(model(corrupted), right, wrong)

    def recovery(hooks) -> torch.Tensor:
        patched = logit_difference(model.run_with_hooks(corrupted, hooks), right, wrong)
        return (patched - corrupted_diff) / (clean_diff - corrupted_diff)

    return cache, recovery


@torch.no_grad()
def patch_residual(model, clean: torch.Tensor, corrupted: torch.Tensor, right: torch.Tensor,
                   wrong: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Activation patching of the residual stream: for each block's `hook_resid_pre` (and
    `hook_resid_final`) and each position, run the corrupted input with the clean activation
    patched in there. Returns [layers, positions] of normalised recovery of the logit difference
    right - wrong: 0 = as corrupted, 1 = as clean."""
    model = _model(model)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.num_blocks)] + ["hook_resid_final"]
    cache, recovery = _patching(model, clean, corrupted, right, wrong, names)
    result = torch.zeros(len(names), clean.shape[1])
    for i, name in enumerate(names):
        for position in range(clean.shape[1]):
            def patch(x, hook, position=position, name=name):
                x = x.clone()
                x[:, position] = cache[name][:, position]
                return x

            result[i, position] = recovery([(name, patch)])
    return result, names


@torch.no_grad()
def patch_heads(model, clean: torch.Tensor, corrupted: torch.Tensor, right: torch.Tensor,
                wrong: torch.Tensor) -> torch.Tensor:
    """Patches each head's clean output (`attn.hook_z`, all positions) into the corrupted run;
    [blocks, heads] of normalised logit-difference recovery."""
    model = _model(model)
    names = [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.num_blocks)]
    cache, recovery = _patching(model, clean, corrupted, right, wrong, names)
    result = torch.zeros(model.cfg.num_blocks, model.cfg.num_heads)
    for i, name in enumerate(names):
        for head in range(model.cfg.num_heads):
            def patch(z, hook, head=head, name=name):
                z = z.clone()
                z[:, :, head] = cache[name][:, :, head]
                return z

            result[i, head] = recovery([(name, patch)])
    return result


# ---------------------------------------------------------------- linear probes


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
    model = _model(model)
    _, cache = model.run_with_cache(tokens, lambda n: n.endswith(("hook_resid_pre", "hook_resid_final")))
    stack, names = residual_stack(model, cache, accumulated=True)
    return {name: train_probe(stack[i][:, position], labels, **probe_args) for i, name in enumerate(names)}


# ---------------------------------------------------------------- Fourier analysis of modular runs


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


def embedding_frequency_norms(model, p: int) -> torch.Tensor:
    """The norm of the number tokens' embedding (tokens 0..p-1) in each frequency k = 1 .. p//2
    (cos and sin together) [p//2]; index k-1 is frequency k."""
    model = _model(model)
    embed = model.embed.weight[:p].detach().float()  # [p, D]
    basis, _ = fourier_basis(p, embed.device)
    coefficients = basis @ embed  # [p, D]: const, cos 1, sin 1, ...
    norms = [coefficients[1 + 2 * (k - 1): 1 + 2 * k].norm() for k in range(1, p // 2 + 1)]
    return torch.stack(norms)


def key_frequencies(norms: torch.Tensor, fraction: float = 0.25) -> list[int]:
    """Frequencies whose norm is at least `fraction` of the largest: the few that a grokked model's
    embedding concentrates on (Nanda et al. find about five), in decreasing order of norm."""
    order = torch.argsort(norms, descending=True)
    return [int(k) + 1 for k in order if norms[k] >= fraction * norms.max()]


def _sum_directions(p: int, frequencies: list[int], device) -> torch.Tensor:
    """Orthonormal directions over the p² inputs (a, b), ordered a*p + b: cos and sin of
    2πk(a+b)/p for each frequency, plus the constant [2·len + 1, p²]."""
    a, b = torch.meshgrid(torch.arange(p, device=device), torch.arange(p, device=device), indexing="ij")
    s = (a + b).flatten().double()
    rows = [torch.ones_like(s)]
    for k in frequencies:
        rows += [torch.cos(2 * math.pi * k * s / p), torch.sin(2 * math.pi * k * s / p)]
    rows = torch.stack(rows)
    return (rows / rows.norm(dim=1, keepdim=True)).float()


def restrict_to_frequencies(logits: torch.Tensor, p: int, frequencies: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [p², n] over all pairs (a*p + b order) -> (kept only along the constant and cos/sin
    of 2πk(a+b)/p for the given frequencies, with those frequencies' directions removed)."""
    directions = _sum_directions(p, frequencies, logits.device)  # [2K+1, p²]
    restricted = directions.T @ (directions @ logits)
    excluded = logits - directions[1:].T @ (directions[1:] @ logits)  # the constant stays
    return restricted, excluded


@dataclass
class FourierLosses:
    key_frequencies: list[int]
    full_loss: float  # the model's loss on the training pairs
    restricted_loss: float  # logits kept only along the key frequencies' cos/sin(w(a+b)) directions
    excluded_loss: float  # logits with those directions removed
    full_accuracy: float
    restricted_accuracy: float


@torch.no_grad()
def fourier_losses(run: Run, frequencies: list[int] | None = None) -> FourierLosses:
    """Restricted and excluded loss on the training pairs (Nanda et al. 2023, section 5.1).

    The logits over all p² pairs, as functions of (a, b), are projected onto (restricted) or away
    from (excluded) the directions cos(w_k(a+b)) and sin(w_k(a+b)) of the key frequencies w_k, plus
    the constant for the restricted one. A model that computes a+b with those frequencies keeps
    its loss under restriction and loses it under exclusion. Addition with p prime only.
    """
    cfg, data = run.cfg, run.data
    if cfg.task != "modular" or cfg.operation != "add":
        raise ValueError("fourier_losses needs a modular addition run")
    p = cfg.modulus
    if frequencies is None:
        frequencies = key_frequencies(embedding_frequency_norms(run.model, p))
    logits = run.model(data.tokens)[:, -1, :p].float()  # [p², p], all pairs in a*p + b order
    restricted, excluded = restrict_to_frequencies(logits, p, frequencies)
    train, answers = data.train_idx.to(logits.device), data.answer.to(logits.device)

    def loss_acc(values):
        picked = values[train]
        return (F.cross_entropy(picked, answers[train]).item(),
                (picked.argmax(-1) == answers[train]).float().mean().item())

    full, restricted_, excluded_ = loss_acc(logits), loss_acc(restricted), loss_acc(excluded)
    return FourierLosses(frequencies, full[0], restricted_[0], excluded_[0], full[1], restricted_[1])


# ---------------------------------------------------------------- plots


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _done(fig, path: str | None):
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_attention(pattern: torch.Tensor, token_labels: list[str] | None = None, head: int | None = None,
                   title: str = "", path: str | None = None):
    """Attention patterns [head, query, key] (or [batch, head, query, key], averaged over the
    batch) as heat maps: one head, or all heads side by side."""
    if pattern.dim() == 4:
        pattern = pattern.float().mean(0)
    heads = [head] if head is not None else list(range(pattern.shape[0]))
    fig, axes = _figure(1, len(heads), figsize=(3.2 * len(heads), 3.2), squeeze=False)
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


def plot_frequency_norms(norms: torch.Tensor, key: list[int] | None = None, title: str = "",
                         path: str | None = None):
    """The embedding's norm in each frequency k = 1 .. p//2, key frequencies highlighted."""
    fig, ax = _figure(figsize=(8, 3))
    ks = list(range(1, len(norms) + 1))
    colours = ["tab:red" if key and k in key else "tab:blue" for k in ks]
    ax.bar(ks, norms.detach().cpu().numpy(), color=colours)
    ax.set(xlabel="frequency k", ylabel="norm", title=title or "token embedding by Fourier frequency")
    return _done(fig, path)


def plot_ablation(results: list[Ablation], clean_loss: float, title: str = "", path: str | None = None):
    """Loss change when each component is ablated, largest first."""
    fig, ax = _figure(figsize=(6, 0.35 * len(results) + 1.2))
    names = [r.component for r in results][::-1]
    ax.barh(names, [r.loss_change for r in results][::-1])
    ax.set(xlabel=f"loss change (clean loss {clean_loss:.3f})", title=title or "ablation")
    return _done(fig, path)


def plot_patching(recovery: torch.Tensor, row_labels: list[str], column_labels: list[str], title: str = "",
                  path: str | None = None):
    """A heat map of normalised logit-difference recovery (0: corrupted, 1: clean)."""
    fig, ax = _figure(figsize=(1.2 * len(column_labels) + 3, 0.5 * len(row_labels) + 1.5))
    image = ax.imshow(recovery.detach().cpu().numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(column_labels)), column_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set(title=title or "activation patching: recovery")
    fig.colorbar(image, ax=ax)
    return _done(fig, path)


# ---------------------------------------------------------------- the report


def write_report(run_dir: str, out_dir: str | None = None, device: str = "auto") -> str:
    """Writes <run>/interp/: plots and report.md with the findings in numbers; returns its path."""
    run = load_run(run_dir, device)
    out_dir = out_dir or os.path.join(run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir), "interp")
    os.makedirs(out_dir, exist_ok=True)
    cfg, data = run.cfg, run.data
    rows = torch.randperm(len(data.val_x), generator=torch.Generator().manual_seed(0))[:2048].to(data.val_x.device)
    tokens, targets = data.val_x[rows], data.val_y[rows]  # a random sample: the split is sorted by a
    lines = [f"# {os.path.basename(os.path.normpath(run_dir))}: interpretability report", "",
             f"Checkpoint `{run.checkpoint_path}` (step {run.step}), task `{cfg.task}`, "
             f"{cfg.num_blocks} block(s) x {cfg.num_heads} heads x {cfg.embedding_dim}.", ""]

    with torch.no_grad():
        _, cache = run.model.run_with_cache(tokens, lambda n: n.endswith("hook_pattern"))
    labels = None
    if cfg.task == "modular":
        labels = ["a", "b", "="]
    for i in range(cfg.num_blocks):
        name = f"attention_L{i}.png"
        plot_attention(cache[f"blocks.{i}.attn.hook_pattern"], labels, title=f"block {i}, mean over "
                       f"{len(tokens)} validation examples", path=os.path.join(out_dir, name))
        lines.append(f"![attention, block {i}]({name})")
    lines.append("")

    clean, results = ablation_sweep(run.model, tokens, targets, kind="mean")
    plot_ablation(results, clean[0], title="mean ablation", path=os.path.join(out_dir, "ablation.png"))
    lines += ["## Ablation (mean over the batch)", "",
              f"Clean validation loss {clean[0]:.4f}, accuracy {clean[1]:.4f}.", "",
              "| component | loss | accuracy | loss change |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.component} | {r.loss:.4f} | {r.accuracy:.4f} | {r.loss_change:+.4f} |" for r in results]
    lines += ["", "![ablation](ablation.png)", ""]

    if cfg.task == "modular":
        p = cfg.modulus
        corrupted, _ = corrupt(run, tokens)
        right, wrong = targets[:, 0], run.model(corrupted)[:, -1, :p].argmax(-1)  # the corrupted answer
        keep = right != wrong
        recovery, names = patch_residual(run.model, tokens[keep], corrupted[keep], right[keep], wrong[keep])
        plot_patching(recovery, names, ["a", "b", "="], title="patching the residual stream (a corrupted)",
                      path=os.path.join(out_dir, "patching_residual.png"))
        heads = patch_heads(run.model, tokens[keep], corrupted[keep], right[keep], wrong[keep])
        lines += ["## Activation patching (`a` corrupted)", "",
                  "Recovery of the logit difference when one head's clean output is patched into the corrupted "
                  "run: " + ", ".join(f"L{i}H{h} {heads[i, h]:.2f}" for i in range(heads.shape[0])
                                      for h in range(heads.shape[1])) + ".", "",
                  "![patching the residual stream](patching_residual.png)", "", "## Linear probes at `=`", "",
                  "| label | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        a, b = tokens[:, 0], tokens[:, 1]
        for label, values in (("a", a), ("b", b), ("answer", targets[:, 0])):
            probes = probe_residual(run.model, tokens, values, position=-1, num_classes=p)
            lines.append(f"| {label} | " + " | ".join(f"{probes[n].heldout_accuracy:.3f}" for n in names) + " |")
        lines += ["", "Held-out accuracy of a linear probe on the residual stream at `=`.", ""]
    if cfg.task == "modular" and cfg.operation == "add":
        norms = embedding_frequency_norms(run.model, cfg.modulus)
        losses = fourier_losses(run)
        plot_frequency_norms(norms, losses.key_frequencies, path=os.path.join(out_dir, "fourier_embedding.png"))
        sparse = len(losses.key_frequencies) <= 10
        lines += ["## Fourier analysis (Nanda et al. 2023)", "",
                  f"Key frequencies from the embedding (norm >= 1/4 of the largest): "
                  f"{losses.key_frequencies if sparse else f'{len(losses.key_frequencies)} of {len(norms)}'}"
                  + ("" if sparse else " — the embedding is not concentrated on a few frequencies, so the "
                     "restricted loss below says little"), "",
                  "| loss on the training pairs | value |", "| --- | --- |",
                  f"| full | {losses.full_loss:.4f} |", f"| restricted to the key frequencies | {losses.restricted_loss:.4f} |",
                  f"| excluding the key frequencies | {losses.excluded_loss:.4f} |", "",
                  "![embedding norm by frequency](fourier_embedding.png)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Write an interpretability report for a run.")
    parser.add_argument("run", help="a run directory (runs/<run>) or a checkpoint file")
    parser.add_argument("--out", default=None, help="output directory (default: <run>/interp)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    path = write_report(args.run, args.out, args.device)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
