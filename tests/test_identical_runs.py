"""The same command gives the same run: bit for bit, whatever else the machine is doing.

A run's arithmetic must not depend on how its work is split between threads or on when its threads
started. hardware.fast_math fixes the intra-op thread count (which turns MKL's dynamic threading
off) and flushes subnormals on every thread or on none; these tests check both halves, then run one
short command many times, some of them while two other processes keep both cores busy.

    pytest tests/test_identical_runs.py                       # TINYLAB_IDENTICAL_RUNS runs (default 4)
    TINYLAB_IDENTICAL_RUNS=30 pytest tests/test_identical_runs.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from plumbing import hardware
from conftest import ROOT, model_weights, run_metrics, run_train

RUNS = int(os.environ.get("TINYLAB_IDENTICAL_RUNS", "4"))  # every other one under load
COMMAND = ["--preset", "grokking", "--max_steps", "30", "--eval_every", "10", "--save_every", "10", "--log_every", "1"]

# Two other heavy jobs, one on each of the machine's two cores: matrix products on one thread each.
LOAD = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a\n"


def test_the_flush_reaches_every_thread_of_the_test_process():
    # conftest.py set it before torch started its threads, as a program's session does in a fresh process
    assert hardware.fast_math(torch.device("cpu")) == "subnormals flushed to zero on every thread"
    assert hardware.subnormals_flushed() == 1.0


@pytest.mark.slow
def test_threads_started_before_the_flush_leave_every_thread_unflushed():
    """A caller whose threads already ran (a notebook, say) gets no flush on any thread, rather
    than a flush on one thread whose results would depend on how work is split."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch\nfrom plumbing import hardware\n"
            "torch.ones(1 << 22) * 2  # starts the intra-op threads without the flush\n"
            "print(hardware.fast_math(torch.device('cpu'))); print(hardware.subnormals_flushed())\n"
            "torch.set_flush_denormal(True); print(hardware.subnormals_flushed())\n")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, check=True).stdout
    said, after, forced = out.splitlines()
    assert said.startswith("subnormals not flushed: this process's") and float(after) == 0.0
    if torch.get_num_threads() > 1:  # what fast_math avoids: the flush on this thread only, half the work
        assert 0.0 < float(forced) < 1.0


@pytest.mark.extended
def test_the_same_command_gives_the_same_run_every_time_even_under_load(tmp_path):
    runs = []
    for i in range(RUNS):
        loaded = i % 2 == 1
        load = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(2 if loaded else 0)]
        try:
            result = run_train(COMMAND + ["--save_model_dir", str(tmp_path), "--run_name", f"r{i}"], cwd=str(tmp_path))
        finally:
            for process in load:
                process.kill()
                process.wait()
        assert result.returncode == 0, result.stderr[-3000:]
        assert "subnormals flushed to zero on every thread" in result.stdout
        records = run_metrics(tmp_path / f"r{i}")
        losses = [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records]
        runs.append((loaded, losses, model_weights(tmp_path / f"r{i}" / "last.pt")))
    print(f"{RUNS} runs of train.py {' '.join(COMMAND)}, {RUNS // 2} of them beside two busy processes")
    _, reference, weights = runs[0]
    assert len(reference) >= 30
    for i, (loaded, losses, other) in enumerate(runs[1:], 1):
        differ = [(a, b) for a, b in zip(losses, reference) if a != b]
        assert not differ and len(losses) == len(reference), \
            f"run {i} ({'under load' if loaded else 'alone'}) first differs at {differ[:1]}"
        assert other.keys() == weights.keys() and all(torch.equal(other[k], weights[k]) for k in weights), i
