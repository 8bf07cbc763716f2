"""Optimizers and schedules: parameter groups, Muon (ours) + AdamW, warm-up and decay (or cuts on a
plateau of the eval loss), restoring optimizer state under today's settings, early stopping."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from config import Config, OptimConfig
from plumbing.checkpoints import todays_settings
from plumbing.sharding import full_value

# Quintic Newton–Schulz coefficients from Keller Jordan's Muon (also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately U Vᵀ for matrix = U S Vᵀ, by `steps` quintic Newton–Schulz iterations in `dtype`.

    `matrix` is one [rows, cols] matrix or a stack [n, rows, cols] of them, each orthogonalised on
    its own. The iteration pushes every singular value towards ~1 (roughly into [0.7, 1.2]); working
    on the wide orientation keeps the Gram matrix X Xᵀ the small one.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT
    # Each matrix's Frobenius norm bounds its spectral norm: start inside [0, 1].
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x[0] if single else x


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalised updates, for 2-D hidden weight matrices.

    Same update as torch.optim.Muon (EMA momentum buffer, Nesterov, decoupled weight decay, the
    learning rate scaled by sqrt(max(1, rows/cols))), but Newton–Schulz runs in `ns_dtype`:
    PyTorch's runs in bf16, which a CPU executes 2–3× slower than fp32. We default to bf16 on
    CUDA (tensor cores) and fp32 elsewhere. Matrices of one shape (up to a transpose) are
    orthogonalised together as one batched Newton–Schulz: a transformer has three such shapes
    however deep it is, so a step launches a few dozen kernels rather than a few dozen per
    matrix, which is what a small model's step on a GPU waits for.

    Under FSDP (--fsdp) each rank holds a slice of rows of every matrix, but Newton–Schulz needs
    whole matrices: every rank gathers each whole update (one all-gather per matrix), orthogonalises
    all of them, and keeps its own rows. modded-nanogpt and nanochat instead give each rank its own
    share of the matrices and gather the results, dividing the Newton–Schulz arithmetic by N. We
    gather: it is exactly the single-process update, the momentum stays sharded, and at the sizes
    one node trains, Newton–Schulz is about 1 % of a step's arithmetic (5 iterations of d x d matmuls
    per matrix against a forward and backward over the whole batch).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes only 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            shards = list(updates)  # DTensors under FSDP: each rank's rows of the matrix
            updates = [full_value(u) for u in updates]  # whole matrices on every rank
            # Newton–Schulz works on the wide orientation, so a [rows, cols] matrix and a
            # [cols, rows] one (an MLP's two matrices) go into the same batch, one transposed.
            batches: dict[tuple, list[int]] = {}
            for i, u in enumerate(updates):
                batches.setdefault((min(u.shape), max(u.shape), u.dtype, u.device), []).append(i)
            orthogonal: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
            for indices in batches.values():
                first = params[indices[0]]
                ns_dtype = group["ns_dtype"] or (torch.bfloat16 if first.is_cuda else torch.float32)
                wide = [updates[i].mT if updates[i].size(0) > updates[i].size(1) else updates[i] for i in indices]
                result = orthogonalize(torch.stack(wide), group["ns_steps"], ns_dtype).to(first.dtype)
                for i, matrix in zip(indices, result.unbind(0)):
                    orthogonal[i] = matrix.mT if params[i].size(0) > params[i].size(1) else matrix
            orthogonal = [own_rows(matrix, like) for matrix, like in zip(orthogonal, shards)]
            # torch.optim.Muon's shape adjustment: tall matrices take larger steps
            torch._foreach_mul_(orthogonal, [math.sqrt(max(1.0, p.size(0) / p.size(1))) for p in params])
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            torch._foreach_add_(params, orthogonal, alpha=-lr)
        return loss


def own_rows(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a whole `matrix`, sharded as `like` is (no communication: every rank
    holds the same whole matrix); `matrix` itself when `like` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor):
        return matrix
    return distribute_tensor(matrix, like.device_mesh, like.placements, src_data_rank=None)


class GrokfastEMA:
    """Amplifies the slow part of the gradient (Lee et al. 2024, "Grokfast"): g <- g + lamb * EMA(g).

    The EMA (decay alpha) starts from the first gradient. Applied after backward, before clipping;
    its state goes into the checkpoint so a resumed run continues exactly.
    """

    def __init__(self, params, alpha: float, lamb: float):
        self.params = [p for p in params if p.requires_grad]
        self.alpha, self.lamb = alpha, lamb
        self.averages: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def apply(self) -> None:
        # An fp16 overflow step (which GradScaler then skips) must not poison the average.
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.norm() for g in grads])).all():
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.averages[i] is None:
                self.averages[i] = p.grad.detach().clone()
            else:
                self.averages[i].lerp_(p.grad, 1 - self.alpha)
            p.grad.add_(self.averages[i], alpha=self.lamb)

    def state_dict(self) -> dict:
        return {"averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        self.averages = [None if a is None else a.to(p.device) for a, p in zip(state["averages"], self.params)]


def _is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """Muon's share: 2-D weights inside blocks (attention and MLP), not embeddings or unembedding."""
    return p.ndim == 2 and name.startswith("blocks.")


