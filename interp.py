"""Look inside a trained run: residual-stream decompositions, logit lens, direct logit attribution,
ablations, and the Fourier analysis of grokked modular arithmetic (Nanda et al. 2023).

    from interp import load_run
    run = load_run("runs/add113-20261122-105839")       # model in eval mode, config, data
    logits, cache = run.model.run_with_cache(run.data.val_x)

Everything takes a loaded model (or a Run) and returns tensors or small dataclasses; every plot
function returns a matplotlib figure (pass `path=` to also save it).

    python interp.py runs/<run>        # writes runs/<run>/interp/: plots and report.md
    python interp.py --model gpt2 --data_path my.txt   # a pretrained model: runs/gpt2/interp/
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from activations import Run, load_run, run_folder, split_sequences  # noqa: F401 (re-exported: `from interp import load_run`)
from config import ConfigError, ModelSourceConfig, parse_flags, section
from data import IGNORE
from fourier import (fourier_basis, fourier_measures, frequency_norms, frequency_rows, gini,  # noqa: F401
                     key_frequencies, logit_frequency_norms, restrict_to_frequencies, restricted_and_excluded,
                     sum_directions)  # (re-exported)
from model import Transformer
from plumbing.checkpoints import CheckpointError
from plumbing.session import run_command

TEXT_WINDOWS, TEXT_POSITIONS = 16, 128  # a text model's report reads this much of its validation split


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
    parts, labels = [cache["hook_embed"]], ["embed"]
    if "hook_pos_embed" in cache:  # rotary models have none
        parts.append(cache["hook_pos_embed"].expand_as(cache["hook_embed"]))
        labels.append("pos_embed")
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
    [components, batch, pos, vocab] (final norm, unembedding and any soft cap); the last entry is
    the model's own logits."""
    model = _model(model)
    stack, labels = residual_stack(model, cache, accumulated=True)
    return model.head(stack), labels


@torch.no_grad()
def direct_logit_attribution(model, cache: dict, targets: torch.Tensor, position: int = -1
                             ) -> tuple[torch.Tensor, list[str]]:
    """How much each component of the residual stream (residual_stack(accumulated=False)) adds
    directly to the logit of `targets` [batch] at `position`: [components, batch]. With no final
    norm the components sum to the logit exactly; with one, its scale is frozen at the real
    stream's (and a LayerNorm's bias is left out), as in TransformerLens. A soft cap
    (--logit_softcap) is not linear, so these are contributions to the logit before the cap."""
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
    means = {hook: cache[hook].mean(0, keepdim=True) for _, hook, _ in plan} if kind == "mean" else {}
    results = []
    for label, hook, index in plan:
        mean = means.get(hook)
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
    """Mean over the batch of logit[right] - logit[wrong] at the last position, in float32 or wider
    (a float64 model's analysis stays in float64)."""
    last = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
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
    result = torch.zeros(model.cfg.num_blocks, model.cfg.num_heads, dtype=torch.float64)
    for i, name in enumerate(names):
        for head in range(model.cfg.num_heads):
            def patch(z, hook, head=head, name=name):
                z = z.clone()
                z[:, :, head] = cache[name][:, :, head]
                return z

            result[i, head] = recovery([(name, patch)])
    return result


