"""One process, stopped the ways a cluster stops it: a signal, then a resume that continues exactly;
and a run whose loss blows up, which must stop without touching its last good checkpoint."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, assert_same_run, logged_steps, run_train, wait_until
from plumbing.tracking import read_metrics

LONG = ["--modulus", "23", "--batch_size", "64", "--max_steps", "120", "--target_val_acc", "0",
        "--dropout", "0.1", "--log_every", "5", "--eval_every", "20", "--save_every", "50"]


@pytest.mark.slow
def test_sigusr1_checkpoints_after_the_step_and_resume_is_exact(tmp_path):
    common = ["--save_model_dir", str(tmp_path), *LONG]
    train.main(common + ["--run", "straight"])

    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--run", "cut"],
                               cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: logged_steps(tmp_path / "cut"), 120, "the first logged step", process)
    process.send_signal(signal.SIGUSR1)  # Slurm's warning signal...
    process.send_signal(signal.SIGTERM)  # ...and another while the run is stopping: no harm done
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, stderr
    assert "Traceback" not in stderr

    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert 1 <= saved["step"] < 120  # stopped early, not at a save_every step
    assert f"SIGUSR1 received: stopping after step {saved['step']}" in stdout
    assert "--resume auto --run_name cut" in stdout  # the log says how to continue

    summary = train.main(common + ["--run", "cut", "--resume", "auto"])
    assert summary["steps"] == 120 and summary["interrupted"] is None
    assert_same_run(tmp_path / "cut", tmp_path / "straight")


@pytest.mark.slow
def test_a_loss_that_blows_up_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    args = ["--save_model_dir", str(tmp_path), "--run", "boom", "--modulus", "17", "--target_val_acc", "0",
            "--log_every", "5", "--eval_every", "10", "--save_every", "10"]
    train.main(args + ["--max_steps", "10"])
    before = {name: (tmp_path / "boom" / name).read_bytes() for name in ("last.pt", "best.pt")}

    # The same run resumed with an absurd learning rate: step 11's update makes weights overflow
    # while its loss and gradients were still finite. Step 11 is a save step: nothing may be saved.
    result = run_train(args + ["--max_steps", "40", "--resume", "auto", "--lr", "2e38", "--grad_clip", "0",
                               "--save_every", "11"], cwd=str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(message) == 1
    assert "diverged at step 11:" in message[0] and "last.pt (step 10) is the last good checkpoint" in message[0]
    assert message[0] in (tmp_path / "boom" / "train.log").read_text()
    for name, data in before.items():
        assert (tmp_path / "boom" / name).read_bytes() == data, name
    assert all(math.isfinite(record.get("train_loss", 0.0))  # nothing nan was logged as a result
               for record in read_metrics(tmp_path / "boom" / "metrics.jsonl"))
