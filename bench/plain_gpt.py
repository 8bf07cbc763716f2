"""A plain nanoGPT-style transformer: our model's arithmetic with every hook call removed.

The yardstick for two benchmarks. bench/hooks.py times our model (no hooks attached) against it,
so the ratio is the price of the hook machinery when nobody uses it; bench/throughput.py runs it
beside ours so "as fast as a plain nanoGPT-style loop" is measured, not assumed.

Its parameters have our model's names and shapes, so `plain.load_state_dict(ours.state_dict())`
gives the same function (`check_same_function` verifies it before any timing). What it leaves
out: hook points, the attention sink, the last-positions path of answer-only tasks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Norm(nn.Module):
    def __init__(self, kind: str, dim: int, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, bias=bias) if kind == "layernorm" else nn.RMSNorm(dim)

    def forward(self, x):
        return self.norm(x)


def _norm(cfg, dim: int) -> nn.Module:
    return nn.Identity() if cfg.norm == "none" else _Norm(cfg.norm, dim, cfg.bias)


class _Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.dropout = cfg.num_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.embedding_dim, 3 * cfg.embedding_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.embedding_dim, cfg.embedding_dim, bias=cfg.bias)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(dim=2)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out(z.transpose(1, 2).reshape(B, T, D))


class _MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.mlp_dim or 4 * cfg.embedding_dim
        self.fc_in = nn.Linear(cfg.embedding_dim, hidden, bias=cfg.bias)
        self.fc_out = nn.Linear(hidden, cfg.embedding_dim, bias=cfg.bias)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class _Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn = _norm(cfg, cfg.embedding_dim), _Attention(cfg)
        self.ln2 = None if cfg.attention_only else _norm(cfg, cfg.embedding_dim)
        self.mlp = None if cfg.attention_only else _MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x if self.mlp is None else x + self.dropout(self.mlp(self.ln2(x)))


class PlainGPT(nn.Module):
    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        if cfg.attention_sink:
            raise ValueError("PlainGPT has no attention sink; benchmark a config without one")
        self.embed = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.pos_embed = nn.Embedding(cfg.context_len, cfg.embedding_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_blocks))
        self.ln_final = _norm(cfg, cfg.embedding_dim)
        self.unembed = nn.Linear(cfg.embedding_dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def forward(self, tokens):
        x = self.drop(self.embed(tokens) + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


class PlainWithLoss(nn.Module):
    """nanoGPT's training forward: logits and the mean cross-entropy in one module (compiled whole)."""

    def __init__(self, model: PlainGPT):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def plain_copy(model: nn.Module, cfg, vocab_size: int) -> PlainGPT:
    """A PlainGPT with `model`'s weights, on its device."""
    plain = PlainGPT(cfg, vocab_size).to(next(model.parameters()).device)
    plain.load_state_dict(model.state_dict())
    return plain


def check_same_function(ours: nn.Module, plain: PlainGPT, vocab_size: int, context_len: int) -> float:
    """Largest |logit difference| over the largest |logit| on a random batch (eval mode); raises if they disagree."""
    device = next(ours.parameters()).device
    tokens = torch.randint(vocab_size, (2, context_len), device=device)
    was_training = ours.training, plain.training
    ours.eval(), plain.eval()
    with torch.no_grad():
        expected = ours(tokens).float()
        difference = (expected - plain(tokens).float()).abs().max().item() / expected.abs().max().clamp(min=1).item()
    ours.train(was_training[0]), plain.train(was_training[1])
    if not difference < 1e-3:  # fp32 gives ~1e-7; TF32 matmuls on a GPU ~1e-4
        raise AssertionError(f"PlainGPT does not compute our model's function (max |logit diff| {difference:.2e} "
                             f"of the largest logit)")
    return difference
