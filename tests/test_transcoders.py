"""Transcoders: sae.py --transcoder per_layer|skip --layer N reads an MLP's input and reconstructs its
output, with every activation function an SAE has, through the same trainer (sources, resume,
metrics). Each row is the input and the output side by side: the `+`-joined hook that capture()
and the sources read."""

from __future__ import annotations

import os

import pytest
import torch

import sae as sae_module
from analysis.runs import capture, hook_width, load_run, split_sequences
from analysis.sources import DumpConfig, dump
from conftest import run_bad_input
from plumbing.tracking import read_metrics
from saes import build_sae
from saes.base import update
from saes.config import SAEConfig
from saes.metrics import reconstruction_metrics, spliced_metrics
from test_sae import one_and_two_ranks, write_rows_as_dump

LAYER0 = "blocks.0.ln2.hook_normalized+blocks.0.hook_mlp_out"  # what a row of a per-layer transcoder at block 0 is
QUICK = ["--dict_size", "96", "--batch_size", "64", "--max_steps", "20", "--eval_every", "10", "--log_every", "5",
         "--buffer_rows", "512", "--eval_tokens", "600", "--l1_warmup_steps", "5", "--warmup_steps", "2",
         "--lr_schedule", "constant", "--save_every", "0", "--dead_rows", "256", "--resample_every", "0"]


def planted_mlp(n: int, d: int = 32, features: int = 64, p: float = 0.05, seed: int = 0, dense: float = 0.0):
    """Rows [n, 2d] of a synthetic MLP built from known sparse features: feature i, active with
    probability p at a magnitude in [0.5, 1.5], puts its unit direction U[i] in the input and V[i] in
    the output. With `dense` > 0 the input also holds dense Gaussian noise (norm about 1) and the
    output the input times a dense matrix A of scale `dense`: what a skip path learns (without the
    noise, A applied to sparse inputs would be sparse too, and the decoder could take it all). Returns (rows, U, V, A, the true L0, the true features [n, features])."""
    generator = torch.Generator().manual_seed(seed)
    U, V = (torch.randn(features, d, generator=generator) for _ in range(2))
    U, V = U / U.norm(dim=1, keepdim=True), V / V.norm(dim=1, keepdim=True)
    A = torch.randn(d, d, generator=generator) * dense / d ** 0.5
    active = torch.rand(n, features, generator=generator) < p
    f = active * (torch.rand(n, features, generator=generator) + 0.5)
    x = f @ U + (torch.randn(n, d, generator=generator) / d ** 0.5 if dense else 0)
    return torch.cat([x, f @ V + x @ A], 1), U, V, A, float(active.sum(1).float().mean()), f


def rows_hook(run_dir: str, transcoder: str = "per_layer", layer: int = 0) -> str:
    """What a row of that transcoder of the run is (its MLP input: the residual stream under --norm none)."""
    cfg = SAEConfig(run_dir=run_dir, transcoder=transcoder, layer=layer)
    cfg.find_transcoder_hooks(load_run(run_dir, device="cpu").model)
    return cfg.rows_hook


def train_on_rows(rows: torch.Tensor, run_dir: str, tmp_path, arch: str, transcoder: str, *flags: str):
    """A 128-feature transcoder trained by sae.py on rows [N, 64] written as a dump of the modular run's
    block-0 MLP (its input and output are 32 wide, as the planted rows), 400 steps of 512 rows."""
    dump_dir = write_rows_as_dump(rows, run_dir, tmp_path / f"dump-{arch}-{transcoder}", hook=rows_hook(run_dir))
    summary = sae_module.main([run_dir, "--transcoder", transcoder, "--layer", "0", "--source", "dump", "--dump",
                               dump_dir, "--positions", "answer", "--arch", arch, "--dict_size", "128", "--k", "4",
                               "--max_steps", "400", "--batch_size", "512", "--lr", "1e-2", "--warmup_steps", "50",
                               "--l1_warmup_steps", "100", "--dead_rows", "20000", "--resample_every", "100",
                               "--eval_every", "400", "--log_every", "100", "--save_every", "0", "--seed", "12345",
                               "--jumprelu_bandwidth", "0.5", "--jumprelu_init_threshold", "0.1",
                               "--save_model_dir", str(tmp_path / "saes"), "--run_name", f"{transcoder}-{arch}", *flags])
    return sae_module.load_sae(summary["sae_dir"], device="cpu")[0], summary


