"""An SAE judged on held-out rows, under the names SAELens's evals use (sae_lens/evals.py), which
SAEBench and Neuronpedia read: mse, explained_variance, l0, never_fired_frac, and with the
reconstruction spliced into the model, ce_loss_score and kl_div_score."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from data import IGNORE

if TYPE_CHECKING:
    from analysis.runs import Sequences
    from saes.base import SparseAutoencoder


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor, chunk: int = 8192) -> dict:
    """On rows x [N, d]: mse (normalised units, as in training), explained variance (1 - residual
    over total variance about the mean), l0, and the fraction of features that never fired. For a
    transcoder, of what it reconstructs (its output: the MLP's, for explained variance); for a
    cross-layer one, also each layer's: layer_<m>_explained_variance of MLP m's output, and
    layer_<l>_l0 and layer_<l>_never_fired_frac of layer l's features."""
    layers = sae.layers
    squared, total = torch.zeros(layers, dtype=torch.float64), torch.zeros(layers, dtype=torch.float64)
    mse = l0 = 0.0
    layer_l0 = torch.zeros(layers, dtype=torch.float64)
    fired = torch.zeros(sae.dict_size, dtype=torch.long, device=x.device)
    mean = sae.targets(x).mean(0)
    for part in x.split(chunk):
        x_hat, f, _ = sae(part)
        target = sae.targets(part)
        mse += float(((target - x_hat) / sae.target_scale).pow(2).sum())
        squared += (target - x_hat).pow(2).reshape(len(part), layers, -1).sum((0, 2)).double().cpu()
        total += (target - mean).pow(2).reshape(len(part), layers, -1).sum((0, 2)).double().cpu()
        l0 += float((f > 0).sum())
        layer_l0 += (f > 0).reshape(len(part), layers, -1).sum((0, 2)).double().cpu()
        fired += (f > 0).sum(0)
    metrics = {"mse": mse / len(x), "explained_variance": 1 - float(squared.sum()) / max(float(total.sum()), 1e-12),
               "l0": l0 / len(x), "never_fired_frac": float((fired == 0).float().mean())}
    if sae.cross_layer:
        per_layer = fired.reshape(layers, -1)
        for layer in range(layers):  # the explained variance of MLP `layer`'s output; its own features' l0
            metrics[f"layer_{layer}_explained_variance"] = 1 - float(squared[layer]) / max(float(total[layer]), 1e-12)
            metrics[f"layer_{layer}_l0"] = float(layer_l0[layer]) / len(x)
            metrics[f"layer_{layer}_never_fired_frac"] = float((per_layer[layer] == 0).float().mean())
    metrics["feature_density"] = (fired.float() / len(x)).cpu()
    return metrics


# Metric names as SAELens's evals write them (sae_lens/evals.py), which SAEBench and Neuronpedia read;
# SAE folders written before issue 22 used the keys on the left, and readers map them (modern_metrics).
OLD_METRIC_NAMES = {"ce_clean": "ce_loss_without_sae", "ce_sae": "ce_loss_with_sae", "ce_zero": "ce_loss_with_ablation",
                    "ce_recovered": "ce_loss_score"}


def held_out_metrics(sae: "SparseAutoencoder", run, held_out: Sequences, rows: torch.Tensor,
                     hook: str) -> tuple[dict, torch.Tensor]:
    """(what sae.py reports on held-out data: reconstruction_metrics of `rows`, the rows of `held_out`
    at `hook`, and spliced_metrics of `held_out` through the model; each feature's density)."""
    metrics = reconstruction_metrics(sae, rows)
    density = metrics.pop("feature_density")
    metrics.update(spliced_metrics(run.model, held_out, hook, lambda r: sae(r)[0], run.data.loss_positions,
                                   replaced=sae.layers))
    return metrics, density


def modern_metrics(record: dict) -> dict:
    """A metrics.jsonl record with any old metric names under today's (SAELens's) names."""
    return {OLD_METRIC_NAMES.get(key, key): value for key, value in record.items()}


@torch.no_grad()
def spliced_metrics(model, sequences: Sequences, hook: str, replace, loss_positions: int | None,
                    batch: int = 512, replaced: int = 1) -> dict:
    """The model on `sequences` with the activation at `hook` left alone (clean), replaced at the taken
    positions by `replace(rows)` (an SAE's reconstruction) and set to zero there (ablation), at the
    positions the loss reads, under SAELens's names and definitions (sae_lens/evals.py):
    ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean): 1 for a perfect reconstruction,
    0 for one no better than zeros; kl_div_score = (KL_ablation - KL_sae) / KL_ablation, with KL the
    divergence of the clean next-token distribution from the spliced one, KL(clean || spliced),
    summed over the vocabulary and averaged over positions.

    Hooks joined by `+` (a transcoder's): the last `replaced` are replaced (a cross-layer transcoder's:
    every MLP's output, the whole replacement model), and `replace` reads the rows of every one side
    by side, those this forward pass has reached as it left them (the replaced ones as replaced), the
    rest zero; each replaced hook takes its part of what `replace` returns. The clean and ablation
    passes keep or zero the replaced ones. A cross-layer transcoder's outputs at layer m read only
    the inputs of layers up to m, so the zeros of later layers change nothing."""
    names = hook.split("+")
    reads, written = names[:-replaced], names[-replaced:]
    sums = dict.fromkeys(("clean", "sae", "ablation", "kl_sae", "kl_ablation"), 0.0)
    count = 0
    device = next(model.parameters()).device
    for start in range(0, len(sequences.tokens), batch):
        tokens = sequences.tokens[start:start + batch].to(device)
        mask = sequences.mask[start:start + batch].to(device)
        targets = sequences.targets[start:start + batch].to(device)
        keep = targets != IGNORE

        def log_probs(fn) -> torch.Tensor:
            """Log-probabilities [kept positions, vocab] with `fn` applied to the taken rows."""
            seen = {}

            def read(x, hook_point):
                seen[hook_point.name] = x.reshape(*x.shape[:2], -1)[mask].float()

            def splice(x, hook_point):
                flat = x.reshape(*x.shape[:2], -1).clone()
                seen[hook_point.name] = flat[mask].float()
                parts = [seen.get(name, torch.zeros_like(seen[hook_point.name])) for name in names]
                out = fn(torch.cat(parts, -1))  # every row, or the replaced hooks' parts: theirs end it
                tail = sum(p.shape[-1] for p in parts[names.index(hook_point.name):])
                flat[mask] = out[..., out.shape[-1] - tail:][..., :flat.shape[-1]].to(flat.dtype)
                seen[hook_point.name] = flat[mask].float()
                return flat.reshape(x.shape)

            logits = model.run_with_hooks(tokens, [(name, read) for name in reads]
                                          + [(name, splice) for name in written]).float()
            if loss_positions:
                logits = logits[:, -loss_positions:]
            return logits[keep].log_softmax(-1)

        clean = log_probs(lambda rows: rows)  # the same hooked forward, so a perfect replacement scores exactly 1
        wanted = targets[keep].unsqueeze(-1)
        sums["clean"] += float(-clean.gather(-1, wanted).sum())
        for name, fn in (("sae", replace), ("ablation", torch.zeros_like)):
            other = log_probs(fn)
            sums[name] += float(-other.gather(-1, wanted).sum())
            sums[f"kl_{name}"] += float((clean.exp() * (clean - other)).sum())
        count += int(keep.sum())
    mean = {key: value / max(count, 1) for key, value in sums.items()}
    return {"ce_loss_without_sae": mean["clean"], "ce_loss_with_sae": mean["sae"],
            "ce_loss_with_ablation": mean["ablation"],
            "ce_loss_score": ((mean["ablation"] - mean["sae"]) / (mean["ablation"] - mean["clean"])
                              if mean["ablation"] != mean["clean"] else float("nan")),
            "kl_div_with_sae": mean["kl_sae"], "kl_div_with_ablation": mean["kl_ablation"],
            "kl_div_score": ((mean["kl_ablation"] - mean["kl_sae"]) / mean["kl_ablation"]
                             if mean["kl_ablation"] > 0 else float("nan"))}


@torch.no_grad()
def replacement_metrics(run, transcoders, held_out: Sequences) -> dict:
    """The whole replacement model of a set of transcoders (analysis.graph.Transcoders: one per block,
    or a cross-layer one) on held-out sequences: every MLP's output replaced in turn, each MLP reading
    the stream the replacements before it wrote (spliced_metrics), under SAELens's names."""
    layers = transcoders.layers
    hooks = "+".join(transcoders.hooks_in + [f"blocks.{m}.hook_mlp_out" for m in range(layers)])
    dtype = next(transcoders.saes[0].parameters()).dtype

    def replace(rows: torch.Tensor) -> torch.Tensor:
        """Every MLP's replacement output from rows [every MLP's input, every MLP's output] (each d_model wide)."""
        parts = list(rows.to(dtype).chunk(2 * layers, -1))
        return torch.cat(transcoders.features(parts[:layers], parts[layers:])[1], -1).float()

    return spliced_metrics(run.model, held_out, hooks, replace, run.data.loss_positions, replaced=layers)
