"""to_transformer_lens: the same model, logits and activations in TransformerLens (an optional extra),
whichever major version is installed: 4 (TransformerBridge around its native model) in the main
environment, 3 (HookedTransformer) in a second virtualenv (test_transformer_lens_3.py runs this file there)."""

from __future__ import annotations

import os

import pytest
import torch

from interop import transformerlens
from config import Config, ConfigError
from model import Transformer

pytest.importorskip("transformer_lens", reason="TransformerLens is an optional extra: pip install transformer_lens")
VERSION = transformerlens.transformer_lens_version()
# Version 3 computes in the model's dtype: float64 agrees to rounding. Version 4's native model takes
# norms in float32 and its rotary tables are float32, whatever the model's dtype: bounds scaled to
# float32's rounding of the quantity.
TOLERANCE = 1e-10 if VERSION < 4 else 1e-5
MISSING_IN_4 = {"qk_norm": "QK-norm", "activation": "ReLU²"}  # what version 4's native model lacks


def our_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = Config(num_blocks=2, num_heads=4, embedding_dim=32, mlp_dim=48, context_len=8, **overrides).validate()
    model = Transformer(cfg, 20).double().eval()  # float64: the two implementations agree to rounding
    with torch.no_grad():  # biases and norm weights start at 0 and 1; make them count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


CONFIGURATIONS = {
    "plain": dict(norm="none", activation="relu"),
    "layernorm-gelu": dict(norm="layernorm", activation="gelu"),
    "rmsnorm-nobias": dict(norm="rmsnorm", activation="gelu", bias=False),
    "untied-attention-only": dict(norm="layernorm", tie_embeddings=False, attention_only=True),
    "rope": dict(norm="rmsnorm", positional="rope", rope_base=500.0),
    "rope-qk_norm": dict(norm="rmsnorm", positional="rope", qk_norm=True),
    "relu2": dict(norm="layernorm", activation="relu2"),
    "swiglu": dict(norm="rmsnorm", activation="swiglu", bias=False),
    "gqa-rope": dict(norm="rmsnorm", num_kv_heads=2, positional="rope"),
    "mqa": dict(norm="layernorm", num_kv_heads=1),
    "softcap": dict(norm="layernorm", logit_softcap=0.5),
    "parameter-free-rms-qk_norm": dict(norm="rmsnorm", norm_weights=False, qk_norm=True),
    "parameter-free-layernorm": dict(norm="layernorm", norm_weights=False),
    "all": dict(norm="rmsnorm", positional="rope", qk_norm=True, activation="swiglu", bias=False, num_kv_heads=2,
                logit_softcap=0.5, norm_weights=False, tie_embeddings=False),
}


def lacking_in_4(overrides: dict) -> list[str]:
    """The pieces of a configuration that version 4's native model does not have."""
    return [what for flag, what in MISSING_IN_4.items()
            if overrides.get(flag) and (flag != "activation" or overrides[flag] == "relu2")]


# Every configuration the installed version can hold is compared; those version 4 cannot are compared
# under version 3 (tests/test_transformer_lens_3.py runs this file there) and refused here.
COMPARED = [name for name, overrides in CONFIGURATIONS.items() if VERSION < 4 or not lacking_in_4(overrides)]
BEYOND_4 = [name for name, overrides in CONFIGURATIONS.items() if lacking_in_4(overrides)]


@pytest.mark.parametrize("name", BEYOND_4)
def test_what_version_4_lacks_is_refused_by_name_there_and_converted_by_3(name):
    model = our_model(**CONFIGURATIONS[name])
    if VERSION >= 4:
        with pytest.raises(ValueError, match=lacking_in_4(CONFIGURATIONS[name])[0]):
            transformerlens.to_transformer_lens(model)
    else:
        assert name in COMPARED and transformerlens.to_transformer_lens(model) is not None