def found(true: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """Each true direction's best cosine with a learned one (rows of both)."""
    learned = learned / learned.norm(dim=1, keepdim=True)
    return (true @ learned.t()).max(1).values


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_a_transcoder_recovers_a_planted_sparse_mlp(arch, trained_runs, tmp_path):
    """The decoder finds the output directions V, and the feature whose decoder row matched each one
    fires on the rows where the planted feature is active (its activation correlates with the
    planted magnitude), at the true L0: what the SAE recovery test asks of an SAE, from the input
    side to the output side. (The encoder's columns are not U itself: with 64 features in 32
    dimensions, reading one feature means leaning away from the others.) ReLU's L1 weight is 4, not
    its default 5: at 5 it kept 2.4 features a row where 3.2 are planted and found 84 %; at 3, 4.3 a
    row and 100 %."""
    rows, _, V, _, true_l0, f = planted_mlp(50_000)
    transcoder, _ = train_on_rows(rows, trained_runs["modular"], tmp_path, arch, "per_layer",
                                  *(["--l1_coefficient", "4"] if arch == "relu" else []))
    with torch.no_grad():
        outputs = found(V, transcoder.W_dec)
        match = (V @ (transcoder.W_dec / transcoder.W_dec.norm(dim=1, keepdim=True)).t()).argmax(1)
        learned = transcoder.encode(rows[:10_000])
        l0 = float((learned > 0).sum(1).float().mean())
        together = torch.stack([f[:10_000].t(), learned.t()[match]], 1)  # [features, 2, rows]
        centred = together - together.mean(-1, keepdim=True)
        correlation = (centred[:, 0] * centred[:, 1]).sum(-1) / centred.norm(dim=-1).prod(-1).clamp_min(1e-12)
    print(f"{arch}: {float((outputs > 0.9).float().mean()):.0%} of the output directions found; their features "
          f"correlate with the planted ones at median {float(correlation.median()):.3f}; L0 {l0:.2f} (true {true_l0:.2f})")
    assert float((outputs > 0.9).float().mean()) >= 0.9, outputs.sort().values[:10]
    assert float((correlation > 0.8).float().mean()) >= 0.9, correlation.sort().values[:10]
    assert abs(l0 - true_l0) < 0.35 * true_l0, (l0, true_l0)


@pytest.mark.slow
def test_a_skip_transcoder_learns_the_dense_part_in_its_skip_path(trained_runs, tmp_path):
    """Output = sparse features + a dense linear map of the input (which holds dense noise beside its
    features): the skip transcoder's W_skip moves most of the way to that map in 400 steps (relative
    error 0.33 here; a skip path that is not applied stays at 1) and it explains clearly more of the
    output than a per-layer transcoder of the same size and k (0.87 against 0.72 here)."""
    rows, _, V, A, _, _ = planted_mlp(50_000, dense=1.0, seed=1)
    skip, skip_summary = train_on_rows(rows, trained_runs["modular"], tmp_path, "topk", "skip")
    plain, plain_summary = train_on_rows(rows, trained_runs["modular"], tmp_path, "topk", "per_layer")
    error = float((skip.W_skip.detach() - A).norm() / A.norm())
    metrics = {name: reconstruction_metrics(t, rows[:10_000]) for name, t in (("skip", skip), ("plain", plain))}
    print(f"W_skip vs A: relative error {error:.3f}; explained variance skip "
          f"{metrics['skip']['explained_variance']:.4f}, per_layer {metrics['plain']['explained_variance']:.4f}")
    assert error < 0.5
    assert metrics["skip"]["explained_variance"] > metrics["plain"]["explained_variance"] + 0.1
    assert float((found(V, skip.W_dec) > 0.9).float().mean()) >= 0.9


def test_a_transcoder_row_is_the_mlp_input_beside_its_output_and_its_loss_reads_the_output():
    """capture() of a `+`-joined hook puts the hooks side by side; the loss, reconstruction metrics and
    resampling of a transcoder measure its output part only (its input part would give other numbers)."""
    torch.manual_seed(0)
    transcoder = build_sae(8, 16, "relu", d_out=6)
    assert transcoder.W_enc.shape == (8, 16) and transcoder.W_dec.shape == (16, 6) and transcoder.b_dec.shape == (6,)
    rows = torch.randn(256, 14)
    transcoder.calibrate(rows, True)
    assert float(transcoder.scale) == pytest.approx(float(rows[:, :8].pow(2).sum(1).mean().div(8).sqrt()))
    assert float(transcoder.out_scale) == pytest.approx(float(rows[:, 8:].pow(2).sum(1).mean().div(6).sqrt()))
    with torch.no_grad():
        y_hat, f, pre = transcoder(rows)
    assert y_hat.shape == (256, 6)
    assert torch.allclose(pre, rows[:, :8] / transcoder.scale @ transcoder.W_enc + transcoder.b_enc)
    metrics = reconstruction_metrics(transcoder, rows)
    target = rows[:, 8:]
    residual = float((target - y_hat).pow(2).sum())
    assert metrics["explained_variance"] == pytest.approx(1 - residual / float((target - target.mean(0)).pow(2).sum()),
                                                         rel=1e-5)
    assert metrics["mse"] == pytest.approx(residual / float(transcoder.out_scale) ** 2 / 256, rel=1e-5)
    cfg = SAEConfig(run_dir="x", transcoder="per_layer", layer=0, l1_coefficient=0.0)
    loss, parts, _ = transcoder.loss(rows, cfg, 0.0, None)
    assert float(loss.detach()) == pytest.approx(residual / float(transcoder.out_scale) ** 2 / 256, rel=1e-5)
    skip = build_sae(8, 16, "topk", k=4, d_out=6, skip=True)
    with torch.no_grad():
        skip.W_skip.normal_()
    assert torch.allclose(skip(rows)[0], skip.decode(skip.encode(rows)) + rows[:, :8] @ skip.W_skip, atol=1e-5)
    parts, _ = update(skip, torch.optim.Adam(skip.parameters(), lr=1e-3), rows, cfg, 0.0, None)
    assert skip.W_skip.grad is None and float(parts["mse_sum"]) > 0  # it trained (and the grads were cleared)


def test_spliced_metrics_of_a_transcoder_read_its_input_and_replace_its_output(trained_runs):
    """With the transcoder's rows (block 0's normalised MLP input beside its output), a replacement that
    is the block's own MLP applied to the input part scores 1 and diverges by nothing: the splice read
    the MLP's real input in the same forward pass. Replacing the output by the input part's first
    columns scores less: the test can tell the two parts apart."""
    run = load_run(trained_runs["text"], device="cpu")
    block = run.model.blocks[0]
    held_out = split_sequences(run, "val", "all", 400)
    width = hook_width(run, "blocks.0.ln2.hook_normalized")
    assert hook_width(run, LAYER0) == width + hook_width(run, "blocks.0.hook_mlp_out")
    rows = capture(run.model, held_out.tokens[:4], LAYER0)
    _, cache = run.model.run_with_cache(held_out.tokens[:4], ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"])
    assert torch.equal(rows[..., :width], cache["blocks.0.ln2.hook_normalized"].float())
    assert torch.equal(rows[..., width:], cache["blocks.0.hook_mlp_out"].float())

    def mlp(rows):
        normed = rows[:, :width]
        weight, bias = block.ln2.norm.weight, getattr(block.ln2.norm, "bias", None)
        x = normed * weight if weight is not None else normed
        return block.mlp(x + bias if bias is not None else x)

    with torch.no_grad():
        exact = spliced_metrics(run.model, held_out, LAYER0, mlp, run.data.loss_positions)
        wrong = spliced_metrics(run.model, held_out, LAYER0, lambda rows: rows[:, :width], run.data.loss_positions)
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and exact["kl_div_with_sae"] < 1e-8
    assert wrong["ce_loss_score"] < 0.99


@pytest.mark.slow
def test_sae_py_trains_a_transcoder_that_resumes_exactly_and_reports(tmp_path, trained_runs):
    run_dir = trained_runs["text"]
    common = [run_dir, "--transcoder", "skip", "--layer", "0", "--arch", "topk", "--k", "8", "--positions", "all",
              *QUICK]
    straight = sae_module.main(common + ["--name", "straight"])
    assert straight["sae_dir"] == os.path.join(run_dir, "sae", "straight")
    records = read_metrics(os.path.join(straight["sae_dir"], "metrics.jsonl"))
    for key in ("train_mse", "train_l0", "explained_variance", "l0", "never_fired_frac", "ce_loss_score",
                "kl_div_score"):
        assert key in records[-1], key
    assert records[-1]["explained_variance"] > 0
    sae_module.main(common + ["--name", "cut", "--max_steps", "10"])
    resumed = sae_module.main(common + ["--name", "cut", "--resume", "auto"])
    a = torch.load(os.path.join(straight["sae_dir"], "last.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed["sae_dir"], "last.pt"), weights_only=True)
    assert set(a["model"]) >= {"W_enc", "W_dec", "W_skip", "b_enc", "b_dec", "scale", "out_scale"}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["d_out"] == b["d_out"]
    transcoder, cfg, _ = sae_module.load_sae(straight["sae_dir"], device="cpu")
    assert transcoder.skip and cfg.hook == "blocks.0.ln2.hook_normalized" and cfg.hook_out == "blocks.0.hook_mlp_out"
    path = sae_module.main(["report", straight["sae_dir"]])
    text = open(path).read()
    assert "skip topk transcoder with 96 features from `blocks.0.ln2.hook_normalized` to `blocks.0.hook_mlp_out`" in text
    assert os.path.isfile(os.path.join(os.path.dirname(path), "features.html"))
    # The browser shows what each feature's decoder pushes up and down through the unembedding: it
    # writes into the residual stream (hook_mlp_out), not the input hook it reads.
    index = open(os.path.join(os.path.dirname(path), "features", "index.js")).read()
    assert '"has_logits": true' in index
    # A dump of the same rows (activations.py dump --hook IN+OUT) trains it too.
    out = dump(DumpConfig(run_dir=run_dir, hook=LAYER0, positions="all", out=str(tmp_path / "dump")).validate(),
               log=lambda *a: None)
    from_dump = sae_module.main(common + ["--name", "from-dump", "--source", "dump", "--dump", out])
    assert from_dump["steps"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--transcoder", "per_layer"], "--layer: name the block whose MLP the transcoder replaces"),
    (["--transcoder", "per_layer", "--layer", "3"], "--layer: the model has blocks 0 to 0; got 3"),
    (["--transcoder", "cross"], "--transcoder: 'cross' is not a transcoder"),
    (["--transcoder", "per_layer", "--layer", "0", "--hook_out", "blocks.0.hook_mlp_outt"],
     "--hook_out: this model has no hook point 'blocks.0.hook_mlp_outt'"),
    (["--hook", "blocks.0.mlp.hook_post", "--hook_out", "blocks.0.hook_mlp_out"],
     "--hook_out: only a transcoder (--transcoder per_layer or skip) has one"),
    (["--transcoder", "skip", "--layer", "0", "--arch", "matryoshka"], "--arch: a skip transcoder's nested prefixes"),
    (["--transcoder", "cross_layer", "--layer", "0"], "--layer: a cross-layer transcoder reads and replaces every"),
    (["--transcoder", "cross_layer", "--hook", "blocks.0.hook_resid_pre"], "--hook: a cross-layer transcoder reads"),
    (["--transcoder", "cross_layer", "--arch", "matryoshka"], "--arch: a cross-layer transcoder's features are per"),
])
def test_bad_transcoder_flags_name_the_flag(tmp_path, trained_runs, args, message):
    run_bad_input("sae.py", [trained_runs["modular"], *args, "--max_steps", "2", "--device", "cpu"], tmp_path,
                  message, watch=(trained_runs["modular"],))


@pytest.mark.slow
def test_two_ranks_train_the_transcoder_one_process_trains(tmp_path, trained_runs):
    """A skip batchtopk transcoder on two ranks: the same choice of features at every step (equal L0),
    the loss and the weights (W_skip and out_scale too) equal to one process's within float sums."""
    run_dir = trained_runs["modular"]
    hook = rows_hook(run_dir)
    dump(DumpConfig(run_dir=run_dir, hook=hook, out=str(tmp_path / "dump")).validate(), log=lambda *a: None)
    common = [*QUICK, "--transcoder", "skip", "--layer", "0", "--source", "dump", "--dump", str(tmp_path / "dump"),
              "--log_every", "1", "--arch", "batchtopk", "--k", "8"]
    x, y = one_and_two_ranks(run_dir, common, "tc", tmp_path)
    assert {"W_skip", "out_scale"} <= x.keys() == y.keys()
    assert all(torch.allclose(x[k], y[k], rtol=1e-6, atol=1e-6) for k in x)


# ---------------------------------------------------------------- cross-layer transcoders


def test_a_cross_layer_transcoder_writes_from_each_layer_to_that_one_and_every_later_one():
    """Three layers: layer m's output is the decoded features of layers 0..m (the blocks m < ℓ stay
    exactly zero through training steps), each layer's features read only that layer's input (its own
    scale), TopK keeps k per layer, and every decoder row, over the layers it writes to, has unit norm."""
    torch.manual_seed(0)
    L, d, d_out, n = 3, 8, 6, 16
    clt = build_sae(d, n, "topk", k=3, d_out=d_out, layers=L)
    assert clt.W_enc.shape == (L, d, n) and clt.W_dec.shape == (L * n, L * d_out) and clt.dict_size == L * n
    rows = torch.randn(256, L * (d + d_out)) * torch.tensor([1.0, 2.0, 3.0]).repeat_interleave(d).repeat(2)[:L * (d + d_out)]
    clt.calibrate(rows, True)
    inputs = rows[:, :L * d].reshape(-1, L, d)
    assert torch.allclose(clt.scale, inputs.pow(2).sum(-1).mean(0).div(d).sqrt())
    cfg = SAEConfig(run_dir="x", transcoder="cross_layer", aux_coefficient=0.0)
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-2)
    for _ in range(5):
        update(clt, optimizer, rows, cfg, 0.0, None)
    blocks = clt.W_dec.detach().reshape(L, n, L, d_out)
    for source in range(L):
        for target in range(L):
            assert (blocks[source, :, target].abs().max() == 0) == (target < source), (source, target)
    assert torch.allclose(clt.W_dec.norm(dim=1), torch.ones(L * n), atol=1e-5)
    with torch.no_grad():
        y, f, pre = clt(rows)
        for layer in range(L):
            W, b = clt.encoder(layer)
            assert torch.allclose(pre[:, layer * n:(layer + 1) * n], inputs[:, layer] @ W + b, atol=1e-5)
            assert bool(((f[:, layer * n:(layer + 1) * n] > 0).sum(1) <= 3).all())
            expected = sum(f[:, s * n:(s + 1) * n] @ clt.decoder(layer)[s * n:(s + 1) * n] for s in range(layer + 1))
            expected = expected + clt.b_dec[layer * d_out:(layer + 1) * d_out] * clt.out_scale[layer]
            assert torch.allclose(y[:, layer * d_out:(layer + 1) * d_out], expected, atol=1e-4)
        assert torch.allclose(clt.residual_writes(), sum(clt.decoder(m) for m in range(L)))


def two_block_model():
    from model import Config, Transformer
    torch.manual_seed(0)
    model = Transformer(Config(num_blocks=2, embedding_dim=16, num_heads=2, mlp_dim=32, context_len=8,
                               norm="layernorm", zero_init_outputs=False), 11).eval()
    with torch.no_grad():
        for block in model.blocks:  # MLPs that matter: their outputs as large as the stream
            block.mlp.fc_out.weight.mul_(30)
    return model


def test_the_whole_replacement_replaces_every_mlp_in_turn_reading_the_replaced_stream():
    """spliced_metrics over every MLP (a cross-layer transcoder's rows): the blocks' own MLPs as the
    replacement score exactly 1; zeroing layer 0's output while layer 1's MLP is recomputed from the
    input it is given gives the model with block 0's MLP output zeroed (so layer 1 read the replaced
    stream, not the clean one), and the ablation zeroes both."""
    from analysis.runs import Sequences
    model = two_block_model()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (6, 8), generator=generator)
    targets = torch.randint(0, 11, (6, 8), generator=generator)
    held_out = Sequences(tokens, targets, torch.ones(6, 8, dtype=torch.bool))
    hooks = "+".join([f"blocks.{i}.ln2.hook_normalized" for i in range(2)] + [f"blocks.{i}.hook_mlp_out" for i in range(2)])

    def mlp(i, normed):
        norm = model.blocks[i].ln2.norm
        return model.blocks[i].mlp(normed * norm.weight + norm.bias)

    def own(rows):
        return torch.cat([mlp(0, rows[:, :16]), mlp(1, rows[:, 16:32])], -1)

    def first_zeroed(rows):
        return torch.cat([torch.zeros(len(rows), 16), mlp(1, rows[:, 16:32])], -1)

    def loss_with(zeroed):
        logits = model.run_with_hooks(tokens, [(f"blocks.{i}.hook_mlp_out", lambda x, h: torch.zeros_like(x))
                                               for i in zeroed])
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))

    with torch.no_grad():
        exact = spliced_metrics(model, held_out, hooks, own, None, replaced=2)
        first = spliced_metrics(model, held_out, hooks, first_zeroed, None, replaced=2)
        assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and exact["kl_div_with_sae"] < 1e-8
        assert first["ce_loss_with_sae"] == pytest.approx(loss_with([0]), rel=1e-5)
        assert first["ce_loss_with_ablation"] == pytest.approx(loss_with([0, 1]), rel=1e-5)
        assert loss_with([0]) != pytest.approx(loss_with([0, 1]), rel=1e-3)


