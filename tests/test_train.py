"""train.main end to end: run directories, checkpoints, resume, W&B offline, and bad input."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import train
from conftest import assert_bad_input, disk_state, run_bad_input, run_train, tiny_args
from plumbing.tracking import read_metrics

RUN_FILES = {"config.json", "train.log", "metrics.jsonl", "last.pt", "best.pt", "training_curves.png"}


def files(run_dir):
    return set(os.listdir(run_dir))


def test_modular_run_writes_its_run_directory(tmp_path, capsys):
    summary = train.main(tiny_args(tmp_path, "--run", "m1"))
    run_dir = tmp_path / "runs" / "m1"
    assert summary["run_dir"] == str(run_dir) and summary["steps"] == 20
    assert RUN_FILES <= files(run_dir)
    out = capsys.readouterr().out
    assert "done: 20 steps in" in out
    head = out.splitlines()[:20]  # the run describes itself: config, then versions and hardware
    assert any(line.startswith("  model: init_from=") for line in head)
    assert any(line.startswith("python ") and " torch " in line for line in head)
    log = (run_dir / "train.log").read_text()
    assert "optimization: max_steps=20" in log and "done: 20 steps" in log

    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20]
    for key in ("train_loss", "train_acc", "lr", "grad_norm", "ms_per_step", "tokens_per_sec", "elapsed_seconds"):
        assert all(key in r for r in records)
    elapsed = [r["elapsed_seconds"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and all("val_acc" in r for r in evals)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["modulus"] == 17 and config["run_name"] == "m1"

    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    for key in ("model", "optimizers", "scaler", "step", "rng", "data_position", "early_stopping",
                "best_val_loss", "config", "wandb_id"):
        assert key in ckpt
    assert ckpt["step"] == 20 and ckpt["config"]["modulus"] == 17
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["best_val_loss"] == min(r["val_loss"] for r in evals)


@pytest.mark.slow
def test_track_progress_logs_nanda_progress_measures_and_plots_them(tmp_path):
    summary = train.main(tiny_args(tmp_path, "--run", "t", "--track_progress", "--max_steps", "20"))
    evals = [r for r in read_metrics(tmp_path / "runs" / "t" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert r["excluded_loss"] > 0 and r["restricted_loss"] > 0 and r["weight_norm"] > 0
        assert 0 <= r["fourier_gini"] <= 1 and 1 <= r["key_frequencies"] <= 8  # p = 17: 8 frequencies
    assert summary["restricted_loss"] == evals[-1]["restricted_loss"]
    # The last eval measured the weights last.pt holds, with the same choice of key frequencies.
    import interp

    losses = interp.fourier_losses(interp.load_run(str(tmp_path / "runs" / "t"), prefer="last"))
    assert evals[-1]["restricted_loss"] == pytest.approx(losses.restricted_loss, rel=1e-4)
    assert evals[-1]["excluded_loss"] == pytest.approx(losses.excluded_loss, rel=1e-4)
    assert evals[-1]["key_frequencies"] == len(losses.key_frequencies)
    # weight_norm and fourier_gini of last.pt, computed here: numpy's FFT of the embedding's p rows
    # (frequency k's norm is sqrt(2/p) |X_k| under an orthonormal basis) and the Gini coefficient as
    # the mean absolute difference over twice the mean.
    weights = torch.load(tmp_path / "runs" / "t" / "last.pt", weights_only=True)["model"]
    unique = {w.data_ptr(): w for w in weights.values()}.values()  # tied weights once, as model.parameters()
    norm = math.sqrt(sum(float(w.double().pow(2).sum()) for w in unique))
    assert evals[-1]["weight_norm"] == pytest.approx(norm, rel=1e-6)
    embedding = weights["embed.weight"][:17].double().numpy()
    spectrum = np.abs(np.fft.rfft(embedding, axis=0))[1:9]  # frequencies 1..8 of p = 17
    norms = np.sqrt(2 / 17) * np.sqrt((spectrum ** 2).sum(1))
    gini = np.abs(norms[:, None] - norms[None, :]).sum() / (2 * len(norms) ** 2 * norms.mean())
    assert evals[-1]["fourier_gini"] == pytest.approx(gini, rel=1e-5)
    assert (tmp_path / "runs" / "t" / "training_curves.png").stat().st_size > 0


def test_generated_run_names_never_collide(tmp_path):
    first = train.main(tiny_args(tmp_path, "--max_steps", "2"))["run_dir"]
    second = train.main(tiny_args(tmp_path, "--max_steps", "2"))["run_dir"]
    assert first != second and os.path.basename(first).startswith("add17-")


def test_dyck_run(tmp_path):
    summary = train.main(["--preset", "dyck", "--save_model_dir", str(tmp_path), "--run", "d",
                          "--max_steps", "30", "--eval_every", "15", "--num_blocks", "1",
                          "--embedding_dim", "32", "--mlp_dim", "64", "--dyck_num_train", "300",
                          "--dyck_num_val", "100", "--batch_size", "32"])
    assert RUN_FILES <= files(tmp_path / "d")
    assert {"val_forced_acc", "val_valid_frac", "val_acc", "val_loss"} <= set(summary)
    assert 0 < summary["val_valid_frac"] < 1 and 0 < summary["val_forced_acc"] < 1  # 30 steps: learning, not done


def test_text_run_samples_and_perplexity(tmp_path, corpus, capsys):
    summary = train.main(["--preset", "shakespeare_char", "--data_path", corpus, "--save_model_dir",
                          str(tmp_path), "--run", "t", "--num_blocks", "1", "--embedding_dim", "32",
                          "--num_heads", "2", "--context_len", "32", "--batch_size", "8",
                          "--max_steps", "12", "--eval_every", "6", "--sample_tokens", "20"])
    assert RUN_FILES <= files(tmp_path / "t")
    assert summary["val_perplexity"] == pytest.approx(2.718281828 ** summary["val_loss"], rel=1e-6)
    out = capsys.readouterr().out
    assert "--- sample from '\\n'" in out and "--- sample from '\\nBefore we proceed'" in out  # the corpus's lines


@pytest.mark.slow
def test_accumulation_gives_the_same_step_as_one_big_batch(tmp_path):
    """Four micro-steps of 8 are one step of 32 up to the order of float32 sums: measured, every
    step's loss and gradient norm 8e-8 relative apart at most, the weights 1.8e-6 after three steps."""
    args = ["--save_model_dir", str(tmp_path), "--modulus", "17", "--batch_size", "32", "--max_steps", "3",
            "--eval_every", "3", "--log_every", "1"]
    train.main(args + ["--run", "one"])
    train.main(args + ["--run", "four", "--accumulation_steps", "4"])
    one = {r["step"]: r for r in read_metrics(tmp_path / "one" / "metrics.jsonl")}
    four = {r["step"]: r for r in read_metrics(tmp_path / "four" / "metrics.jsonl")}
    assert sorted(one) == sorted(four) == [1, 2, 3]
    for step in one:
        for key in ("train_loss", "grad_norm", "val_loss"):
            if key in one[step]:
                assert four[step][key] == pytest.approx(one[step][key], rel=3e-7, abs=0), (step, key)
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "four" / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=5e-6), key