@torch.no_grad()
def path_patch(model, clean: torch.Tensor, corrupted: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor,
               sender: tuple[int, int], receivers: list[tuple[str, int | None]]) -> torch.Tensor:
    """Path patching: how much of the logit difference comes back when the sender head's clean
    output reaches the corrupted run only through the receivers' inputs.

    `sender` is (block, head). `receivers` are input hooks with an optional head: e.g.
    ("blocks.1.attn.hook_q", 2) for the query of L1H2, ("blocks.0.mlp.hook_pre", None) for an
    MLP, ("hook_resid_final", None) for the direct path to the logits. First the corrupted input
    runs with the sender's `hook_z` set to its clean value and every other head and every MLP
    frozen at its corrupted output, so only the direct sender -> receiver paths carry the change;
    the change in the receivers' inputs is recorded. Then the corrupted input runs with only that
    change added to the receivers' inputs. Returns the normalised recovery (0: as corrupted, 1: as
    clean). In a one-block model, receivers ("hook_resid_final", None) and the block's MLP input
    together carry everything the head does, so they recover what patching the head's output does.
    """
    model = _model(model)
    block, head = sender
    frozen = [n for n in model.hook_names if n.endswith(("attn.hook_z", "hook_mlp_out"))]
    cache, recovery = _patching(model, clean, corrupted, right, wrong, [f"blocks.{block}.attn.hook_z"])
    receiver_names = sorted({name for name, _ in receivers})
    _, corrupted_cache = model.run_with_cache(corrupted, frozen + receiver_names)
    sender_name = f"blocks.{block}.attn.hook_z"

    def freeze(x, hook_point):
        value = corrupted_cache[hook_point.name]
        if hook_point.name == sender_name:
            value = value.clone()
            value[:, :, head] = cache[sender_name][:, :, head]
        return value

    with model.hooks([(name, freeze) for name in frozen]):
        _, patched_inputs = model.run_with_cache(corrupted, receiver_names)
    # Receivers get the change the sender made to their input, added to whatever they hold, so
    # several receivers compose (an MLP's new output still reaches a patched final residual).
    deltas = {name: patched_inputs[name] - corrupted_cache[name] for name in receiver_names}

    def replace(x, hook_point):
        x = x.clone()
        for name, index in receivers:
            if name == hook_point.name and index is None:
                x = x + deltas[name]
            elif name == hook_point.name:
                x[:, :, index] += deltas[name][:, :, index]
        return x

    return recovery([(name, replace) for name in receiver_names])


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


def embedding_frequency_norms(model, p: int) -> torch.Tensor:
    """The norm of the number tokens' embedding (tokens 0..p-1) in each frequency k = 1 .. p//2
    (cos and sin together) [p//2]; index k-1 is frequency k."""
    return frequency_norms(_model(model).embed.weight[:p])


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
def neuron_grid(run: Run, layer: int = -1) -> torch.Tensor:
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
def fourier_ablation(run: Run, frequencies: list[int], compare_random: int = 5, seed: int = 0) -> FourierAblation:
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


# ---------------------------------------------------------------- plots


def _figure(*args, **kwargs):
    # pyplot, so that a notebook shows the figure inline; headless, matplotlib falls back to Agg.
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


def plot_neuron_frequencies(neurons: NeuronFrequencies, threshold: float = 0.5, title: str = "",
                            path: str | None = None):
    """Left: the neurons' mean power in each 2-D Fourier term (a's basis down, b's across, log
    scale). Right: how many neurons each frequency explains (share of variance >= threshold)."""
    import matplotlib.colors

    fig, (spectrum_ax, count_ax) = _figure(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
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
    return _done(fig, path)


def plot_residual_norms(model, cache: dict, token_labels: list[str] | None = None, title: str = "",
                        path: str | None = None):
    """The residual stream's mean norm before each block and at the end, one line per position."""
    stack, names = residual_stack(model, cache, accumulated=True)
    norms = stack.float().norm(dim=-1).mean(1).cpu()  # [layers, positions]
    fig, ax = _figure(figsize=(1.0 * len(names) + 4, 3.5))
    for position in range(norms.shape[1]):
        label = token_labels[position] if token_labels else f"position {position}"
        ax.plot(range(len(names)), norms[:, position].numpy(), marker="o", label=label)
    ax.set_xticks(range(len(names)), [n.replace(".hook_resid_pre", "").replace("hook_", "") for n in names])
    ax.set(ylabel="mean norm", title=title or "residual stream norm by layer")
    if norms.shape[1] <= 12:
        ax.legend()
    return _done(fig, path)


def plot_probes(accuracies: dict[str, dict[str, Probe]], title: str = "", path: str | None = None):
    """Held-out probe accuracy by layer, one line per label: {label: probe_residual(...)}."""
    fig, ax = _figure(figsize=(6, 3.5))
    for label, probes in accuracies.items():
        names = list(probes)
        ax.plot(range(len(names)), [probes[n].heldout_accuracy for n in names], marker="o", label=label)
    ax.set_xticks(range(len(names)), [n.replace(".hook_resid_pre", "").replace("hook_", "") for n in names])
    ax.set(ylabel="held-out accuracy", ylim=(-0.02, 1.02), title=title or "linear probes by layer")
    ax.legend()
    return _done(fig, path)


# ---------------------------------------------------------------- the report


def write_report(run_dir: str, out_dir: str | None = None, device: str = "auto", source=None) -> str:
    """Writes <run>/interp/: plots and report.md with the findings in numbers; returns its path.
    `source` (a config.ModelSourceConfig) opens a pretrained model instead (load_run)."""
    import matplotlib.pyplot as plt

    open_before = set(plt.get_fignums())
    try:
        return _write_report(run_dir, out_dir, device, source)
    finally:  # the report's figures are on disk; close them, and only them
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)


