import pytest
import torch

from config import Config
from model import ModelWithLoss, Transformer

B, T, V = 3, 7, 19


def make(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = Config(**{"num_blocks": 2, "num_heads": 4, "embedding_dim": 32, "mlp_dim": 48,
                    "context_len": 8, **overrides})
    model = Transformer(cfg, V).eval()
    if cfg.attention_sink:  # the sink starts at 0; give it values that matter
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.sink, std=2.0)
    return model


def tokens():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def test_hook_names_and_shapes_match_transformerlens():
    model = make(norm="layernorm")
    D, H, Dh, M = 32, 4, 8, 48
    logits, cache = model.run_with_cache(tokens())
    assert logits.shape == (B, T, V)
    expected = {"hook_embed": (B, T, D), "hook_pos_embed": (B, T, D), "ln_final.hook_normalized": (B, T, D),
                "hook_resid_final": (B, T, D)}
    for i in range(2):
        b = f"blocks.{i}."
        expected.update({
            b + "hook_resid_pre": (B, T, D), b + "hook_attn_out": (B, T, D), b + "hook_resid_mid": (B, T, D),
            b + "hook_mlp_out": (B, T, D), b + "hook_resid_post": (B, T, D),
            b + "ln1.hook_normalized": (B, T, D), b + "ln2.hook_normalized": (B, T, D),
            b + "attn.hook_q": (B, T, H, Dh), b + "attn.hook_k": (B, T, H, Dh), b + "attn.hook_v": (B, T, H, Dh),
            b + "attn.hook_z": (B, T, H, Dh), b + "attn.hook_attn_scores": (B, H, T, T),
            b + "attn.hook_pattern": (B, H, T, T), b + "attn.hook_result": (B, T, H, D),
            b + "mlp.hook_pre": (B, T, M), b + "mlp.hook_post": (B, T, M),
        })
    assert set(model.hook_names) == set(expected) == set(cache)
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name


