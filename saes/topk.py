"""topk: f = the k largest pre-activations of each row, ReLU'd; no penalty: k sets the sparsity, and
dead features are trained by AuxK (Gao et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saes.base import SparseAutoencoder, register, sparse_decode


@register
class TopKSAE(SparseAutoencoder):
    name = "topk"
    summary = "k active features per row"
    uses_k = True
    saelens_architecture = "topk"

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        top = pre.topk(min(self.k, self.dict_size), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def forward(self, x: torch.Tensor, batch: bool = False):
        """Decodes only the k active rows of W_dec: k/n of a dense matmul's work."""
        pre = self.pre_activations(x)
        top = pre.topk(min(self.k, self.dict_size), dim=-1)
        values = F.relu(top.values)
        f = torch.zeros_like(pre).scatter(-1, top.indices, values)
        y = (sparse_decode(top.indices, values, self.W_dec) + self.b_dec) * self.target_scale
        return self.add_skip(y, x), f, pre

    def add_penalties(self, loss, x, f, pre, error, cfg, l1_weight, dead, parts):
        return self.add_auxk(loss, pre, error, cfg, dead, parts)