@pytest.mark.parametrize("name", COMPARED)
def test_same_logits_and_activations_under_the_same_hook_names(name):
    overrides = CONFIGURATIONS[name]
    model = our_model(**overrides)
    tl = transformerlens.to_transformer_lens(model)
    if VERSION < 4:
        tl.set_use_attn_result(True)  # version 4's native attention has no per-head results
    tokens = torch.randint(20, (4, 8))
    with torch.no_grad():
        ours_logits, ours = model.run_with_cache(tokens)
        tl_logits, theirs = tl.run_with_cache(tokens)
    scale = max(1.0, ours_logits.abs().max().item())
    assert torch.allclose(ours_logits, tl_logits, rtol=0, atol=TOLERANCE * scale)
    theirs = dict(theirs.cache_dict if VERSION < 4 else theirs.items())
    shared = [n for n in ours if n in theirs]
    assert {"hook_embed", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post",
            "blocks.0.attn.hook_q", "blocks.1.mlp.hook_out" if VERSION >= 4 else "blocks.0.attn.hook_result"
            } - {"blocks.1.mlp.hook_out"} <= set(shared)
    if not overrides.get("attention_only"):
        assert "blocks.0.mlp.hook_post" in shared
    # Each piece's own hooks are among those compared.
    for flag, hook in (("positional", "blocks.1.attn.hook_rot_k" if VERSION < 4 else "blocks.1.attn.hook_k"),
                       ("qk_norm", "blocks.1.attn.q_norm.hook_normalized"),
                       ("activation", "blocks.1.mlp.hook_pre_linear" if overrides.get("activation") == "swiglu" else
                        "blocks.1.mlp.hook_pre")):
        if flag in overrides:
            assert hook in shared, hook
    rotary = overrides.get("positional") == "rope"
    for name in shared:
        a, b = ours[name], theirs[name]
        if name.endswith(("q_norm.hook_normalized", "k_norm.hook_normalized")):
            b = b.reshape(a.shape)  # TransformerLens flattens [batch, pos, head] for its QK-norm; we keep them
        if VERSION >= 4 and rotary and name.endswith(("attn.hook_q", "attn.hook_k")):
            a = a[..., transformerlens.rotary_order(a.shape[-1])]  # its rotation's pairs side by side
        if VERSION >= 4 and name.endswith("hook_attn_scores"):
            # Version 4.3's native attention fires hook_attn_scores with the softmaxed pattern: what
            # it holds is hook_pattern (checked), so there are no scores of its to compare with ours.
            assert torch.equal(b, theirs[name.replace("hook_attn_scores", "hook_pattern")]), name
            continue
        finite = torch.isfinite(a)  # masked attention scores are -inf in both
        assert torch.equal(finite, torch.isfinite(b)), name
        scale = max(1.0, a[finite].abs().max().item())
        assert torch.allclose(a[finite], b[finite], rtol=0, atol=TOLERANCE * scale), name


def test_an_attention_sink_has_no_counterpart():
    with pytest.raises(ValueError, match="attention sink"):
        transformerlens.to_transformer_lens(our_model(attention_sink=True))


def test_biases_inside_a_swiglu_have_no_counterpart():
    with pytest.raises(ValueError, match="--bias false"):
        transformerlens.to_transformer_lens(our_model(norm="rmsnorm", activation="swiglu", bias=True))


@pytest.mark.slow
def test_export_writes_what_transformer_lens_opens_with_our_logits_and_hooks(tmp_path):
    import json

    import export
    import train
    from analysis.runs import load_run

    # a grokking-shaped run with the rotary, RMSNorm, SwiGLU and grouped-query pieces both versions have
    train.main(["--modulus", "11", "--max_steps", "2", "--eval_every", "2", "--save_model_dir", str(tmp_path),
                "--run_name", "add11", "--norm", "rmsnorm", "--positional", "rope", "--activation", "swiglu",
                "--bias", "false", "--num_kv_heads", "2"])
    out = export.main([str(tmp_path / "add11"), "--to", "transformer_lens", str(tmp_path / "tl")])
    record = json.load(open(os.path.join(out, transformerlens.TL_FILE)))
    assert record["transformer_lens"] == VERSION and record["settings"]["n_key_value_heads"] == 2
    assert set(os.listdir(out)) == {transformerlens.TL_FILE, "model.safetensors"}
    tl = transformerlens.load_transformer_lens(out)
    run = load_run(str(tmp_path / "add11"), "cpu")
    tokens = run.data.val_x[:32].cpu()
    with torch.no_grad():
        ours_logits, ours = run.model.run_with_cache(tokens)
        tl_logits, theirs = tl.run_with_cache(tokens)
    scale = ours_logits.abs().max().item()
    assert (ours_logits - tl_logits).abs().max().item() <= 1e-5 * max(1.0, scale)
    for name in ("blocks.0.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_pattern"):
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5 * max(1.0, ours[name].abs().max().item()), name
    with pytest.raises(ConfigError, match="--out: .* exists and is not an empty folder"):
        export.main([str(tmp_path / "add11"), "--to", "transformer_lens", out])
