"""A small GPT-style transformer with TransformerLens-named hook points.

Hooks live in one plain dict, name -> list of `fn(tensor, hook) -> tensor | None`, shared by every
module. With the dict empty the forward pass is the fast one: fused scaled_dot_product_attention
(flash on GPU), no per-head result tensors, and it compiles. Attention takes the explicit path (it
materialises scores and pattern) only for a block where a hook asks for `attn.hook_attn_scores`,
`attn.hook_pattern` or `attn.hook_result`. Both paths give the same logits.

Shapes beside each hook point: batch B, position T, head H, d_model D, d_head Dh, d_mlp M.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Config

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
    """LayerNorm or RMSNorm with a `hook_normalized` point, or nothing at all."""

    def __init__(self, kind: str, dim: int, bias: bool, hooks: dict, name: str):
        super().__init__()
        self.hooks, self.name = hooks, name
        self.norm = (nn.LayerNorm(dim, bias=bias) if kind == "layernorm" else nn.RMSNorm(dim))

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
    return nn.Identity() if cfg.norm == "none" else Norm(cfg.norm, cfg.embedding_dim, cfg.bias, hooks, name)


class Attention(nn.Module):
    def __init__(self, cfg: Config, hooks: dict, prefix: str):
        super().__init__()
        self.hooks, self.prefix = hooks, prefix  # prefix: "blocks.{i}.attn."
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embedding_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.embedding_dim, 3 * cfg.embedding_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.embedding_dim, cfg.embedding_dim, bias=cfg.bias)
        self.dropout = cfg.dropout
        # A learnable logit per head for an extra "attend nowhere" slot with a zero value.
        self.sink = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.attention_sink else None
        self._explicit_names = tuple(f"{prefix}{n}" for n in ("hook_attn_scores", "hook_pattern", "hook_result"))

    def _hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _run_hooks(self.hooks, self.prefix + name, x) if self.hooks else x

    def forward(self, x, last_positions: int | None = None, cache: dict | None = None):
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        if last_positions:
            return self._last_queries(x, last_positions)
        if cache is not None:
            return self._cached(x, cache)
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).unbind(dim=2)
        q = self._hook("hook_q", q)  # [B, T, H, Dh]
        k = self._hook("hook_k", k)  # [B, T, H, Dh]
        v = self._hook("hook_v", v)  # [B, T, H, Dh]
        explicit = bool(self.hooks) and any(n in self.hooks for n in self._explicit_names)
        if explicit:
            return self._explicit(q, k, v)
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
        k, v [B, H, T, Dh]: its causal kernel (flash on GPU) when it can, else an explicit mask, with
        the sink as one more key of logit sink[h] and a zero value."""
        n, T = q.shape[2], k.shape[2]
        if self.sink is None and n == T:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        H = q.shape[1]
        mask = self._causal_bias(T, q, n).expand(H, n, T)
        if self.sink is not None:
            zeros = q.new_zeros(q.shape[0], H, 1, q.shape[3])
            k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
            mask = torch.cat([mask, self.sink.to(q.dtype).view(H, 1, 1).expand(H, n, 1)], -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

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

    def _cached(self, x, cache: dict):
        """Attention for new positions x [B, n, D] that follow the positions whose keys and values
        `cache` holds ({} at the start); appends theirs to it. Gradients flow through the cache. The
        fast path only: hooks see nothing here (callers use it with none attached)."""
        B, n, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, n, 3, H, Dh).transpose(1, 3).unbind(dim=2)  # [B, H, n, Dh] each
        if cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache["k"], cache["v"] = k, v
        z = self._fused(q, k, v)
        return self.out(z.transpose(1, 2).reshape(B, n, H * Dh))

    def _last_queries(self, x, n: int):
        """Attention output for the last n positions only (keys and values from all positions).

        The training path of answer-only tasks, whose sequences are a few tokens long. There a
        fused kernel's (or a batched matmul's) per-call overhead outweighs the arithmetic, so this
        is broadcast-and-sum attention over [B, n, T, H, Dh]: 2x faster than einsum on a CPU at
        T = 3. Hooks never see this path (the model uses it only with no hooks attached).
        """
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, -n:], w[:D], None if b is None else b[:D]).view(B, n, 1, H, Dh)
        k, v = F.linear(x, w[D:], None if b is None else b[D:]).view(B, 1, T, 2, H, Dh).unbind(dim=3)
        scores = (q * k).sum(-1) / math.sqrt(Dh)  # [B, n, T, H]
        if n > 1:
            scores = scores + self._causal_bias(T, q, n)[None, :, :, None]
        pattern = self._softmax(scores, key_dim=2, head_dim=3)
        if self.training and self.dropout > 0:
            pattern = F.dropout(pattern, self.dropout)
        z = (pattern.unsqueeze(-1) * v).sum(2)  # [B, n, H, Dh]
        return self.out(z.reshape(B, n, D))

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
        result = self._hook("hook_result", by_head.view(H, B, T, -1).permute(1, 2, 0, 3))  # [B, T, H, D]
        out = result.sum(2)
        return out if self.out.bias is None else out + self.out.bias