@pytest.fixture(scope="module")
def two_block_run(tmp_path_factory):
    """A small modular run with two blocks (32 wide, like the planted rows): what a cross-layer
    transcoder spans."""
    import train
    root = tmp_path_factory.mktemp("two-blocks")
    train.main(["--save_model_dir", str(root), "--run", "two", "--num_blocks", "2", "--embedding_dim", "32",
                "--num_heads", "2", "--mlp_dim", "64", "--modulus", "17", "--max_steps", "60", "--eval_every", "60",
                "--target_val_acc", "0", "--log_every", "30"])
    return str(root / "two")


def planted_cross_layer_mlps(n: int, d: int = 32, features: int = 64, p: float = 0.05, seed: int = 0):
    """Rows [n, 4d] of two synthetic MLPs (inputs x0, x1, outputs y0, y1): layer 0's feature i reads
    U0[i] and writes V00[i] to y0 and V01[i] to y1; layer 1's feature j reads U1[j] and writes V11[j]
    to y1. Returns (rows, each feature's true output [2 features, 2d] over both layers, the true L0 of
    each layer)."""
    generator = torch.Generator().manual_seed(seed)

    def unit(rows):
        v = torch.randn(rows, d, generator=generator)
        return v / v.norm(dim=1, keepdim=True)

    U0, V00, V01, U1, V11 = (unit(features) for _ in range(5))
    active = [torch.rand(n, features, generator=generator) < p for _ in range(2)]
    f0, f1 = (a * (torch.rand(n, features, generator=generator) + 0.5) for a in active)
    rows = torch.cat([f0 @ U0, f1 @ U1, f0 @ V00, f0 @ V01 + f1 @ V11], 1)
    outputs = torch.cat([torch.cat([V00, V01], 1), torch.cat([torch.zeros_like(V11), V11], 1)])
    return rows, outputs, [float(a.sum(1).float().mean()) for a in active]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_a_cross_layer_transcoder_recovers_planted_features_that_write_to_two_layers(arch, two_block_run, tmp_path):
    """Layer 0's planted features write to both MLP outputs: the cross-layer transcoder trained by
    sae.py finds each one's output over both layers as one decoder row of a layer-0 feature (so its
    write to layer 1 too), and layer 1's features with nothing written to layer 0, at each layer's
    true L0. Seen here: topk 99 % found (layer 0 100 %, layer 1 98 %), L0 3.84 and 3.79 (true 3.21,
    3.19); jumprelu (L0 weight 0.5) 98 %, L0 2.83 and 2.14: layer 1's target, which both layers write
    to, has the larger scale, so its features' normalised activations are smaller against the same
    thresholds. batchtopk shares one budget across the layers and gives it to layer 0's features,
    which write twice: 100 % and 75 % found, L0 4.72 and 3.20."""
    rows, outputs, true_l0 = planted_cross_layer_mlps(50_000)
    hook = rows_hook(two_block_run, "cross_layer")
    dump_dir = write_rows_as_dump(rows, two_block_run, tmp_path / "dump", hook=hook)
    summary = sae_module.main([two_block_run, "--transcoder", "cross_layer", "--source", "dump", "--dump", dump_dir,
                               "--positions", "answer", "--arch", arch, "--dict_size", "256", "--k", "4",
                               "--max_steps", "400", "--batch_size", "512", "--lr", "1e-2", "--warmup_steps", "50",
                               "--dead_rows", "20000", "--eval_every", "400", "--log_every", "100", "--save_every", "0",
                               "--seed", "12345", "--jumprelu_bandwidth", "0.5", "--jumprelu_init_threshold", "0.1",
                               "--save_model_dir", str(tmp_path / "saes"), "--run_name", arch,
                               *(["--l0_coefficient", "0.5"] if arch == "jumprelu" else [])])
    clt = sae_module.load_sae(summary["sae_dir"], device="cpu")[0]
    with torch.no_grad():
        learned = clt.W_dec / clt.W_dec.norm(dim=1, keepdim=True)
        cosine = outputs @ learned.t()  # [128 planted, 256 learned]
        best, which = cosine.max(1)
        l0 = (clt.encode(rows[:10_000]) > 0).reshape(10_000, 2, -1).sum(-1).float().mean(0).tolist()
    layer_of_match = (which // 128).tolist()
    print(f"{arch}: {float((best > 0.9).float().mean()):.0%} of the planted outputs found (layer 0's "
          f"{float((best[:64] > 0.9).float().mean()):.0%}, layer 1's {float((best[64:] > 0.9).float().mean()):.0%}); "
          f"L0 per layer {l0[0]:.2f}, {l0[1]:.2f} (true {true_l0[0]:.2f}, {true_l0[1]:.2f})")
    assert float((best > 0.9).float().mean()) >= 0.9, best.sort().values[:10]
    assert layer_of_match[:64].count(0) >= 58 and layer_of_match[64:].count(1) >= 58
    for layer in range(2):
        assert abs(l0[layer] - true_l0[layer]) < 0.35 * true_l0[layer], (l0, true_l0)


@pytest.mark.slow
def test_sae_py_trains_a_cross_layer_transcoder_that_resumes_exactly_and_reports(two_block_run):
    """Live activations of every block: the folder is cross_layer-<arch>-<size>, its metrics hold each
    layer's explained variance, L0 and never-fired fraction beside the whole replacement's CE and KL
    scores, a run cut at step 10 and resumed ends bit-identical, and the report and browser are written."""
    common = [two_block_run, "--transcoder", "cross_layer", "--arch", "topk", "--k", "4", "--positions", "all",
              *QUICK]
    straight = sae_module.main(common)
    assert straight["sae_dir"] == os.path.join(two_block_run, "sae", "cross_layer-topk-96")
    record = read_metrics(os.path.join(straight["sae_dir"], "metrics.jsonl"))[-1]
    for key in ("explained_variance", "ce_loss_score", "kl_div_score", *(f"layer_{i}_{m}" for i in range(2) for m in
                                                                        ("explained_variance", "l0", "never_fired_frac"))):
        assert key in record, key
    assert record["layer_0_l0"] == record["layer_1_l0"] == 4 and record["l0"] == 8
    sae_module.main(common + ["--name", "cut", "--max_steps", "10"])
    resumed = sae_module.main(common + ["--name", "cut", "--resume", "auto"])
    a = torch.load(os.path.join(straight["sae_dir"], "last.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed["sae_dir"], "last.pt"), weights_only=True)
    assert a["layers"] == 2 and a["model"]["W_enc"].shape == (2, 32, 48)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    clt, cfg, _ = sae_module.load_sae(straight["sae_dir"], device="cpu")
    assert clt.cross_layer and cfg.hook_out == "blocks.0.hook_mlp_out+blocks.1.hook_mlp_out"
    path = sae_module.main(["report", straight["sae_dir"]])
    assert "cross-layer topk transcoder with 96 features (48 at each of 2 layers" in open(path).read()
    index = open(os.path.join(os.path.dirname(path), "features", "index.js")).read()
    assert '"has_logits": true' in index


@pytest.mark.slow
def test_a_cross_layer_dictionary_that_does_not_split_into_the_layers_is_refused(two_block_run, tmp_path):
    run_bad_input("sae.py", [two_block_run, "--transcoder", "cross_layer", "--dict_size", "7", "--max_steps", "2",
                             "--device", "cpu"], tmp_path, "--dict_size: 7 features do not split evenly into 2 layers",
                  watch=(two_block_run,))


@pytest.mark.slow
def test_sae_py_replacement_scores_the_whole_replacement_model(trained_runs, two_block_run, tmp_path):
    """`sae.py replacement DIR`: on a one-block run the whole replacement is the transcoder's own
    splice, so its CE-loss and KL scores are those sae.py's evaluation wrote (same held-out rows); a
    set that leaves a block's MLP without a transcoder is refused by name."""
    run_dir = trained_runs["modular"]
    trained = sae_module.main([run_dir, "--transcoder", "per_layer", "--layer", "0", "--arch", "topk", "--k", "8",
                               *QUICK, "--eval_tokens", "32768", "--name", "whole"])
    record = read_metrics(os.path.join(trained["sae_dir"], "metrics.jsonl"))[-1]
    metrics = sae_module.main(["replacement", trained["sae_dir"]])
    for key in ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "ce_loss_with_ablation"):
        assert metrics[key] == pytest.approx(record[key], rel=1e-6), key
    layer0 = sae_module.main([two_block_run, "--transcoder", "per_layer", "--layer", "0", *QUICK, "--name", "only-0"])
    run_bad_input("sae.py", ["replacement", layer0["sae_dir"]], tmp_path,
                  "--transcoders: no transcoder of block 1's MLP", watch=(two_block_run,))


@pytest.mark.slow
def test_two_ranks_train_the_cross_layer_transcoder_one_process_trains(tmp_path, two_block_run):
    """A batchtopk cross-layer transcoder on two ranks (its cut across every rank's rows and every layer):
    the same features chosen at every step (equal L0), loss and weights equal to one process's within
    float sums, and the blocks below the diagonal still zero."""
    hook = rows_hook(two_block_run, "cross_layer")
    dump(DumpConfig(run_dir=two_block_run, hook=hook, out=str(tmp_path / "dump")).validate(), log=lambda *a: None)
    common = [*QUICK, "--transcoder", "cross_layer", "--source", "dump", "--dump", str(tmp_path / "dump"),
              "--log_every", "1", "--arch", "batchtopk", "--k", "4"]
    x, y = one_and_two_ranks(two_block_run, common, "clt", tmp_path)
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-6, atol=1e-6) for k in x)
    assert float(y["W_dec"].reshape(2, 48, 2, 32)[1, :, 0].abs().max()) == 0