@pytest.mark.parametrize("task_args", [
    ["--modulus", "17", "--batch_size", "64", "--dropout", "0.1", "--grokfast_lamb", "2"],
    ["--preset", "dyck", "--num_blocks", "1", "--embedding_dim", "32", "--mlp_dim", "64",
     "--dyck_num_train", "300", "--dyck_num_val", "50", "--batch_size", "16", "--dropout", "0.1",
     "--lr_schedule", "constant"],
], ids=["modular", "dyck"])
@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, task_args):
    """Stop at step 10, resume to 20: the same losses and weights as 20 steps straight."""
    common = ["--save_model_dir", str(tmp_path), "--eval_every", "5", "--log_every", "5", *task_args]
    train.main(common + ["--run", "straight", "--max_steps", "20"])
    train.main(common + ["--run", "stopped", "--max_steps", "10"])
    summary = train.main(common + ["--run", "stopped", "--max_steps", "20", "--resume", "auto"])
    assert summary["steps"] == 20

    straight = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")}
    assert set(straight) <= set(resumed) and max(resumed) == 20 and 15 in straight
    for step, record in straight.items():
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            if key in record:
                assert resumed[step][key] == record[key], (step, key)
    # The wall clock carries on from the checkpoint rather than restarting at zero.
    assert resumed[15]["elapsed_seconds"] > resumed[10]["elapsed_seconds"] > 0
    x = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    y = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert "resumed at step 10" in (tmp_path / "stopped" / "train.log").read_text()


