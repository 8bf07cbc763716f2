"""The 2026 small-LM pieces: rotary positions, QK-norm, ReLU² and SwiGLU, grouped-query attention,
soft-capped logits, parameter-free norms, zero-started outputs. Each is checked against what it
claims to compute, on every attention path, and old checkpoints still load and train as before."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile

import pytest
import torch
import torch.nn.functional as F

from config import Config, ConfigError, config_from_dict, parse_config
from conftest import ROOT
from model import Transformer, rotary_tables, rotate

B, T, V = 3, 9, 23

PIECES = {
    "rope": dict(positional="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "swiglu": dict(activation="swiglu"),
    "gqa": dict(num_kv_heads=2),
    "mqa-sink": dict(num_kv_heads=1, attention_sink=True),
    "softcap": dict(logit_softcap=3.0),
    "parameter-free": dict(norm_weights=False, qk_norm=True),
    "all": dict(positional="rope", qk_norm=True, activation="swiglu", num_kv_heads=2, logit_softcap=5.0,
                attention_sink=True, tie_embeddings=False),
}


def make(dtype=torch.float64, **overrides) -> Transformer:
    """A small model with every parameter moved off its initial value (zeros, ones), in float64:
    the paths below must agree to rounding, whatever the weights."""
    torch.manual_seed(0)
    cfg = Config(**{"num_blocks": 2, "num_heads": 4, "embedding_dim": 32, "mlp_dim": 40, "context_len": 12,
                    "norm": "rmsnorm", **overrides}).validate()
    model = Transformer(cfg, V).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(n=T):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("piece", PIECES)
def test_every_attention_path_computes_the_same_logits(piece):
    model = make(**PIECES[piece])
    x = tokens()
    fused = model(x)
    explicit = model.run_with_hooks(x, [(lambda name: name.endswith("hook_pattern"), lambda t, hook: None)])
    last = model(x, last_positions=2)
    caches = [{} for _ in model.blocks]
    cached = torch.cat([model.forward_cached(x[:, a:b], caches) for a, b in ((0, 4), (4, 5), (5, T))], 1)
    for other in (explicit, cached):
        torch.testing.assert_close(other, fused, rtol=0, atol=1e-12)
    torch.testing.assert_close(last, fused[:, -2:], rtol=0, atol=1e-12)
    assert caches[0]["k"].shape == (B, model.cfg.num_kv_heads or 4, T, 8)  # keys cached once per kv head


def test_hooks_of_the_new_pieces_have_transformer_lens_shapes():
    model = make(**PIECES["all"])
    _, cache = model.run_with_cache(tokens())
    H, Hkv, Dh, M = 4, 2, 8, 40
    b = "blocks.1.attn."
    assert "hook_pos_embed" not in model.hook_names  # rotary: no position table
    shapes = {b + "hook_q": (B, T, H, Dh), b + "hook_k": (B, T, Hkv, Dh), b + "hook_v": (B, T, Hkv, Dh),
              b + "q_norm.hook_normalized": (B, T, H, Dh), b + "k_norm.hook_normalized": (B, T, Hkv, Dh),
              b + "hook_rot_q": (B, T, H, Dh), b + "hook_rot_k": (B, T, Hkv, Dh), b + "hook_z": (B, T, H, Dh),
              b + "hook_pattern": (B, H, T, T), "blocks.1.mlp.hook_pre_linear": (B, T, M)}
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    assert set(cache) == set(model.hook_names)


def test_rotary_positions_rotate_each_pair_by_position_times_frequency():
    # Reference: pair i of a head is the complex number x[i] + 1j * x[i + Dh/2] (the two halves,
    # as Llama and GPT-NeoX lay them out), multiplied by exp(1j * position * base^(-2i/Dh)).
    Dh, positions, base = 16, 11, 500.0
    x = torch.randn(2, positions, 3, Dh, dtype=torch.float64)
    cos, sin = rotary_tables(Dh, positions, base)
    rotated = rotate(x, cos.double(), sin.double())
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, Dh, 2) / Dh)
    z = torch.complex(x[..., :Dh // 2], x[..., Dh // 2:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    torch.testing.assert_close(rotated, torch.cat([z.real, z.imag], -1), rtol=0, atol=1e-6)  # float32 tables
    # Scores depend only on the distance between query and key: shifting both changes nothing.
    q, k = torch.randn(Dh, dtype=torch.float64), torch.randn(Dh, dtype=torch.float64)

    def score(m, n):
        at = lambda v, p: rotate(v.view(1, 1, 1, Dh), cos[p:p + 1].double(), sin[p:p + 1].double()).flatten()
        return (at(q, m) @ at(k, n)).item()

    assert score(7, 3) == pytest.approx(score(5, 1), abs=1e-5) and score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_a_rotary_model_depends_on_order_without_a_position_table():
    model = make(positional="rope", num_blocks=1)
    assert model.pos_embed is None and "pos_embed.weight" not in model.state_dict()
    x = tokens()
    swapped = x.clone()
    swapped[:, [0, 1]] = x[:, [1, 0]]
    assert not torch.allclose(model(x)[:, -1], model(swapped)[:, -1])


def test_grouped_query_attention_is_multi_head_attention_with_shared_keys_and_values():
    # Key/value head j serves query heads 2j and 2j+1 (TransformerLens's and Hugging Face's grouping):
    # a multi-head model whose key and value rows are those heads' copies gives the same logits.
    gqa = make(num_kv_heads=2, positional="rope", qk_norm=True)
    mha = make(positional="rope", qk_norm=True)
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([32, 16, 16])
        repeat = lambda m: m.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, repeat(k), repeat(v)])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([
            b.view(-1, 8).repeat_interleave(r, 0).flatten()
            for b, r in zip(state[f"blocks.{i}.attn.qkv.bias"].split([32, 16, 16]), (1, 2, 2))])
    mha.load_state_dict(state)
    torch.testing.assert_close(mha(tokens()), gqa(tokens()), rtol=0, atol=1e-12)
    assert gqa.num_params() < mha.num_params()


def test_mlp_activations_compute_what_they_are_named():
    for activation, post in (("relu2", lambda c: F.relu(c["pre"]) ** 2),
                             ("swiglu", lambda c: F.silu(c["pre"]) * c["pre_linear"])):
        model = make(activation=activation)
        _, cache = model.run_with_cache(tokens())
        acts = {k: cache[f"blocks.0.mlp.hook_{k}"] for k in ("pre", "post", "pre_linear") if f"blocks.0.mlp.hook_{k}" in cache}
        torch.testing.assert_close(acts["post"], post(acts), rtol=0, atol=1e-12)
    assert make(activation="swiglu", mlp_dim=0).blocks[0].mlp.fc_gate.out_features == 96  # 8/3 x 32, to 32s


def test_qk_norm_and_parameter_free_norms():
    weighted = make(qk_norm=True)
    _, cache = weighted.run_with_cache(tokens())
    rms = cache["blocks.0.attn.k_norm.hook_normalized"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-6)
    assert weighted.state_dict()["blocks.0.attn.q_norm.norm.weight"].shape == (8,)  # Qwen3's: one per head dim
    bare = make(qk_norm=True, norm_weights=False)
    assert not [n for n in bare.state_dict() if "norm" in n]  # no norm has a parameter
    assert bare.num_params() == weighted.num_params() - 2 * (2 * 8 + 2 * 32) - 32


def test_soft_capped_logits_are_the_cap_times_tanh_of_the_uncapped():
    capped = make(logit_softcap=2.0)
    plain = make()
    plain.load_state_dict(capped.state_dict())
    x = tokens()
    torch.testing.assert_close(capped(x), 2.0 * torch.tanh(plain(x) / 2.0), rtol=0, atol=1e-12)
    assert capped(x).abs().max() < 2.0 < plain(x).abs().max()


def test_zero_initialised_outputs_start_every_block_as_the_identity():
    torch.manual_seed(0)
    model = Transformer(Config(num_blocks=2, context_len=8, tie_embeddings=False, zero_init_outputs=True).validate(), V)
    for name, p in model.named_parameters():
        if name.endswith(("attn.out.weight", "mlp.fc_out.weight", "unembed.weight")):
            assert not p.any(), name
    x = tokens(8)
    _, cache = model.run_with_cache(x)
    torch.testing.assert_close(cache["hook_resid_final"], cache["blocks.0.hook_resid_pre"])
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    assert loss.item() == pytest.approx(math.log(V), abs=1e-6)  # uniform logits
    tied = Transformer(Config(zero_init_outputs=True).validate(), V)  # a tied unembedding is the embedding
    assert tied.unembed.weight.std() > 0


@pytest.mark.slow
def test_the_fast_path_traces_whole_for_torch_compile():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward without
    # generating code, so this says "compiles" in seconds on any machine.
    model = make(dtype=torch.float32, **PIECES["all"]).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = tokens()
    loss = compiled(x).logsumexp(-1).mean()
    loss.backward()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("argv, fragment", [
    (["--num_heads", "4", "--num_kv_heads", "3"], "--num_kv_heads: 3 does not divide num_heads 4"),
    (["--embedding_dim", "20", "--num_heads", "4", "--positional", "rope"], "--positional: rope rotates pairs"),
    (["--positional", "alibi"], "--positional: 'alibi' is not one of learned, rope"),
    (["--activation", "geglu"], "--activation: 'geglu' is not one of"),
    (["--logit_softcap", "-1"], "--logit_softcap"),
    (["--rope_base", "1"], "--rope_base"),
])
def test_bad_architecture_flags_name_the_flag(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- checkpoints from before these pieces

# The last commit before these pieces. Its code, checked out from the history, writes the
# checkpoints today's code must load; a clone without that history skips these tests.
BEFORE = "bf8742deb52a5babceec126691df455aee81b00c"
# Runs in the old checkout: its modules by their old names (there was no plumbing/ then).
OLD_LOGITS = """
import json, sys, torch
from checkpoints import load_checkpoint
from config import config_from_dict
from model import Transformer
saved = load_checkpoint(sys.argv[1])
model = Transformer(config_from_dict(saved["config"], {}), saved["model"]["embed.weight"].shape[0]).eval()
model.load_state_dict(saved["model"])
tokens = torch.arange(16).view(2, 8) % model.vocab_size
print(json.dumps(model(tokens).double().tolist()))
"""


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE], capture_output=True)
    if archive.returncode:
        pytest.skip(f"needs the git history of commit {BEFORE[:7]} (a shallow clone has none)")
    root = tmp_path_factory.mktemp("before")
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.11.4+ has extraction filters
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(root, **safe)
    return root


def run_old(old_code, *args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=old_code, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_a_checkpoint_from_before_the_new_pieces_gives_the_same_logits(old_code, tmp_path):
    # A text model of the old code (layernorm, a sink, untied embeddings, no biases, GELU): its
    # weights load into today's model under the same names (strictly) and give the logits they gave.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 50)
    run_old(old_code, "train.py", "--task", "text", "--data_path", str(corpus), "--num_blocks", "2",
            "--embedding_dim", "16", "--num_heads", "2", "--mlp_dim", "32", "--context_len", "8", "--norm", "layernorm",
            "--activation", "gelu", "--attention_sink", "--tie_embeddings", "false", "--bias", "false",
            "--batch_size", "4", "--max_steps", "3", "--eval_every", "3", "--save_model_dir", str(tmp_path), "--run", "old")
    checkpoint = str(tmp_path / "old" / "last.pt")
    expected = torch.tensor(json.loads(run_old(old_code, "-c", OLD_LOGITS, checkpoint)), dtype=torch.float64)
    saved = torch.load(checkpoint, weights_only=True)
    cfg = config_from_dict(saved["config"], {})
    assert (cfg.positional, cfg.num_kv_heads, cfg.qk_norm, cfg.activation) == ("learned", 0, False, "gelu")
    model = Transformer(cfg, saved["model"]["embed.weight"].shape[0]).eval()
    model.load_state_dict(saved["model"])  # strict: no key missing or left over
    with torch.no_grad():
        logits = model(torch.arange(16).view(2, 8) % model.vocab_size)
    assert torch.equal(logits.double(), expected)  # bit for bit (the old code printed float32 logits as float64)


@pytest.mark.slow
def test_a_run_from_before_the_new_pieces_resumes_as_it_did(old_code, tmp_path):
    # A grokking run of the old code stopped at step 3, resumed to step 6 by the old code and by
    # today's: the same losses.
    import train

    common = ["--modulus", "7", "--embedding_dim", "16", "--num_heads", "2", "--mlp_dim", "32", "--eval_every", "3",
              "--save_model_dir", str(tmp_path)]
    run_old(old_code, "train.py", *common, "--max_steps", "3", "--run", "first")
    checkpoint = str(tmp_path / "first" / "last.pt")
    run_old(old_code, "train.py", *common, "--max_steps", "6", "--run", "old", "--resume", checkpoint)
    train.main(common + ["--max_steps", "6", "--run", "new", "--resume", checkpoint])
    old, new = ([json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")][-1] for run in ("old", "new"))
    assert old["step"] == new["step"] == 6
    for key in ("train_loss", "val_loss", "grad_norm"):
        assert new[key] == old[key], key  # bit for bit