def test_cached_activations_are_consistent():
    model = make()
    logits, cache = model.run_with_cache(tokens())
    b = "blocks.0."
    pattern, scores = cache[b + "attn.hook_pattern"], cache[b + "attn.hook_attn_scores"]
    assert torch.allclose(pattern.sum(-1), torch.ones(B, 4, T), atol=1e-5)
    assert torch.isinf(scores[0, 0].triu(1)[scores[0, 0].triu(1) != 0]).all()  # causal mask, pre-softmax
    assert torch.allclose(pattern, scores.softmax(-1), atol=1e-6)
    assert torch.allclose(cache[b + "hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"], atol=1e-6)
    # The per-head results add up to the attention output.
    attn_out = cache[b + "attn.hook_result"].sum(2) + model.blocks[0].attn.out.bias
    assert torch.allclose(attn_out, cache[b + "hook_attn_out"], atol=1e-5)
    assert torch.allclose(cache[b + "hook_resid_mid"], cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"], atol=1e-6)
    assert torch.allclose(cache["blocks.1.hook_resid_post"], cache["hook_resid_final"])
    assert torch.allclose(model.unembed(cache["hook_resid_final"]), logits, atol=1e-5)  # no final norm here
    normed = make(norm="layernorm")
    ln = normed.ln_final.norm
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    logits, cache = normed.run_with_cache(tokens())
    # As in TransformerLens: hook_normalized is the stream normalised, before the norm's weight and bias.
    normalized = cache["ln_final.hook_normalized"]
    expected = torch.nn.functional.layer_norm(cache["hook_resid_final"], (normalized.shape[-1],), eps=ln.eps)
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert torch.allclose(normed.unembed(normalized * ln.weight + ln.bias), logits, atol=1e-5)
    assert torch.allclose(normed(tokens()), logits, atol=1e-5)  # the fused path, with no hooks attached


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("norm", ["none", "layernorm", "rmsnorm"])
def test_fast_and_explicit_attention_agree(sink, norm):
    model = make(attention_sink=sink, norm=norm)
    x = tokens()
    fast = model(x)
    # Any hook on the pattern sends every block down the explicit path.
    explicit = model.run_with_hooks(x, [(lambda name: name.endswith("hook_pattern"), lambda t, hook: None)])
    assert torch.allclose(fast, explicit, atol=1e-5)
    _, cache = model.run_with_cache(x, lambda name: name.endswith("hook_result"))
    if sink:  # attention may go to the sink, so pattern rows sum to less than one
        _, pattern_cache = model.run_with_cache(x, "blocks.0.attn.hook_pattern")
        assert (pattern_cache["blocks.0.attn.hook_pattern"].sum(-1) < 1 - 1e-3).any()


@pytest.mark.parametrize("sink", [False, True])
def test_the_four_attention_paths_compute_one_function(sink):
    """Fused, explicit, last-queries and cached attention share their mask and sink code; in float64
    they agree to rounding, on every position each of them computes."""
    model = make(attention_sink=sink, norm="layernorm").double()
    x = tokens()
    fused = model(x)
    explicit = model.run_with_hooks(x, [(lambda name: name.endswith("hook_attn_scores"), lambda t, hook: None)])
    last = model(x, last_positions=3)
    h, caches = model.embed(x) + model.pos_embed.weight[:T], [{} for _ in model.blocks]
    pieces = []
    for start, stop in ((0, 4), (4, 5), (5, 7)):
        piece = h[:, start:stop]
        for block, cache in zip(model.blocks, caches):
            piece = block(piece, cache=cache)
        pieces.append(piece)
    cached = model.unembed(model.ln_final(torch.cat(pieces, 1)))
    for other in (explicit, cached):
        torch.testing.assert_close(other, fused, rtol=0, atol=1e-12)
    torch.testing.assert_close(last, fused[:, -3:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sink", [False, True])
def test_last_positions_gives_the_same_logits(sink):
    model = make(attention_sink=sink)
    x = tokens()
    full = model(x)
    for n in (1, 3, T, T + 5):  # n >= T asks for every position
        assert torch.allclose(model(x, last_positions=n), full[:, -n:], atol=1e-5)


@pytest.mark.parametrize("sink", [False, True])
def test_blocks_with_a_key_value_cache_give_the_full_forward(sink):
    # Positions fed in pieces (a prompt, then one or two at a time), each attending to the cached keys
    # and values before it: the residual stream the whole sequence gives at once.
    model = make(attention_sink=sink, norm="layernorm")
    x = model.embed(tokens()) + model.pos_embed.weight[:T]
    full = x
    for block in model.blocks:
        full = block(full)
    caches, pieces = [{} for _ in model.blocks], []
    for start, stop in ((0, 3), (3, 4), (4, 6), (6, 7)):
        h = x[:, start:stop]
        for block, cache in zip(model.blocks, caches):
            h = block(h, cache=cache)
        pieces.append(h)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert caches[0]["k"].shape == (B, 4, T, 8)


def test_model_with_loss_is_the_summed_loss_and_count_over_supervised_targets():
    """What train.py's loop (and torch.compile) gets: loss and correct predictions, ignored targets out."""
    model = make()
    x = tokens()
    y = torch.randint(0, V, (B, 2), generator=torch.Generator().manual_seed(2))
    y[0, 1] = -100  # a position with no target
    loss_sum, correct = ModelWithLoss(model, 2, ignore_index=-100)(x, y)
    logits = model(x)[:, -2:]
    kept = y != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], y[kept], reduction="sum")
    assert torch.allclose(loss_sum, expected) and loss_sum.dtype == torch.float32
    assert correct.item() == (logits.argmax(-1)[kept] == y[kept]).sum().item()
    loss_sum.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["hook_attn_scores", "hook_pattern"])