@pytest.mark.slow
def test_epochs_set_the_length_when_max_steps_is_zero(tmp_path):
    # 0.3 * 17 * 17 = 87 training pairs; batches of 16 give 5 steps per epoch.
    summary = train.main(tiny_args(tmp_path, "--max_steps", "0", "--epochs", "2", "--batch_size", "16"))
    assert summary["steps"] == 10


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    summary = train.main(tiny_args(tmp_path, "--run", "fresh", "--resume", "auto", "--max_steps", "3"))
    assert summary["steps"] == 3
    # A run that saved nothing before it was stopped restarts from step 0 in its own directory.
    (tmp_path / "runs" / "fresh" / "last.pt").unlink()
    (tmp_path / "runs" / "fresh" / "best.pt").unlink()
    summary = train.main(tiny_args(tmp_path, "--run", "fresh", "--resume", "auto", "--max_steps", "3"))
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "fresh" / "metrics.jsonl")]
    assert summary["steps"] == 3 and steps == sorted(set(steps))


@pytest.mark.slow
def test_resume_auto_takes_the_newest_checkpoint_and_relogs_nothing_twice(tmp_path):
    """A preemption after step 8 whose last save was at step 5: resume from 5, log 6.. once."""
    run_dir = tmp_path / "runs" / "p"
    args = tiny_args(tmp_path, "--run", "p", "--resume", "auto", "--eval_every", "100", "--log_every", "1",
                     "--save_every", "5")
    train.main(args + ["--max_steps", "5"])
    saved_at_5 = (run_dir / "last.pt").read_bytes()
    train.main(args + ["--max_steps", "8"])
    (run_dir / "last.pt").write_bytes(saved_at_5)  # the newer file: what a preempted job left
    summary = train.main(args + ["--max_steps", "10"])
    assert summary["steps"] == 10
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 10
    assert "resumed at step 5" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_resume_from_best_only(tmp_path):
    run_dir = tmp_path / "runs" / "b"
    train.main(tiny_args(tmp_path, "--run", "b", "--max_steps", "20"))
    (run_dir / "last.pt").unlink()  # stopped before its first periodic save
    best_step = torch.load(run_dir / "best.pt", weights_only=True)["step"]
    train.main(tiny_args(tmp_path, "--run", "b", "--resume", "auto", "--max_steps", "20"))
    assert f"resumed at step {best_step}" in (run_dir / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--fsdp"]])  # a checkpoint file, and a sharded folder
def test_flags_typed_at_resume_take_effect(tmp_path, flags):
    args = tiny_args(tmp_path, "--run", "lr", "--resume", "auto", "--warmup_steps", "0", *flags)
    train.main(args + ["--max_steps", "5"])
    train.main(args + ["--max_steps", "10", "--lr", "1e-4"])
    records = read_metrics(tmp_path / "runs" / "lr" / "metrics.jsonl")
    assert [r["lr"] for r in records if r["step"] == 10] == [1e-4]
    assert json.loads((tmp_path / "runs" / "lr" / "config.json").read_text())["lr"] == 1e-4


def test_a_checkpoint_with_a_new_run_name_starts_a_new_run(tmp_path, existing_run):
    run_dir, snapshot = existing_run
    summary = train.main(["--resume", str(run_dir / "best.pt"), "--run", "branch", "--max_steps", "4"])
    assert summary["run_dir"] == str(tmp_path / "runs" / "branch") and summary["steps"] == 4
    assert disk_state(run_dir) == snapshot
    assert "started from" in (tmp_path / "runs" / "branch" / "train.log").read_text()


def test_resume_from_a_path_uses_the_saved_config(tmp_path):
    train.main(tiny_args(tmp_path, "--run", "src", "--max_steps", "5", "--embedding_dim", "64"))
    summary = train.main(["--resume", str(tmp_path / "runs" / "src"), "--max_steps", "8"])
    assert summary["steps"] == 8
    config = json.loads((tmp_path / "runs" / "src" / "config.json").read_text())
    assert config["embedding_dim"] == 64 and config["max_steps"] == 8 and config["modulus"] == 17


@pytest.mark.slow
def test_config_json_reproduces_a_run(tmp_path):
    first = train.main(tiny_args(tmp_path, "--run", "a", "--max_steps", "6", "--seed", "3"))
    second = train.main(["--config", str(tmp_path / "runs" / "a" / "config.json"), "--run", "b"])
    assert second["train_loss"] == first["train_loss"] and second["val_loss"] == first["val_loss"]


@pytest.mark.slow
def test_wandb_offline_settings_from_dotenv_and_one_wandb_run_across_a_resume(tmp_path):
    secret = "sk-test-0123456789abcdef0123456789abcdef0123456789"
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={secret}\nWANDB_PROJECT=from-dotenv\n"
                                   "WANDB_MODE=offline\nWANDB_SILENT=true\n")
    args = tiny_args(tmp_path, "--run", "w", "--wandb_enabled", "--resume", "auto")
    for max_steps in ("4", "8"):  # the second launch resumes the first, as a requeued job does
        result = run_train(args + ["--max_steps", max_steps], cwd=str(tmp_path),
                           unset=("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE"))
        assert result.returncode == 0, result.stderr

    run_dir = tmp_path / "runs" / "w"
    wandb_runs = sorted(d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-"))
    wandb_id = torch.load(run_dir / "last.pt", weights_only=True)["wandb_id"]
    assert len(wandb_runs) == 2 and all(d.endswith(f"-{wandb_id}") for d in wandb_runs)
    assert b"from-dotenv" in (run_dir / "wandb" / wandb_runs[0] / f"run-{wandb_id}.wandb").read_bytes()
    for root, _, names in os.walk(run_dir):  # the key is never written anywhere in the run
        for name in names:
            assert secret.encode() not in open(os.path.join(root, name), "rb").read(), name


@pytest.mark.slow
def test_rclone_copies_the_run_and_a_failing_copy_never_stops_training(tmp_path):
    if shutil.which("rclone") is None:
        pytest.skip("rclone is not installed (apt-get install rclone; .ci/run installs it)")
    dest = tmp_path / "remote"
    result = run_train(tiny_args(tmp_path, "--run", "r", "--rclone_every", "1"), cwd=str(tmp_path),
                       env={"RCLONE_DEST": str(dest)})
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "r"
    assert files(dest / "r") == files(run_dir)
    assert (dest / "r" / "last.pt").read_bytes() == (run_dir / "last.pt").read_bytes()
    assert f"copied the run directory to {dest}/r" in (run_dir / "train.log").read_text()

    result = run_train(tiny_args(tmp_path, "--run", "r2", "--rclone_every", "1"), cwd=str(tmp_path),
                       env={"RCLONE_DEST": "no-such-remote:bucket"})
    assert result.returncode == 0, result.stderr
    assert "rclone copy to no-such-remote:bucket/r2 failed" in result.stdout
    assert torch.load(tmp_path / "runs" / "r2" / "last.pt", weights_only=True)["step"] == 20


@pytest.mark.slow
def test_fp16_keeps_its_grad_scaler_and_resumes_exactly(tmp_path):
    common = ["--save_model_dir", str(tmp_path), "--modulus", "17", "--dtype", "float16", "--eval_every", "5",
              "--log_every", "5", "--target_val_acc", "0"]
    train.main(common + ["--run", "straight", "--max_steps", "12"])
    train.main(common + ["--run", "cut", "--max_steps", "6"])
    scaler = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 6
    train.main(common + ["--run", "cut", "--max_steps", "12", "--resume", "auto"])
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_compiled_run_saves_clean_keys_and_matches_eager(tmp_path):
    eager = train.main(tiny_args(tmp_path, "--run", "eager", "--max_steps", "4"))
    compiled = train.main(tiny_args(tmp_path, "--run", "compiled", "--max_steps", "4", "--torch_compile"))
    keys = torch.load(tmp_path / "runs" / "compiled" / "last.pt", weights_only=True)["model"].keys()
    assert not [k for k in keys if k.startswith(("_orig_mod.", "module."))]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    # ...so an eager model loads it as it is.
    train.main(tiny_args(tmp_path, "--run", "compiled", "--max_steps", "6", "--resume", "auto"))


# ---------------------------------------------------------------- bad input, as a real process


@pytest.fixture
def existing_run(tmp_path):
    train.main(tiny_args(tmp_path, "--run", "keep", "--max_steps", "2"))
    run_dir = tmp_path / "runs" / "keep"
    return run_dir, disk_state(run_dir)


@pytest.mark.parametrize("args, fragments", [
    (["--learning_rate", "1e-3"], ["--learning_rate", "did you mean --lr"]),
    (["--num_heads", "3"], ["--num_heads", "not divisible"]),
    (["--frac_train", "1.2"], ["--frac_train"]),
    (["--context_len", "2"], ["--context_len"]),
    (["--config", "missing/config.json"], ["missing/config.json"]),
    (["--resume", "nowhere/last.pt"], ["nowhere/last.pt"]),
    (["--task", "text", "--data_path", "no/such/corpus.txt", "--data_url", "http://127.0.0.1:9/x.txt"],
     ["no/such/corpus.txt", "by hand"]),
    (["--run", "/tmp/elsewhere"], ["--run", "is a path"]),
    (["--resume", "auto", "--num_blocks", "2"], ["--num_blocks", "resumed run keeps"]),
    (["--resume", "auto", "--use_muon", "true"], ["--use_muon", "resumed run keeps"]),
    (["--track_progress", "--operation", "multiply"], ["--track_progress", "multiply"]),
])
@pytest.mark.slow
def test_bad_input_fails_cleanly_and_touches_nothing(tmp_path, existing_run, args, fragments):
    # the working folder holds the run and its runs folder: nothing under it may change
    run_bad_input("train.py", ["--save_model_dir", str(tmp_path / "runs"), "--run", "keep", *args], tmp_path, *fragments)


@pytest.mark.slow
def test_out_of_memory_in_the_first_step_names_the_micro_batch_and_what_to_try(tmp_path):
    """A micro batch too large for the device: one line, exit 2, naming its size and the flags that help,
    and nothing trained or saved. The device here is the CPU under an 8 GB limit on address space, asked
    for a 15 GB activation (3831 examples x a 1,000,000-wide MLP, fp32), whose allocator then fails at
    once; a GPU's torch.OutOfMemoryError takes the same path. With --accumulation_steps 2 (half the micro
    batch, still too large) the advice moves on to 4."""
    import resource
    import subprocess
    import sys

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
    runs = tmp_path / "runs"
    for accumulation, sequences, advice in ((1, 3831, 2), (2, 1916, 4)):
        args = ["--save_model_dir", str(runs), "--run", f"acc{accumulation}", "--modulus", "113", "--batch_size", "0",
                "--embedding_dim", "8", "--num_heads", "2", "--mlp_dim", "1000000", "--max_steps", "2",
                "--accumulation_steps", str(accumulation)]
        result = subprocess.run([sys.executable, "train.py", *args], cwd=os.path.dirname(train.__file__),
                                capture_output=True, text=True, timeout=120, preexec_fn=limited)
        assert_bad_input(result, "out of memory in the first step on cpu", f"a micro batch of {sequences} sequences",
                         f"--accumulation_steps {advice} (micro batches half as large, the same global batch)",
                         "--activation_checkpointing", "--fsdp", "Nothing was trained or saved")
        assert files(runs / f"acc{accumulation}") == {"config.json", "train.log"}


@pytest.mark.slow
def test_resume_auto_needs_a_run_name(tmp_path):
    run_bad_input("train.py", ["--save_model_dir", str(tmp_path / "runs"), "--resume", "auto"], tmp_path, "--resume",
                  "--run")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_save_model_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    run_bad_input("train.py", ["--save_model_dir", str(tmp_path / "runs"), "--max_steps", "1"], tmp_path,
                  "--save_model_dir", "is a file")


@pytest.mark.slow
def test_existing_run_directory_is_never_overwritten(tmp_path, existing_run):
    run_bad_input("train.py", ["--save_model_dir", str(tmp_path / "runs"), "--run", "keep", "--modulus", "17"],
                  tmp_path, "already holds a run", "--resume auto")


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_unreadable_checkpoint(tmp_path, existing_run, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    run_bad_input("train.py", ["--resume", str(bad)], tmp_path, str(bad), "not a readable checkpoint")


@pytest.mark.slow
def test_help_lists_every_flag(tmp_path):
    result = run_train(["--help"], cwd=str(tmp_path))
    assert result.returncode == 0
    assert "--num_blocks" in result.stdout and "--wandb_enabled" in result.stdout and "default:" in result.stdout


def test_resume_in_another_precision(tmp_path):
    # An fp32 checkpoint has no GradScaler state; resuming under fp16 starts a fresh scaler.
    args = tiny_args(tmp_path, "--run", "p16", "--resume", "auto")
    train.main(args + ["--max_steps", "4"])
    summary = train.main(args + ["--max_steps", "8", "--dtype", "float16"])
    assert summary["steps"] == 8 and math.isfinite(summary["train_loss"])


@pytest.mark.slow
def test_the_plateau_schedule_cuts_the_lr_and_a_resumed_run_cuts_where_a_straight_one_does(tmp_path):
    # min_delta 100: no eval after the first counts as an improvement; with patience 2 the evals at
    # steps 10 and 15 cut the LR after step 15. The stopped run ends at 10, between the two.
    common = tiny_args(tmp_path, "--lr_schedule", "plateau", "--plateau_patience", "2", "--plateau_factor", "0.5",
                       "--min_delta", "100", "--min_lr_frac", "0.1", "--warmup_steps", "0", "--eval_every", "5",
                       "--log_every", "1", "--target_val_acc", "0")
    train.main(common + ["--run", "straight"])
    train.main(common + ["--run", "cut", "--max_steps", "10"])
    train.main(common + ["--run", "cut", "--resume", "auto"])
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "runs" / "straight" / "metrics.jsonl")}
    assert [lrs[s] for s in (1, 15, 16, 20)] == [1e-2, 1e-2, 5e-3, 5e-3]
    assert lrs == {r["step"]: r["lr"] for r in read_metrics(tmp_path / "runs" / "cut" / "metrics.jsonl")}
    assert "plateau: LR x 0.5 of its schedule from step 16" in (tmp_path / "runs" / "straight" / "train.log").read_text()


@pytest.mark.slow
def test_config_files_and_checkpoints_from_before_the_run_name_rename_still_load(tmp_path):
    train.main(tiny_args(tmp_path, "--run", "old", "--max_steps", "4"))
    run_dir = tmp_path / "runs" / "old"
    config = json.loads((run_dir / "config.json").read_text())
    config["run"] = config.pop("run_name")  # as written before the field was renamed
    (run_dir / "config.json").write_text(json.dumps(config))
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        checkpoint["config"]["run"] = checkpoint["config"].pop("run_name")
        del checkpoint["lr_schedule"]  # and before the plateau schedule
        torch.save(checkpoint, run_dir / name)
    summary = train.main(["--save_model_dir", str(tmp_path / "runs"), "--run_name", "old", "--resume", "auto",
                          "--max_steps", "6"])
    assert summary["steps"] == 6
    again = train.main(["--config", str(run_dir / "config.json"), "--run_name", "again", "--max_steps", "2"])
    assert again["steps"] == 2