class MLP(nn.Module):
    def __init__(self, cfg: Config, hooks: dict, prefix: str):
        super().__init__()
        self.hooks, self.prefix = hooks, prefix  # "blocks.{i}.mlp."
        hidden = cfg.mlp_dim or 4 * cfg.embedding_dim
        self.fc_in = nn.Linear(cfg.embedding_dim, hidden, bias=cfg.bias)
        self.fc_out = nn.Linear(hidden, cfg.embedding_dim, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()

    def forward(self, x):
        pre = self.fc_in(x)
        if self.hooks:
            pre = _run_hooks(self.hooks, self.prefix + "hook_pre", pre)  # [B, T, M]
        post = self.act(pre)
        if self.hooks:
            post = _run_hooks(self.hooks, self.prefix + "hook_post", post)  # [B, T, M]
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

    def forward(self, x, last_positions: int | None = None, cache: dict | None = None):
        """cache: this block's keys and values of the positions before x (see Attention._cached)."""
        x = self._hook("hook_resid_pre", x)  # [B, T, D]
        attn_out = self._hook("hook_attn_out", self.dropout(self.attn(self.ln1(x), last_positions, cache)))  # [B, T, D]
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
        self.pos_embed = nn.Embedding(cfg.context_len, cfg.embedding_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self._hooks, i) for i in range(cfg.num_blocks))
        self.ln_final = _maybe_norm(cfg, self._hooks, "ln_final")
        self.unembed = nn.Linear(cfg.embedding_dim, vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_names = self._list_hook_names()

    def _init_weights(self):
        # GPT-2 style: N(0, init_std) for matrices, zero biases, and (scale_residual_init) residual-
        # branch outputs scaled by 1/sqrt(2 · blocks) so the residual stream's variance does not grow
        # with depth. TransformerLens, and so the `nanda` preset, leaves them unscaled.
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("sink") or "norm" in name:
                continue
            if p.dim() >= 2:
                scaled = self.cfg.scale_residual_init and name.endswith(("out.weight", "fc_out.weight"))
                scale = 1 / math.sqrt(2 * self.cfg.num_blocks) if scaled else 1
                nn.init.normal_(p, mean=0.0, std=std * scale)
            else:
                nn.init.zeros_(p)

    def _list_hook_names(self) -> list[str]:
        cfg = self.cfg
        names = ["hook_embed", "hook_pos_embed"]
        for i, block in enumerate(self.blocks):
            b = f"blocks.{i}."
            names.append(b + "hook_resid_pre")
            if cfg.norm != "none":
                names.append(b + "ln1.hook_normalized")
            names += [b + "attn.hook_" + n for n in ("q", "k", "v", "attn_scores", "pattern", "z", "result")]
            names.append(b + "hook_attn_out")
            if block.mlp is not None:
                names.append(b + "hook_resid_mid")
                if cfg.norm != "none":
                    names.append(b + "ln2.hook_normalized")
                names += [b + "mlp.hook_pre", b + "mlp.hook_post", b + "hook_mlp_out"]
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
            total -= self.pos_embed.weight.numel()
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
        pos_embed = self.pos_embed(torch.arange(T, device=tokens.device))  # [T, D], broadcast over the batch
        if hooked:
            embed = _run_hooks(self._hooks, "hook_embed", embed)  # [B, T, D]
            pos_embed = _run_hooks(self._hooks, "hook_pos_embed", pos_embed.expand_as(embed))  # [B, T, D]
        x = self.drop(embed + pos_embed)
        last_block = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, last_positions if i == last_block and not hooked else None)
        if hooked:
            x = _run_hooks(self._hooks, "hook_resid_final", x)  # [B, T, D], the residual stream at the end
            if last_positions:
                x = x[:, -last_positions:]
        return self.unembed(self.ln_final(x))

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

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Appends max_new_tokens sampled tokens to tokens [B, T] (temperature 0: greedy)."""
        for _ in range(max_new_tokens):
            context = tokens[:, -self.cfg.context_len :]
            logits = self(context)[:, -1, :].float()
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
