"""What every dictionary kind shares: the weights, the input scale, the unit-norm decoder, the
reconstruction loss and one optimizer step. A kind (relu.py, topk.py, ...) is a subclass that says
how pre-activations become features (`activate`) and what it adds to the loss (`extra_loss`), and
registers itself under its `--arch` name with @register.

x̂ = (W_dec f + b_dec) · scale with f = activate(W_enc (x/scale - b_dec) + b_enc). Shapes: W_enc [d, n],
W_dec [n, d] (row i is feature i's direction), b_enc [n], b_dec [d]. The weights keep the names
and shapes SAE folders have always had, so every folder sae.py ever wrote opens.

A transcoder (d_out > 0) reads one activation and reconstructs another, an MLP's input and its
output: each row is the input [d] and the target [d_out] side by side (a `+`-joined hook's capture),
f = activate(W_enc x/scale + b_enc) and ŷ = (W_dec f + b_dec) · out_scale, plus x W_skip with a
skip path (Paulo et al. 2025). W_enc [d, n], W_dec [n, d_out], b_dec [d_out]. Every kind is both."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS: dict[str, type["SparseAutoencoder"]] = {}  # --arch name -> class, filled by @register


def register(kind: type["SparseAutoencoder"]) -> type["SparseAutoencoder"]:
    """Class decorator: makes `kind` what --arch `kind.name` builds."""
    KINDS[kind.name] = kind
    return kind


class SparseAutoencoder(nn.Module):
    """The base of every kind. Class attributes a kind sets:
    name          its --arch value
    summary       a few words for --help
    uses_k        sparsity set by --k (and dead features trained by AuxK)
    batch_training  training chooses features across the whole batch (every rank's rows), so
                  forward(x, batch=True) must be called on every rank together
    saelens_architecture  what SAELens calls it in use (interop/saelens.py; None: SAELens has no
                  form of it, and export refuses). A subclass inherits it: say it again.
    logged        the loss parts, beyond mse and L0, that training sums for its log (extra_record
                  turns them into metrics)"""

    name = ""
    summary = ""  # a few words for --arch's help
    uses_k = False
    batch_training = False
    saelens_architecture: str | None = None
    logged: tuple[str, ...] = ()
    cross_layer = False  # saes/crosslayer.py's transcoders say True
    layers = 1  # the layers a dictionary spans (a cross-layer transcoder: every block)

    def __init__(self, d: int, dict_size: int, k: int = 32, jumprelu_init_threshold: float = 0.01,
                 jumprelu_bandwidth: float = 0.05, d_out: int = 0, skip: bool = False):
        super().__init__()
        self.d, self.dict_size, self.k = d, dict_size, k  # d: the width read
        self.transcoder, self.d_out, self.skip = bool(d_out), d_out or d, skip  # d_out: the width reconstructed
        W_dec = torch.randn(dict_size, self.d_out)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        if self.transcoder:  # input and output are different spaces: nothing to tie
            W_enc = torch.randn(d, dict_size)
            self.W_enc = nn.Parameter(W_enc / W_enc.norm(dim=0, keepdim=True))
        else:
            self.W_enc = nn.Parameter(W_dec.t().clone())  # tied at the start (Gao et al.)
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.register_buffer("scale", torch.ones(()))
        if self.transcoder:
            self.register_buffer("out_scale", torch.ones(()))
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(d, self.d_out))

    @property
    def arch(self) -> str:
        return self.name

    @property
    def target_scale(self) -> torch.Tensor:
        """The scale of what is reconstructed: the input's for an SAE, the output's for a transcoder."""
        return self.out_scale if self.transcoder else self.scale

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads of rows x: all of it, or a transcoder's input part."""
        return x[..., :self.d] if self.transcoder else x

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder reconstructs of rows x: all of it, or a transcoder's output part."""
        return x[..., self.d:] if self.transcoder else x

    def add_skip(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's reconstruction y plus its linear path from the input of rows x."""
        return y + self.inputs(x) @ self.W_skip if self.skip else y

    def describe(self) -> str:
        """How the log names this dictionary, e.g. `topk, k=32`."""
        return f"{self.name}, k={self.k}" if self.uses_k else self.name

    @classmethod
    def check(cls, cfg, dict_size: int, origin: str) -> str | None:
        """What is wrong with these settings for a dictionary of `dict_size` features (`origin`: where
        that size came from), as a message naming the flag; None if nothing."""
        if cls.uses_k and cfg.k > dict_size:
            return (f"--k: {cfg.k} is more than the dictionary's {dict_size} features ({origin}); pick a smaller k "
                    f"or a larger dictionary")
        return None

    # ---- the forward pass

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.transcoder:
            return (self.inputs(x) / self.scale) @ self.W_enc + self.b_enc
        return (x / self.scale - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Features -> the reconstruction in the model's units (a skip transcoder's path not included)."""
        return (f @ self.W_dec + self.b_dec) * self.target_scale

    def forward(self, x: torch.Tensor, batch: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, d] -> (x̂ [B, d] in the model's units, f [B, n], pre-activations [B, n]); a transcoder's
        rows are [B, d + d_out] and x̂ is [B, d_out]. batch=True: a batch_training kind chooses its
        features across the batch (training)."""
        pre = self.pre_activations(x)
        f = self.activate(pre, batch)
        if batch:  # training's few features per row: decode only those (in use, early on, many more fire)
            y = (bag_decode(*nonzero_entries(f), self.W_dec) + self.b_dec) * self.target_scale
        else:
            y = self.decode(f)
        return self.add_skip(y, x), f, pre

    # ---- training

    def loss(self, x: torch.Tensor, cfg, l1_weight: float, dead: torch.Tensor | None,
             forward=None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss, its parts summed over rows, f). MSE is ‖x - x̂‖² in normalised units (summed over d,
        averaged over rows), plus what the kind adds (extra_loss). `forward` is the module to call
        (the DDP wrapper under torchrun, so that gradients are all-reduced)."""
        x_hat, f, pre = (forward or self)(x, batch=self.batch_training)
        target = self.targets(x)
        error = (target - x_hat) / self.target_scale
        squared = error.pow(2).sum(-1)
        parts = {"mse_sum": squared.sum().detach(), "l0_sum": (f > 0).sum().detach().float()}
        return self.add_penalties(squared.mean(), target, f, pre, error, cfg, l1_weight, dead, parts), parts, f

    def add_penalties(self, loss, x, f, pre, error, cfg, l1_weight: float, dead: torch.Tensor | None, parts: dict):
        """`loss` (the MSE) plus what the kind adds; it may put its own sums in `parts`. `x`: what is
        reconstructed (a transcoder's target)."""
        return loss

    def add_auxk(self, loss, pre: torch.Tensor, error: torch.Tensor, cfg, dead: torch.Tensor | None, parts: dict):
        """`loss` plus AuxK (Gao et al. 2024): the dead features' k_aux largest pre-activations
        reconstruct what the live ones miss, weighted by --aux_coefficient; nothing when none is dead."""
        if dead is None or not bool(dead.any()) or not cfg.aux_coefficient:
            return loss
        k_aux = min(cfg.aux_k or self.d_out // 2, int(dead.sum()))
        top = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1)
        missed = sparse_decode(top.indices, F.relu(top.values), self.W_dec)
        aux = (error.detach() - missed).pow(2).sum(-1)
        parts["aux_sum"] = aux.sum().detach()
        return loss + cfg.aux_coefficient * aux.mean()

    def extra_record(self, sums: dict, rows: float, weight: float) -> dict:
        """What the kind adds to a logged training record, from the window's summed `logged` parts."""
        return {}

    def extra_log(self, record: dict) -> str:
        """What the kind adds to the step's log line."""
        return ""

    def penalty_weight(self, step: int, cfg) -> float:
        """The sparsity penalty's weight at `step` (relu warms its L1 up; the others have none)."""
        return 0.0

    @torch.no_grad()
    def after_step(self, cfg) -> None:
        """After each optimizer step: unit decoder rows (kinds add their own upkeep)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def maintain(self, step: int, cfg, optimizer, x: torch.Tensor, dead: torch.Tensor, distributed: bool) -> int:
        """After a step's metrics are written: a kind's occasional upkeep (relu resamples dead
        features); returns how many features it changed."""
        return 0

    # ---- shared pieces

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, normalize: bool) -> None:
        """Input scale (E‖x/scale‖² = d) and b_dec = the mean input, from a sample x [N, d]; a
        transcoder's output gets its own scale and b_dec its mean."""
        inputs, targets = self.inputs(x), self.targets(x)
        if normalize:
            self.scale.copy_(inputs.pow(2).sum(-1).mean().div(self.d).sqrt().clamp_min(1e-8))
            if self.transcoder:
                self.out_scale.copy_(targets.pow(2).sum(-1).mean().div(self.d_out).sqrt().clamp_min(1e-8))
        self.b_dec.copy_(targets.mean(0) / self.target_scale)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drops each decoder row's gradient component along the row (which only changes its norm)."""
        if self.W_dec.grad is not None:
            unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * unit).sum(1, keepdim=True) * unit

    def saelens_weights(self) -> dict[str, torch.Tensor]:
        """Weights beyond W_enc, W_dec, b_enc, b_dec that SAELens's format of this kind holds."""
        return {}

    # ---- what the report and the attribution graphs read (a cross-layer transcoder has its own)

    def residual_writes(self) -> torch.Tensor:
        """[n, d_out]: each feature's decoder direction in the model's units."""
        return self.W_dec * self.target_scale

    def decoder(self, layer: int) -> torch.Tensor:
        """[n, d_out]: each feature's write to the output it reconstructs, in the model's units."""
        return self.residual_writes()

    def decoder_bias(self, layer: int) -> torch.Tensor:
        """[d_out]: what the reconstruction is with no feature active, in the model's units."""
        return self.b_dec * self.target_scale

    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d, n], b [n]): a transcoder's pre-activations are x W + b for its input x, in model units."""
        return self.W_enc / self.scale, self.b_enc


