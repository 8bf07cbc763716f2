"""torchrun on CPU: two processes with the gloo backend, as a researcher launches them on GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

import train
from conftest import assert_same_run, child_pids, logged_steps, model_weights, run_torchrun, torchrun_command, wait_until
from plumbing.tracking import read_metrics

# A run long enough to interrupt: 150 steps, a checkpoint every 10, dropout so that every rank's
# own RNG stream matters for an exact resume.
LONG = ["--modulus", "23", "--batch_size", "64", "--max_steps", "150", "--target_val_acc", "0",
        "--dropout", "0.1", "--log_every", "5", "--eval_every", "25", "--save_every", "10"]


@pytest.mark.slow
@pytest.mark.parametrize("architecture, losses", [
    ([], 3e-7),
    (["--positional", "rope", "--qk_norm", "--num_kv_heads", "2", "--norm", "rmsnorm", "--activation", "relu2",
      "--muon_lr", "0.02"], 2e-6)], ids=["gpt2", "rope-gqa-qknorm"])
def test_two_ranks_match_one_process(tmp_path, architecture, losses):
    """Same global batch: 2 ranks x 2 micro-steps of 16 give one process's 64-example steps.

    Only float rounding differs (the sums are split differently). Measured over the 36 steps on a
    2-core x86 CPU: losses 1.5e-7 relative apart at most, the gradient norm 2.3e-7; with rotary,
    QK-norm (whose division magnifies rounding) and grouped-query attention 6.3e-7 and 3.4e-6;
    weights 4e-6 apart. On an AMD EPYC, whose kernels round otherwise: 1.1e-7 and 1.3e-7, and with
    the second architecture 1.14e-6 and 4.3e-6. The bounds below (README: "to 3e-7") keep about
    twice the larger. Large learning
    rates amplify the rounding step after step (grokking's Muon lr 0.3 turns it into 1e-3 within 30
    steps), so this run uses gentle ones; with QK-norm gentler still (Muon 0.05 drifted 2e-5 apart by
    step 32). The second architecture also checks that its rotary tables (buffers, which DDP is told
    not to broadcast) agree on both ranks.
    """
    common = ["--save_model_dir", str(tmp_path), "--modulus", "23", "--batch_size", "64", "--lr", "1e-3", "--use_muon", "true",
              "--muon_lr", "0.05", "--max_steps", "36", "--target_val_acc", "0", "--log_every", "1",
              "--eval_every", "12", *architecture]
    train.main(common + ["--run", "one"])
    result = run_torchrun(common + ["--run_name", "two", "--accumulation_steps", "2"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    one = {r["step"]: r for r in read_metrics(tmp_path / "one" / "metrics.jsonl")}
    two = {r["step"]: r for r in read_metrics(tmp_path / "two" / "metrics.jsonl")}
    assert sorted(one) == sorted(two) == list(range(1, 37))
    bounds = {"train_loss": losses, "val_loss": losses, "grad_norm": 5 * losses, "train_acc": 0, "val_acc": 0}
    for step in one:
        for key, bound in bounds.items():
            if key in one[step]:
                assert two[step][key] == pytest.approx(one[step][key], rel=bound, abs=0), (step, key)
    a, b = model_weights(tmp_path / "one" / "last.pt"), model_weights(tmp_path / "two" / "last.pt")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)

    log = (tmp_path / "two" / "train.log").read_text()
    assert "world size 2" in log and "weights identical on all 2 ranks" in log
    # Only rank 0 prints: every line of the run appears once in torchrun's combined output.
    assert result.stdout.count("step     36/36") == 1 and result.stdout.count("tinylab run two") == 1
    # Both ranks exited 0, and gloo's threads went with the process group (a thread left running into
    # the interpreter's shutdown is what aborted runs at exit: distributed.teardown_distributed).
    assert "gloo threads outlived" not in result.stderr and "terminate called" not in result.stderr


def assert_torchrun_stopped_by_sigterm(returncode: int, output: str) -> None:
    """torchrun, given SIGTERM, stops its workers (which save and exit 128 + 15) and then raises its
    own SignalException: it exits 1 with that exception, not with a worker's failure."""
    assert returncode == 1, output[-3000:]
    assert "SignalException: Process" in output and "got signal: 15" in output, output[-3000:]
    assert "ChildFailedError" not in output, output[-3000:]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted torchrun run that interrupted ones must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("straight")
    result = run_torchrun(["--save_model_dir", str(root), "--run_name", "straight", *LONG], cwd=str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "straight"


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_resume_is_exact(tmp_path, straight_run):
    args = ["--save_model_dir", str(tmp_path), "--run_name", "cut", *LONG]
    process = subprocess.Popen(torchrun_command(args), cwd=str(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: logged_steps(tmp_path / "cut"), 120, "the first logged step", process)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    output, _ = process.communicate(timeout=120)
    assert_torchrun_stopped_by_sigterm(process.returncode, output)

    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert 1 <= saved["step"] < 150, saved["step"]
    assert len(saved["rng"]) == 2  # each rank's own RNG streams
    log = (tmp_path / "cut" / "train.log").read_text()
    assert f"SIGTERM received: stopping after step {saved['step']}" in log
    assert f"interrupted at step {saved['step']}; last.pt saved" in log

    result = run_torchrun(args + ["--resume", "auto"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed at step {saved['step']}" in result.stdout
    assert_same_run(tmp_path / "cut", straight_run)


@pytest.mark.slow
def test_max_restarts_resumes_after_a_worker_dies(tmp_path, straight_run):
    # No run name: the restarted workers must find the run their first attempt generated.
    args = ["--save_model_dir", str(tmp_path), *LONG]
    process = subprocess.Popen(torchrun_command(args, launcher=["--max-restarts", "1"]), cwd=str(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run_dir():
        names = [n for n in os.listdir(tmp_path) if not n.startswith(".")]
        return tmp_path / names[0] if names else None

    wait_until(lambda: run_dir() and (run_dir() / "last.pt").exists(), 120, "the first checkpoint", process)
    workers = child_pids(process.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]

    log = (run_dir() / "train.log").read_text()
    assert "(new)" in log and "(resumed at step " in log
    assert_same_run(run_dir(), straight_run)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".torchrun-")] == []  # cleaned up at the end


@pytest.mark.slow
def test_every_rank_stops_after_the_same_step_whoever_asks_and_however_uneven_the_steps(tmp_path):
    """distributed.StopAgreement, which train.py, sae.py and lens.py ask after every step: three
    ranks whose steps take random, different times; rank 2 asks to stop at step 60 with SIGUSR1 and
    rank 1 at step 90 with SIGTERM. Every rank leaves after the same step, with the same answer, a
    bounded number of steps after the first request (the rounds adapt to steps of about 1-6 ms)."""
    env = {**os.environ, "OUT": str(tmp_path), "REQUESTS": f"2:60:{int(signal.SIGUSR1)},1:90:{int(signal.SIGTERM)}",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(torchrun_command([], nproc=3, script="tests/harness/stop_program.py"), env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert len({r["stopped_after"] for r in ranks}) == 1, ranks
    stopped = ranks[0]["stopped_after"]
    # Before step 90 only rank 2 has asked; after it, rank 1's request may have made the same round
    # (then the larger signal wins) or not.
    assert len({r["agreed"] for r in ranks}) == 1
    assert ranks[0]["agreed"] in ((signal.SIGUSR1,) if stopped < 90 else (signal.SIGUSR1, signal.SIGTERM)), ranks
    # Not before the first request; within two rounds of it (a round spans about 0.1 s of steps).
    assert 60 <= stopped <= 60 + 2 * max(r["largest_interval"] for r in ranks), ranks
    assert max(r["largest_interval"] for r in ranks) > 1  # the rounds did widen past one step


@pytest.mark.slow
def test_three_ranks_stopped_and_resumed_end_bit_identical(tmp_path):
    """With three or more ranks, how DDP groups the gradients into buckets changes the rounding of
    their sums (with two it cannot: a + b = b + a). DDP regroups them after its first step, so a
    resumed run needs the uninterrupted run's grouping from its first step on
    (distributed.regroup_ddp_buckets); without it this run drifted from the straight one by 1e-7
    in the loss right after the resume."""
    flags = [*LONG, "--batch_size", "48"]
    straight = run_torchrun(["--save_model_dir", str(tmp_path), "--run_name", "straight", *flags], cwd=str(tmp_path),
                            nproc=3)
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = ["--save_model_dir", str(tmp_path), "--run_name", "cut", *flags]
    process = subprocess.Popen(torchrun_command(args, nproc=3), cwd=str(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: logged_steps(tmp_path / "cut"), 120, "the first logged step", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert_torchrun_stopped_by_sigterm(process.returncode, output)
    stopped = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"]
    assert 1 <= stopped < 150, output[-3000:]
    resumed = run_torchrun(args + ["--resume", "auto"], cwd=str(tmp_path), nproc=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped}" in resumed.stdout and "weights identical on all 3 ranks" in resumed.stdout
    assert_same_run(tmp_path / "cut", tmp_path / "straight")
