"""A cross-layer transcoder (Ameisen et al. 2025): an encoder at every layer ℓ reads that layer's MLP
input x_ℓ, and each of its features writes to the MLP output of layer ℓ and of every later layer:

    f_ℓ = activate(W_enc[ℓ] x_ℓ / scale_ℓ + b_enc_ℓ)       ŷ_m = (Σ_{ℓ ≤ m} W_dec[ℓ → m] f_ℓ + b_dec_m) · out_scale_m

trained jointly on every layer's output. It is one dictionary of L x n features (feature g = ℓ n + i
is layer ℓ's feature i) whose encoder is block-diagonal and whose decoder is block-upper-triangular:
rows are every layer's input then every layer's output side by side (a `+`-joined capture), W_enc
[L, d, n], W_dec [L n, L d_out] with the blocks m < ℓ held at zero, scale and out_scale [L]. So the
shared trainer, loss, unit-norm decoder (each feature's decoder over all the layers it writes to,
concatenated, as Anthropic's penalty reads it) and AuxK apply unchanged, and the activation is any
kind's: `cross_layer(KINDS[arch])` makes the class. TopK keeps k features per layer of each row;
BatchTopK k x rows x layers across the batch; JumpReLU a threshold per feature. ReLU's dead-feature
resampling is left out (dead features stay dead; prefer topk or batchtopk, whose AuxK trains them)."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from saes.base import SparseAutoencoder, bag_decode, nonzero_entries


class CrossLayer:
    """Mixed in before a kind: CrossLayer + TopKSAE is a cross-layer TopK transcoder."""

    cross_layer = True

    def __init__(self, d: int, dict_size: int, layers: int = 2, d_out: int = 0, **settings):
        """d, d_out, dict_size: one layer's input width, output width and features."""
        self.layers, self.layer_d, self.layer_d_out, self.layer_n = layers, d, d_out or d, dict_size
        super().__init__(d * layers, dict_size * layers, d_out=(d_out or d) * layers, **settings)
        L = layers
        W_enc = torch.randn(L, d, dict_size)
        self.W_enc = nn.Parameter(W_enc / W_enc.norm(dim=1, keepdim=True))
        with torch.no_grad():
            self.W_dec.mul_(self.decoder_mask())
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.register_buffer("scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))

    def decoder_mask(self) -> torch.Tensor:
        """[L n, L d_out]: 1 where layer ℓ's features may write to layer m's output (m ≥ ℓ), else 0."""
        L = self.layers
        allowed = torch.ones(L, L, device=self.W_dec.device, dtype=self.W_dec.dtype).triu()
        return allowed[:, None, :, None].expand(L, self.layer_n, L, self.layer_d_out).reshape(self.W_dec.shape)

    @property
    def target_scale(self) -> torch.Tensor:
        return self.out_scale.repeat_interleave(self.layer_d_out)

    def describe(self) -> str:
        return f"cross-layer {super().describe()} over {self.layers} layers"

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.inputs(x).unflatten(-1, (self.layers, self.layer_d)) / self.scale[:, None]
        return torch.einsum("...ld,ldn->...ln", xs, self.W_enc).flatten(-2) + self.b_enc

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """The kind's activation; a k kind's with each layer's features as a row of their own (k per layer)."""
        if not self.uses_k:  # elementwise: one threshold or penalty per feature
            return super().activate(pre, batch)
        per_layer = pre.reshape(-1, self.layer_n)  # [rows x layers, n]
        return super().activate(per_layer, batch).reshape(pre.shape)

    def forward(self, x: torch.Tensor, batch: bool = False):
        pre = self.pre_activations(x)
        f = self.activate(pre, batch)
        flat = f.reshape(-1, f.shape[-1])
        y = (bag_decode(*nonzero_entries(flat), self.W_dec) + self.b_dec) * self.target_scale
        return y.reshape(*f.shape[:-1], -1), f, pre

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, normalize: bool) -> None:
        """Each layer's input and output scale, and b_dec the mean output."""
        inputs = self.inputs(x).unflatten(-1, (self.layers, self.layer_d))
        targets = self.targets(x).unflatten(-1, (self.layers, self.layer_d_out))
        if normalize:
            self.scale.copy_(inputs.pow(2).sum(-1).mean(0).div(self.layer_d).sqrt().clamp_min(1e-8))
            self.out_scale.copy_(targets.pow(2).sum(-1).mean(0).div(self.layer_d_out).sqrt().clamp_min(1e-8))
        self.b_dec.copy_(self.targets(x).mean(0) / self.target_scale)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        if self.W_dec.grad is not None:
            self.W_dec.grad.mul_(self.decoder_mask())  # nothing flows into the blocks held at zero
        super().remove_parallel_gradient()

    @torch.no_grad()
    def after_step(self, cfg) -> None:
        self.W_dec.mul_(self.decoder_mask())
        super().after_step(cfg)

    def maintain(self, step: int, cfg, optimizer, x: torch.Tensor, dead: torch.Tensor, distributed: bool) -> int:
        return 0  # see the module's docstring

    # ---- what the metrics, the report and the graphs read

    def residual_writes(self) -> torch.Tensor:
        """[L n, d_out]: what each feature adds to the residual stream, summed over the layers it writes to."""
        return (self.W_dec * self.target_scale).unflatten(-1, (self.layers, self.layer_d_out)).sum(1)

    def decoder(self, layer: int) -> torch.Tensor:
        """[L n, d_out]: each feature's write to layer `layer`'s MLP output, in the model's units."""
        d = self.layer_d_out
        return self.W_dec[:, layer * d:(layer + 1) * d] * self.out_scale[layer]

    def decoder_bias(self, layer: int) -> torch.Tensor:
        """[d_out]: MLP `layer`'s reconstruction with no feature active, in the model's units."""
        d = self.layer_d_out
        return self.b_dec[layer * d:(layer + 1) * d] * self.out_scale[layer]

    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d, n], b [n]): layer `layer`'s pre-activations are x W + b for its MLP input x, model units."""
        n = self.layer_n
        return self.W_enc[layer] / self.scale[layer], self.b_enc[layer * n:(layer + 1) * n]


@functools.cache
def cross_layer(kind: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """The cross-layer transcoder class whose activation is `kind`'s."""
    return type(f"CrossLayer{kind.__name__}", (CrossLayer, kind), {"__module__": __name__})