def _write_report(run_dir: str, out_dir: str | None, device: str, source) -> str:
    run = load_run(run_dir, device, source=source)
    out_dir = out_dir or os.path.join(run_folder(run_dir), "interp")
    os.makedirs(out_dir, exist_ok=True)
    cfg, data = run.cfg, run.data
    if cfg.task == "text":  # the first TEXT_WINDOWS windows of the val split, cut to TEXT_POSITIONS tokens
        sequences = split_sequences(run, "val", "all", TEXT_WINDOWS * cfg.context_len)
        tokens = sequences.tokens[:TEXT_WINDOWS, :TEXT_POSITIONS].to(run.device)
        targets = sequences.targets[:TEXT_WINDOWS, :TEXT_POSITIONS].to(run.device)
    else:
        rows = torch.randperm(len(data.val_x), generator=torch.Generator().manual_seed(0))[:2048].to(data.val_x.device)
        tokens, targets = data.val_x[rows], data.val_y[rows]  # a random sample: the split is sorted by a
    header = [f"# {os.path.basename(os.path.normpath(run_dir))}: interpretability report", "",
              f"Checkpoint `{run.checkpoint_path}` (step {run.step}), task `{cfg.task}`, "
              f"{cfg.num_blocks} block(s) x {cfg.num_heads} heads x {cfg.embedding_dim}."
              + (f" {len(tokens)} windows of {tokens.shape[1]} tokens from the start of the validation split."
                 if cfg.task == "text" else ""), ""]
    lines = []  # the sections; `summary` collects the findings that head them

    with torch.no_grad():
        _, cache = run.model.run_with_cache(tokens, lambda n: n.endswith(("hook_pattern", "hook_resid_pre",
                                                                           "hook_resid_final")))
    labels, shown = None, slice(None)
    if cfg.task == "modular":
        labels = ["a", "b", "="]
    if cfg.task == "text":  # a few positions' norms, the first positions' attention
        picked = [t for t in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256) if t < tokens.shape[1]]
        labels, shown = [f"position {t}" for t in picked], slice(0, 32)
        cache.update({k: v[:, picked] for k, v in cache.items() if not k.endswith("hook_pattern")})
    plot_residual_norms(run.model, cache, labels, path=os.path.join(out_dir, "residual_norms.png"))
    lines += ["![residual stream norm by layer](residual_norms.png)", ""]
    for i in range(cfg.num_blocks):
        name = f"attention_L{i}.png"
        what = "validation examples" if cfg.task != "text" else "windows, their first 32 positions"
        plot_attention(cache[f"blocks.{i}.attn.hook_pattern"][..., shown, shown], labels if cfg.task != "text" else None,
                       title=f"block {i}, mean over {len(tokens)} {what}", path=os.path.join(out_dir, name))
        lines.append(f"![attention, block {i}]({name})")
    lines.append("")

    # Single neurons for modular runs (one block of 512 here); on deeper models that is a pass per neuron.
    clean, every = ablation_sweep(run.model, tokens, targets, kind="mean", neurons=cfg.task == "modular")
    results = [r for r in every if " N" not in r.component]  # heads and MLPs
    neurons_ranked = [r for r in every if " N" in r.component]
    plot_ablation(results, clean[0], title="mean ablation", path=os.path.join(out_dir, "ablation.png"))
    lines += ["## Ablation (mean over the batch)", "",
              f"Clean validation loss {clean[0]:.4f}, accuracy {clean[1]:.4f}.", "",
              "| component | loss | accuracy | loss change |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.component} | {r.loss:.4f} | {r.accuracy:.4f} | {r.loss_change:+.4f} |" for r in results]
    lines += ["", "![ablation](ablation.png)", ""]
    if neurons_ranked:
        lines += ["The neurons whose mean ablation costs the most loss: " + ", ".join(
            f"{r.component.split()[-1]} (block {r.component[1:r.component.index(' ')]}, {r.loss_change:+.4f})"
            for r in neurons_ranked[:10]) + f"; {sum(r.loss_change > 0.01 for r in neurons_ranked)} of "
            f"{len(neurons_ranked)} cost more than 0.01 each.", ""]
    summary = ["- Components that matter most (mean ablation, loss change): "
               + ", ".join(f"{r.component} {r.loss_change:+.3f}" for r in results[:4]) + "."]

    if cfg.task == "modular":
        p = cfg.modulus
        corrupted, _ = corrupt(run, tokens)
        right, wrong = targets[:, 0], run.model(corrupted)[:, -1, :p].argmax(-1)  # the corrupted answer
        keep = right != wrong
        recovery, names = patch_residual(run.model, tokens[keep], corrupted[keep], right[keep], wrong[keep])
        plot_patching(recovery, names, ["a", "b", "="], title="patching the residual stream (a corrupted)",
                      path=os.path.join(out_dir, "patching_residual.png"))
        heads = patch_heads(run.model, tokens[keep], corrupted[keep], right[keep], wrong[keep])
        direct = {(i, h): path_patch(run.model, tokens[keep], corrupted[keep], right[keep], wrong[keep], (i, h),
                                     [("hook_resid_final", None)]).item()
                  for i in range(cfg.num_blocks) for h in range(cfg.num_heads)}
        lines += ["## Activation patching (`a` corrupted)", "",
                  "Recovery of the logit difference (clean answer minus the corrupted run's answer) when clean "
                  "activations are patched into the corrupted run: 0 is as corrupted, 1 as clean.", "",
                  "| head | its output | only its direct path to the logits |", "| --- | --- | --- |"]
        lines += [f"| L{i}H{h} | {heads[i, h]:.3f} | {direct[i, h]:.3f} |" for (i, h) in direct]
        lines += ["", "The difference between the columns is what a head does through the MLPs and heads after it."]
        lines += ["", "![patching the residual stream](patching_residual.png)", "", "## Linear probes at `=`", "",
                  "| label | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        a, b = tokens[:, 0], tokens[:, 1]
        probes = {label: probe_residual(run.model, tokens, values, position=-1, num_classes=p)
                  for label, values in (("a", a), ("b", b), ("answer", targets[:, 0]))}
        for label, by_layer in probes.items():
            lines.append(f"| {label} | " + " | ".join(f"{by_layer[n].heldout_accuracy:.3f}" for n in names) + " |")
        plot_probes(probes, title="linear probes at '='", path=os.path.join(out_dir, "probes.png"))
        lines += ["", "Held-out accuracy of a linear probe on the residual stream at `=`.", "",
                  "![probe accuracy by layer](probes.png)", ""]
        summary.append("- Linear probes at `=` on the final residual stream (held-out accuracy): " + ", ".join(
            f"{label} {by_layer[names[-1]].heldout_accuracy:.2f}" for label, by_layer in probes.items()) + ".")
    if cfg.task == "modular" and cfg.operation == "add":
        norms = embedding_frequency_norms(run.model, cfg.modulus)
        losses = fourier_losses(run)
        key = losses.key_frequencies
        embedding_key = key_frequencies(norms)
        plot_frequency_norms(norms, key, path=os.path.join(out_dir, "fourier_embedding.png"))
        sparse = len(key) <= 10

        def listed(ks):
            return f"{ks}" if len(ks) <= 10 else f"{len(ks)} of {len(norms)}"

        lines += ["## Fourier analysis (Nanda et al. 2023)", "",
                  f"Key frequencies of the logits (norm along cos/sin of w(a+b) >= 1/4 of the largest): "
                  f"{listed(key)}" + ("" if sparse else " — the logits are not concentrated on a few "
                                      "frequencies, so the model does not compute with a handful of them")
                  + f". Of the token embedding (norm >= 1/4 of the largest): {listed(embedding_key)}; Gini "
                  f"coefficient of its frequency norms {gini(norms):.2f} (0: spread evenly). The plot marks the "
                  f"logits' key frequencies in red.", "",
                  "| loss on the training pairs | value |", "| --- | --- |",
                  f"| full | {losses.full_loss:.4f} |", f"| restricted to the key frequencies | {losses.restricted_loss:.4f} |",
                  f"| excluding the key frequencies | {losses.excluded_loss:.4f} |", "",
                  "![embedding norm by frequency](fourier_embedding.png)", ""]
        summary.insert(0, f"- Key frequencies of the logits: {key if sparse else f'{len(key)} of {len(norms)} (not sparse)'}; "
                          f"loss on the training pairs {losses.full_loss:.4f} in full, "
                          f"{losses.restricted_loss:.4f} restricted to them, {losses.excluded_loss:.4f} without them.")
        if sparse:
            ablated = fourier_ablation(run, key)
            lines += [f"Removing the key frequencies from the embedding of the numbers: loss over all pairs "
                      f"{ablated.clean_loss:.4f} -> {ablated.key_loss:.4f}, accuracy {ablated.clean_acc:.3f} "
                      f"-> {ablated.key_acc:.3f}. Removing as many other frequencies (mean of "
                      f"{len(ablated.random_sets)} random sets): loss {ablated.random_loss:.4f}, "
                      f"accuracy {ablated.random_acc:.3f}.", ""]
        if not cfg.attention_only:
            neurons = neuron_frequencies(neuron_grid(run))
            plot_neuron_frequencies(neurons, path=os.path.join(out_dir, "fourier_neurons.png"))
            clear = neurons.explained >= 0.5
            counts = torch.bincount(neurons.frequency[clear].cpu(), minlength=len(norms) + 1)
            top = [(k, int(counts[k])) for k in torch.argsort(counts, descending=True).tolist() if counts[k] > 0][:8]
            summary.append(f"- {int(clear.sum())} of {len(clear)} MLP neurons have at least half their variance in "
                           f"one frequency.")
            lines += [f"MLP neurons of the last block (activations at `=` over all pairs, in the 2-D Fourier "
                      f"basis): {int(clear.sum())} of {len(clear)} have at least half their variance in one "
                      f"frequency (median share {neurons.explained.median():.2f}). Neurons per frequency: "
                      + ", ".join(f"{k}: {n}" for k, n in top) + ".", "",
                      "![neurons in the Fourier basis](fourier_neurons.png)", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(header + ["## Findings", "", *summary, ""] + lines))
    return path


_report = section("report")


@dataclass
class ReportConfig(ModelSourceConfig):
    run_dir: str = _report("", "a run directory (runs/<run>) or a checkpoint file (or --model)")
    out: str = _report("", "output directory (default <run>/interp)")
    device: str = _report("auto", "auto | cpu | cuda | mps")

    def validate(self) -> "ReportConfig":
        self.validate_source()
        return self


def main(argv: list[str] | None = None) -> str:
    cfg, _ = parse_flags(ReportConfig, argv, "interp.py", "Write an interpretability report for a run or a "
                         "pretrained model.", positional="run_dir")
    path = write_report(cfg.run_dir, cfg.out or None, cfg.device, source=cfg)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
