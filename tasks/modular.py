"""Modular arithmetic (grokking): a op b = c (mod p) for every pair, a fraction of them for training.
Sequences [a, b, =], the loss read at `=` only."""

from __future__ import annotations

import math
import os

import torch

from config import ConfigError
from data import ReportSample, _IndexedData, _shift_tokens
from fourier import (embedding_frequency_norms, fourier_ablation, fourier_losses, gini, key_frequencies, neuron_frequencies,
                     neuron_grid, plot_frequency_norms, plot_neuron_frequencies)


def modular_table(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair (a, b) in 0..p-1 with its answer; division skips b = 0. Ordered by a*p + b."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if operation == "divide":
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([pow(int(x), -1, p) for x in b])  # b⁻¹ mod p (p prime)
        answer = (a * inverse) % p
    else:
        answer = {"add": a + b, "subtract": a - b, "multiply": a * b}[operation] % p
    return a, b, answer


class ModularData(_IndexedData):
    """`a b =` → answer at `=`. Tokens 0..p-1 are numbers, token p is `=`. Targets [N, 1]: the answer.

    All p² pairs (p(p-1) for division) are split once, by a permutation seeded with cfg.seed,
    into frac_train for training and the rest for validation.
    """

    @staticmethod
    def run_name(cfg) -> str:
        return f"{cfg.operation}{cfg.modulus}"

    def token_names(self, ids) -> list[str]:
        """The numbers, and `=`."""
        return ["=" if int(i) == self.equals_token else str(int(i)) for i in ids]

    def __init__(self, cfg, dist_info, device):
        super().__init__(cfg, dist_info, device)
        p = cfg.modulus
        self.p = p
        self.equals_token = p
        self.vocab_size = p + 1
        self.answer_tokens = p  # the answer is a number
        self.a, self.b, self.answer = modular_table(p, cfg.operation)
        n = len(self.a)
        tokens = torch.stack([self.a, self.b, torch.full_like(self.a, p)], dim=1)
        targets = self.answer[:, None]
        self.loss_positions = 1
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        num_train = int(round(cfg.frac_train * n))
        if not 0 < num_train < n:
            raise ConfigError(f"--frac_train: {cfg.frac_train} of {n} pairs leaves an empty split")
        # Indices into the full table (ordered by a*p + b), kept for analysis of the run.
        self.train_idx = order[:num_train].sort().values
        self.val_idx = order[num_train:].sort().values
        self.tokens, self.targets = tokens.to(device), targets.to(device)
        self.train_x, self.train_y = self.tokens[self.train_idx.to(device)], self.targets[self.train_idx.to(device)]
        self.val_x, self.val_y = self.tokens[self.val_idx.to(device)], self.targets[self.val_idx.to(device)]
        self._finish()

    # -- what the reports show
    ablate_neurons = True  # one block of 512 neurons: a pass per neuron is cheap

    def report_sample(self) -> ReportSample:
        sample = super().report_sample()
        sample.labels = ["a", "b", "="]
        return sample

    def circuit_pairs(self, count: int, seed: int = 0) -> list[tuple[list[int], list[int], int, int]]:
        """`a b =` against `a' b =` with another operand a' (drawn at random), right the answer to the first
        and wrong the answer to the second: pairs drawn from the whole table, none whose answers agree."""
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(self.a), generator=generator)[:count]
        shifts = torch.randint(1, self.p, (len(rows),), generator=generator)
        table = {(int(a), int(b)): int(c) for a, b, c in zip(self.a, self.b, self.answer)}
        pairs = []
        for row, shift in zip(rows.tolist(), shifts.tolist()):
            a, b = int(self.a[row]), int(self.b[row])
            other = (a + shift) % self.p
            if (other, b) in table and table[(other, b)] != table[(a, b)]:
                pairs.append(([a, b, self.p], [other, b, self.p], table[(a, b)], table[(other, b)]))
        return pairs

    def corrupt(self, tokens: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
        """`a` (position 0) becomes another number, so the answer changes."""
        return _shift_tokens(tokens, 0, self.p, seed)

    def probe_labels(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": tokens[:, 0], "b": tokens[:, 1], "answer": targets[:, 0]}

    def report_sections(self, run, out_dir: str) -> tuple[list[str], list[str]]:
        """Modular addition: the Fourier analysis of Nanda et al. 2023 (key frequencies of the logits and
        the embedding, restricted and excluded loss, the key frequencies removed from the embedding,
        the last block's neurons by frequency)."""
        cfg, summary, lines = self.cfg, [], []
        if cfg.operation != "add":
            return summary, lines
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
        summary.append(f"- Key frequencies of the logits: {key if sparse else f'{len(key)} of {len(norms)} (not sparse)'}; "
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
        return summary, lines

    def sae_sections(self, view) -> tuple[list[str], tuple | None]:
        """Modular runs: the top features over every pair (a, b) and by frequency; every feature's best
        frequency, for the feature browser."""
        from matplotlib.figure import Figure

        lines, fourier = [], None
        p, ranked, top, out = self.p, view.ranked, view.top, view.out
        grid_tokens = self.tokens
        every = torch.cat([view.encode(grid_tokens[s:s + 4096])[:, -1]
                           for s in range(0, len(grid_tokens), 4096)])
        if self.cfg.operation == "divide":  # b = 0 is not in the table
            grid = torch.zeros(p * p, every.shape[1], device=every.device)
            grid[(grid_tokens[:, 0] * p + grid_tokens[:, 1])] = every
            every = grid
        grid = every.reshape(p, p, -1)[:, :, ranked]
        freqs = neuron_frequencies(grid)
        fig = Figure(figsize=(2.6 * min(top, 6), 5.4 * math.ceil(len(ranked) / 6)))
        axes = fig.subplots(2 * math.ceil(len(ranked) / 6), min(len(ranked), 6), squeeze=False)
        for i, feature in enumerate(ranked):
            image_ax, spectrum_ax = axes[2 * (i // 6), i % 6], axes[2 * (i // 6) + 1, i % 6]
            image_ax.imshow(grid[:, :, i].cpu().numpy(), cmap="viridis", origin="lower")
            image_ax.set(title=f"feature {feature}", xlabel="b", ylabel="a")
            spectrum_ax.bar(range(1, p // 2 + 1), freqs.shares[:, i].cpu().numpy())
            spectrum_ax.set(title=f"k={int(freqs.frequency[i])}: {float(freqs.explained[i]):.0%} of variance",
                            xlabel="frequency k", ylim=(0, 1))
        fig.tight_layout()
        fig.savefig(os.path.join(out, "features_grid.png"), dpi=90)
        lines += ["## Top features over every pair (a, b)", "",
                  "Activation at `=` over all p² pairs, and each feature's share of variance in each frequency "
                  "(2-D Fourier basis, as for neurons in interp.py).", "",
                  "| feature | fires on pairs | best frequency | its share |", "| --- | --- | --- | --- |"]
        lines += [f"| {feature} | {float((grid[:, :, i] > 0).float().mean()):.1%} | {int(freqs.frequency[i])} | "
                  f"{float(freqs.explained[i]):.2f} |" for i, feature in enumerate(ranked)]
        lines += ["", "![features over the (a, b) grid](features_grid.png)", ""]
        # Every feature that fires on at least 1% of the pairs, by the frequency that explains it best.
        everything = neuron_frequencies(every.reshape(p, p, -1))
        fourier = (everything.frequency.cpu(), everything.explained.cpu())  # for the feature browser
        used = (every > 0).float().mean(0) >= 0.01
        counts = torch.bincount(everything.frequency[used].cpu(), minlength=p // 2 + 1)
        common = [(k, int(counts[k])) for k in torch.argsort(counts, descending=True).tolist() if counts[k]][:8]
        lines.append(f"Of the {int(used.sum())} features that fire on at least 1% of the pairs, the number whose "
                     f"variance is best explained by each frequency: " + ", ".join(f"{k}: {n}" for k, n in common)
                     + f" (median share {float(everything.explained[used].median()):.2f}).")
        if self.cfg.operation == "add":
            key = fourier_losses(view.run).key_frequencies
            lines.append(f"The model's key frequencies (its logits, `fourier.fourier_losses`): {key}; "
                         f"{sum(int(counts[k]) for k in key if k < len(counts))} of those features have their best "
                         f"frequency among them.")
        lines.append("")
        return lines, fourier
