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
from activations import DumpSettings, DumpSource, TokenSource, dump, load_run
from config import ConfigError
from conftest import ROOT, logged_steps, run_torchrun, wait_until, write_corpus
from lens import LensConfig, Schedule, build_lens, lens_losses, prepare
from utils import read_metrics

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
    return prepare(run.model, lens.layer, source.tokens[rows.sequence], rows.position, rows.acts, run.device,
                   torch.float32)


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


def test_the_base_stays_frozen_and_is_shared(text_run):
    cfg, run, lens = quick_lens(text_run)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert lens.decoder_model() is run.model and lens.encoder_model() is run.model
    assert not any(k.startswith(("decoder_base", "encoder_base")) for k in lens.state_dict())
    optimizers = lens_module.Optimizers(cfg, lens)
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
    optimizers.add_base(copy, 5)
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
    """Sends this process SIGUSR1 when the lens logs step `step`: a preemption at a known step."""

    def __init__(self, step: int):
        super().__init__()
        self.line = f"step {step:>6}/"

    def filter(self, record) -> bool:
        if record.getMessage().startswith(self.line):
            os.kill(os.getpid(), signal.SIGUSR1)
        return True


def test_a_stopped_lens_resumes_exactly_across_unfreezing(text_run):
    common = [text_run, *QUICK, "--max_steps", "24", "--eval_every", "12", "--log_every", "1",
              "--unfreeze_decoder_step", "6", "--unfreeze_encoder_step", "16", "--base_warmup_steps", "4"]
    straight = lens_module.main(common + ["--run_name", "straight"])
    logger = logging.getLogger("tinylab")
    stop = _SignalAt(10)  # after the decoder unfroze, before the encoder does
    logger.addFilter(stop)
    try:
        cut = lens_module.main(common + ["--run_name", "cut"])
    finally:
        logger.removeFilter(stop)
    assert cut["interrupted"] == "SIGUSR1" and cut["steps"] == 10
    saved = torch.load(os.path.join(cut["lens_dir"], "last.pt"), weights_only=True)
    assert any(k.startswith("decoder_base.") for k in saved["model"])
    assert not any(k.startswith("encoder_base.") for k in saved["model"])
    resumed = lens_module.main(common + ["--run_name", "cut", "--resume", "auto"])
    assert resumed["steps"] == 24 and resumed["interrupted"] is None
    a = {r["step"]: r for r in read_metrics(os.path.join(straight["lens_dir"], "metrics.jsonl"))}
    b = {r["step"]: r for r in read_metrics(os.path.join(cut["lens_dir"], "metrics.jsonl"))}
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in a:
        for key in ("train_loss", "train_kl", "train_mse", "val_kl", "val_fve"):
            if key in a[step]:
                assert a[step][key] == b[step][key], (step, key)
    x = torch.load(os.path.join(straight["lens_dir"], "last.pt"), weights_only=True)["model"]
    y = torch.load(os.path.join(cut["lens_dir"], "last.pt"), weights_only=True)["model"]
    assert x.keys() == y.keys() and any(k.startswith("encoder_base.") for k in x)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_dumped_and_on_the_fly_sources_give_the_same_batches(tmp_path, text_run):
    hook = "blocks.1.hook_resid_post"
    out = str(tmp_path / "dump")
    dump(DumpSettings(run_dir=text_run, hook=hook, positions="all", out=out, shard_rows=500).validate(),
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


def test_two_ranks_train_one_lens(tmp_path, text_run):
    args = [text_run, *QUICK, "--max_steps", "6", "--eval_every", "6", "--log_every", "2", "--run_name", "ddp"]
    result = run_torchrun(args, cwd=str(tmp_path), script="lens.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lens weights identical on all 2 ranks" in result.stdout
    assert result.stdout.count("eval      6 |") == 1  # rank 0 alone prints
    records = read_metrics(os.path.join(text_run, "lens", "ddp", "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 4, 6] and "val_fve" in records[-1]


def test_sigusr1_stops_the_command_with_a_checkpoint(tmp_path, text_run):
    lens_dir = os.path.join(text_run, "lens", "signalled")
    command = [sys.executable, os.path.join(ROOT, "lens.py"), text_run, *QUICK, "--max_steps", "5000",
               "--log_every", "1", "--run_name", "signalled"]
    process = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: logged_steps(lens_dir), 120, "the first logged step", process)
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, stderr[-2000:]
    step = torch.load(os.path.join(lens_dir, "last.pt"), weights_only=True)["step"]
    assert 1 <= step < 5000 and f"stopping after step {step}" in stdout and "--resume auto" in stdout


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
])
def test_bad_input_names_the_flag(text_run, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        lens_module.main([text_run, *QUICK, *args, "--run_name", "bad"])
    assert not os.path.exists(os.path.join(text_run, "lens", "bad"))


def test_a_non_text_run_and_an_existing_lens_are_refused(tmp_path, trained_runs, text_run):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "lens.py"), trained_runs["modular"]],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2 and "needs a text run" in result.stderr and "Traceback" not in result.stderr
    os.makedirs(os.path.join(text_run, "lens", "taken"))
    with open(os.path.join(text_run, "lens", "taken", "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(ConfigError, match="already holds a lens"):
        lens_module.main([text_run, *QUICK, "--run_name", "taken"])
    assert os.listdir(os.path.join(text_run, "lens", "taken")) == ["notes.txt"]
