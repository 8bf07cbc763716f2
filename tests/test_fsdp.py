"""Training beyond one GPU's memory, on CPU processes over gloo: FSDP2 (`--fsdp`), sharded checkpoints
that resume on another number of ranks, activation checkpointing, and the hang watchdog."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

import train
from conftest import child_pids, disk_state, model_weights, run_bad_input, run_torchrun, torchrun_command, wait_until
from plumbing.tracking import read_metrics

# Three processes split a global batch of 48 evenly, as do two and one; no dropout, so that a resume on
# another number of ranks (whose dropout streams cannot continue) is still the same computation.
COMMON = ["--modulus", "23", "--batch_size", "48", "--lr", "1e-3", "--max_steps", "24", "--target_val_acc", "0",
          "--log_every", "1", "--eval_every", "12", "--save_every", "12", "--tie_embeddings", "false"]
OPTIMIZERS = {"adamw": [], "muon": ["--use_muon", "true", "--muon_lr", "0.05"]}


def metrics(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))}


def assert_close_runs(a: dict, b: dict, steps, rel: float) -> None:
    """The same steps logged and the same learning rates, losses within `rel` (float rounding of another
    reduction order), the gradient norm within 1e-4: a gradient is more fragile than the loss, since a
    ReLU whose input sits within rounding of zero takes the other branch (measured with Muon: 2.2e-5 at
    one step of 24, 1e-7 at the others, while the loss stayed within 1e-7)."""
    assert [s for s in sorted(b) if s in steps] == list(steps), sorted(b)
    for step in steps:
        for key, bound in (("train_loss", rel), ("val_loss", rel), ("grad_norm", max(rel, 1e-4))):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=bound, abs=0), (step, key)
        assert b[step]["lr"] == a[step]["lr"], step


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fsdp_on_two_ranks_equals_one_process_and_ddp(tmp_path, optimizer):
    """Same global batch: one process; FSDP on 2 ranks x 2 micro-steps; DDP on 2 ranks. Only the
    rounding of sums split differently may differ: the DDP test's bound (3e-7 of the loss) holds.
    The FSDP run saves a sharded checkpoint folder, which the single-process readers open as a run."""
    common = ["--save_model_dir", str(tmp_path), *COMMON, *OPTIMIZERS[optimizer]]
    train.main(common + ["--run", "one"])
    fsdp = run_torchrun(common + ["--run_name", "fsdp", "--fsdp", "--accumulation_steps", "2"], cwd=str(tmp_path))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    ddp = run_torchrun(common + ["--run_name", "ddp"], cwd=str(tmp_path))
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, sharded, replicated = (metrics(tmp_path / name) for name in ("one", "fsdp", "ddp"))
    assert_close_runs(one, sharded, range(1, 25), 3e-7)
    assert_close_runs(replicated, sharded, range(1, 25), 3e-7)
    assert sorted(os.listdir(tmp_path / "fsdp" / "last.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                    "meta.pt"]
    assert not os.path.exists(tmp_path / "fsdp" / "last.pt")
    # Weights: 1e-5 apart under AdamW (as DDP's test). Muon's Newton-Schulz sets every singular value of
    # an update to about 1, so a rounding-sized change along a direction of tiny singular value becomes
    # an order-one change there: after a ReLU took the other branch at step 22 (above), one matrix
    # ended 6.6e-4 apart (the losses still 1e-7).
    a, b = model_weights(tmp_path / "one" / "last.pt"), model_weights(tmp_path / "fsdp" / "last.dcp")
    bound = 1e-5 if optimizer == "adamw" else 2e-3
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=bound) for k in a)

    from analysis.runs import load_run
    run = load_run(str(tmp_path / "fsdp"), "cpu", prefer="last")
    assert run.step == 24 and run.checkpoint_path.endswith("last.dcp")
    log = (tmp_path / "fsdp" / "train.log").read_text()
    assert "world size 2" in log and fsdp.stdout.count("step     24/24") == 1
    assert "gloo threads outlived" not in fsdp.stderr and "terminate called" not in fsdp.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_a_run_stopped_on_two_ranks_resumes_on_one_two_or_three(tmp_path, kind):
    """Stopped at step 12 on 2 ranks, resumed to step 24 on 1, 2 and 3: the same steps, learning rates
    and accuracies, losses within float rounding of another reduction order. And 1 -> 2: the one-process
    continuation stopped at step 18, resumed on 2 ranks to step 24, takes the same steps again."""
    flags = ["--fsdp"] if kind == "fsdp" else []
    first = run_torchrun(["--save_model_dir", str(tmp_path / "stopped"), "--run_name", "r", *COMMON, *flags,
                          "--max_steps", "12"], cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = "last.dcp" if kind == "fsdp" else "last.pt"
    assert os.path.exists(tmp_path / "stopped" / "r" / checkpoint)
    continued = {}
    for ranks in (2, 1, 3):
        runs = tmp_path / f"on{ranks}"
        shutil.copytree(tmp_path / "stopped", runs)
        args = ["--save_model_dir", str(runs), "--run_name", "r", "--resume", "auto", *COMMON, *flags]
        if ranks == 1:  # stopped at 18 in one process, then on two ranks
            train.main([*args, "--max_steps", "18"])
            result = run_torchrun(args, cwd=str(tmp_path))
            assert result.returncode == 0, result.stderr[-3000:]
            assert "resumed at step 18" in result.stdout
        else:
            result = run_torchrun(args, cwd=str(tmp_path), nproc=ranks)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "resumed at step 12" in result.stdout
        continued[ranks] = metrics(runs / "r")
    for ranks in (1, 3):
        assert_close_runs(continued[2], continued[ranks], range(13, 25), 1e-6)


@pytest.mark.slow
def test_activation_checkpointing_and_compile_compute_the_same_steps(tmp_path):
    """Recomputing each block in the backward pass (its dropout replayed) changes what is kept, not what
    is computed: the same losses and gradient norms to the bit, under DDP and under FSDP on two ranks.
    Compiled after sharding (--torch_compile --fsdp), the steps are the same to the reordering of float
    sums that fusion brings (the single-process compile test's 1e-4)."""
    common = ["--save_model_dir", str(tmp_path), *COMMON, "--dropout", "0.1", "--max_steps", "6", "--num_blocks", "2"]
    runs = {}
    for kind in ("ddp", "fsdp"):
        for name, flags in (("plain", []), ("recomputed", ["--activation_checkpointing"])):
            sharding = ["--fsdp"] if kind == "fsdp" else []
            result = run_torchrun(common + ["--run_name", f"{kind}-{name}", *sharding, *flags], cwd=str(tmp_path))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[f"{kind}-{name}"] = [(r["train_loss"], r["grad_norm"])
                                      for r in map(metrics(tmp_path / f"{kind}-{name}").get, range(1, 7))]
    assert runs["ddp-plain"] == runs["ddp-recomputed"] and runs["fsdp-plain"] == runs["fsdp-recomputed"]

    # compiled after sharding, without dropout (compiled dropout draws its own random stream)
    train.main(common + ["--run", "eager", "--dropout", "0"])
    result = run_torchrun(common + ["--run_name", "compiled", "--fsdp", "--torch_compile", "--dropout", "0"],
                          cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for step in range(1, 7):
        assert compiled[step]["train_loss"] == pytest.approx(eager[step]["train_loss"], rel=1e-4), step


@pytest.mark.slow
def test_fsdp_samples_during_training_and_stops_a_divergence_at_its_last_good_folder(tmp_path, corpus):
    """A text run sharded on two ranks samples at its eval (a sharded forward: every rank runs it, rank 0
    prints), then, resumed with an absurd learning rate, stops at the step whose update overflowed (the
    guard reads the global weight norm): exit 1, one error line naming last.dcp as the last good
    checkpoint, and that folder as it was (the diverged step was a save step)."""
    args = ["--save_model_dir", str(tmp_path), "--run_name", "s", "--preset", "shakespeare_char", "--data_path", corpus,
            "--num_blocks", "1", "--embedding_dim", "32", "--num_heads", "2", "--context_len", "16", "--batch_size",
            "8", "--eval_every", "4", "--eval_max_batches", "1", "--sample_tokens", "12", "--log_every", "1",
            "--fsdp", "--tie_embeddings", "false", "--target_val_acc", "0"]
    first = run_torchrun(args + ["--max_steps", "4"], cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    prompts = re.findall(r"^--- sample from (.*):$", first.stdout, re.M)  # the corpus's prompts, each printed once
    assert prompts and len(prompts) == len(set(prompts)), first.stdout[-3000:]
    before = disk_state(tmp_path / "s" / "last.dcp")
    result = run_torchrun(args + ["--max_steps", "20", "--resume", "auto", "--lr", "2e38", "--grad_clip", "0",
                                  "--save_every", "5"], cwd=str(tmp_path))
    assert result.returncode != 0 and "exitcode  : 1" in result.stderr, result.stderr[-3000:]
    message = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.stdout[-3000:]
    assert "diverged at step 5:" in message[0] and "last.dcp (step 4) is the last good checkpoint" in message[0]
    assert disk_state(tmp_path / "s" / "last.dcp") == before


def start_torchrun(args: list[str], cwd, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(args, nproc), cwd=str(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_the_step_timeout_naming_it(tmp_path):
    """One of two ranks SIGSTOPped mid-run (a wedged GPU, a stuck file system): the other rank's
    watchdog ends the run within --step_timeout plus a few seconds, printing its stack and naming
    rank 1, and exits 3; torchrun fails, and the run resumes from its checkpoint."""
    args = ["--save_model_dir", str(tmp_path), "--run_name", "h", "--modulus", "23", "--max_steps", "100000",
            "--target_val_acc", "0", "--eval_every", "50", "--save_every", "50", "--log_every", "10",
            "--step_timeout", "5"]
    launcher = start_torchrun(args, tmp_path)
    try:
        wait_until(lambda: os.path.exists(tmp_path / "h" / "last.pt"), 120, "the first checkpoint", launcher)
        workers = child_pids(launcher.pid)
        assert len(workers) == 2
        stopped_at = time.monotonic()
        os.kill(workers[1], signal.SIGSTOP)  # rank 1: torchrun starts its workers in rank order
        output, _ = launcher.communicate(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        for pid in child_pids(launcher.pid) if launcher.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    print(output[-4000:])
    assert launcher.returncode != 0
    assert took < 5 + 10, took
    assert "error: hang: no rank has made progress for 5 s (--step_timeout)" in output
    assert "ranks that did not arrive: 1" in output
    assert "rank 1: no heartbeat for" in output and "its process is stopped or gone" in output
    assert "rank 0 stacks:" in output and "thread MainThread:" in output and "train.py" in output
    assert "exitcode  : 3" in output or "exitcode: 3" in output  # torchrun's summary of rank 0
    log = (tmp_path / "h" / "train.log").read_text()
    assert "ranks that did not arrive: 1" in log


@pytest.mark.slow
def test_a_long_evaluation_is_not_a_hang(tmp_path):
    """An evaluation of more than 20 s (25 s here: 8,938 examples one at a time), under --step_timeout 5:
    both ranks are busy, so neither is waiting on a lost peer, and the run ends normally."""
    args = ["--save_model_dir", str(tmp_path), "--run_name", "e", "--modulus", "113", "--max_steps", "2",
            "--eval_every", "2", "--eval_batch_size", "1", "--embedding_dim", "384", "--mlp_dim", "1536",
            "--num_blocks", "4", "--batch_size", "16", "--log_every", "1", "--step_timeout", "5"]
    launcher = start_torchrun(args, tmp_path)
    seen = {}
    for line in launcher.stdout:
        for mark in ("step      2/2", "eval      2"):
            if mark in line:
                seen[mark] = time.monotonic()
    launcher.wait(timeout=300)
    assert launcher.returncode == 0
    assert seen["eval      2"] - seen["step      2/2"] > 20, seen


@pytest.mark.parametrize("args, fragments", [
    (["--fsdp", "--dtype", "float16"], ["--fsdp", "bfloat16"]),
    (["--fsdp", "--grokfast_lamb", "2"], ["--fsdp", "--grokfast_lamb"]),
    (["--step_timeout", "2"], ["--step_timeout", "5 or more"]),
])
def test_bad_sharding_flags_name_the_flag(args, fragments):
    """Refused before anything is built (train.py then prints the one line and exits 2, as for every
    ConfigError: tests/test_train.py)."""
    from config import ConfigError, parse_config
    with pytest.raises(ConfigError) as error:
        parse_config(args)
    assert all(fragment in str(error.value) for fragment in fragments), str(error.value)


@pytest.mark.parametrize("program", ["sae", "lens"])
def test_the_other_trainers_take_the_watchdogs_flag(program):
    """sae.py and lens.py run the same watchdog (their sessions start it): --step_timeout is theirs too,
    checked the same way."""
    import lens
    from config import ConfigError, parse_flags
    from saes.config import SAEConfig
    Config = SAEConfig if program == "sae" else lens.LensConfig
    needed = ["--run_dir", "runs/x"] + (["--hook", "blocks.0.mlp.hook_post"] if program == "sae" else [])
    cfg, _ = parse_flags(Config, [*needed, "--step_timeout", "0"], f"{program}.py", "")
    assert cfg.step_timeout == 0 and Config().step_timeout == 900
    with pytest.raises(ConfigError, match="--step_timeout: 2 s would call a healthy run hung"):
        parse_flags(Config, [*needed, "--step_timeout", "2"], f"{program}.py", "")


@pytest.mark.slow
def test_a_sharded_checkpoint_missing_a_shard_or_of_another_model_is_refused(tmp_path):
    """Exit 2 naming the folder, nothing overwritten: shards of another model under this run's meta.pt
    (a folder copied together from two runs), and a folder that lost a rank's shard."""
    runs = tmp_path / "runs"
    for name, extra in (("r", []), ("narrow", ["--embedding_dim", "64"])):  # one process: one shard each
        train.main(["--save_model_dir", str(runs), "--run_name", name, *COMMON, "--fsdp", "--max_steps", "2", *extra])
    mixed = runs / "narrow" / "last.dcp"
    shutil.copy(runs / "r" / "last.dcp" / "meta.pt", mixed / "meta.pt")  # r's settings over narrow's shards
    resume = ["--save_model_dir", str(runs), "--resume", "auto", "--max_steps", "4"]
    run_bad_input("train.py", [*resume, "--run_name", "narrow"], tmp_path, str(mixed), "does not fit this model")
    folder = runs / "r" / "last.dcp"
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "meta.pt"]
    os.remove(folder / "__0_0.distcp")
    run_bad_input("train.py", [*resume, "--run_name", "r"], tmp_path, str(folder))


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_from_its_previous_checkpoint(tmp_path):
    """SIGKILL to torchrun and both ranks while they write a sharded checkpoint (its temporary folder
    holds shards, and the rename has not happened): the previous last.dcp is whole, and the same
    command with --resume auto continues from it; the next save replaces the leftover folder."""
    args = ["--save_model_dir", str(tmp_path), "--run_name", "k", "--modulus", "23", "--max_steps", "100000",
            "--target_val_acc", "0", "--eval_every", "1000", "--save_every", "5", "--log_every", "5", "--fsdp",
            "--embedding_dim", "512", "--mlp_dim", "2048", "--num_blocks", "4", "--batch_size", "16"]
    run = tmp_path / "k"
    launcher = start_torchrun(args, tmp_path)
    try:
        wait_until(lambda: (run / "last.dcp" / "meta.pt").exists(), 180, "the first checkpoint", launcher)
        first = torch.load(run / "last.dcp" / "meta.pt", weights_only=True)["step"]

        def writing() -> bool:  # the next save is under way: some shard written, not yet renamed
            tmp = run / ".last.dcp.tmp"
            return tmp.is_dir() and any(name.endswith(".distcp") for name in os.listdir(tmp))
        deadline = time.monotonic() + 120
        workers = child_pids(launcher.pid)  # in sessions of their own: killpg of the launcher misses them
        assert len(workers) == 2
        while not writing():
            assert launcher.poll() is None and time.monotonic() < deadline, "no second save seen"
            time.sleep(0.002)
        for pid in workers + [launcher.pid]:
            os.kill(pid, signal.SIGKILL)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    kept = torch.load(run / "last.dcp" / "meta.pt", weights_only=True)["step"]
    assert kept >= first and (run / ".last.dcp.tmp").exists()
    weights = model_weights(run / "last.dcp")  # whole: every shard there
    assert weights["embed.weight"].shape == (24, 512)
    resumed = run_torchrun([*args[:args.index("--max_steps")], "--max_steps", str(kept + 5), "--resume", "auto",
                            *args[args.index("--max_steps") + 2:]], cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {kept}" in resumed.stdout
    assert not (run / ".last.dcp.tmp").exists()
    assert torch.load(run / "last.dcp" / "meta.pt", weights_only=True)["step"] == kept + 5
