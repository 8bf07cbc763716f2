"""to_transformer_lens: the same model, logits and activations in TransformerLens (an optional extra)."""

from __future__ import annotations

import pytest
import torch

import interp
from config import Config
from model import Transformer

transformer_lens = pytest.importorskip(
    "transformer_lens", reason="TransformerLens is an optional extra: pip install 'transformer_lens<4'")
if not hasattr(transformer_lens, "HookedTransformer"):  # version 4 dropped it for TransformerBridge
    pytest.skip("TransformerLens 4 has no HookedTransformer: pip install 'transformer_lens<4'", allow_module_level=True)


def our_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = Config(num_blocks=2, num_heads=4, embedding_dim=32, mlp_dim=48, context_len=8, **overrides).validate()
    model = Transformer(cfg, 20).eval()
    with torch.no_grad():  # biases and norm weights start at 0 and 1; make them count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [
    dict(norm="none", activation="relu"),
    dict(norm="layernorm", activation="gelu"),
    dict(norm="rmsnorm", activation="gelu", bias=False),
    dict(norm="layernorm", tie_embeddings=False, attention_only=True),
], ids=["plain", "layernorm-gelu", "rmsnorm-nobias", "untied-attention-only"])
def test_same_logits_and_activations_under_the_same_hook_names(overrides):
    model = our_model(**overrides)
    tl = interp.to_transformer_lens(model)
    tl.set_use_attn_result(True)
    tokens = torch.randint(20, (4, 8))
    with torch.no_grad():
        ours_logits, ours = model.run_with_cache(tokens)
        tl_logits, theirs = tl.run_with_cache(tokens)
    assert torch.allclose(ours_logits, tl_logits, atol=1e-5)
    shared = [n for n in ours if n in theirs.cache_dict]
    assert {"hook_embed", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post",
            "blocks.0.attn.hook_result"} <= set(shared)
    if not overrides.get("attention_only"):
        assert "blocks.0.mlp.hook_post" in shared
    for name in shared:
        a, b = ours[name], theirs[name]
        finite = torch.isfinite(a)  # masked attention scores are -inf in both
        assert torch.equal(finite, torch.isfinite(b)), name
        assert torch.allclose(a[finite], b[finite], atol=1e-5), name


def test_an_attention_sink_has_no_counterpart():
    with pytest.raises(ValueError, match="attention sink"):
        interp.to_transformer_lens(our_model(attention_sink=True))