def split_parameters(named, to_muon, decayed) -> tuple[list, list, list]:
    """(Muon's, AdamW's decayed, AdamW's undecayed) share of `named` (name, parameter) pairs, each
    parameter once (tied weights share one) and empty ones left out; `to_muon(name, p)` and
    `decayed(name, p)` decide. Every trainer splits its parameters here (train.py, lens.py)."""
    seen: set[int] = set()
    muon, decay, no_decay = [], [], []
    for name, p in named:
        if id(p) in seen or not p.numel():  # an empty soft prompt: nothing to train
            continue
        seen.add(id(p))
        (muon if to_muon(name, p) else decay if decayed(name, p) else no_decay).append(p)
    return muon, decay, no_decay


def build_optimizers(model: nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for hidden matrices plus AdamW for everything else.

    AdamW decays matrices and embeddings and leaves biases, norms and sinks alone (unless
    --decay_all_params, the plain `AdamW(model.parameters())` of Nanda et al.).
    Each group remembers its peak LR as `initial_lr`; `apply_lr` scales from it.
    """
    muon_params, decay, no_decay = split_parameters(
        [(name, p) for name, p in model.named_parameters() if p.requires_grad],
        to_muon=lambda name, p: cfg.use_muon and _is_hidden_matrix(name, p),
        decayed=lambda name, p: p.ndim >= 2 or cfg.decay_all_params)
    from torch.distributed.tensor import DTensor
    first = next(model.parameters())
    # fused kernels on GPU; the foreach ones for FSDP's sharded parameters (DTensors)
    fused = first.is_cuda and not isinstance(first, DTensor)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)]
    if muon_params:
        optimizers.append(Muon(muon_params, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                               weight_decay=cfg.muon_weight_decay))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def load_optimizer_states(optimizers: list[torch.optim.Optimizer], states: list[dict]) -> None:
    """Restores moments and step counts from a checkpoint, but keeps the hyperparameters (LR, weight
    decay, betas, momentum, the peak `initial_lr` and any other entry of a group) that the optimizers
    were built with from today's settings, so flags typed at resume time take effect. Every trainer
    resumes its optimizers through this; a checkpoint whose optimizers do not fit raises ValueError."""
    if len(states) != len(optimizers):
        raise ValueError(f"the checkpoint has {len(states)} optimizers, this config builds {len(optimizers)}")
    with todays_settings(optimizers):
        for optimizer, state in zip(optimizers, states):
            optimizer.load_state_dict(state)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up over warmup_steps, then cosine / linear decay to min_lr_frac, or constant
    (also the plateau schedule's shape: its cuts are LRSchedule's)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule in ("constant", "plateau"):
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * shape


def apply_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


class LRSchedule:
    """The LR multiplier of every step: `lr_multiplier`'s warm-up and decay, and for
    `--lr_schedule plateau` a factor cut by `plateau_factor` (never below `min_lr_frac`) whenever
    `plateau_patience` evals in a row have not improved the program's own eval loss by more than
    `min_delta` (as torch's ReduceLROnPlateau, without cooldown). `observe` takes each eval's loss;
    the state goes into the checkpoint, so a resumed run cuts where an unbroken one would."""

    def __init__(self, settings: OptimConfig, max_steps: int):
        self.settings, self.max_steps = settings, max_steps
        self.factor, self.best, self.bad_evals = 1.0, math.inf, 0

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.settings, self.max_steps) * self.factor

    def observe(self, eval_loss: float) -> bool:
        """Records one eval; True when it cut the learning rate."""
        if self.settings.lr_schedule != "plateau":
            return False
        if eval_loss < self.best - self.settings.min_delta:
            self.best, self.bad_evals = eval_loss, 0
            return False
        self.bad_evals += 1
        if self.bad_evals < self.settings.plateau_patience or self.factor <= self.settings.min_lr_frac:
            return False
        self.factor = max(self.settings.min_lr_frac, self.factor * self.settings.plateau_factor)
        self.bad_evals = 0
        return True

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's state; None (one written before the plateau schedule existed) starts afresh."""
        if state:
            self.factor, self.best, self.bad_evals = state["factor"], state["best"], state["bad_evals"]


class EarlyStopping:
    """Stops on a target validation accuracy, or after `patience` evals without val_loss improving
    by more than `min_delta`. Its state goes into the checkpoint."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0, target_val_acc: float = 0.0):
        self.patience, self.min_delta, self.target_val_acc = patience, min_delta, target_val_acc
        self.best_loss = math.inf
        self.bad_evals = 0
        self.reason = ""

    @property
    def active(self) -> bool:
        """Whether anything but max_steps may end the run."""
        return bool(self.target_val_acc or self.patience)

    def update(self, val_loss: float, val_acc: float | None) -> bool:
        """Records one eval; True when training should stop (the reason is in `self.reason`)."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        if self.target_val_acc and val_acc is not None and val_acc >= self.target_val_acc:
            self.reason = f"val_acc {val_acc:.4f} reached target {self.target_val_acc}"
        elif self.patience and self.bad_evals >= self.patience:
            self.reason = f"val_loss did not improve by {self.min_delta} for {self.patience} evals"
        return bool(self.reason)

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.bad_evals = state["best_loss"], state["bad_evals"]
