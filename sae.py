"""Sparse autoencoders on a trained run's activations, judged by what they recover.

    python sae.py runs/<run> --hook blocks.0.mlp.hook_post                   # ReLU SAE, activations live
    python sae.py runs/<run> --hook blocks.0.hook_resid_post --arch topk --k 16 --source dump
    torchrun --nproc_per_node=8 sae.py runs/<run> --hook blocks.3.hook_resid_post --arch topk
    python sae.py report runs/<run>/sae/<name>                              # feature views + summary

An SAE lives in `<run>/sae/<name>/` (name: `<hook>-<arch>-<dict_size>` unless --name says
otherwise) and is laid out like a run: config.json, train.log, metrics.jsonl, last.pt, curves.

The dictionary: x̂ = W_dec f + b_dec with f = ReLU(W_enc (x - b_dec) + b_enc) (`relu`, trained with an
L1 penalty on f weighted by each feature's decoder norm, warmed up linearly), f = the k largest
of those pre-activations, ReLU'd (`topk`, no penalty), the k x rows largest of the whole batch
(`batchtopk`; in use, those above a threshold learned in training), those above a threshold per
feature (`jumprelu`, an L0 penalty through a straight-through estimator), or batchtopk whose
nested prefixes each reconstruct (`matryoshka`). SparseAutoencoder's docstring has the details. Inputs are divided by one scalar so that
E‖x‖² = d (estimated on the first rows of the train split), so --l1_coefficient means the same at
every width and layer. Each feature's decoder vector is kept at unit norm: the gradient's component
along it is removed before each step and the vector renormalised after it. Features that have not
fired for --dead_rows rows are dead: a ReLU SAE resamples them every --resample_every steps in the
first half of training (new directions from the inputs it reconstructs worst, Anthropic 2023);
a TopK SAE trains them with the AuxK loss (the dead features' k_aux largest pre-activations
reconstruct what the live ones miss, Gao et al. 2024).

Evaluation uses the val split of the run, which neither the SAE nor the model trained on, under the
names SAELens's evals use: mse, explained_variance, l0, the dead and never-fired fractions, and with
the reconstruction spliced into the model at the hook, ce_loss_score = (CE_ablation - CE_sae) /
(CE_ablation - CE_clean) and kl_div_score = (KL_ablation - KL_sae) / KL_ablation (spliced_metrics).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from activations import (POSITIONS, DumpSource, LiveSource, Sequences, capture, capture_all, default_dump_dir,
                         hook_width, rows_of, run_folder, split_sequences, token_names)
from checkpoints import CheckpointError, load_checkpoint, seed_everything, set_rng_state
from config import (DEVICES, DTYPES, ConfigError, ModelSource, OptimSettings, config_from_dict, need, need_name,
                    need_one_of, override, parse_flags, resumed_config, section)
from data import IGNORE
from distributed import all_reduce_sum, gather_to_main, regroup_ddp_buckets
from feature_browser import write_feature_browser
from interp import fourier_losses, load_run, neuron_frequencies
from optimizer import LRSchedule, apply_lr, load_optimizer_states
from session import Session, StepClock, run_command
from tracking import read_metrics, wandb_settings
from utils import new_or_empty, write_folder, write_json

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
BATCH_ARCHS = ("batchtopk", "matryoshka")  # k x rows largest across the global batch; a threshold in use
K_ARCHS = ("topk", "batchtopk", "matryoshka")  # sparsity set by k, dead features trained by AuxK
DIVERGED_ADVICE = "Lower --lr or set --grad_clip, then start again"
SOURCES = ("live", "dump")

_what = section("what to train on")
_dictionary = section("dictionary")
_optim = section("optimization")
_eval = section("evaluation, logging, checkpoints")
_runtime = section("runtime")


@dataclass
class SAEConfig(OptimSettings, ModelSource):
    run_dir: str = _what("", "the model's run directory (runs/<run>) or checkpoint (or --model)")
    hook: str = _what("", "hook point whose activations to reconstruct, e.g. blocks.0.mlp.hook_post")
    positions: str = _what("answer", "answer (the positions the loss reads) | all (every token)")
    source: str = _what("live", "live (from the model, through a shuffling buffer) | dump (activations.py dump)")
    dump: str = _what("", "with --source dump: the dump directory (default <run>/activations/<hook>/train-<positions>)")
    max_tokens: int = _what(0, "with --source live: use only the first N tokens of the train split (0: all)")
    buffer_rows: int = _what(65536, "with --source live: rows in the shuffling buffer")
    run_name: str = _what("", "the SAE's name (empty: <hook>-<arch>-<dict_size>)", aliases=("--name",))
    save_model_dir: str = _what("", "where SAEs live (empty: <run>/sae); the SAE is <save_model_dir>/<run_name>")
    resume: str = _what("", "'auto': continue <save_model_dir>/<run_name>/last.pt if it exists")
    claim_timeout: float = _what(300.0, "an SAE directory whose writer on another host has sent no heartbeat for "
                                        "this many seconds may be taken over")
    seed: int = _what(0, "seed for initialisation and batch order")

    arch: str = _dictionary("relu", "relu (L1 penalty) | topk (k active features per row) | batchtopk (k x rows "
                                     "across the batch; a learned threshold in use) | jumprelu (per-feature "
                                     "thresholds, L0 penalty) | matryoshka (batchtopk whose nested prefixes "
                                     "each reconstruct)")
    dict_size: int = _dictionary(0, "features (0: expansion x the activation width)")
    expansion: float = _dictionary(4.0, "features per activation dimension, when --dict_size is 0")
    k: int = _dictionary(32, "topk: active features per row; batchtopk, matryoshka: on average over the batch")
    threshold_lr: float = _dictionary(0.01, "batchtopk, matryoshka: the threshold used outside training is an "
                                            "average of each step's smallest kept activation, with this weight")
    l0_coefficient: float = _dictionary(1.0, "jumprelu: weight of the L0 penalty (features active per row)")
    jumprelu_init_threshold: float = _dictionary(0.01, "jumprelu: every feature's threshold at the start")
    jumprelu_bandwidth: float = _dictionary(0.05, "jumprelu: width of the straight-through estimator's window")
    pre_act_coefficient: float = _dictionary(3e-6, "jumprelu: weight of the loss that pulls dead features' "
                                                   "pre-activations up to their thresholds")
    matryoshka_sizes: str = _dictionary("", "matryoshka: the nested prefixes that each reconstruct, e.g. 64,256,1024 "
                                            "(the whole dictionary is the last level; empty: 1/16, 1/4 of it)")
    l1_coefficient: float = _dictionary(5.0, "relu: weight of the decoder-norm-weighted L1 penalty")
    l1_warmup_steps: int = _dictionary(500, "relu: the L1 weight rises linearly from 0 over these steps")
    dead_rows: int = _dictionary(1_000_000, "a feature that fired on none of the last N training rows is dead")
    resample_every: int = _dictionary(250, "relu: resample dead features every N steps in the first half (0: never)")
    aux_k: int = _dictionary(0, "topk: dead features used by the AuxK loss (0: half the activation width)")
    aux_coefficient: float = _dictionary(1 / 32, "topk: weight of the AuxK loss")
    normalize: bool = _dictionary(True, "scale inputs so that E|x|^2 = d (one scalar, kept in the SAE)")

    max_steps: int = _optim(3000, "optimizer steps")
    batch_size: int = _optim(4096, "rows per step (all ranks together)")
    lr: float = override("lr", 1e-3, "Adam learning rate (peak)")
    beta1: float = override("beta1", 0.9, "Adam beta1")
    beta2: float = override("beta2", 0.999, "Adam beta2")
    warmup_steps: int = override("warmup_steps", 100)
    lr_schedule: str = override("lr_schedule", "cosine")  # plateau: on the held-out mse

    eval_every: int = _eval(500, "evaluate on held-out rows every N steps")
    eval_tokens: int = _eval(32768, "tokens of the val split used for evaluation (0: all)")
    log_every: int = _eval(50, "log training metrics every N steps")
    save_every: int = _eval(1000, "write last.pt every N steps (0: only at the end)")
    wandb_enabled: bool = _eval(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = _eval("", "W&B project (empty: WANDB_PROJECT, else tinylab)")

    device: str = _runtime("auto", "auto | cpu | cuda | mps")
    dtype: str = _runtime("auto", "precision of the model's forward pass (the SAE trains in float32)")

    # Fields that shape the SAE, its data or its live buffer (in the checkpoint): a resumed SAE keeps them.
    FIXED_ON_RESUME = ("hook", "positions", "arch", "dict_size", "expansion", "k", "normalize", "source", "seed",
                       "buffer_rows", "max_tokens", "matryoshka_sizes")
    RENAMED = {"name": "run_name"}  # the keys of SAE checkpoints written before the rename

    def validate(self) -> "SAEConfig":
        self.validate_optimization()
        for name, choices in (("arch", ARCHS), ("source", SOURCES), ("positions", POSITIONS),
                              ("device", DEVICES), ("dtype", DTYPES)):
            need_one_of(self, name, choices)
        need(bool(self.hook), "hook", "name the hook point, e.g. --hook blocks.0.mlp.hook_post")
        for name in ("max_steps", "batch_size", "k", "eval_every", "log_every", "buffer_rows", "dead_rows"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("dict_size", "l1_warmup_steps", "resample_every", "aux_k", "save_every",
                     "eval_tokens", "max_tokens"):
            need(getattr(self, name) >= 0, name, f"must be 0 or more, got {getattr(self, name)}")
        for name in ("expansion", "lr"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("l1_coefficient", "aux_coefficient", "claim_timeout", "l0_coefficient", "pre_act_coefficient"):
            need(getattr(self, name) >= 0, name, f"must not be negative, got {getattr(self, name)}")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(0 < self.threshold_lr <= 1, "threshold_lr", f"must be in (0, 1], got {self.threshold_lr}")
        if self.dict_size:
            need(self.arch not in K_ARCHS or self.k <= self.dict_size, "k",
                 f"{self.k} is more than the dictionary's {self.dict_size} features; pick k below --dict_size")
        need(not self.matryoshka_sizes or self.arch == "matryoshka", "matryoshka_sizes",
             f"only --arch matryoshka has nested prefixes (this SAE is {self.arch})")
        sizes = self.prefix_sizes()
        if sizes:
            need(sizes[0] >= 1 and all(a < b for a, b in zip(sizes, sizes[1:])), "matryoshka_sizes",
                 f"{self.matryoshka_sizes}: the prefixes must grow, each at least 1")
        need_name(self.run_name, "run_name")
        need(self.resume in ("", "auto"), "resume", f"{self.resume!r}: the only value is auto")
        self.validate_source()
        return self

    def prefix_sizes(self) -> list[int]:
        """--matryoshka_sizes as numbers ([] when not given)."""
        try:
            return [int(s) for s in self.matryoshka_sizes.split(",")] if self.matryoshka_sizes else []
        except ValueError:
            raise ConfigError(f"--matryoshka_sizes: {self.matryoshka_sizes!r} is not a comma-separated list of "
                              f"feature counts, e.g. 64,256") from None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the autoencoder


class SparseAutoencoder(nn.Module):
    """f = act(W_enc (x/scale - b_dec) + b_enc); x̂ = (W_dec f + b_dec) * scale. Shapes: W_enc [d, n],
    W_dec [n, d] (row i is feature i's direction), b_enc [n], b_dec [d].

    act by arch: relu; topk (the k largest of each row); batchtopk and matryoshka (in training, the
    k x rows largest of the whole batch, over every rank: forward(x, batch=True); in use, those above
    `threshold`, a running average of the smallest value training kept, so that an SAE in use does
    not depend on its batch); jumprelu (pre where pre > threshold, one threshold per feature,
    trained through a straight-through estimator, Rajamanoharan et al. 2024)."""

    def __init__(self, d: int, dict_size: int, arch: str = "relu", k: int = 32, jumprelu_init_threshold: float = 0.01,
                 jumprelu_bandwidth: float = 0.05):
        super().__init__()
        self.d, self.dict_size, self.arch, self.k = d, dict_size, arch, k
        self.bandwidth = jumprelu_bandwidth
        W_dec = torch.randn(dict_size, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # tied at the start (Gao et al.)
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("scale", torch.ones(()))
        if arch in BATCH_ARCHS:  # float64: an average over thousands of steps (SAELens keeps it so too)
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
            self.smallest_kept = None  # set by each batch forward, read by update_threshold
        if arch == "jumprelu":  # kept at 0 or more after each step (normalize_decoder)
            self.threshold = nn.Parameter(torch.full((dict_size,), float(jumprelu_init_threshold)))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.scale - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, batch: bool = False) -> torch.Tensor:
        if self.arch == "topk":
            top = pre.topk(min(self.k, self.dict_size), dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        if self.arch in BATCH_ARCHS:
            positive = F.relu(pre)
            if not batch:
                return positive * (positive > self.threshold.to(pre.dtype))
            cut, self.smallest_kept = batch_topk_cut(positive, self.k * len(pre))  # for update_threshold
            return positive * (positive >= cut)
        if self.arch == "jumprelu":
            return JumpReLU.apply(pre, self.threshold, self.bandwidth)
        return F.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Features -> the reconstruction in the model's units."""
        return (f @ self.W_dec + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor, batch: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, d] -> (x̂ [B, d] in the model's units, f [B, n], pre-activations [B, n]). batch=True:
        batchtopk and matryoshka choose their active features across the batch (training); every rank
        must call it together then."""
        pre = self.pre_activations(x)
        if self.arch == "topk":  # decode only the k active rows of W_dec: k/n of a dense matmul's work
            top = pre.topk(min(self.k, self.dict_size), dim=-1)
            values = F.relu(top.values)
            f = torch.zeros_like(pre).scatter(-1, top.indices, values)
            return (sparse_decode(top.indices, values, self.W_dec) + self.b_dec) * self.scale, f, pre
        f = self.activate(pre, batch)
        if batch:  # training's k x rows of n features: decode only those (in use, early on, many more fire)
            return (bag_decode(*nonzero_entries(f), self.W_dec) + self.b_dec) * self.scale, f, pre
        return self.decode(f), f, pre

    @torch.no_grad()
    def update_threshold(self, rate: float) -> None:
        """batchtopk, matryoshka: after a training step, move the threshold in use towards the smallest
        activation the step's batch forward kept, over every rank (batch_topk_cut found it)."""
        if self.smallest_kept is not None:
            self.threshold.mul_(1 - rate).add_(rate * self.smallest_kept)

    def matryoshka_reconstructions(self, f: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """The reconstructions (model units) from the first `size` features, for each nested prefix."""
        rows, features, values, count = nonzero_entries(f)
        return [(bag_decode(rows[inside], features[inside], values[inside], count, self.W_dec) + self.b_dec) * self.scale
                for inside in (features < size for size in sizes)]

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, normalize: bool) -> None:
        """Input scale (E‖x/scale‖² = d) and b_dec = the mean input, from a sample x [N, d]."""
        if normalize:
            self.scale.copy_(x.pow(2).sum(-1).mean().div(self.d).sqrt().clamp_min(1e-8))
        self.b_dec.copy_(x.mean(0) / self.scale)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drops each decoder row's gradient component along the row (which only changes its norm)."""
        if self.W_dec.grad is not None:
            unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * unit).sum(1, keepdim=True) * unit

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """After each step: unit decoder rows (and jumprelu's thresholds kept at 0 or more)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        if self.arch == "jumprelu":
            self.threshold.clamp_(min=0)


def first_step_loss(sae: "SparseAutoencoder", model, x: torch.Tensor, cfg: "SAEConfig") -> torch.Tensor:
    """The loss of a first step (no feature dead yet, so no AuxK) on rows x through `model`: the
    graph whose backward pass set the uninterrupted run's DDP buckets."""
    return sae_loss(sae, x, cfg, cfg.l1_coefficient, None, model)[0]


def batch_topk_cut(positive: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the keep-th largest value of `positive` [B, n] over the whole batch, every rank's rows
    together; the smallest positive value at or above it, in float64, None if none is positive).
    Each rank's keep largest values are gathered and the cut found among them, so that N ranks choose
    exactly what one process would from the same rows. Ties at the cut keep them all. Every positive
    value kept is among the candidates (a cut of 0 means fewer than keep are positive, all gathered),
    so the smallest one needs no further exchange."""
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    keep *= world  # k x the global batch's rows (each rank has an equal share)
    with torch.no_grad():
        top = largest(positive.detach().flatten(), keep, positive.shape[-1])  # one rank may hold all of the global top
        if world > 1:
            padded = torch.full((keep,), -math.inf, dtype=top.dtype, device=top.device)
            padded[:len(top)] = top
            gathered = [torch.empty_like(padded) for _ in range(world)]
            torch_dist.all_gather(gathered, padded)
            top = largest(torch.cat(gathered), keep)
        cut = top.min()
        positive_top = top[top > 0]
        return cut, (positive_top.min().double() if len(positive_top) else None)


def largest(values: torch.Tensor, keep: int, width: int = 1) -> torch.Tensor:
    """The `keep` largest of a 1-D tensor of values 0 or more (rows of `width` features, flattened),
    in no order, exactly. A strided sample first guesses a value below the cut (about twice keep's
    share of the sample lies above it); only the values above the guess go to topk, a small fraction
    of them when keep is too (the batch kinds: k of n). The stride shares no factor with the width, so
    the sample visits every feature, not the same few columns of each row."""
    if keep >= len(values):
        return values
    stride = max(1, len(values) // 65536)
    while math.gcd(stride, width) != 1:
        stride += 1
    sample = values[::stride]
    guess = sample.topk(min(len(sample), 2 * keep // stride + 16)).values[-1]
    candidates = values[values >= guess] if guess > 0 else values[values > 0]
    if len(candidates) < keep:  # the guess was too high, or fewer than keep are positive: every value
        candidates = values
    return candidates.topk(keep, sorted=False).values


def rectangle_window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float, dtype) -> torch.Tensor:
    """rect((pre - threshold) / bandwidth) / bandwidth: the kernel both straight-through estimators use."""
    return ((pre - threshold).abs() < bandwidth / 2).to(dtype) / bandwidth


class JumpReLU(torch.autograd.Function):
    """pre where pre > threshold, else 0. Backward: to pre where it passed, and to the threshold a
    straight-through estimate of the jump, -(threshold / bandwidth) * rect((pre - threshold) /
    bandwidth) per row (Rajamanoharan et al. 2024; SAELens's JumpReLU)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = rectangle_window(pre, threshold, ctx.bandwidth, grad.dtype)
        return (pre > threshold) * grad, (-threshold * window * grad).sum(0), None


class Step(torch.autograd.Function):
    """1 where pre > threshold, else 0 (an L0 count). Backward: only to the threshold,
    -(1 / bandwidth) * rect((pre - threshold) / bandwidth) (DeepMind's L0 estimator)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        return None, (-rectangle_window(pre, threshold, ctx.bandwidth, grad.dtype) * grad).sum(0), None


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


def sae_loss(sae: SparseAutoencoder, x: torch.Tensor, cfg: SAEConfig, l1_weight: float,
             dead: torch.Tensor | None, forward=None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(loss, its parts summed over rows, f). MSE is ‖x - x̂‖² in normalised units (summed over d,
    averaged over rows); relu adds l1_weight · Σ f_i ‖W_dec,i‖; jumprelu adds l0_coefficient times
    the features active per row (its gradient through the thresholds' estimator) and, for dead
    features, pre_act_coefficient · Σ relu(threshold - pre) ‖W_dec,i‖ (Anthropic's, as SAELens has
    it); matryoshka adds the MSE of each nested prefix's reconstruction; the k kinds add AuxK on the
    dead features. `forward` is the module to call (the DDP wrapper under torchrun, so gradients
    are all-reduced)."""
    x_hat, f, pre = (forward or sae)(x, batch=sae.arch in BATCH_ARCHS)
    error = (x - x_hat) / sae.scale
    squared = error.pow(2).sum(-1)
    loss = squared.mean()
    parts = {"mse_sum": squared.sum().detach(), "l0_sum": (f > 0).sum().detach().float()}
    if sae.arch == "matryoshka":
        for inner in sae.matryoshka_reconstructions(f, matryoshka_levels(cfg, sae.dict_size)[:-1]):
            loss = loss + ((x - inner) / sae.scale).pow(2).sum(-1).mean()
    if sae.arch == "relu":
        l1 = (f * sae.W_dec.norm(dim=1)).sum(-1)
        loss = loss + l1_weight * l1.mean()
        parts["l1_sum"] = l1.sum().detach()
    elif sae.arch == "jumprelu":
        loss = loss + cfg.l0_coefficient * Step.apply(pre, sae.threshold, sae.bandwidth).sum(-1).mean()
        if dead is not None and bool(dead.any()) and cfg.pre_act_coefficient:
            pull = (F.relu(sae.threshold - pre) * sae.W_dec.norm(dim=1))[:, dead].sum(-1)
            loss = loss + cfg.pre_act_coefficient * pull.mean()
            parts["pre_act_sum"] = pull.sum().detach()
    elif dead is not None and bool(dead.any()) and cfg.aux_coefficient:
        k_aux = min(cfg.aux_k or sae.d // 2, int(dead.sum()))
        top = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=-1)
        missed = sparse_decode(top.indices, F.relu(top.values), sae.W_dec)
        aux = (error.detach() - missed).pow(2).sum(-1)  # dead features reconstruct what the live ones miss
        loss = loss + cfg.aux_coefficient * aux.mean()
        parts["aux_sum"] = aux.sum().detach()
    return loss, parts, f


def update(sae: SparseAutoencoder, optimizer, x: torch.Tensor, cfg: SAEConfig, l1_weight: float,
           dead: torch.Tensor | None, forward=None) -> tuple[dict, torch.Tensor]:
    """One optimizer step on rows x: loss, backward, the decoder-norm constraint, clip, step.
    Returns the loss parts (summed over rows) and the feature activations f."""
    loss, parts, f = sae_loss(sae, x, cfg, l1_weight, dead, forward)
    parts["loss"] = loss.detach()  # for the nan guard
    loss.backward()
    sae.remove_parallel_gradient()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    if sae.arch in BATCH_ARCHS:
        sae.update_threshold(cfg.threshold_lr)
    return parts, f.detach()


def matryoshka_levels(cfg: SAEConfig, dict_size: int) -> list[int]:
    """The nested prefixes' sizes, the whole dictionary last (default: 1/16 and 1/4 of it)."""
    sizes = cfg.prefix_sizes() or [max(1, dict_size // 16), max(2, dict_size // 4)]
    return [s for s in sizes if s < dict_size] + [dict_size]


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor, chunk: int = 8192) -> dict:
    """On rows x [N, d]: mse (normalised units, as in training), explained variance (1 - residual
    over total variance about the mean), l0, and the fraction of features that never fired."""
    squared = total = l0 = 0.0
    fired = torch.zeros(sae.dict_size, dtype=torch.long, device=x.device)
    mean = x.mean(0)
    for part in x.split(chunk):
        x_hat, f, _ = sae(part)
        squared += float((part - x_hat).pow(2).sum())
        total += float((part - mean).pow(2).sum())
        l0 += float((f > 0).sum())
        fired += (f > 0).sum(0)
    scale2 = float(sae.scale) ** 2
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
    summed over the vocabulary and averaged over positions."""
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
            def splice(x, hook_point):
                flat = x.reshape(*x.shape[:2], -1).clone()
                flat[mask] = fn(flat[mask].float()).to(flat.dtype)
                return flat.reshape(x.shape)

            logits = model.run_with_hooks(tokens, [(hook, splice)]).float()
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


# ---------------------------------------------------------------- training


def sae_dir(cfg: SAEConfig, d: int) -> tuple[str, str]:
    """(where the SAE lives, its name): <save_model_dir>/<run_name>, by default <run>/sae/<hook>-<arch>-<size>."""
    base = run_folder(cfg.run_dir)
    name = cfg.run_name or f"{cfg.hook}-{cfg.arch}-{cfg.dict_size or int(cfg.expansion * d)}"
    return os.path.join(cfg.save_model_dir or os.path.join(base, "sae"), name), name


def train(cfg: SAEConfig, explicit: set[str] = frozenset()) -> dict:
    """Trains one SAE (every rank of a torchrun job calls this); returns the final metrics and
    where the SAE lives. Bad input raises ConfigError / CheckpointError before anything is written."""
    with Session(cfg.device, cfg.dtype) as session:
        log, dist, device, dtype = session.log, session.dist, session.device, session.dtype
        run = load_run(cfg.run_dir, device=str(device), source=cfg)
        for p in run.model.parameters():
            p.requires_grad_(False)  # the model is only read
        d = hook_width(run, cfg.hook)
        out_dir, name = sae_dir(cfg, d)
        checkpoint = None
        if cfg.resume == "auto" and os.path.isfile(os.path.join(out_dir, "last.pt")):
            checkpoint = load_checkpoint(os.path.join(out_dir, "last.pt"))
            if checkpoint.get("model_step", run.step) != run.step:
                raise ConfigError(f"--resume: this SAE was trained on the model at step {checkpoint['model_step']}, "
                                  f"but {run.checkpoint_path} now holds step {run.step}; start a new SAE (--run_name)")
            cfg = resumed_config(cfg, checkpoint["config"], explicit, "SAE")
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch_size: {cfg.batch_size} rows do not split into {dist.world_size} ranks")
        dict_size = cfg.dict_size or int(cfg.expansion * d)
        if cfg.arch in K_ARCHS and cfg.k > dict_size:
            raise ConfigError(f"--k: {cfg.k} is more than the dictionary's {dict_size} features "
                              f"({'--dict_size' if cfg.dict_size else f'--expansion {cfg.expansion:g} x width {d}'}); "
                              f"pick a smaller k or a larger dictionary")
        if cfg.arch == "matryoshka" and max(cfg.prefix_sizes(), default=0) >= dict_size:
            raise ConfigError(f"--matryoshka_sizes: {cfg.matryoshka_sizes} must stay below the dictionary's "
                              f"{dict_size} features (the whole dictionary is the last level)")
        local_batch = cfg.batch_size // dist.world_size
        if cfg.source == "dump":
            directory = cfg.dump or default_dump_dir(cfg.run_dir, cfg.hook, "train", cfg.positions)
            source = DumpSource(directory, cfg.batch_size, device, cfg.seed, dist.rank, dist.world_size)
            wanted = {"hook": cfg.hook, "d": d, "split": "train", "positions": cfg.positions, "step": run.step}
            for key, value in wanted.items():
                if source.manifest.get(key) != value:
                    raise ConfigError(f"--dump: {directory} holds {key} {source.manifest.get(key)!r}, and this SAE "
                                      f"needs {value!r} (the train split of the model at step {run.step}); dump it "
                                      f"with `python activations.py dump {cfg.run_dir} --hook {cfg.hook} "
                                      f"--positions {cfg.positions}`")
        else:
            source = LiveSource(run, cfg.hook, cfg.positions, "train", local_batch, cfg.buffer_rows // dist.world_size,
                                cfg.seed, dist.rank, dist.world_size, cfg.max_tokens, dtype=cfg.dtype)
        held_out = split_sequences(run, "val", cfg.positions, cfg.eval_tokens)
        session.claim_directory(out_dir, cfg.resume == "auto", f"--run_name: {out_dir} already holds an SAE; pass "
                                f"another --run_name, or --resume auto to continue it", cfg.to_dict(), cfg.claim_timeout)

        # ---- the SAE, its optimizer, its state
        def all_rows(seqs: Sequences) -> torch.Tensor:
            return torch.cat([rows_of(run.model, seqs, s, s + 1024, cfg.hook, device, dtype).acts
                              for s in range(0, len(seqs.tokens), 1024)])

        eval_rows = all_rows(held_out)
        seed_everything(cfg.seed)  # the same initialisation on every rank
        sae = SparseAutoencoder(d, dict_size, cfg.arch, cfg.k, cfg.jumprelu_init_threshold,
                                cfg.jumprelu_bandwidth).to(device)
        # The input scale and b_dec from the rows it will train on: a dump's own (as stored), else the
        # model's on the first 32,768 tokens of the train split.
        sae.calibrate(source.rows(torch.arange(min(source.num_rows, 32768))) if cfg.source == "dump" else
                      all_rows(split_sequences(run, "train", cfg.positions, 32768)), cfg.normalize)
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        schedule = LRSchedule(cfg, cfg.max_steps)
        rows_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)
        step, elapsed_before = 0, 0.0
        if checkpoint is not None:
            sae.load_state_dict(checkpoint["model"])
            load_optimizer_states([optimizer], checkpoint["optimizers"])
            schedule.load_state_dict(checkpoint.get("lr_schedule"))
            rows_since_fired = checkpoint["rows_since_fired"].to(device)
            step, elapsed_before = checkpoint["step"], checkpoint["elapsed_seconds"]
            states = checkpoint["source"]
            if len(states) == dist.world_size:
                source.load_state_dict(states[dist.rank])
                set_rng_state(checkpoint["rng"][dist.rank])
            elif cfg.source == "live":
                log.warning("warning: resumed on a different number of ranks; the live buffers start afresh")
        model = DDP(sae, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.enabled else sae
        if dist.enabled and checkpoint is not None:  # bit-exact resume on 3+ ranks (see there)
            rows = eval_rows[:cfg.batch_size].to(device)
            regroup_ddp_buckets(model, functools.partial(first_step_loss, sae, model, rows, cfg), device)

        log.info(f"SAE {name} on {cfg.hook} of {cfg.run_dir} (checkpoint {run.checkpoint_path}, step {run.step}) "
                 f"-> {out_dir}")
        log.info("  " + " ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()))
        log.info(f"d={d} -> {dict_size} features ({cfg.arch}{f', k={cfg.k}' if cfg.arch in K_ARCHS else ''}) | "
                 f"{cfg.source} source | {cfg.batch_size} rows/step on {dist.world_size} rank(s) | "
                 f"eval on {len(eval_rows):,} val rows | input scale {float(sae.scale):.4g}"
                 + (f" | resumed at step {step}" if checkpoint is not None else ""))

        tracker = session.tracker(out_dir, step, wandb_settings(cfg.wandb_project, name, out_dir, cfg.to_dict())
                                  if cfg.wandb_enabled else None, checkpoint.get("wandb_id") if checkpoint else None)
        last_good = (os.path.join(out_dir, "last.pt"), step) if checkpoint is not None else None
        checkpointer = session.checkpointer(out_dir, sae.parameters, cfg.max_steps, last=last_good, advice=DIVERGED_ADVICE)
        clock = StepClock(cfg.max_steps, elapsed_before)
        density = None  # each feature's firing frequency on the held-out rows, at the latest eval

        def evaluate() -> dict:
            nonlocal density
            sae.eval()
            metrics, density = held_out_metrics(sae, run, held_out, eval_rows, cfg.hook)
            sae.train()
            return metrics

        def state() -> dict:
            return {"model": sae.state_dict(), "optimizers": [optimizer.state_dict()], "step": step,
                    "source": gather_to_main(source.state_dict()),  # a live buffer per rank: only rank 0 needs them
                    "rows_since_fired": rows_since_fired.cpu(), "lr_schedule": schedule.state_dict(),
                    "config": cfg.to_dict(), "elapsed_seconds": clock.elapsed(), "wandb_id": tracker.wandb_id,
                    "d": d, "model_checkpoint": os.path.abspath(run.checkpoint_path), "model_step": run.step}

        # ---- the loop
        window = dict.fromkeys(("mse_sum", "l0_sum", "l1_sum", "aux_sum", "rows"), 0.0)
        last_eval, interrupted = {}, 0
        with session.stop_signals():
            while step < cfg.max_steps:
                apply_lr([optimizer], schedule(step))
                x = source.batch(step).acts
                l1_weight = cfg.l1_coefficient * min(1.0, (step + 1) / max(cfg.l1_warmup_steps, 1))
                dead = rows_since_fired >= cfg.dead_rows
                parts, f = update(sae, optimizer, x, cfg, l1_weight, dead, forward=model)
                fired = (f > 0).any(0).long()
                if dist.enabled:
                    torch_dist.all_reduce(fired)
                rows_since_fired = torch.where(fired > 0, 0, rows_since_fired + cfg.batch_size)
                step += 1
                clock.tick()
                checkpointer.watch(step, parts["loss"])
                for key, value in parts.items():
                    if key in window:
                        window[key] += float(value)
                window["rows"] += len(x)

                log_due = step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps
                eval_due = step % cfg.eval_every == 0 or step == cfg.max_steps
                save_due = cfg.save_every and step % cfg.save_every == 0
                if log_due or eval_due or save_due:
                    checkpointer.check(step)  # before anything is logged as good or saved
                record = {}
                if log_due:
                    sums = all_reduce_sum(window, device)
                    rows = max(sums["rows"], 1)
                    ms_per_step, rows_per_sec = clock.report(cfg.batch_size)
                    record = {"step": step, "train_mse": sums["mse_sum"] / rows, "train_l0": sums["l0_sum"] / rows,
                              "dead_frac": float((rows_since_fired >= cfg.dead_rows).float().mean()),
                              "lr": optimizer.param_groups[0]["lr"], "ms_per_step": ms_per_step,
                              "rows_per_sec": rows_per_sec}
                    if cfg.arch == "relu":
                        record["train_l1"] = sums["l1_sum"] / rows
                        record["l1_weight"] = l1_weight
                    log.info(f"step {step:>6}/{cfg.max_steps} | mse {record['train_mse']:.4g} | "
                             f"L0 {record['train_l0']:.1f}"
                             + (f" | l1 {record['train_l1']:.4g} (weight {l1_weight:.3g})" if cfg.arch == "relu" else "")
                             + f" | dead {record['dead_frac']:.1%} | lr {record['lr']:.2e} | "
                             f"{ms_per_step:.1f} ms/step | {rows_per_sec:,.0f} rows/s | {clock.progress(step)}")
                    window = dict.fromkeys(window, 0.0)
                with clock.paused():  # evals and checkpoints stay out of ms/step and rows/s
                    if eval_due:
                        last_eval = evaluate()
                        record = {"step": step, **record, **last_eval}
                        log.info(f"eval {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                        if schedule.observe(last_eval["mse"]):
                            log.info(f"plateau: LR x {schedule.factor:.3g} of its schedule from step {step + 1}")
                    if record:
                        tracker.write({**record, "elapsed_seconds": round(clock.elapsed(), 3)})
                    # After this step's metrics: they describe the SAE as trained, not the moment after resampling.
                    resample_due = cfg.resample_every and step % cfg.resample_every == 0 and step <= cfg.max_steps // 2
                    if cfg.arch == "relu" and resample_due:
                        count = resample_dead(sae, optimizer, x, rows_since_fired >= cfg.dead_rows, dist.enabled)
                        rows_since_fired = torch.where(rows_since_fired >= cfg.dead_rows, 0, rows_since_fired)
                        if count:
                            log.info(f"step {step}: resampled {count} dead features")
                    if save_due:
                        checkpointer.save("last.pt", step, state())
                signum = session.agreed_stop_signal()
                if signum and step < cfg.max_steps:
                    interrupted = signum
                    log.info(f"{signal.Signals(signum).name} received: stopping after step {step} to save a checkpoint")
                    break
            checkpointer.save("last.pt", step, state())
        del model  # the DDP wrapper goes before the process group does (see distributed.teardown_distributed)
        session.report_replicas(sae.parameters(), "SAE weights")  # resampling included
        if dist.is_main:
            plot_sae_curves(tracker.path, os.path.join(out_dir, "curves.png"), title=name)
            if density is not None:
                plot_feature_density(density, os.path.join(out_dir, "feature_density.png"))
        seconds = session.seconds()
        summary = {"sae_dir": out_dir, "steps": step, "seconds": seconds, "dict_size": dict_size,
                   "interrupted": signal.Signals(interrupted).name if interrupted else None, **last_eval}
        if interrupted:
            log.info(f"interrupted at step {step}; last.pt saved. Continue with the same command and --resume auto")
        else:
            log.info(f"done: {step} steps in {seconds:.1f}s | " + " | ".join(
                f"{k} {last_eval[k]:.4f}" for k in ("explained_variance", "l0", "ce_loss_score", "kl_div_score") if k in last_eval)
                + f" | report: python sae.py report {out_dir}")
        session.finish_tracking(128 + interrupted if interrupted else 0, preempted=bool(interrupted))
    return summary


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, optimizer, x: torch.Tensor, dead: torch.Tensor, distributed: bool) -> int:
    """Anthropic's resampling: each dead feature gets, as its decoder direction, an input drawn with
    probability ∝ its squared reconstruction loss (centred by b_dec, unit norm); its encoder row is
    that direction scaled to 0.2 x the mean live encoder norm; its bias 0; its Adam moments reset.
    Rank 0 draws from its batch and every rank takes its choice."""
    count = int(dead.sum())
    if not count:
        return 0
    indices = dead.nonzero().squeeze(1)
    x_hat, _, _ = sae(x)
    loss = ((x - x_hat) / sae.scale).pow(2).sum(-1)
    # Distinct inputs while there are enough, so that no two new features start on the same one.
    weights = loss.pow(2) + 1e-12
    picks = torch.multinomial(weights, count, replacement=count > len(x))
    directions = x[picks] / sae.scale - sae.b_dec
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if distributed:
        torch_dist.broadcast(directions, src=0)
    alive = ~dead
    encoder_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[indices] = directions
    sae.W_enc[:, indices] = directions.t() * 0.2 * encoder_norm
    sae.b_enc[indices] = 0
    for param, rows in ((sae.W_dec, (indices, slice(None))), (sae.W_enc, (slice(None), indices)),
                        (sae.b_enc, (indices,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows] = 0
    return count


# ---------------------------------------------------------------- pictures and the report


def plot_sae_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    from matplotlib.figure import Figure

    records = [modern_metrics(r) for r in read_metrics(metrics_path)]
    panels = [("train_mse", "mse (normalised)", "log"), ("explained_variance", "explained variance (val)", "linear"),
              ("train_l0", "L0", "log"), ("dead_frac", "dead fraction", "linear"),
              ("ce_loss_score", "CE-loss score (val)", "linear")]
    fig = Figure(figsize=(4 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    for ax, (key, label, yscale) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        if key == "train_mse":
            points = [(r["step"], r["mse"]) for r in records if "mse" in r]
            if points:
                ax.plot(*zip(*points), "o-", label="val")
                ax.legend()
        ax.set(xlabel="step", title=label, yscale=yscale)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return out_path


def plot_feature_density(density: torch.Tensor, path: str) -> str:
    """Histogram of log10 firing frequency (share of held-out rows on which each feature fires)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    alive = density[density > 0]
    ax.hist(torch.log10(alive).numpy(), bins=40)
    ax.set(xlabel="log10 firing frequency on held-out rows", ylabel="features",
           title=f"feature density ({int((density == 0).sum())} of {len(density)} never fired)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@torch.no_grad()
def feature_statistics(sae: SparseAutoencoder, model_acts: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                       contexts: int = 8, before: int = 20, after: int = 4, bins: int = 24) -> dict:
    """Every feature's numbers over held-out activations [S, T, d] of `tokens` [S, T] at the positions
    `mask` [S, T] marks (the rows the SAE reads), a few sequences at a time so that 16k features fit
    in memory: `density` (share of rows it fires on), `total` and `largest` activation, the
    `contexts` rows where it is largest (`top_values`, `top_index` = s * T + t, [contexts, n]), the
    window t - before .. t + after around each: its tokens (`window_tokens` [contexts, n, before + 1
    + after], -1 off the sequence) and its activations (`windows`, NaN off the mask or the
    sequence), and a `histogram` [n, bins] of its nonzero activations in equal bins from 0 to its
    largest."""
    S, T, _ = model_acts.shape
    n = sae.dict_size
    per_chunk = max(1, (1 << 22) // (n * T))  # sequences per chunk: about 4M activations at a time

    def chunks():  # (first sequence, features [c, T, n], mask [c, T], the rows read as positions and as [r, n])
        for s in range(0, S, per_chunk):
            acts, on = sae.encode(model_acts[s:s + per_chunk]).float(), mask[s:s + per_chunk]
            read = on.reshape(-1).nonzero().squeeze(1)
            yield s, acts, on, read, acts.reshape(-1, n) if len(read) == on.numel() else acts.reshape(-1, n)[read]

    fired, total = torch.zeros(n, device=mask.device), torch.zeros(n, device=mask.device)
    top_values = torch.full((contexts, n), -1.0, device=mask.device)
    top_index = torch.zeros((contexts, n), dtype=torch.long, device=mask.device)
    for s, _, _, read, rows in chunks():
        if not len(rows):
            continue
        fired += torch.count_nonzero(rows, dim=0)  # every kind's features are 0 or positive
        total += rows.sum(0)
        values, index = rows.topk(min(contexts, len(rows)), dim=0)
        values, index = torch.cat([top_values, values]), torch.cat([top_index, read[index] + s * T])
        top_values, pick = values.topk(contexts, dim=0)
        top_index = index.gather(0, pick)
    largest = top_values[0].clamp(min=0)
    # Second pass: the histograms (their bins need each feature's largest) and the context windows.
    offsets = torch.arange(-before, after + 1, device=mask.device)
    windows = torch.full((contexts, n, len(offsets)), float("nan"), device=mask.device)
    histogram = torch.zeros(n * bins, device=mask.device)
    sequence, position = top_index // T, top_index % T
    around = position[..., None] + offsets  # [contexts, n, window]
    window_tokens = tokens.to(mask.device)[sequence[..., None], around.clamp(0, T - 1)]
    window_tokens = window_tokens.masked_fill((around < 0) | (around >= T), -1)
    for s, acts, on, _, rows in chunks():
        row, feature = (rows > 0).nonzero(as_tuple=True)
        which = (rows[row, feature] / largest[feature] * bins).long().clamp(max=bins - 1)
        histogram += torch.bincount(feature * bins + which, minlength=n * bins)
        slot, feature = ((sequence >= s) & (sequence < s + len(acts)) & (top_values > 0)).nonzero(as_tuple=True)
        where = around[slot, feature]  # [contexts here, window]
        inside = (where >= 0) & (where < T)
        where = where.clamp(0, T - 1)
        local = (sequence[slot, feature] - s)[:, None].expand_as(where)
        seen = acts[local, where, feature[:, None].expand_as(where)]
        windows[slot, feature] = seen.masked_fill(~(inside & on[local, where]), float("nan"))
    return {"density": fired / mask.sum().clamp(min=1), "total": total, "largest": largest,
            "top_values": top_values, "top_index": top_index, "windows": windows, "window_tokens": window_tokens,
            "histogram": histogram.reshape(n, bins), "before": before}


def residual_directions(model, hook: str, directions: torch.Tensor) -> torch.Tensor | None:
    """What `directions` [n, width] at `hook` write into the residual stream [n, d_model]: themselves
    at a point of the stream (or a block's output into it), through the block's output matrix for
    `mlp.hook_post` and `attn.hook_z`; None elsewhere (queries, keys, patterns...)."""
    stream = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
              "hook_attn_out", "hook_mlp_out", "hook_resid_final")
    if hook.split(".")[-1] in stream:
        return directions
    parts = hook.split(".")
    if len(parts) == 4 and parts[0] == "blocks":
        block = model.blocks[int(parts[1])]
        if parts[2:] == ["mlp", "hook_post"] and block.mlp is not None:
            return directions @ block.mlp.fc_out.weight.T
        if parts[2:] == ["attn", "hook_z"]:
            return directions @ block.attn.out.weight.T
    return None


@torch.no_grad()
def logit_effects(model, hook: str, directions: torch.Tensor, top: int = 10):
    """The tokens each feature's decoder direction pushes up and down most, through the final norm's
    gain (the mean removed under LayerNorm) and the unembedding, as SAE dashboards show them:
    (up ids, up values, down ids, down values), each [n, top]; None for a hook off the residual stream."""
    stream = residual_directions(model, hook, directions.float())
    if stream is None:
        return None
    norm = getattr(model.ln_final, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        stream = stream - stream.mean(-1, keepdim=True)
    if norm is not None and norm.weight is not None:
        stream = stream * norm.weight.float()
    unembed = model.unembed.weight.float()  # [vocab, d_model]
    top = min(top, len(unembed) // 2)  # a small vocabulary: no token in both lists
    results = [[], [], [], []]
    for start in range(0, len(stream), 1024):
        logits = stream[start:start + 1024] @ unembed.T
        up, down = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        for bucket, value in zip(results, (up.indices, up.values, down.indices, down.values)):
            bucket.append(value)
    return tuple(torch.cat(bucket) for bucket in results)


def load_sae(path: str, device: str = "auto"):
    """An SAE directory (its last.pt) or checkpoint -> (SparseAutoencoder in eval mode, SAEConfig, run)."""
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    checkpoint = load_checkpoint(path)
    if "rows_since_fired" not in checkpoint:
        raise CheckpointError(f"{path} is a model checkpoint, not an SAE's; pass <run>/sae/<name>")
    cfg = config_from_dict(checkpoint["config"], cls=SAEConfig)
    # The model checkpoint it was trained on, by absolute path (run_dir may be relative to elsewhere);
    # else the run directory two levels up (<run>/sae/<name>/last.pt).
    model_path = checkpoint.get("model_checkpoint", "")
    if not os.path.isfile(model_path):
        model_path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    run = load_run(model_path, device=device)
    if checkpoint.get("model_step", run.step) != run.step:
        raise CheckpointError(f"{path}: this SAE was trained on the model at step {checkpoint['model_step']}, but "
                              f"{run.checkpoint_path} now holds step {run.step}; its metrics would not mean much")
    weights = checkpoint["model"]
    sae = SparseAutoencoder(checkpoint["d"], weights["W_dec"].shape[0], cfg.arch, cfg.k)
    sae.load_state_dict(weights)
    return sae.to(run.device).eval(), cfg, run


@torch.no_grad()
def write_browser(sae: SparseAutoencoder, cfg: SAEConfig, run, held_out: Sequences, stats: dict, metrics: dict,
                  out: str, fourier=None) -> str:
    """The feature browser (feature_browser.py) of `sae` from its feature_statistics on `held_out`."""
    n, C, before = sae.dict_size, len(stats["top_values"]), stats["before"]
    fired = (stats["top_values"] > 0).cpu().tolist()
    around, windows = stats["window_tokens"].cpu().numpy(), stats["windows"].cpu().numpy()
    values = stats["top_values"].cpu().tolist()
    contexts = []
    for feature in range(n):
        shown = []
        for slot in range(C):
            if not fired[slot][feature]:
                break
            ids = around[slot, feature]
            on = ids >= 0
            shown.append((ids[on], windows[slot, feature][on], before - int((~on[:before]).sum()), values[slot][feature]))
        contexts.append(shown)
    logits = logit_effects(run.model, cfg.hook, sae.W_dec * sae.scale)
    used = set(np.unique(around[around >= 0]).tolist())
    if logits is not None:
        logits = tuple(x.cpu().numpy() for x in logits)
        used |= set(np.unique(logits[0]).tolist()) | set(np.unique(logits[2]).tolist())
    used = sorted(used)
    token_text = dict(zip(used, token_names(run, used)))
    joined = getattr(run.cfg, "task", "text") == "text"  # text: tokens are pieces of it; else shown apart

    def label(f):  # what the list shows and searches: the top token (and, apart, the two before it)
        if not fired[0][f]:
            return ""
        ids = around[0, f, before if joined else max(0, before - 2):before + 1]
        return (" ".join(token_text[int(i)] for i in ids if i >= 0) if not joined
                else json.dumps(token_text[int(ids[0])], ensure_ascii=False))

    labels = [label(f) for f in range(n)]
    name = os.path.basename(os.path.normpath(os.path.dirname(out)))
    summary = (f"{cfg.arch} SAE with {n:,} features on {cfg.hook} of {cfg.run_dir} ({cfg.positions} positions); "
               f"{int(held_out.mask.sum()):,} held-out rows of the val split")
    shown_metrics = {k: v for k, v in metrics.items() if k in ("explained_variance", "l0", "mse", "ce_loss_score",
                                                                "kl_div_score", "never_fired_frac")}
    return write_feature_browser(out, title=f"SAE {name}", summary=summary, metrics=shown_metrics,
                                 density=stats["density"].cpu().numpy(), largest=stats["largest"].cpu().numpy(),
                                 labels=labels, histogram=stats["histogram"].cpu().numpy(), contexts=contexts,
                                 token_text=token_text, joined=joined,
                                 logits=logits, fourier=fourier)


@torch.no_grad()
def report(sae_path: str, top: int = 12, model: str = "", log=None) -> str:
    """Writes <sae>/report/: a summary with the held-out metrics, the feature-density histogram, and
    views of the top features (by total activation on held-out rows): for modular runs each one's
    activation over the (a, b) grid and its share of variance per frequency; for text runs the
    contexts that activate it most; for Dyck runs its mean activation by nesting depth; and the
    feature browser, features.html (write_browser). A folder that SAELens saved opens too, with
    `model` naming what it reads (load_saelens). `log`: a function that takes each stage's line."""
    clock, say = time.perf_counter(), log or (lambda line: None)
    from matplotlib.figure import Figure

    if os.path.isdir(sae_path) and is_saelens_folder(sae_path):
        sae, cfg, run = load_saelens(sae_path, model)
    elif os.path.isdir(sae_path) and not os.path.isfile(os.path.join(sae_path, "last.pt")):
        raise ConfigError(f"{sae_path} holds no SAE: neither last.pt (an SAE of sae.py) nor cfg.json and "
                          f"sae_weights.safetensors (one of SAELens); pass <run>/sae/<name>")
    else:
        sae, cfg, run = load_sae(sae_path)
    directory = sae_path if os.path.isdir(sae_path) else os.path.dirname(sae_path)
    out = os.path.join(directory, "report")
    os.makedirs(out, exist_ok=True)
    held_out = split_sequences(run, "val", cfg.positions, cfg.eval_tokens)
    # One pass of the model: its activations at every position [S, T, d], and the rows at the taken
    # positions (what the SAE was trained and evaluated on); the features' numbers a few sequences at
    # a time (feature_statistics), so that a wide SAE fits in memory.
    model_acts = capture_all(run, held_out.tokens, cfg.hook)
    mask = held_out.mask.to(run.device)
    rows = model_acts[mask]
    metrics, density = held_out_metrics(sae, run, held_out, rows, cfg.hook)
    say(f"{len(rows):,} held-out rows read and the metrics computed ({time.perf_counter() - clock:.1f}s)")
    stats = feature_statistics(sae, model_acts, mask, held_out.tokens)
    say(f"every feature's density, top contexts and histogram ({time.perf_counter() - clock:.1f}s)")
    ranked = torch.argsort(stats["total"], descending=True)[:top].tolist()

    plot_feature_density(density, os.path.join(out, "feature_density.png"))

    lines = [f"# SAE {os.path.basename(os.path.normpath(directory))}", "",
             f"{cfg.arch} SAE with {sae.dict_size} features on `{cfg.hook}` ({cfg.positions} positions) of "
             f"`{cfg.run_dir}`; {len(rows):,} held-out rows from the val split.", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    lines += ["", "![feature density](feature_density.png)", ""]

    task, fourier = run.cfg.task, None
    if task == "modular":
        p = run.cfg.modulus
        grid_tokens = run.data.tokens
        every = torch.cat([sae.encode(capture(run.model, grid_tokens[s:s + 4096], cfg.hook)[:, -1])
                           for s in range(0, len(grid_tokens), 4096)])
        if run.cfg.operation == "divide":  # b = 0 is not in the table
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
        if run.cfg.operation == "add":
            key = fourier_losses(run).key_frequencies
            lines.append(f"The model's key frequencies (its logits, `interp.fourier_losses`): {key}; "
                         f"{sum(int(counts[k]) for k in key if k < len(counts))} of those features have their best "
                         f"frequency among them.")
        lines.append("")
    elif task == "text":
        lines += ["## Top features: the contexts that activate them most", "",
                  "The activating token is in ⟦brackets⟧; the number is the activation.", ""]
        T = mask.shape[1]
        for feature in ranked:
            lines.append(f"**feature {feature}** (fires on {float(stats['density'][feature]):.1%} of rows)")
            lines.append("")
            for value, index in zip(stats["top_values"][:5, feature].tolist(), stats["top_index"][:5, feature].tolist()):
                if value <= 0:
                    break
                s, t = divmod(index, T)
                ids = held_out.tokens[s].tolist()
                before = run.data.decode(ids[max(0, t - 40):t])
                context = (before + "⟦" + run.data.decode(ids[t:t + 1]) + "⟧" + run.data.decode(ids[t + 1:t + 6]))
                lines.append(f"    {value:7.3f}  {context!r}")
            lines.append("")
    elif task == "dyck":
        k = run.cfg.dyck_types
        tokens = held_out.tokens.to(run.device)
        step_ = ((tokens >= 3) & (tokens < 3 + k)).long() - ((tokens >= 3 + k) & (tokens < 3 + 2 * k)).long()
        depth = step_.cumsum(1)  # depth after reading each token
        max_depth = int(depth[mask].max())
        acts = torch.cat([sae.encode(model_acts[s:s + 256])[..., ranked] for s in range(0, len(model_acts), 256)])
        table = torch.stack([acts[(depth == level) & mask].mean(0) if ((depth == level) & mask).any()
                             else torch.zeros(len(ranked), device=run.device) for level in range(max_depth + 1)])
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for i, feature in enumerate(ranked):
            ax.plot(range(max_depth + 1), table[:, i].cpu().numpy(), marker="o", label=f"feature {feature}")
        ax.set(xlabel="nesting depth after the token", ylabel="mean activation", title="top features by depth")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "features_depth.png"), dpi=110)
        lines += ["## Top features by nesting depth", "",
                  "| feature | " + " | ".join(f"depth {level}" for level in range(max_depth + 1)) + " |",
                  "|---" * (max_depth + 2) + "|"]
        lines += [f"| {feature} | " + " | ".join(f"{float(value):.3f}" for value in table[:, i]) + " |"
                  for i, feature in enumerate(ranked)]
        lines += ["", "![features by depth](features_depth.png)", ""]
    page = write_browser(sae, cfg, run, held_out, stats, metrics, out, fourier)
    say(f"the feature browser: {page} ({time.perf_counter() - clock:.1f}s)")
    lines[4:4] = [f"Every feature, one after another: [{os.path.basename(page)}]({os.path.basename(page)}) "
                  f"(a page that opens from disk).", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- SAELens's format

SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                        "matryoshka": "jumprelu"}  # the batch kinds are JumpReLU SAEs in use, as SAELens saves them


def saelens_folder(sae: SparseAutoencoder, cfg: SAEConfig, model_name: str) -> tuple[dict, dict]:
    """(cfg.json, the weights) of `sae` as SAELens saves an SAE (SAE.save_model: cfg.json and
    sae_weights.safetensors), for SAE.load_from_disk. Our input scale is folded into the weights
    (SAELens computes (x - b_dec) W_enc + b_enc; ours (x / scale - b_dec) W_enc + b_enc, then times
    scale out), so `normalize_activations` is none and the pre-activations, thresholds and
    features are ours exactly; only the decoder rows then have norm `scale` instead of 1."""
    scale = float(sae.scale)
    weights = {"W_enc": sae.W_enc.detach() / scale, "W_dec": sae.W_dec.detach() * scale,
               "b_enc": sae.b_enc.detach().clone(), "b_dec": sae.b_dec.detach() * scale}
    architecture = SAELENS_ARCHITECTURE[sae.arch]
    if sae.arch == "jumprelu":
        weights["threshold"] = sae.threshold.detach().clone()
    elif sae.arch in BATCH_ARCHS:
        weights["threshold"] = torch.full((sae.dict_size,), float(sae.threshold))
    config = {"architecture": architecture, "d_in": sae.d, "d_sae": sae.dict_size, "dtype": "float32",
              "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none",
              # sae_lens_version: the format's (SAELens converts configs without one, or older, from pre-6 layouts)
              "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None,
                           "hook_name": cfg.hook, "model_name": model_name, "hook_head_index": None,
                           "prepend_bos": False, "context_size": None, "dataset_path": None,
                           "model_from_pretrained_kwargs": {}, "exported_by": "tinylab sae.py export",
                           "tinylab_arch": sae.arch}}
    if architecture == "topk":
        config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return config, {name: value.float().contiguous() for name, value in weights.items()}


def is_saelens_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cfg.json")) and os.path.isfile(os.path.join(path, "sae_weights.safetensors"))


def load_saelens(folder: str, model: str, device: str = "auto"):
    """A folder SAELens saved (SAE.save_model: cfg.json, sae_weights.safetensors) for a hook of `model`
    (a run directory or checkpoint, or a pretrained model as --model takes it) -> (SparseAutoencoder in
    eval mode, SAEConfig, run), as load_sae gives ours. Standard, TopK and JumpReLU SAEs open (SAELens
    saves its BatchTopK and Matryoshka SAEs as JumpReLU ones)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError("opening a SAELens folder reads safetensors: pip install safetensors") from None
    if not model:
        raise ConfigError(f"--model: {folder} is a SAELens SAE, which does not record the model it reads; name it, "
                          f"e.g. python sae.py report {folder} --model runs/<run>")
    with open(os.path.join(folder, "cfg.json")) as f:
        config = json.load(f)
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
    architecture = config.get("architecture", "standard")
    if architecture not in ours:
        raise ConfigError(f"{folder}: a SAELens {architecture!r} SAE; sae.py opens {', '.join(ours)} ones")
    for key in ("normalize_activations", "reshape_activations"):
        if config.get(key, "none") != "none":
            raise ConfigError(f"{folder}: {key} is {config[key]!r}; sae.py opens SAEs that read the hook as it is "
                              f"({key} none; SAELens's fold_activation_norm_scaling_factor folds a scale in)")
    hook = (config.get("metadata") or {}).get("hook_name") or config.get("hook_name")
    if not hook:
        raise ConfigError(f"{folder}/cfg.json names no hook (metadata.hook_name)")
    source = {"run_dir": model} if os.path.exists(model) else {"model": model}
    cfg = SAEConfig(hook=hook, arch=ours[architecture], k=int(config.get("k", 32)), positions="all",
                    **source).validate()
    run = load_run(cfg.run_dir, device=device, source=cfg)
    d = hook_width(run, hook)  # names the hook if the model has no such point
    weights = load_file(os.path.join(folder, "sae_weights.safetensors"))
    if tuple(weights["W_enc"].shape) != (d, config["d_sae"]):
        raise ConfigError(f"{folder}: its W_enc is {list(weights['W_enc'].shape)}, but {hook} of {model} is {d} wide")
    sae = SparseAutoencoder(d, config["d_sae"], cfg.arch, cfg.k)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if cfg.arch == "jumprelu" else ()):
            getattr(sae, name).copy_(weights[name].float())
        if not config.get("apply_b_dec_to_input", True):  # theirs: x W_enc + b_enc; ours subtracts b_dec first
            sae.b_enc += sae.b_dec @ sae.W_enc
    return sae.to(run.device).eval(), cfg, run


def export(sae_path: str, out: str) -> str:
    """`python sae.py export <sae dir> --to saelens OUT`: a folder SAELens opens with SAE.load_from_disk."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("--to saelens writes safetensors: pip install safetensors") from None
    if not new_or_empty(out):
        raise ConfigError(f"--to: {out} already exists and is not an empty folder; name a new one")
    if not os.path.isdir(sae_path) and not os.path.isfile(sae_path):
        raise ConfigError(f"{sae_path} does not exist; pass an SAE folder (<run>/sae/<name>)")
    sae, cfg, run = load_sae(sae_path, device="cpu")  # refuses an SAE whose model checkpoint moved on
    config, weights = saelens_folder(sae, cfg, os.path.abspath(run.checkpoint_path))

    def write(staging):
        save_file(weights, os.path.join(staging, "sae_weights.safetensors"))
        write_json(os.path.join(staging, "cfg.json"), config)

    write_folder(out, write)
    return out


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        usage = "usage: python sae.py report <run>/sae/<name>, or report <SAELens folder> --model <run or model>"
        if len(argv) not in (2, 4) or argv[1].startswith("-") or len(argv) == 4 and argv[2] != "--model":
            raise ConfigError(usage)
        path = report(argv[1], model=argv[3] if len(argv) == 4 else "", log=print)
        print(f"wrote {path}")
        return path
    if argv and argv[0] == "export":
        usage = "usage: python sae.py export <run>/sae/<name> --to saelens OUT"
        if len(argv) != 5 or argv[2] != "--to":
            raise ConfigError(usage)
        if argv[3] != "saelens":
            raise ConfigError(f"--to: {argv[3]!r} is not a format sae.py exports; the one is saelens ({usage})")
        path = export(argv[1], argv[4])
        print(f"wrote {path}: SAELens opens it with SAE.load_from_disk({path!r})")
        return path
    cfg, explicit = parse_flags(SAEConfig, argv, "sae.py", "Train a sparse autoencoder on a run's activations "
                                "(`python sae.py report DIR` writes feature views; `python sae.py export DIR --to "
                                "saelens OUT` a folder SAELens opens).", positional="run_dir")
    return train(cfg, explicit)


if __name__ == "__main__":
    run_command(main)
