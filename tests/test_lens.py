"""lens.py, the consistency lens: on a tiny text model trained here, it learns to beat both baselines;
gradients reach the decoder's soft prompt through the encoder (straight-through); the base stays
frozen; resume is exact across an unfreezing; the dumped and on-the-fly sources give the same
batches; two ranks train one lens; bad input fails cleanly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

import lens as lens_module
from analysis.runs import load_run
from analysis.sources import DumpConfig, DumpSource, TokenSource, dump
from conftest import ROOT, logged_steps, run_bad_input, run_torchrun, wait_until, write_corpus
from lens import LensConfig, Schedule, build_batch, build_lens, lens_losses
from plumbing.tracking import read_metrics

# Short prompts: the test model's context is 32 positions.
QUICK = ["--decoder_prompt", "of <A>:", "--encoder_prompt", "<T> is", "--t_text", "4", "--batch_size", "32",
         "--eval_rows", "128", "--examples", "3", "--warmup_steps", "5", "--save_every", "0"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A two-block character model of the test corpus (context 32), trained for 150 steps."""
    import train

    root = tmp_path_factory.mktemp("lens")
    train.main(["--preset", "shakespeare_char", "--data_path", write_corpus(root), "--save_model_dir", str(root),
                "--run", "text", "--num_blocks", "2", "--embedding_dim", "32", "--num_heads", "2", "--mlp_dim", "64",
                "--context_len", "32", "--batch_size", "16", "--max_steps", "150", "--eval_every", "150",
                "--log_every", "50", "--use_muon", "false", "--lr", "3e-3"])
    return str(root / "text")


def quick_lens(run_dir: str, *extra: str):
    cfg, _ = lens_module.parse_flags(LensConfig, [run_dir, *QUICK, *extra], "lens.py", "", positional="run_dir")
    run = load_run(run_dir, device="cpu")
    for p in run.model.parameters():
        p.requires_grad_(False)
    return cfg, run, build_lens(cfg, run)


def a_batch(run, lens, size: int = 16, seed: int = 0):
    source = TokenSource(run, f"blocks.{lens.layer}.hook_resid_post", "all", "train", size, seed)
    rows = source.batch(0)
    return build_batch(run.model, lens.layer, source.tokens[rows.sequence], rows.position, rows.acts, run.device,
                   torch.float32)