def test_a_hook_may_return_a_broadcastable_attention_tensor(name):
    """Mean ablation over the batch returns [1, H, T, T]; every sequence then uses that pattern."""
    model = make(init_std=0.5)  # sharp attention, so that averaging it over the batch matters
    x = tokens()
    mean = lambda t, hook: t.mean(0, keepdim=True)  # noqa: E731
    ablated = model.run_with_hooks(x, [(f"blocks.0.attn.{name}", mean)])
    expanded = model.run_with_hooks(x, [(f"blocks.0.attn.{name}", lambda t, hook: mean(t, hook).expand_as(t))])
    assert torch.allclose(ablated, expanded, atol=1e-6)
    clean = model(x)
    assert (ablated - clean).abs().max() > 0.01 * clean.abs().max()  # the hook took effect


def test_sink_gradients_flow_on_the_fast_path():
    model = make(attention_sink=True).train()
    model(tokens()).sum().backward()
    assert all(block.attn.sink.grad is not None and block.attn.sink.grad.abs().sum() > 0 for block in model.blocks)


def test_hooks_edit_activations_and_are_removed_even_on_error():
    model = make()
    x = tokens()
    clean = model(x)
    zero = lambda tensor, hook: torch.zeros_like(tensor)
    ablated = model.run_with_hooks(x, [("blocks.1.hook_mlp_out", zero)])
    assert not torch.allclose(ablated, clean)
    seen = []
    with model.hooks([("blocks.0.hook_resid_pre", lambda t, hook: seen.append(hook.name))]):
        model(x)
    assert seen == ["blocks.0.hook_resid_pre"]
    with pytest.raises(RuntimeError):
        with model.hooks([("blocks.0.hook_attn_out", zero)]):
            raise RuntimeError("analysis code failed")
    assert model._hooks == {}
    assert torch.allclose(model(x), clean)


def test_zeroing_one_head_through_hook_z_matches_hook_result():
    model = make()
    x = tokens()

    def zero_head_z(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def zero_head_result(result, hook):
        result = result.clone()
        result[:, :, 2] = 0
        return result

    via_z = model.run_with_hooks(x, [("blocks.0.attn.hook_z", zero_head_z)])
    via_result = model.run_with_hooks(x, [("blocks.0.attn.hook_result", zero_head_result)])
    assert torch.allclose(via_z, via_result, atol=1e-5)


def test_names_filter_forms_and_unknown_names():
    model = make()
    x = tokens()
    assert set(model.run_with_cache(x, "blocks.0.hook_resid_post")[1]) == {"blocks.0.hook_resid_post"}
    two = ["hook_embed", "blocks.1.mlp.hook_post"]
    assert set(model.run_with_cache(x, two)[1]) == set(two)
    assert len(model.run_with_cache(x, lambda n: "attn.hook_q" in n)[1]) == 2
    with pytest.raises(KeyError, match="did you mean"):
        model.run_with_cache(x, "blocks.0.hook_resid_postt")


def test_attention_only_and_no_norm_hooks():
    model = make(attention_only=True)
    assert not any("mlp" in name or "resid_mid" in name or "ln" in name for name in model.hook_names)
    assert model(tokens()).shape == (B, T, V)


def test_tied_embeddings_share_storage():
    tied, untied = make(tie_embeddings=True), make(tie_embeddings=False)
    assert tied.unembed.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == V * 32


def test_generate_is_reproducible_with_a_generator():
    model = make()
    prompt = tokens()[:1, :3]
    runs = [model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert runs[0].shape == (1, 13) and torch.equal(runs[0], runs[1])
    greedy = model.generate(prompt, 10, temperature=0)  # longer than the context: it slides
    assert torch.equal(greedy[:, :3], prompt)


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    x = tokens()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_non_embedding_parameters_are_those_that_cost_flops():
    for tied in (True, False):
        model = make(tie_embeddings=tied)
        lookup = model.pos_embed.weight.numel() + (0 if tied else model.embed.weight.numel())
        assert model.num_params(exclude_embeddings=True) == model.num_params() - lookup
