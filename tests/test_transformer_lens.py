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
    model = Transformer(cfg, 20).double().eval()  # float64: the two implementations agree to rounding
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
    dict(norm="rmsnorm", positional="rope", rope_base=500.0),
    dict(norm="rmsnorm", positional="rope", qk_norm=True),
    dict(norm="layernorm", activation="relu2"),
    dict(norm="rmsnorm", activation="swiglu", bias=False),
    dict(norm="rmsnorm", num_kv_heads=2, positional="rope"),
    dict(norm="layernorm", num_kv_heads=1),
    dict(norm="layernorm", logit_softcap=0.5),
    dict(norm="rmsnorm", norm_weights=False, qk_norm=True),
    dict(norm="layernorm", norm_weights=False),
    dict(norm="rmsnorm", positional="rope", qk_norm=True, activation="swiglu", bias=False, num_kv_heads=2,
         logit_softcap=0.5, norm_weights=False, tie_embeddings=False),
], ids=["plain", "layernorm-gelu", "rmsnorm-nobias", "untied-attention-only", "rope", "rope-qk_norm", "relu2",
        "swiglu", "gqa-rope", "mqa", "softcap", "parameter-free-rms-qk_norm", "parameter-free-layernorm", "all"])
def test_same_logits_and_activations_under_the_same_hook_names(overrides):
    model = our_model(**overrides)
    tl = interp.to_transformer_lens(model)
    tl.set_use_attn_result(True)
    tokens = torch.randint(20, (4, 8))
    with torch.no_grad():
        ours_logits, ours = model.run_with_cache(tokens)
        tl_logits, theirs = tl.run_with_cache(tokens)
    assert torch.allclose(ours_logits, tl_logits, rtol=0, atol=1e-10)
    shared = [n for n in ours if n in theirs.cache_dict]
    assert {"hook_embed", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post",
            "blocks.0.attn.hook_result"} <= set(shared)
    if not overrides.get("attention_only"):
        assert "blocks.0.mlp.hook_post" in shared
    # Each piece's own hooks are among those compared.
    for flag, hook in (("positional", "blocks.1.attn.hook_rot_k"), ("qk_norm", "blocks.1.attn.q_norm.hook_normalized"),
                       ("activation", "blocks.1.mlp.hook_pre_linear" if overrides.get("activation") == "swiglu" else
                        "blocks.1.mlp.hook_pre")):
        if flag in overrides:
            assert hook in shared, hook
    for name in shared:
        a, b = ours[name], theirs[name]
        if name.endswith(("q_norm.hook_normalized", "k_norm.hook_normalized")):
            b = b.reshape(a.shape)  # TransformerLens flattens [batch, pos, head] for its QK-norm; we keep them
        finite = torch.isfinite(a)  # masked attention scores are -inf in both
        assert torch.equal(finite, torch.isfinite(b)), name
        assert torch.allclose(a[finite], b[finite], rtol=0, atol=1e-10), name


def test_an_attention_sink_has_no_counterpart():
    with pytest.raises(ValueError, match="attention sink"):
        interp.to_transformer_lens(our_model(attention_sink=True))


def test_biases_inside_a_swiglu_have_no_counterpart():
    with pytest.raises(ValueError, match="--bias false"):
        interp.to_transformer_lens(our_model(norm="rmsnorm", activation="swiglu", bias=True))