@pytest.mark.slow
def test_the_lens_learns_to_beat_both_baselines_and_writes_its_report(text_run):
    summary = lens_module.main([text_run, *QUICK, "--max_steps", "300", "--eval_every", "100", "--log_every", "50",
                                "--run_name", "learns"])
    directory = summary["lens_dir"]
    assert directory == os.path.join(text_run, "lens", "learns") and summary["steps"] == 300
    # Held-out activations: Â stands in for A better than the mean activation or another sample's A.
    assert summary["val_kl"] < summary["val_kl_mean"] and summary["val_kl"] < summary["val_kl_random"], summary
    assert summary["val_mse"] < summary["val_mse_mean"] and summary["val_mse"] < summary["val_mse_random"], summary
    assert summary["val_fve"] > 0, summary
    assert {"config.json", "train.log", "metrics.jsonl", "last.pt", "curves.png", "explanations.jsonl",
            "explanations.png"} <= set(os.listdir(directory))
    first, last = read_metrics(os.path.join(directory, "metrics.jsonl"))[0], summary
    assert last["val_kl"] < first["train_kl"]
    evals = read_metrics(os.path.join(directory, "explanations.jsonl"))
    assert [e["step"] for e in evals] == [100, 200, 300]
    assert evals[0]["tau"] > evals[-1]["tau"] == pytest.approx(0.3)  # the default schedule anneals
    assert all(len(e["explanations"]) == 3 for e in evals)

    result = subprocess.run([sys.executable, os.path.join(ROOT, "lens.py"), "eval", directory], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = open(os.path.join(directory, "eval", "report.md")).read()
    assert "Â = mean activation" in report and "⟦" in report and "Fraction of variance explained" in report
    assert os.path.isfile(os.path.join(directory, "eval", "explanations.png"))


def test_gradients_reach_the_decoder_prompt_only_through_the_encoder(text_run):
    cfg, run, lens = quick_lens(text_run)
    batch = a_batch(run, lens)
    weights = {"kl_weight": 0.0, "mse_weight": 1.0, "alpha": 0.0, "entropy_weight": 0.0}
    generator = torch.Generator().manual_seed(0)
    loss, parts, ids = lens_losses(lens, batch, 0.7, weights, None, False, generator)
    loss.backward()
    # With the MSE alone, the decoder's prompt reaches the loss only through the tokens it writes,
    # which are one-hot in the forward pass: only the straight-through gradient can carry this.
    assert lens.decoder_left.grad is not None and lens.decoder_left.grad.abs().sum() > 0
    assert lens.decoder_in.weight.grad.abs().sum() > 0
    tokens, _ = lens.explain(batch.acts, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(tokens.detach(), torch.nn.functional.one_hot(tokens.argmax(-1), tokens.shape[-1]).float())
    assert torch.equal(tokens.argmax(-1), ids)
    # Without the straight-through term (detached tokens) the same path carries nothing.
    lens.zero_grad()
    reconstruction = lens.reconstruct(tokens.detach())
    ((reconstruction - batch.acts).pow(2).mean()).backward()
    assert lens.decoder_left.grad is None


@pytest.mark.parametrize("patch_all_layers", [False, True])
def test_the_decoder_writes_what_the_model_would_read_back(text_run, patch_all_layers):
    # The decoder feeds each token back through a key-value cache; the logits before token k are the
    # model's on the whole sequence so far (prompt, slot, tokens 0..k-1) run from scratch.
    extra = ["--patch_all_layers"] if patch_all_layers else []
    cfg, run, lens = quick_lens(text_run, *extra)
    acts = a_batch(run, lens, size=5).acts
    tokens, logits = lens.explain(acts, 0.5, torch.Generator().manual_seed(3))
    model, blocks = run.model, range(len(run.model.blocks))
    slot_value = lens.decoder_in(acts)
    prompt = torch.cat([lens.decoder_left.expand(5, -1, -1), slot_value[:, None], lens.decoder_right.expand(5, -1, -1)], 1)
    for k in range(lens.t_text):
        x = torch.cat([prompt, tokens[:, :k] @ model.embed.weight], 1)
        h = lens_module.run_blocks(model, x, blocks, len(lens.decoder_left), slot_value if patch_all_layers else None)
        torch.testing.assert_close(logits[:, k], lens_module.logits_at(model, h[:, -1]), rtol=1e-4, atol=1e-4)


def test_the_base_stays_frozen_and_is_shared(text_run):
    cfg, run, lens = quick_lens(text_run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert lens.decoder_model() is run.model and lens.encoder_model() is run.model
    assert not any(k.startswith(("decoder_base", "encoder_base")) for k in lens.state_dict())
    optimizers = lens_module.Optimizers(cfg, lens)
    base_ids = {id(p) for p in run.model.parameters()}

    def optimized() -> set[int]:
        return {id(p) for o in optimizers.all() for g in o.param_groups for p in g["params"]}

    assert optimized() and not optimized() & base_ids  # no optimizer holds a base weight
    trained = {k: v.clone() for k, v in lens.named_parameters()}
    weights = {"kl_weight": 1.0, "mse_weight": 1.0, "alpha": 0.1, "entropy_weight": 0.01}
    prefix = torch.tensor([run.data.encode("\n")])
    for step in range(5):
        optimizers.set_lr(step)
        loss, _, _ = lens_losses(lens, a_batch(run, lens, seed=step), 1.0, weights, prefix, True,
                                 torch.Generator().manual_seed(step))
        loss.backward()
        optimizers.step()
    assert all(p.grad is None for p in run.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert lens.encoder_left.numel() == 0  # "<T> is": nothing before the text
    assert all(not torch.equal(trained[k], v) for k, v in lens.named_parameters() if v.numel()), "a parameter stood still"
    # Unfreezing gives the decoder a copy; training it leaves the original (and the encoder's) alone.
    copy = lens.unfreeze("decoder")
    optimizers.add_base(copy, "decoder")
    assert {id(p) for p in copy.parameters()} <= optimized() and not optimized() & base_ids
    for step in range(5, 8):
        optimizers.set_lr(step)
        loss, _, _ = lens_losses(lens, a_batch(run, lens, seed=step), 1.0, weights, prefix, False,
                                 torch.Generator().manual_seed(step))
        loss.backward()
        optimizers.step()
    assert lens.decoder_model() is copy and lens.encoder_model() is run.model
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert not torch.equal(copy.blocks[0].mlp.fc_in.weight, run.model.blocks[0].mlp.fc_in.weight)


class _SignalAt(logging.Filter):
    """Sends this process SIGUSR1 when the lens logs a line that starts with `line`: a preemption at
    a known step, without a second process."""

    def __init__(self, line: str):
        super().__init__()
        self.line = line

    def filter(self, record) -> bool:
        if record.getMessage().startswith(self.line):
            os.kill(os.getpid(), signal.SIGUSR1)
        return True


@pytest.mark.slow
def test_a_stopped_lens_resumes_exactly_across_unfreezing(text_run):
    # The encoder unfreezes before the decoder (their copies have one shape: optimizer states must
    # come back to the right one), the stop falls between two log lines (the next line averages steps
    # from both sides of it) and the schedules of tau and alpha move throughout.
    common = [text_run, *QUICK, "--max_steps", "24", "--eval_every", "12", "--log_every", "5",
              "--unfreeze_encoder_step", "4", "--unfreeze_decoder_step", "6", "--decoder_warmup_steps", "4",
              "--encoder_warmup_steps", "2", "--encoder_lr_mult", "0.3",
              "--tau", "1.5>0.5@0:24", "--alpha", "0>0.2@0:24", "--resample_ablation"]
    straight = lens_module.main(common + ["--run_name", "straight"])
    logger = logging.getLogger("tinylab")
    stop = _SignalAt("step 6: the decoder gets its own copy")  # logged before step 7 runs
    logger.addFilter(stop)
    try:
        cut = lens_module.main(common + ["--run_name", "cut"])
    finally:
        logger.removeFilter(stop)
    assert cut["interrupted"] == "SIGUSR1" and cut["steps"] == 7
    saved = torch.load(os.path.join(cut["lens_dir"], "last.pt"), weights_only=True)
    assert any(k.startswith("decoder_base.") for k in saved["model"])
    assert any(k.startswith("encoder_base.") for k in saved["model"])
    resumed = lens_module.main(common + ["--run_name", "cut", "--resume", "auto"])
    assert resumed["steps"] == 24 and resumed["interrupted"] is None
    a = {r["step"]: r for r in read_metrics(os.path.join(straight["lens_dir"], "metrics.jsonl"))}
    b = {r["step"]: r for r in read_metrics(os.path.join(cut["lens_dir"], "metrics.jsonl"))}
    assert sorted(a) == sorted(b) == [1, 5, 10, 12, 15, 20, 24]
    for step in a:
        for key in ("train_loss", "train_kl", "train_mse", "train_fluency", "val_kl", "val_fve", "tau"):
            assert (key in a[step]) == (key in b[step]), (step, key)
            if key in a[step]:
                assert a[step][key] == b[step][key], (step, key)
    x = torch.load(os.path.join(straight["lens_dir"], "last.pt"), weights_only=True)["model"]
    y = torch.load(os.path.join(cut["lens_dir"], "last.pt"), weights_only=True)["model"]
    assert x.keys() == y.keys() and any(k.startswith("encoder_base.") for k in x)
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_dumped_and_on_the_fly_sources_give_the_same_batches(tmp_path, text_run):
    hook = "blocks.1.hook_resid_post"
    out = str(tmp_path / "dump")
    dump(DumpConfig(run_dir=text_run, hook=hook, positions="all", out=out, shard_rows=500).validate(),
         log=lambda *a: None)
    run = load_run(text_run, device="cpu")
    dumped, live = DumpSource(out, 32, "cpu", seed=3), TokenSource(run, hook, "all", "train", 32, seed=3)
    assert dumped.num_rows == live.num_rows and torch.equal(dumped.tokens, live.tokens)
    for step in (0, 1, dumped.num_rows // 32 + 2):  # the last one is in the second epoch
        a, b = dumped.batch(step), live.batch(step)
        assert torch.equal(a.sequence, b.sequence) and torch.equal(a.position, b.position)
        torch.testing.assert_close(a.acts, b.acts, rtol=1e-5, atol=1e-5)
    # Trained from either, the lens sees the same data: the same losses.
    common = [text_run, *QUICK, "--layer", "1", "--max_steps", "4", "--eval_every", "4", "--log_every", "1"]
    from_dump = lens_module.main(common + ["--source", "dump", "--dump", out, "--run_name", "from-dump"])
    from_tokens = lens_module.main(common + ["--run_name", "from-tokens"])
    a = read_metrics(os.path.join(from_dump["lens_dir"], "metrics.jsonl"))
    b = read_metrics(os.path.join(from_tokens["lens_dir"], "metrics.jsonl"))
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-4)


@pytest.mark.slow
def test_two_ranks_train_the_lens_one_process_trains(tmp_path, text_run):
    # Without Gumbel noise (which each rank draws for itself) two ranks of 16 rows are one process of
    # 32: the same losses, and the same gradient norm, which a sum instead of a mean would double.
    args = [text_run, *QUICK, "--max_steps", "6", "--eval_every", "6", "--log_every", "1", "--gumbel_noise", "false"]
    one = lens_module.main(args + ["--run_name", "one"])
    result = run_torchrun(args + ["--run_name", "two"], cwd=str(tmp_path), script="lens.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gloo threads outlived" not in result.stderr
    assert "lens weights identical on all 2 ranks" in result.stdout
    assert result.stdout.count("eval      6 |") == 1  # rank 0 alone prints
    a = read_metrics(os.path.join(one["lens_dir"], "metrics.jsonl"))
    b = read_metrics(os.path.join(text_run, "lens", "two", "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    # Only float rounding differs: measured 1.2e-7 relative at most.
    for x, y in zip(a, b):
        for key in ("train_loss", "train_kl", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), (x["step"], key)
    assert b[-1]["val_kl"] == pytest.approx(a[-1]["val_kl"], rel=1e-6)


def test_the_fluency_prior_reads_each_token_after_the_ones_before_it(text_run):
    cfg, run, lens = quick_lens(text_run)
    prefix = torch.tensor([run.data.encode("\n\n")])
    ids = torch.randint(0, run.data.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))
    prior = lens_module.fluency_prior(run.model, prefix, ids)
    for k in range(4):  # token k, predicted from the prefix and tokens 0..k-1
        text = torch.cat([prefix.expand(3, -1), ids[:, :k]], 1)
        expected = torch.log_softmax(run.model(text)[:, -1].float(), -1)
        torch.testing.assert_close(prior[:, k], expected, rtol=1e-5, atol=1e-5)


def test_a_lens_of_a_itself_scores_zero_and_the_baselines_do_not(text_run):
    cfg, run, lens = quick_lens(text_run)
    batch = a_batch(run, lens)
    assert float(lens_module.kl_from(batch.clean_logprobs, lens_module.patched_logprobs(
        run.model, batch, lens.layer, batch.acts)).abs().max()) == 0.0  # the reference takes Â's path
    lens.mean_act.copy_(batch.acts.mean(0))
    lens.mean_square.copy_(batch.acts.pow(2).mean())
    identity = lens_module.ConsistencyLens(run.model, lens.layer, lens.encoder_layer, 4, ([], []), ([], []))
    identity.mean_act.copy_(lens.mean_act)
    identity.mean_square.copy_(lens.mean_square)
    identity.reconstruct = lambda tokens: batch.acts  # a perfect encoder
    metrics, _ = lens_module.evaluate(identity, [batch])
    assert metrics["val_kl"] == 0.0 and metrics["val_mse"] == 0.0 and metrics["val_fve"] == 1.0
    assert metrics["val_kl_mean"] > 0.01 and metrics["val_kl_random"] > metrics["val_kl_mean"] / 2
    assert 0.1 < metrics["val_mse_mean"] < metrics["val_mse_random"]


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_in_one_wandb_run(tmp_path, text_run):
    # The command train.slurm runs for TINYLAB_PROGRAM=lens.py: its --run_name and --resume auto first.
    lens_dir = os.path.join(text_run, "lens", "preempted")
    command = [sys.executable, os.path.join(ROOT, "lens.py"), "--run_name", "preempted", "--resume", "auto",
               text_run, *QUICK, "--max_steps", "150", "--eval_every", "75", "--log_every", "1", "--wandb_enabled"]
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    process = subprocess.Popen(command, cwd=str(tmp_path), env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_until(lambda: logged_steps(lens_dir), 120, "the first logged step", process)
    process.send_signal(signal.SIGTERM)  # what train.slurm's warning becomes (scancel --signal=TERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = torch.load(os.path.join(lens_dir, "last.pt"), weights_only=True)["step"]
    assert 1 <= stopped_at < 150 and f"stopping after step {stopped_at}" in stdout and "Traceback" not in stderr

    resumed = subprocess.run(command, cwd=str(tmp_path), env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {stopped_at}" in resumed.stdout
    assert logged_steps(lens_dir) == list(range(1, 151))
    wandb_id = torch.load(os.path.join(lens_dir, "last.pt"), weights_only=True)["wandb_id"]
    attempts = [d for d in os.listdir(os.path.join(lens_dir, "wandb")) if d.startswith("offline-run-")]
    assert len(attempts) == 2 and all(d.endswith(f"-{wandb_id}") for d in attempts)


def test_schedules():
    tau = Schedule.parse("1.0>0.2@100:300:cosine", "tau", 1000)
    assert tau(0) == tau(100) == 1.0 and tau(300) == tau(900) == pytest.approx(0.2)
    assert tau(200) == pytest.approx(0.6)  # half-way on a cosine is the mean
    linear = Schedule.parse("0>1@0.1:0.5", "alpha", 1000)  # fractions of max_steps
    assert (linear.begin, linear.finish) == (100, 500) and linear(300) == pytest.approx(0.5)
    assert Schedule.parse("0.25", "alpha", 10)(7) == 0.25


@pytest.mark.parametrize("args,message", [
    (["--decoder_prompt", "explain:"], "--decoder_prompt"),
    (["--tau", "1>0.5@10"], "--tau: '1>0.5@10' is not a schedule"),
    (["--tau", "0"], "--tau"),
    (["--alpha", "0.5>-1@0:10"], "--alpha"),
    (["--layer", "5"], "--layer: 5 is not a block"),
    (["--decoder_prompt", "€ <A>"], "no token for '€'"),
    (["--t_text", "40"], "more than the model's context of 32"),
    (["--source", "dump", "--dump", "/nonexistent"], "--dump"),
    (["--dtype", "float16"], "--dtype: float16"),
    (["--fluency_prefix", "€"], "--fluency_prefix: the run's tokenizer cannot write '€'"),
    (["--batch_size", "1"], "--batch_size: 1 rows"),
])
@pytest.mark.slow
def test_bad_input_names_the_flag(tmp_path, text_run, args, message):
    """As a user meets it: `python lens.py RUN ... ARGS` exits 2 with one line naming the flag, and
    writes nothing (no <run>/lens/bad, nothing in the working folder or the token cache)."""
    run_bad_input("lens.py", [text_run, *QUICK, *args, "--run_name", "bad"], tmp_path, message, watch=[text_run])


@pytest.mark.slow
def test_a_non_text_run_is_refused(tmp_path, trained_runs):
    run_bad_input("lens.py", [trained_runs["modular"]], tmp_path, "needs a text run", watch=[trained_runs["modular"]])


@pytest.mark.slow
def test_an_existing_lens_is_refused(tmp_path, text_run):
    os.makedirs(os.path.join(text_run, "lens", "taken"))
    with open(os.path.join(text_run, "lens", "taken", "notes.txt"), "w") as f:
        f.write("mine")
    run_bad_input("lens.py", [text_run, *QUICK, "--run_name", "taken"], tmp_path, "already holds a lens", watch=[text_run])
    assert os.listdir(os.path.join(text_run, "lens", "taken")) == ["notes.txt"]