def update(sae: SparseAutoencoder, optimizer, x: torch.Tensor, cfg, l1_weight: float,
           dead: torch.Tensor | None, forward=None) -> tuple[dict, torch.Tensor]:
    """One optimizer step on rows x: loss, backward, the decoder-norm constraint, clip, step, the
    kind's upkeep. Returns the loss parts (summed over rows) and the feature activations f."""
    loss, parts, f = sae.loss(x, cfg, l1_weight, dead, forward)
    parts["loss"] = loss.detach()  # for the nan guard
    loss.backward()
    sae.remove_parallel_gradient()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.after_step(cfg)
    return parts, f.detach()


def sae_loss(sae: SparseAutoencoder, x: torch.Tensor, cfg, l1_weight: float, dead: torch.Tensor | None,
             forward=None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """sae.loss, as a function."""
    return sae.loss(x, cfg, l1_weight, dead, forward)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[:, j] · W_dec[indices[:, j]]: the decoder applied to k nonzero features per row,
    without the dense [B, n] matmul."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def nonzero_entries(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(row, feature, value) of every nonzero entry of f [B, n], row by row, and B; the values keep
    their gradient."""
    rows, features = f.nonzero(as_tuple=True)
    return rows, features, f[rows, features], len(f)


def bag_decode(rows: torch.Tensor, features: torch.Tensor, values: torch.Tensor, count: int,
               W_dec: torch.Tensor) -> torch.Tensor:
    """Σ value · W_dec[feature] for each of `count` rows, from entries grouped by row: the decoder
    applied to the batch kinds' ~k features per row (a varying number each) without the dense
    [B, n] x [n, d] matmul, forward and backward."""
    sizes = torch.bincount(rows, minlength=count)
    return F.embedding_bag(features, W_dec, torch.cumsum(sizes, 0) - sizes, per_sample_weights=values, mode="sum")
