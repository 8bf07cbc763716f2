"""Modular arithmetic (grokking): a op b = c (mod p) for every pair, a fraction of them for training.
Sequences [a, b, =], the loss read at `=` only."""

from __future__ import annotations

import torch

from config import ConfigError
from data import _IndexedData


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
