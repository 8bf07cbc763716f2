"""interp.py on tiny models whose answers we know."""

from __future__ import annotations

import math

import pytest
import torch

import fourier
import interp
import train
from config import Config
from conftest import run_bad_input, tiny_args
from model import Transformer
from plumbing.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    train.main(tiny_args(root, "--run", "t", "--max_steps", "30"))
    return root / "runs" / "t"


def test_load_run_gives_the_trained_model_in_eval_mode(tiny_run):
    run = interp.load_run(str(tiny_run))
    assert not run.model.training and run.checkpoint_path.endswith("best.pt")
    assert run.cfg.modulus == 17 and run.data.vocab_size == 18
    saved = torch.load(tiny_run / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(run.model.state_dict()[k], saved[k]) for k in saved)
    last = interp.load_run(str(tiny_run / "last.pt"))
    assert last.step == 30 and interp.load_run(str(tiny_run), prefer="last").step == 30
    with pytest.raises(CheckpointError, match="holds no last.pt or best.pt"):
        interp.load_run(str(tiny_run.parent))


def small_model(norm: str) -> Transformer:
    torch.manual_seed(0)
    cfg = Config(num_blocks=2, num_heads=2, embedding_dim=16, mlp_dim=32, context_len=6, norm=norm).validate()
    return Transformer(cfg, 11).eval()


@pytest.mark.parametrize("norm", ["none", "layernorm", "rmsnorm"])
def test_residual_decomposition_logit_lens_and_direct_logit_attribution_add_up(norm):
    model = small_model(norm)
    tokens = torch.randint(11, (5, 6))
    targets = torch.randint(11, (5,))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    parts, labels = interp.residual_stack(model, cache, accumulated=False)
    assert labels[:4] == ["embed", "pos_embed", "L0H0", "L0H1"] and labels[-1] == "L1 MLP"
    assert torch.allclose(parts.sum(0), cache["hook_resid_final"], atol=1e-5)

    lens, names = interp.logit_lens(model, cache)
    assert names[-1] == "hook_resid_final" and torch.allclose(lens[-1], logits, atol=1e-5)

    attribution, _ = interp.direct_logit_attribution(model, cache, targets)
    target_logits = logits[:, -1].gather(1, targets[:, None])[:, 0]
    if norm == "layernorm":  # the final LayerNorm's bias is no component's doing
        target_logits = target_logits - model.unembed.weight[targets] @ model.ln_final.norm.bias
    assert torch.allclose(attribution.sum(0), target_logits, atol=1e-4)


def test_ablating_a_silent_component_changes_nothing_and_the_ranking_is_by_loss():
    model = small_model("none")
    with torch.no_grad():
        model.blocks[0].attn.out.weight[:, 8:] = 0  # head 1 of block 0 writes nothing
        model.blocks[1].mlp.fc_out.weight.zero_()  # nor does block 1's MLP
    tokens = torch.randint(11, (64, 6))
    targets = torch.randint(11, (64, 6))
    clean, results = interp.ablation_sweep(model, tokens, targets, kind="zero")
    by_name = {r.component: r for r in results}
    assert set(by_name) == {"L0H0", "L0H1", "L0 MLP", "L1H0", "L1H1", "L1 MLP"}
    assert by_name["L0H1"].loss_change == pytest.approx(0, abs=1e-6)
    assert by_name["L1 MLP"].loss_change == pytest.approx(0, abs=1e-6)  # its biases start at zero
    assert by_name["L0H0"].loss != clean[0]
    assert [r.loss_change for r in results] == sorted((r.loss_change for r in results), reverse=True)
    _, with_neurons = interp.ablation_sweep(model, tokens, targets, kind="mean", neurons=True)
    assert sum(r.component.startswith("L1 N") for r in with_neurons) == 32
    assert all(r.loss_change == pytest.approx(0, abs=1e-6) for r in with_neurons if r.component.startswith("L1 N"))


