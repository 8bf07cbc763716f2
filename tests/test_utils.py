"""Runtime plumbing: checkpoints that survive a kill, the stop signals, the MFU table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from plumbing.checkpoints import load_checkpoint, save_checkpoint
from conftest import ROOT, wait_until
from plumbing.hardware import PEAK_FLOPS, describe_hosts, flops_per_token, peak_flops, peak_flops_of
from plumbing.session import StopSignals


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # A process saves a 64 MB checkpoint over and over; SIGKILL lands at arbitrary points of a save.
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from plumbing.checkpoints import save_checkpoint
        weights = torch.randn(16, 1024, 1024)
        for i in range(10**6):
            save_checkpoint({{"model": {{"w": weights}}, "config": {{}}, "step": i}}, {str(path)!r})
    """)
    for delay in (0.05, 0.2, 0.45):
        process = subprocess.Popen([sys.executable, "-c", script])
        try:
            wait_until(path.exists, 60, "the first checkpoint", process)
            first = load_checkpoint(str(path))["step"]
            wait_until(lambda: load_checkpoint(str(path))["step"] > first, 60, "a second save", process)
            time.sleep(delay)  # a kill at some point of a save; any point must be safe
        finally:
            process.kill()
            process.wait()
        checkpoint = load_checkpoint(str(path))  # whole, whichever save the kill interrupted
        assert checkpoint["model"]["w"].shape == (16, 1024, 1024)
        path.unlink()
    leftovers = [n for n in os.listdir(tmp_path) if n != "last.pt"]
    assert all(n.startswith(".last.pt.tmp-") for n in leftovers)  # hidden, never mistaken for a checkpoint


def test_a_checkpoint_cut_short_is_refused_with_its_name(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "config": {}}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="last.pt is not a readable checkpoint"):
        load_checkpoint(str(path))


def test_stop_signals_record_the_first_signal_and_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing and kills nothing
        wait_until(lambda: signals.received, 5, "the signal handler")
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("Tesla T4", 65e12),
    ("NVIDIA GeForce GTX 1080 Ti", None),  # not in the table: no MFU rather than a guess
    ("Some Future Accelerator", None),
])
def test_peak_flops_table(name, flops):
    assert peak_flops_of(name) == flops


def test_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu")) is None
    assert all(flops > 1e12 for _, flops in PEAK_FLOPS)


def test_flops_per_token_is_palms_formula():
    # GPT-2 small: 85M non-embedding parameters, 12 layers x 12 heads x 64, context 1024.
    assert flops_per_token(85_000_000, 12, 12, 64, 1024) == 6 * 85_000_000 + 12 * 12 * 12 * 64 * 1024


def test_the_log_says_which_ranks_ran_on_which_host():
    assert describe_hosts(["node1", "node1", "node2", "node2"]) == " on 2 hosts: node1 (ranks 0-1), node2 (ranks 2-3)"
    assert describe_hosts(["a", "b", "a"]) == " on 2 hosts: a (rank 0), b (rank 1), a (rank 2)"
    assert describe_hosts(["gpu7"] * 8) == describe_hosts([]) == ""
