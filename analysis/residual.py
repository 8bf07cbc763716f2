"""The residual stream as a stack of what wrote into it, the logit lens, and direct logit
attribution (TransformerLens's `accumulated_resid`, `decompose_resid`, `apply_ln_to_stack`)."""

from __future__ import annotations

import torch

from analysis.runs import model_of
from model import Transformer


def residual_stack(model, cache: dict, accumulated: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The residual stream as a stack [components, batch, pos, d_model] and its labels.

    accumulated=True: the stream before each block, then at the end (`hook_resid_final`).
    accumulated=False: what each part wrote into it — token and position embeddings, every
    head's result, each attention output bias, every MLP — which sums to `hook_resid_final`.
    The cache must hold the hooks named here (run_with_cache with no filter holds them all).
    """
    model = model_of(model)
    layers = range(model.cfg.num_blocks)
    if accumulated:
        labels = [f"blocks.{i}.hook_resid_pre" for i in layers] + ["hook_resid_final"]
        return torch.stack([cache[n] for n in labels]), labels
    parts, labels = [cache["hook_embed"]], ["embed"]
    if "hook_pos_embed" in cache:  # rotary models have none
        parts.append(cache["hook_pos_embed"].expand_as(cache["hook_embed"]))
        labels.append("pos_embed")
    for i in layers:
        result = cache[f"blocks.{i}.attn.hook_result"]  # [B, T, H, D]
        for h in range(result.shape[2]):
            parts.append(result[:, :, h])
            labels.append(f"L{i}H{h}")
        bias = model.blocks[i].attn.out.bias
        if bias is not None:
            parts.append(bias.expand_as(result[:, :, 0]))
            labels.append(f"L{i} attn bias")
        if f"blocks.{i}.hook_mlp_out" in cache:
            parts.append(cache[f"blocks.{i}.hook_mlp_out"])
            labels.append(f"L{i} MLP")
    return torch.stack(parts), labels


def _final_norm(model: Transformer, stack: torch.Tensor, resid_final: torch.Tensor) -> torch.Tensor:
    """ln_final applied to each component linearly, with the scale of the real final stream frozen
    (TransformerLens's apply_ln_to_stack). Without a final norm: the stack itself."""
    norm = model.ln_final
    if isinstance(norm, torch.nn.Identity):
        return stack
    inner = norm.norm
    if isinstance(inner, torch.nn.LayerNorm):
        centred = stack - stack.mean(-1, keepdim=True)
        scale = (resid_final.var(-1, unbiased=False, keepdim=True) + inner.eps).sqrt()
    else:  # RMSNorm
        centred = stack
        eps = inner.eps if inner.eps is not None else torch.finfo(stack.dtype).eps
        scale = (resid_final.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    out = centred / scale
    return out * inner.weight if inner.weight is not None else out


@torch.no_grad()
def logit_lens(model, cache: dict) -> tuple[torch.Tensor, list[str]]:
    """Logits read off the residual stream before each block and at the end
    [components, batch, pos, vocab] (final norm, unembedding and any soft cap); the last entry is
    the model's own logits."""
    model = model_of(model)
    stack, labels = residual_stack(model, cache, accumulated=True)
    return model.head(stack), labels


@torch.no_grad()
def direct_logit_attribution(model, cache: dict, targets: torch.Tensor, position: int = -1
                             ) -> tuple[torch.Tensor, list[str]]:
    """How much each component of the residual stream (residual_stack(accumulated=False)) adds
    directly to the logit of `targets` [batch] at `position`: [components, batch]. With no final
    norm the components sum to the logit exactly; with one, its scale is frozen at the real
    stream's (and a LayerNorm's bias is left out), as in TransformerLens. A soft cap
    (--logit_softcap) is not linear, so these are contributions to the logit before the cap."""
    model = model_of(model)
    stack, labels = residual_stack(model, cache, accumulated=False)
    stack = stack[:, :, position]  # [C, B, D]
    normed = _final_norm(model, stack, cache["hook_resid_final"][:, position])
    directions = model.unembed.weight[targets]  # [B, D]
    return (normed * directions).sum(-1), labels