def test_fourier_basis_is_orthonormal_and_finds_planted_frequencies():
    p = 23
    basis, labels = interp.fourier_basis(p)
    assert torch.allclose(basis @ basis.T, torch.eye(p), atol=1e-5)
    assert labels[:3] == ["const", "cos 1", "sin 1"] and len(labels) == p

    model = Transformer(Config(modulus=p, embedding_dim=8, mlp_dim=16, num_heads=2).validate(), p + 1)
    x = torch.arange(p).float()
    planted = torch.zeros(p, 8)
    planted[:, 0], planted[:, 1] = torch.cos(2 * math.pi * 4 * x / p), torch.sin(2 * math.pi * 4 * x / p)
    planted[:, 2] = 0.8 * torch.cos(2 * math.pi * 9 * x / p)
    planted += 0.01 * torch.randn(p, 8)
    with torch.no_grad():
        model.embed.weight[:p] = planted
    assert interp.key_frequencies(interp.embedding_frequency_norms(model, p)) == [4, 9]


def test_even_modulus_basis_and_norms_account_for_every_direction():
    p = 12  # the last frequency (6) has a cosine and no sine
    basis, labels = interp.fourier_basis(p)
    assert torch.allclose(basis @ basis.T, torch.eye(p), atol=1e-5) and labels[-1] == "cos 6"
    table = torch.randn(p, 5)
    norms = interp.frequency_norms(table)
    constant = (basis[0] @ table).norm()
    assert len(norms) == 6 and torch.allclose(norms.pow(2).sum() + constant ** 2, table.pow(2).sum(), atol=1e-4)
    # Over the p² pairs, the directions of a + b are orthonormal but for sin 6, which is 0 at every
    # pair (sin(π(a+b))): a function of a + b alone has all its energy in the constant and the norms.
    directions = interp.sum_directions(p, list(range(1, 7)))
    assert torch.equal(directions[-1], torch.zeros(p * p))
    kept = directions[:-1]
    assert torch.allclose(kept @ kept.T, torch.eye(len(kept)), atol=1e-5)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    logits = torch.randn(p, 3)[(a + b).flatten() % p]  # [p², 3]: any function of (a + b) mod p
    constant = (directions[0] @ logits).norm()
    norms = interp.logit_frequency_norms(logits, p)
    assert torch.allclose(norms.pow(2).sum() + constant ** 2, logits.pow(2).sum(), rtol=1e-5)


def test_restriction_keeps_what_the_key_frequencies_carry_and_exclusion_removes_it():
    p, k = 13, 3
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    s = (a + b).flatten()[:, None].float()
    c = torch.arange(p)[None].float()
    logits = 5 * torch.cos(2 * math.pi * k * (s - c) / p) + 2.0  # the grokking algorithm, one frequency
    restricted, excluded = interp.restrict_to_frequencies(logits, p, [k])
    assert torch.allclose(restricted, logits, atol=1e-4)
    assert torch.allclose(excluded, torch.full_like(logits, 2.0), atol=1e-4)
    other, _ = interp.restrict_to_frequencies(logits, p, [5])
    assert torch.allclose(other, torch.full_like(logits, 2.0), atol=1e-4)
    norms = interp.logit_frequency_norms(logits, p)
    assert norms.argmax().item() == k - 1 and norms[k - 1] > 1 and (norms[torch.arange(len(norms)) != k - 1] < 1e-3).all()
    assert interp.key_frequencies(norms) == [k]


@pytest.mark.slow
def test_report_writes_plots_and_numbers(tiny_run, tmp_path):
    path = interp.main([str(tiny_run), "--out", str(tmp_path / "report")])
    text = open(path).read()
    names = set(p.name for p in (tmp_path / "report").iterdir())
    assert {"report.md", "attention_L0.png", "ablation.png", "fourier_embedding.png", "patching_residual.png"} <= names
    assert "| L0 MLP |" in text and "restricted to the key frequencies" in text and "| answer |" in text
    for name in names - {"report.md"}:
        assert f"({name})" in text  # every plot is linked from the report


