"""A small GPT-style transformer with TransformerLens-named hook points.

Hooks live in one plain dict, name -> list of `fn(tensor, hook) -> tensor | None`, shared by every
module. With the dict empty the forward pass is the fast one: fused scaled_dot_product_attention
(flash on GPU), no per-head result tensors, and it compiles. Attention takes the explicit path (it
materialises scores and pattern) only for a block where a hook asks for `attn.hook_attn_scores`,
`attn.hook_pattern` or `attn.hook_result`. Both paths give the same logits.

Shapes beside each hook point: batch B, position T, head H, key/value head Hkv (= H unless
grouped-query), d_model D, d_head Dh, d_mlp M.

The pieces of a 2026 small LM are flags, each off by default, so that the GPT-2-shaped presets and
every older checkpoint stay as they were: rotary positions (`--positional rope`), QK-norm,
ReLU² and SwiGLU MLPs, grouped-query attention (`--num_kv_heads`), soft-capped logits,
parameter-free norms and zero-initialised output projections.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from config import Config, rope_scaling

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint:
    """What a hook function receives as its second argument; `hook.name` is the hook's name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"HookPoint({self.name!r})"


def _run_hooks(table: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    for fn in table.get(name, ()):
        out = fn(x, HookPoint(name))
        if out is not None:
            x = out
    return x


class Norm(nn.Module):
    """LayerNorm or RMSNorm with a `hook_normalized` point; affine=False: parameter-free."""

    def __init__(self, kind: str, dim: int, bias: bool, hooks: dict, name: str, affine: bool = True,
                 eps: float = 0.0):
        super().__init__()
        self.hooks, self.name = hooks, name
        # eps 0: PyTorch's defaults (1e-5; RMSNorm: the dtype's machine epsilon), what every run used
        # before --norm_eps; a pretrained checkpoint sets its own.
        self.norm = (nn.LayerNorm(dim, eps=eps or 1e-5, elementwise_affine=affine, bias=bias) if kind == "layernorm"
                     else nn.RMSNorm(dim, eps=eps or None, elementwise_affine=affine))

    def forward(self, x):
        if not self.hooks:
            return self.norm(x)
        # As in TransformerLens, hook_normalized sees the stream after normalising and before the
        # norm's own weight and bias.
        norm = self.norm
        if isinstance(norm, nn.LayerNorm):
            x = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
        else:
            x = F.rms_norm(x, norm.normalized_shape, None, norm.eps)
        x = _run_hooks(self.hooks, f"{self.name}.hook_normalized", x)  # [B, T, D]
        if norm.weight is not None:
            x = x * norm.weight
        return x + norm.bias if getattr(norm, "bias", None) is not None else x


def _maybe_norm(cfg: Config, hooks: dict, name: str) -> nn.Module:
    return nn.Identity() if cfg.norm == "none" else Norm(cfg.norm, cfg.embedding_dim, cfg.bias, hooks, name,
                                                         cfg.norm_weights, cfg.norm_eps)


def rotary_frequencies(head_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """[head_dim / 2] float64: base^(-2i / head_dim) for pair i, with a Hugging Face rope_scaling
    applied: linear divides every frequency by the factor; llama3 divides those whose wavelength is
    beyond original_max_position_embeddings / low_freq_factor, keeps those below
    original / high_freq_factor, and blends the two in between."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    original, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                "high_freq_factor"))
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rotary_tables(head_dim: int, positions: int, base: float, dtype=torch.float32,
                  device=None, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables [positions, head_dim] for `rotate`: cos(a) and sin(a) of the angles
    a = position · frequency of pair i (`rotary_frequencies`), each twice (the sin negated the
    first time), computed in float64 and rounded once to `dtype`."""
    inv_freq = rotary_frequencies(head_dim, base, scaling)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq  # [positions, head_dim / 2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1).to(device, dtype), torch.cat([-sin, sin], -1).to(device, dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on x [B, T, heads, Dh] with rotary_tables rows [T, Dh]. Pair i is (x[i],
    x[i + Dh/2]), the two halves of the head (GPT-NeoX and Llama's layout, TransformerLens's
    default; not GPT-J's adjacent pairs), so Hugging Face checkpoints map without permuting:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), here as x·cos + roll(x)·sin in four operators."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [T, 1, Dh]; under autocast x may be bf16
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def head_width(cfg: Config) -> int:
    """d_head: --head_dim, or by default d_model / heads."""
    return cfg.head_dim or cfg.embedding_dim // cfg.num_heads


def mlp_width(cfg: Config) -> int:
    """d_mlp: --mlp_dim, or by default 4 x d_model (8/3 x d_model for SwiGLU, which has a third matrix,
    rounded up to a multiple of 32: about the same parameters)."""
    if cfg.mlp_dim:
        return cfg.mlp_dim
    if cfg.activation == "swiglu":
        return -(-8 * cfg.embedding_dim // 3 // 32) * 32
    return 4 * cfg.embedding_dim


class Attention(nn.Module):
    def __init__(self, cfg: Config, hooks: dict, prefix: str):
        super().__init__()
        self.hooks, self.prefix = hooks, prefix  # prefix: "blocks.{i}.attn."
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = Dh = head_width(cfg)
        # One matrix for queries (H heads), then keys and values (Hkv heads each): with Hkv = H it is
        # the [3D, D] matrix of every checkpoint written before grouped-query attention.
        self.split = (self.num_heads * Dh, self.num_kv_heads * Dh, self.num_kv_heads * Dh)
        self.qkv = nn.Linear(cfg.embedding_dim, sum(self.split), bias=cfg.bias or cfg.qkv_bias)
        self.out = nn.Linear(self.num_heads * Dh, cfg.embedding_dim, bias=cfg.bias)
        self.dropout = cfg.dropout
        # QK-norm: RMSNorm over each head's query and key (weights shared across heads, as in Qwen3).
        qk_norm = (lambda name: Norm("rmsnorm", Dh, False, hooks, prefix + name, cfg.norm_weights, cfg.norm_eps))
        self.q_norm = qk_norm("q_norm") if cfg.qk_norm else None
        self.k_norm = qk_norm("k_norm") if cfg.qk_norm else None
        # Rotary positions: the tables are the model's (Transformer.rope_cos / rope_sin, one copy for
        # every block), passed to forward as `rope`.
        self.rotary = cfg.positional == "rope"
        # A learnable logit per head for an extra "attend nowhere" slot with a zero value.
        self.sink = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.attention_sink else None
        self._explicit_names = tuple(f"{prefix}{n}" for n in ("hook_attn_scores", "hook_pattern", "hook_result"))

    def _hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _run_hooks(self.hooks, self.prefix + name, x) if self.hooks else x

    def _project(self, x, rope, start: int = 0, queries: int | None = None):
        """q [B, n, H, Dh] for the last n = `queries` (default all T) positions of x [B, T, D], and k, v
        [B, T, Hkv, Dh]: projected, QK-normed and rotated by the tables rope = (cos, sin) (x holds
        positions start, start + 1, ...)."""
        B, T, _ = x.shape
        n = queries or T
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if n == T:
            qkv = self.qkv(x)
            if not self.hooks and (self.q_norm is not None or self.rotary):
                return self._joint(qkv, rope, start)
            q, k, v = qkv.split(self.split, dim=-1)
        else:  # the answer-only path: queries of the last positions only
            w, b = self.qkv.weight, self.qkv.bias
            q_rows = self.split[0]
            q = F.linear(x[:, -n:], w[:q_rows], None if b is None else b[:q_rows])
            k, v = F.linear(x, w[q_rows:], None if b is None else b[q_rows:]).split(self.split[1:], dim=-1)
        q = self._hook("hook_q", q.view(B, n, H, Dh))  # [B, T, H, Dh]
        k = self._hook("hook_k", k.view(B, T, Hkv, Dh))  # [B, T, Hkv, Dh]
        v = self._hook("hook_v", v.view(B, T, Hkv, Dh))  # [B, T, Hkv, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # hook_normalized inside: [B, T, H or Hkv, Dh]
        if self.rotary:
            end, (cos, sin) = start + T, rope
            q = self._hook("hook_rot_q", rotate(q, cos[end - n:end], sin[end - n:end]))  # [B, T, H, Dh]
            k = self._hook("hook_rot_k", rotate(k, cos[start:end], sin[start:end]))  # [B, T, Hkv, Dh]
        return q, k, v

    def _joint(self, qkv, rope, start: int):
        """_project with no hooks attached, for a model with QK-norm or rotary positions: queries and
        keys (adjacent in qkv [B, T, (H + 2 Hkv) Dh]) normalised and rotated as one tensor of H + Hkv
        heads, so that each operator runs once rather than twice (a small model's CPU step is
        mostly operator calls). The same arithmetic as the separate path."""
        B, T, _ = qkv.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = qkv.split([(H + Hkv) * Dh, Hkv * Dh], dim=-1)
        qk = qk.view(B, T, H + Hkv, Dh)
        if self.q_norm is not None:
            qk = F.rms_norm(qk, (Dh,), None, self.q_norm.norm.eps)
            if self.q_norm.norm.weight is not None:
                qk = qk * torch.cat([self.q_norm.norm.weight.expand(H, Dh), self.k_norm.norm.weight.expand(Hkv, Dh)])
        if self.rotary:
            qk = rotate(qk, rope[0][start:start + T], rope[1][start:start + T])
        q, k = qk.split([H, Hkv], dim=2)
        return q, k, v.view(B, T, Hkv, Dh)

    def _repeat_kv(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Keys or values of Hkv heads -> H heads along `dim` (key head j serves query heads
        j·H/Hkv .. (j+1)·H/Hkv - 1, TransformerLens's and Hugging Face's grouping)."""
        groups = self.num_heads // self.num_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=dim)

    def forward(self, x, rope=None, last_positions: int | None = None, cache: dict | None = None):
        """rope: the model's rotary tables (cos, sin), None without rotary positions."""
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        if last_positions:
            return self._last_queries(x, rope, last_positions)
        if cache is not None:
            return self._cached(x, rope, cache)
        q, k, v = self._project(x, rope)
        explicit = bool(self.hooks) and any(n in self.hooks for n in self._explicit_names)
        if explicit:
            return self._explicit(q, self._repeat_kv(k, 2), self._repeat_kv(v, 2))
        z = self._fused(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.dropout if self.training else 0.0)
        z = self._hook("hook_z", z.transpose(1, 2))  # [B, T, H, Dh]
        return self.out(z.reshape(B, T, H * Dh))

    # The mask and the sink, for every path: query i (the last n of T positions) sees keys j <= its
    # own position, and with --attention_sink one more key whose logit is sink[h] and whose value is zero.

    @staticmethod
    def _causal_bias(T: int, like: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """[n, T]: 0 where query i may see key j, -inf elsewhere; the queries are the last `queries` positions."""
        n = queries or T
        return torch.full((n, T), float("-inf"), device=like.device, dtype=like.dtype).triu(T - n + 1)

    def _fused(self, q, k, v, dropout: float = 0.0):
        """scaled_dot_product_attention for queries q [B, H, n, Dh] at the last n of the T positions of
        k, v [B, Hkv, T, Dh]: its causal kernel (flash on GPU) when it can, else an explicit mask, with
        the sink as one more key of logit sink[h] and a zero value. Grouped-query attention goes
        through the kernel's own support (enable_gqa), never a copy of the keys per query head."""
        n, T = q.shape[2], k.shape[2]
        gqa = {"enable_gqa": True} if self.num_kv_heads != self.num_heads else {}
        if self.sink is None and n in (1, T):  # one query at the end (a cached token) sees every key: no mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=n > 1, **gqa)
        H = q.shape[1]
        mask = self._causal_bias(T, q, n).expand(H, n, T)
        if self.sink is not None:
            zeros = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])
            k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
            mask = torch.cat([mask, self.sink.to(q.dtype).view(H, 1, 1).expand(H, n, 1)], -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **gqa)

    def _softmax(self, scores: torch.Tensor, key_dim: int, head_dim: int) -> torch.Tensor:
        """The attention pattern from masked scores (keys along `key_dim`, heads along `head_dim`):
        with a sink, its logit joins the softmax and its share is dropped, so rows sum to < 1."""
        if self.sink is None:
            return scores.softmax(key_dim)
        shape = [1] * scores.dim()
        shape[head_dim] = -1
        sink_shape = list(scores.shape)
        sink_shape[key_dim] = 1
        sink = self.sink.to(scores.dtype).view(shape).expand(sink_shape)
        T = scores.shape[key_dim]
        return torch.cat([scores, sink], key_dim).softmax(key_dim).narrow(key_dim, 0, T)

    def _cached(self, x, rope, cache: dict):
        """Attention for new positions x [B, n, D] that follow the positions whose keys and values
        `cache` holds ({} at the start); appends theirs to it (keys rotated, Hkv heads). Gradients flow
        through the cache. Never the explicit path: attached hooks on q, k, v and the rotation see
        only these n positions (generate runs it with none attached)."""
        B, n, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        start = cache["k"].shape[2] if cache else 0
        q, k, v = (t.transpose(1, 2) for t in self._project(x, rope, start))  # [B, H or Hkv, n, Dh]
        if cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache["k"], cache["v"] = k, v
        z = self._fused(q, k, v)
        return self.out(z.transpose(1, 2).reshape(B, n, H * Dh))

    def _last_queries(self, x, rope, n: int):
        """Attention output for the last n positions only (keys and values from all positions).

        The training path of answer-only tasks, whose sequences are a few tokens long. There a
        fused kernel's (or a batched matmul's) per-call overhead outweighs the arithmetic, so this
        is broadcast-and-sum attention over [B, n, T, H, Dh]: 2x faster than einsum on a CPU at
        T = 3. Hooks never see this path (the model uses it only with no hooks attached).
        """
        B, T, _ = x.shape
        q, k, v = self._project(x, rope, queries=n)
        k, v = self._repeat_kv(k, 2)[:, None], self._repeat_kv(v, 2)[:, None]  # [B, 1, T, H, Dh]
        scores = (q[:, :, None] * k).sum(-1) / math.sqrt(self.head_dim)  # [B, n, T, H]
        if n > 1:
            scores = scores + self._causal_bias(T, q, n)[None, :, :, None]
        pattern = self._softmax(scores, key_dim=2, head_dim=3)
        if self.training and self.dropout > 0:
            pattern = F.dropout(pattern, self.dropout)
        z = (pattern.unsqueeze(-1) * v).sum(2)  # [B, n, H, Dh]
        return self.out(z.reshape(B, n, -1))

    def _explicit(self, q, k, v):
        # Batched matmuls over B * H rather than einsums: the same arithmetic in fewer operator
        # calls, which is what a cached forward of a small model spends its time on.
        B, T, H, Dh = q.shape
        q, k, v = (t.transpose(1, 2).reshape(B * H, T, Dh) for t in (q, k, v))
        # mask + q kᵀ / sqrt(Dh) in one call
        scores = torch.baddbmm(self._causal_bias(T, q), q, k.transpose(1, 2), alpha=1 / math.sqrt(Dh))
        scores = self._hook("hook_attn_scores", scores.view(B, H, T, T))  # [B, H, T_q, T_k], scaled, masked, pre-softmax
        scores = scores.expand(B, H, T, T)  # a hook may have returned a broadcastable tensor
        pattern = self._hook("hook_pattern", self._softmax(scores, key_dim=-1, head_dim=1))  # [B, H, T_q, T_k]
        if self.training and self.dropout > 0:
            pattern = F.dropout(pattern, self.dropout)
        # expand: a hook may return a broadcastable pattern (a mean over the batch, say)
        z = torch.bmm(pattern.expand(B, H, T, T).reshape(B * H, T, T), v).view(B, H, T, Dh)
        z = self._hook("hook_z", z.transpose(1, 2))  # [B, T, H, Dh]
        if self.prefix + "hook_result" not in self.hooks:
            return self.out(z.reshape(B, T, H * Dh))
        # Each head's share of the output projection: one [B*T, Dh] x [Dh, D] product per head.
        w_o = self.out.weight.view(-1, H, Dh).permute(1, 2, 0)  # [H, Dh, D]
        by_head = torch.bmm(z.reshape(B * T, H, Dh).transpose(0, 1), w_o)  # [H, B*T, D]
        heads_last = by_head.view(H, B, T, -1).permute(1, 2, 0, 3)
        result = self._hook("hook_result", heads_last)  # [B, T, H, D]
        # the sum over heads along by_head's contiguous first dimension, unless a hook replaced it
        out = by_head.sum(0).view(B, T, -1) if result is heads_last else result.sum(2)
        return out if self.out.bias is None else out + self.out.bias


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu2": relu_squared,
                        "swiglu": F.silu}


class MLP(nn.Module):
    """fc_out(act(fc_in(x))), or under SwiGLU fc_out(silu(fc_gate(x)) * fc_in(x)): `hook_pre` is the
    gate's input and `hook_pre_linear` its partner's, as in TransformerLens's gated MLP."""

    def __init__(self, cfg: Config, hooks: dict, prefix: str):
        super().__init__()
        self.hooks, self.prefix = hooks, prefix  # "blocks.{i}.mlp."
        hidden = mlp_width(cfg)
        self.fc_gate = nn.Linear(cfg.embedding_dim, hidden, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.fc_in = nn.Linear(cfg.embedding_dim, hidden, bias=cfg.bias)
        self.fc_out = nn.Linear(hidden, cfg.embedding_dim, bias=cfg.bias)
        self.act = ACTIVATION_FUNCTIONS[cfg.activation]

    def _hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _run_hooks(self.hooks, self.prefix + name, x) if self.hooks else x

    def forward(self, x):
        if self.fc_gate is None:
            pre = self._hook("hook_pre", self.fc_in(x))  # [B, T, M]
            post = self._hook("hook_post", self.act(pre))  # [B, T, M]
        else:
            pre = self._hook("hook_pre", self.fc_gate(x))  # [B, T, M], the gate
            linear = self._hook("hook_pre_linear", self.fc_in(x))  # [B, T, M]
            post = self._hook("hook_post", self.act(pre) * linear)  # [B, T, M]
        return self.fc_out(post)


class Block(nn.Module):
    def __init__(self, cfg: Config, hooks: dict, index: int):
        super().__init__()
        self.hooks, self.prefix = hooks, f"blocks.{index}."
        self.ln1 = _maybe_norm(cfg, hooks, f"blocks.{index}.ln1")
        self.attn = Attention(cfg, hooks, f"blocks.{index}.attn.")
        self.ln2 = None if cfg.attention_only else _maybe_norm(cfg, hooks, f"blocks.{index}.ln2")
        self.mlp = None if cfg.attention_only else MLP(cfg, hooks, f"blocks.{index}.mlp.")
        self.dropout = nn.Dropout(cfg.dropout)

    def _hook(self, name, x):
        return _run_hooks(self.hooks, self.prefix + name, x) if self.hooks else x

    def forward(self, x, rope=None, last_positions: int | None = None, cache: dict | None = None):
        """rope: the model's rotary tables; cache: this block's keys and values of the positions
        before x (see Attention._cached)."""
        x = self._hook("hook_resid_pre", x)  # [B, T, D]
        attn_out = self._hook("hook_attn_out", self.dropout(self.attn(self.ln1(x), rope, last_positions, cache)))  # [B, T, D]
        if last_positions:
            x = x[:, -last_positions:]
        if self.mlp is None:
            return self._hook("hook_resid_post", x + attn_out)  # [B, T, D]
        x = self._hook("hook_resid_mid", x + attn_out)  # [B, T, D]
        mlp_out = self._hook("hook_mlp_out", self.dropout(self.mlp(self.ln2(x))))  # [B, T, D]
        return self._hook("hook_resid_post", x + mlp_out)  # [B, T, D]


class ModelWithLoss(nn.Module):
    """The training forward: model, cross-entropy and the count of correct predictions in one module.

    train.py compiles (and DDP-wraps) this rather than the bare model, so that torch.compile sees
    the loss too: it fuses the fp32 upcast, log-softmax and argmax into kernels that read the
    low-precision logits once, instead of writing a float32 copy of [batch x positions x vocab]
    (3.3 GB per step for GPT-2 small at batch 16). Eager, it computes exactly what the separate
    calls did. Returns the summed loss over targets that are not `ignore_index`, and the number of
    those predicted right.
    """

    def __init__(self, model: "Transformer", loss_positions: int | None, ignore_index: int):
        super().__init__()
        self.model, self.loss_positions, self.ignore_index = model, loss_positions, ignore_index

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x, self.loss_positions)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=self.ignore_index,
                                   reduction="sum")
        correct = ((logits.argmax(-1) == y) & (y != self.ignore_index)).sum()
        return loss_sum, correct


class Transformer(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self._hooks: dict[str, list[HookFn]] = {}
        self.embed = nn.Embedding(vocab_size, cfg.embedding_dim)
        # Rotary models have no position table: their attention rotates queries and keys instead.
        self.pos_embed = nn.Embedding(cfg.context_len, cfg.embedding_dim) if cfg.positional == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.positional == "rope":  # one table for every block; not saved in checkpoints (a function of the config)
            self._rope_shape = (head_width(cfg), cfg.context_len, cfg.rope_base)
            cos, sin = rotary_tables(*self._rope_shape, scaling=rope_scaling(cfg))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, self._hooks, i) for i in range(cfg.num_blocks))
        self.ln_final = _maybe_norm(cfg, self._hooks, "ln_final")
        self.unembed = nn.Linear(cfg.embedding_dim, vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_names = self._list_hook_names()
        self.checkpoint_blocks = False  # train.py's --activation_checkpointing (see forward)

    def _apply(self, fn, *args, **kwargs):
        # After .to(), .double(), .cuda(): the rotary tables afresh in their new dtype and device,
        # rather than float32 values cast (a float64 model gets float64-exact angles).
        super()._apply(fn, *args, **kwargs)
        if self.cfg.positional == "rope":
            self.rope_cos, self.rope_sin = rotary_tables(*self._rope_shape, self.rope_cos.dtype, self.rope_cos.device,
                                                         rope_scaling(self.cfg))
        return self

    @property
    def rope(self):
        """The rotary tables (cos, sin) [context_len, d_head] every block's attention uses, or None."""
        return (self.rope_cos, self.rope_sin) if self.cfg.positional == "rope" else None

    def _init_weights(self):
        # GPT-2 style: N(0, init_std) for matrices, zero biases, and (scale_residual_init) residual-
        # branch outputs scaled by 1/sqrt(2 · blocks) so the residual stream's variance does not grow
        # with depth. TransformerLens, and so the `nanda` preset, leaves them unscaled.
        # zero_init_outputs starts every matrix that writes into the residual stream (and an untied
        # unembedding) at zero, as nanochat and modded-nanogpt do: each block begins as the identity
        # and the logits as uniform.
        std = self.cfg.init_std
        zeroed = ("attn.out.weight", "mlp.fc_out.weight") + (() if self.cfg.tie_embeddings else ("unembed.weight",))
        for name, p in self.named_parameters():
            if name.endswith("sink") or "norm" in name:
                continue
            if self.cfg.zero_init_outputs and name.endswith(zeroed):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                scaled = self.cfg.scale_residual_init and name.endswith(("out.weight", "fc_out.weight"))
                scale = 1 / math.sqrt(2 * self.cfg.num_blocks) if scaled else 1
                nn.init.normal_(p, mean=0.0, std=std * scale)
            else:
                nn.init.zeros_(p)

    def _list_hook_names(self) -> list[str]:
        cfg = self.cfg
        names = ["hook_embed"] + (["hook_pos_embed"] if self.pos_embed is not None else [])
        for i, block in enumerate(self.blocks):
            b = f"blocks.{i}."
            names.append(b + "hook_resid_pre")
            if cfg.norm != "none":
                names.append(b + "ln1.hook_normalized")
            names += [b + "attn.hook_" + n for n in ("q", "k", "v")]
            if cfg.qk_norm:
                names += [b + "attn.q_norm.hook_normalized", b + "attn.k_norm.hook_normalized"]
            if cfg.positional == "rope":
                names += [b + "attn.hook_rot_q", b + "attn.hook_rot_k"]
            names += [b + "attn.hook_" + n for n in ("attn_scores", "pattern", "z", "result")]
            names.append(b + "hook_attn_out")
            if block.mlp is not None:
                names.append(b + "hook_resid_mid")
                if cfg.norm != "none":
                    names.append(b + "ln2.hook_normalized")
                names += [b + "mlp.hook_pre"] + ([b + "mlp.hook_pre_linear"] if block.mlp.fc_gate is not None else [])
                names += [b + "mlp.hook_post", b + "hook_mlp_out"]
            names.append(b + "hook_resid_post")
        names.append("hook_resid_final")
        if cfg.norm != "none":
            names.append("ln_final.hook_normalized")
        return names

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, tied weights once. exclude_embeddings drops the lookup tables (positional, and
        the token embedding unless it doubles as the unembedding), leaving what costs FLOPs."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= 0 if self.pos_embed is None else self.pos_embed.weight.numel()
            if self.unembed.weight is not self.embed.weight:
                total -= self.embed.weight.numel()
        return total

    # ------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, last_positions: int | None = None) -> torch.Tensor:
        """tokens [B, T] (int) -> logits [B, T, vocab].

        last_positions=n returns logits [B, n, vocab] for the last n positions only, and the last
        block computes queries, MLP and unembedding only there: the same numbers as
        `model(tokens)[:, -n:]` for less work, for tasks whose loss reads only the end (modular
        arithmetic). With hooks attached the full forward runs, so every hook sees every position.
        """
        T = tokens.shape[1]
        hooked = bool(self._hooks)
        if last_positions is not None and last_positions >= T:
            last_positions = None  # every position is wanted
        embed = self.embed(tokens)
        if hooked:
            embed = _run_hooks(self._hooks, "hook_embed", embed)  # [B, T, D]
        if self.pos_embed is not None:
            pos_embed = self.pos_embed(torch.arange(T, device=tokens.device))  # [T, D], broadcast over the batch
            if hooked:
                pos_embed = _run_hooks(self._hooks, "hook_pos_embed", pos_embed.expand_as(embed))  # [B, T, D]
            embed = embed + pos_embed
        x = self.drop(embed)
        last_block, rope = len(self.blocks) - 1, self.rope
        # --activation_checkpointing: keep only each block's input for the backward pass, and run the
        # block again there (its dropout draws replayed) instead of keeping what is inside it.
        recompute = self.checkpoint_blocks and torch.is_grad_enabled() and not hooked
        for i, block in enumerate(self.blocks):
            last = last_positions if i == last_block and not hooked else None
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, last, use_reentrant=False)
            else:
                x = block(x, rope, last)
        if hooked:
            x = _run_hooks(self._hooks, "hook_resid_final", x)  # [B, T, D], the residual stream at the end
            if last_positions:
                x = x[:, -last_positions:]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream x [..., D]: the final norm, the unembedding and, with
        --logit_softcap, cap · tanh(logits / cap)."""
        logits = self.unembed(self.ln_final(x))
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward_cached(self, tokens: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Logits [B, n, vocab] for tokens [B, n] that follow the positions whose keys and values
        `caches` (one dict per block, each {} at the start) hold, appending theirs: what `self(all
        tokens)[:, -n:]` gives, reading each earlier position once. The fast path, for use with no
        hooks attached (generate falls back to the full forward when there are). Positions must stay
        below context_len."""
        start = caches[0]["k"].shape[2] if caches[0] else 0
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[start:start + tokens.shape[1]]
        rope = self.rope
        for block, cache in zip(self.blocks, caches):
            x = block(x, rope, cache=cache)
        return self.head(x)

    # ------------------------------------------------------------ hooks

    def _resolve(self, name_or_filter) -> list[str]:
        if callable(name_or_filter):
            return [n for n in self.hook_names if name_or_filter(n)]
        if name_or_filter not in self.hook_names:
            close = difflib.get_close_matches(name_or_filter, self.hook_names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names"
            raise KeyError(f"no hook point named {name_or_filter!r}{hint}")
        return [name_or_filter]

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = ()):
        """Adds (name or name-predicate, fn) hooks for the body; always removes exactly those."""
        added: list[tuple[str, HookFn]] = []
        try:
            for name_or_filter, fn in fwd_hooks:
                for name in self._resolve(name_or_filter):
                    self._hooks.setdefault(name, []).append(fn)
                    added.append((name, fn))
            yield self
        finally:
            for name, fn in reversed(added):
                fns = self._hooks[name]
                for i in range(len(fns) - 1, -1, -1):
                    if fns[i] is fn:
                        del fns[i]
                        break
                if not fns:
                    del self._hooks[name]

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks=()) -> torch.Tensor:
        with self.hooks(fwd_hooks):
            return self(tokens)

    def run_with_cache(self, tokens: torch.Tensor, names_filter=None, detach: bool = True):
        """Forward pass that also returns {hook name: activation}.

        names_filter: None (every hook), a name, a list of names, or a predicate on names.
        """
        if names_filter is None:
            names = list(self.hook_names)
        elif isinstance(names_filter, str):
            names = self._resolve(names_filter)
        elif callable(names_filter):
            names = self._resolve(names_filter)
        else:
            names = [n for name in names_filter for n in self._resolve(name)]
        cache: dict[str, torch.Tensor] = {}

        def save(tensor, hook):
            cache[hook.name] = tensor.detach() if detach else tensor

        logits = self.run_with_hooks(tokens, [(name, save) for name in names])
        return logits, cache

    # ------------------------------------------------------------ sampling

    @torch.inference_mode()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Appends max_new_tokens sampled tokens to tokens [B, T] (temperature 0: greedy).

        With use_cache, each new token reads the keys and values of the positions before it from a
        cache instead of re-running them: the same tokens as the uncached loop, for one position's
        work per token. Once prompt and sample outgrow context_len, the window slides as nanoGPT's
        does: each further token is predicted from the last context_len tokens, run afresh (a
        cache cannot slide: every position's keys depend on the positions before it, and the
        first of those has just left the window). So those tokens cost what the uncached loop's do.
        """
        C = self.cfg.context_len
        caches: list[dict] = [{} for _ in self.blocks]
        cached = 0  # positions whose keys and values the caches hold
        for _ in range(max_new_tokens):
            if use_cache and not self._hooks and tokens.shape[1] <= C:
                logits = self.forward_cached(tokens[:, cached:], caches)[:, -1, :].float()
                cached = tokens.shape[1]
            else:
                logits = self(tokens[:, -C:])[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, next_token], dim=1)
        return tokens
