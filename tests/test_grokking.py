"""`python train.py` with no flags groks modular addition, stops by itself (under a minute) and
learns a circuit the Fourier tools explain."""

import os
import re

import pytest
import torch

import interp
from conftest import run_train
from plumbing.tracking import read_metrics


@pytest.mark.slow
def test_default_run_groks_and_stops_by_itself(tmp_path):
    result = run_train([], cwd=str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_name,) = os.listdir(tmp_path / "runs")
    run_dir = tmp_path / "runs" / run_name
    expected = {"config.json", "train.log", "metrics.jsonl", "last.pt", "best.pt", "training_curves.png"}
    assert expected <= set(os.listdir(run_dir))

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "val_acc" in r]
    max_steps = torch.load(run_dir / "last.pt", weights_only=True)["config"]["max_steps"]
    assert evals[-1]["val_acc"] >= 0.99 and evals[-1]["step"] < max_steps  # the target stopped it
    assert records[-1]["train_acc"] == 1.0
    # Memorisation comes first: train accuracy is perfect while validation is still far from it.
    assert any(r.get("train_acc", 0) == 1.0 and r.get("val_acc", 1) < 0.5 for r in records)

    assert "early stop: val_acc" in result.stdout
    done = re.search(r"done: (\d+) steps in ([\d.]+s|\d+m\d+s)", result.stdout)
    assert done and int(done.group(1)) == evals[-1]["step"]

    # It learned the circuit of Nanda et al.: logits in a handful of frequencies, which carry the loss.
    losses = interp.fourier_losses(interp.load_run(str(run_dir)))
    assert 1 <= len(losses.key_frequencies) <= 8
    assert losses.restricted_loss <= 3 * losses.full_loss + 0.01 and losses.excluded_loss > 3
    report = open(interp.main([str(run_dir)])).read()
    assert f"Key frequencies of the logits: {losses.key_frequencies}" in report