@pytest.mark.slow
def test_report_on_a_dyck_run_has_what_applies(tmp_path):
    train.main(["--preset", "dyck", "--save_model_dir", str(tmp_path), "--run", "d", "--max_steps", "10",
                "--eval_every", "10", "--num_blocks", "2", "--embedding_dim", "32", "--mlp_dim", "64",
                "--dyck_num_train", "200", "--dyck_num_val", "100", "--batch_size", "32"])
    text = open(interp.main([str(tmp_path / "d")])).read()
    names = set(p.name for p in (tmp_path / "d" / "interp").iterdir())
    assert {"attention_L0.png", "attention_L1.png", "residual_norms.png", "ablation.png"} <= names
    assert "| L1 MLP |" in text and "Fourier" not in text and "fourier_embedding.png" not in names


@pytest.mark.slow
def test_report_on_a_missing_run_fails_cleanly(tmp_path):
    """As a user meets it: `python interp.py MISSING` exits 2 with one 'error: ' line and writes nothing
    (no report folder, nothing in the working folder or the token cache)."""
    run_bad_input("interp.py", [str(tmp_path / "nope")], tmp_path)


def test_patching_the_changed_position_at_the_input_recovers_everything(tiny_run):
    run = interp.load_run(str(tiny_run))
    clean = run.data.val_x[:64]
    corrupted, position = interp.corrupt(run, clean)
    assert position == 0 and (corrupted[:, 0] != clean[:, 0]).all() and (corrupted[:, 1:] == clean[:, 1:]).all()
    p = run.cfg.modulus
    right, wrong = run.data.val_y[:64, 0], (corrupted[:, 0] + corrupted[:, 1]) % p
    recovery, names = interp.patch_residual(run.model, clean, corrupted, right, wrong)
    assert names == ["blocks.0.hook_resid_pre", "hook_resid_final"] and recovery.shape == (2, 3)
    # Before block 0 the stream at a position is that token's embedding: only position 0 differs.
    assert recovery[0].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    # At the end only the last position is read out.
    assert recovery[1].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)
    heads = interp.patch_heads(run.model, clean, corrupted, right, wrong)
    assert heads.shape == (1, run.cfg.num_heads) and torch.isfinite(heads).all()


def test_a_probe_reads_a_planted_label_and_not_a_random_one():
    torch.manual_seed(0)
    labels = torch.randint(5, (600,))
    directions = torch.randn(5, 32)
    features = directions[labels] + 0.3 * torch.randn(600, 32)
    probe = interp.train_probe(features, labels)
    assert probe.heldout_accuracy > 0.95
    # The weights were folded back: they apply to the raw features.
    assert ((features @ probe.weight.T + probe.bias).argmax(-1) == labels).float().mean() > 0.95
    chance = interp.train_probe(torch.randn(600, 32), labels)
    assert chance.heldout_accuracy < 0.4


def test_probes_by_layer_on_a_trained_model(tiny_run):
    run = interp.load_run(str(tiny_run))
    tokens = run.data.tokens  # all 17 x 17 pairs
    probes = interp.probe_residual(run.model, tokens, tokens[:, 0], position=0, num_classes=17)
    assert set(probes) == {"blocks.0.hook_resid_pre", "hook_resid_final"}
    assert probes["blocks.0.hook_resid_pre"].heldout_accuracy == 1.0  # `a` is its own token there


def test_path_patching_through_every_path_recovers_what_patching_the_head_does(tiny_run):
    # Patching effects are ratios of logit differences: in float32 their last digits depend on the
    # CPU's kernels. The identities below are exact, so they are checked in float64.
    run = interp.load_run(str(tiny_run))
    run.model.double()
    clean = run.data.val_x[:64]
    corrupted, _ = interp.corrupt(run, clean)
    p = run.cfg.modulus
    right, wrong = run.data.val_y[:64, 0], (corrupted[:, 0] + corrupted[:, 1]) % p
    heads = interp.patch_heads(run.model, clean, corrupted, right, wrong)
    for head in range(run.cfg.num_heads):
        # One block: a head reaches the logits directly and through the MLP after it, nothing else.
        both = interp.path_patch(run.model, clean, corrupted, right, wrong, (0, head),
                                 [("hook_resid_final", None), ("blocks.0.mlp.hook_pre", None)])
        assert both.item() == pytest.approx(heads[0, head].item(), abs=1e-9)
        direct = interp.path_patch(run.model, clean, corrupted, right, wrong, (0, head), [("hook_resid_final", None)])
        via_mlp = interp.path_patch(run.model, clean, corrupted, right, wrong, (0, head),
                                    [("blocks.0.mlp.hook_pre", None)])
        # With no final norm the logits are linear in the final residual, so the two paths add up.
        assert (direct + via_mlp).item() == pytest.approx(both.item(), abs=1e-9)
        assert abs(via_mlp.item()) > 1e-3  # and the MLP path is really there


