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
    transcoder, of what it reconstructs (its output: the MLP's, for explained variance)."""
    squared = total = l0 = 0.0
    fired = torch.zeros(sae.dict_size, dtype=torch.long, device=x.device)
    mean = sae.targets(x).mean(0)
    for part in x.split(chunk):
        x_hat, f, _ = sae(part)
        target = sae.targets(part)
        squared += float((target - x_hat).pow(2).sum())
        total += float((target - mean).pow(2).sum())
        l0 += float((f > 0).sum())
        fired += (f > 0).sum(0)
    scale2 = float(sae.target_scale) ** 2
    return {"mse": squared / scale2 / len(x), "explained_variance": 1 - squared / max(total, 1e-12),
            "l0": l0 / len(x), "never_fired_frac": float((fired == 0).float().mean()),
            "feature_density": (fired.float() / len(x)).cpu()}


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
    metrics.update(spliced_metrics(run.model, held_out, hook, lambda r: sae(r)[0], run.data.loss_positions))
    return metrics, density


def modern_metrics(record: dict) -> dict:
    """A metrics.jsonl record with any old metric names under today's (SAELens's) names."""
    return {OLD_METRIC_NAMES.get(key, key): value for key, value in record.items()}


@torch.no_grad()
def spliced_metrics(model, sequences: Sequences, hook: str, replace, loss_positions: int | None,
                    batch: int = 512) -> dict:
    """The model on `sequences` with the activation at `hook` left alone (clean), replaced at the taken
    positions by `replace(rows)` (an SAE's reconstruction) and set to zero there (ablation), at the
    positions the loss reads, under SAELens's names and definitions (sae_lens/evals.py):
    ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean): 1 for a perfect reconstruction,
    0 for one no better than zeros; kl_div_score = (KL_ablation - KL_sae) / KL_ablation, with KL the
    divergence of the clean next-token distribution from the spliced one, KL(clean || spliced),
    summed over the vocabulary and averaged over positions.

    Hooks joined by `+` (a transcoder's): the last is replaced, and `replace` reads the rows of every
    one side by side, the earlier ones as this forward pass reaches them; the clean and ablation
    passes keep or zero the last one."""
    *reads, written = hook.split("+")
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
                rows = torch.cat([seen[name] for name in reads] + [flat[mask].float()], -1)
                flat[mask] = fn(rows)[..., -flat.shape[-1]:].to(flat.dtype)  # the replaced hook's part
                return flat.reshape(x.shape)

            logits = model.run_with_hooks(tokens, [(name, read) for name in reads] + [(written, splice)]).float()
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
