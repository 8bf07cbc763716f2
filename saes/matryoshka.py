"""matryoshka: batchtopk whose nested prefixes (the first 1/16, 1/4, ... of the features, or
--matryoshka_sizes) each reconstruct the input on their own too (Bussmann et al. 2025), so that the
first features learn general directions and later ones refine them."""

from __future__ import annotations

import torch

from saes.base import bag_decode, nonzero_entries, register
from saes.batchtopk import BatchTopKSAE


@register
class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    summary = "batchtopk whose nested prefixes each reconstruct"

    @classmethod
    def check(cls, cfg, dict_size: int, origin: str) -> str | None:
        if max(cfg.prefix_sizes(), default=0) >= dict_size:
            return (f"--matryoshka_sizes: {cfg.matryoshka_sizes} must stay below the dictionary's {dict_size} "
                    f"features (the whole dictionary is the last level)")
        return super().check(cfg, dict_size, origin)

    def add_penalties(self, loss, x, f, pre, error, cfg, l1_weight, dead, parts):
        for inner in self.prefix_reconstructions(f, matryoshka_levels(cfg, self.dict_size)[:-1]):
            loss = loss + ((x - inner) / self.target_scale).pow(2).sum(-1).mean()
        return super().add_penalties(loss, x, f, pre, error, cfg, l1_weight, dead, parts)

    def prefix_reconstructions(self, f: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """The reconstructions (model units) from the first `size` features, for each nested prefix."""
        rows, features, values, count = nonzero_entries(f)
        return [(bag_decode(rows[inside], features[inside], values[inside], count, self.W_dec) + self.b_dec)
                * self.target_scale for inside in (features < size for size in sizes)]


def matryoshka_levels(cfg, dict_size: int) -> list[int]:
    """The nested prefixes' sizes, the whole dictionary last (default: 1/16 and 1/4 of it)."""
    sizes = cfg.prefix_sizes() or [max(1, dict_size // 16), max(2, dict_size // 4)]
    return [s for s in sizes if s < dict_size] + [dict_size]