def test_path_patching_into_one_receiver_head_of_a_later_block():
    model = small_model("none").double()  # float64, as above: in float32 the two differed by 3e-4 on some CPUs
    torch.manual_seed(1)
    clean = torch.randint(11, (32, 6))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 1) % 11
    right, wrong = clean[:, -1], (clean[:, -1] + 1) % 11
    receivers = [(f"blocks.1.attn.hook_{x}", h) for x in "qkv" for h in range(2)] + \
        [("blocks.1.mlp.hook_pre", None), ("blocks.0.mlp.hook_pre", None), ("hook_resid_final", None)]
    everything = interp.path_patch(model, clean, corrupted, right, wrong, (0, 1), receivers)
    heads = interp.patch_heads(model, clean, corrupted, right, wrong)
    # Every input the sender's output can reach, together, carry all of its effect.
    assert everything.item() == pytest.approx(heads[0, 1].item(), abs=1e-9)
    only_query = interp.path_patch(model, clean, corrupted, right, wrong, (0, 1), [("blocks.1.attn.hook_q", 0)])
    assert torch.isfinite(only_query) and only_query.item() != pytest.approx(everything.item(), abs=1e-4)


def test_neurons_are_clustered_by_the_frequency_they_compute_with():
    p = 23
    a, b = torch.meshgrid(torch.arange(p).float(), torch.arange(p).float(), indexing="ij")
    w = lambda k: 2 * math.pi * k / p  # noqa: E731
    torch.manual_seed(0)
    grid = torch.stack([
        torch.cos(w(3) * a) * torch.cos(w(3) * b) + torch.sin(w(3) * a) + 2.0,  # frequency 3, and a mean
        torch.cos(w(5) * (a + b)),  # frequency 5
        torch.randn(p, p),  # no frequency
    ], dim=-1)
    neurons = interp.neuron_frequencies(grid)
    assert neurons.frequency[:2].tolist() == [3, 5]
    assert neurons.explained[0] > 0.99 and neurons.explained[1] > 0.99 and neurons.explained[2] < 0.3
    assert neurons.spectrum.shape == (p, p) and neurons.spectrum[0, 0] == 0


def test_removing_every_frequency_from_the_embedding_leaves_one_answer_for_all_pairs(tiny_run):
    run = interp.load_run(str(tiny_run))
    p = run.cfg.modulus
    everything = interp.fourier_ablation(run, list(range(1, p // 2 + 1)), compare_random=1)
    # Every number now has the same embedding, so every pair gets the same logits, and each answer
    # is right for exactly p of the p² pairs.
    assert everything.key_acc == pytest.approx(1 / p)
    assert everything.random_sets == [[]]
    some = interp.fourier_ablation(run, [1, 2], compare_random=3)
    assert len(some.random_sets) == 3 and all(len(s) == 2 and not {1, 2} & set(s) for s in some.random_sets)
    assert math.isnan(interp.fourier_ablation(run, [1], compare_random=0).random_acc)


def test_gini_of_even_and_concentrated_norms():
    assert fourier.gini(torch.ones(10)) == pytest.approx(0)
    assert fourier.gini(torch.tensor([0.0] * 9 + [5.0])) == pytest.approx(0.9)
    assert fourier.gini(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25, abs=1e-12)  # sum|xi-xj| / 2n²μ
