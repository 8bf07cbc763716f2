"""SAELens interchange: `python sae.py export <sae dir> --to saelens OUT` writes what SAELens opens with
its own loader (`SAE.load_from_disk`), and it gives our features and reconstruction of the same rows.
SAELens requires TransformerLens < 4, which cannot share the main environment (TransformerLens 4), so
it runs in a second virtualenv, `.venv-saelens/`, built on first use (tests/overlay_venv.py); SAELens
is never needed to train."""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from harness import overlay_venv
import sae as sae_module
from interop.saelens import load_saelens
from conftest import run_bad_input
from test_sae import QUICK

# What SAELens needs beyond the main environment: the release the README's figures were checked
# against, pinned so that CI checks that one (a new release is a deliberate change here).
PACKAGES = ["sae-lens==6.54.12", "transformer_lens>=3,<4", "better-abc>=0.0.3", "plotly", "plotly-express", "babe",
            "nltk", "simple-parsing", "docstring-parser", "tenacity"]
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness", "saelens_check.py")


@pytest.fixture(scope="module")
def saelens_python():
    python, why_not = overlay_venv.overlay_python(".venv-saelens", PACKAGES)
    if python is None:
        pytest.skip(why_not)
    return python


# Every SAELens class we write: batchtopk and matryoshka (the same in use) become JumpReLU SAEs with
# one threshold for all features, as SAELens saves its own.
KINDS = {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE",
         "matryoshka": "JumpReLUSAE"}


@pytest.mark.slow
def test_exported_saes_give_our_features_in_saelens(tmp_path, trained_runs, saelens_python):
    hooks = {}
    for arch in KINDS:
        trained = sae_module.main([trained_runs["modular"], *QUICK, "--arch", arch, "--k", "4",
                                   "--name", f"export-{arch}"])
        folder = tmp_path / arch
        out = str(folder / "saelens")
        assert sae_module.main(["export", trained["sae_dir"], "--to", "saelens", out]) == out
        assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors"]
        sae, cfg, _ = sae_module.load_sae(trained["sae_dir"], device="cpu")
        hooks[str(folder)] = cfg.hook
        x = torch.randn(256, sae.d) * 2 + 0.5  # any rows: both sides compute the same function of them
        with torch.no_grad():
            x_hat, f, _ = sae(x)
        for name, value in (("x", x), ("f", f), ("x_hat", x_hat)):
            np.save(folder / f"{name}.npy", value.numpy())
    result = subprocess.run([saelens_python, CHECK, *hooks], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["class"] for r in found] == list(KINDS.values())
    for theirs in found:
        assert theirs["hook_name"] == hooks[theirs["folder"]], theirs
        assert theirs["same_active"], theirs  # the same features fire on every row
        assert theirs["features"] < 1e-5 and theirs["reconstruction"] < 1e-5, theirs

    # And back: what SAELens saved (its save_model) opens in sae.py for the run's hook, computing our
    # features again, and its report runs on the model (`sae.py report FOLDER --model RUN`).
    for arch in KINDS:
        folder = tmp_path / arch
        theirs, cfg, run = load_saelens(str(folder / "resaved"), trained_runs["modular"], device="cpu")
        x, f = (torch.from_numpy(np.load(folder / f"{name}.npy")) for name in ("x", "f"))
        with torch.no_grad():
            assert torch.equal(theirs.encode(x) > 0, f > 0)
            assert float((theirs.encode(x) - f).abs().max()) <= 1e-5 * float(f.abs().max())
        assert cfg.hook == hooks[str(folder)] and theirs.arch == ("jumprelu" if arch in ("batchtopk", "matryoshka")
                                                                   else arch)
    path = sae_module.main(["report", str(tmp_path / "relu" / "resaved"), "--model", trained_runs["modular"]])
    assert "relu SAE with" in open(path).read() and "| ce_loss_score |" in open(path).read()
    # Without --model, as a user meets it: exit 2, one line naming --model, nothing written.
    result = run_bad_input("sae.py", ["report", str(tmp_path / "relu" / "resaved")], tmp_path,
                           watch=[trained_runs["modular"]])
    assert re.search("--model: .* is a SAELens SAE, which does not record the model", result.stderr)


# Our transcoders -> the SAELens class that opens each (sae_lens/saes/transcoder.py).
TRANSCODERS = {("per_layer", "relu"): "Transcoder", ("per_layer", "jumprelu"): "JumpReLUTranscoder",
               ("per_layer", "batchtopk"): "JumpReLUTranscoder", ("skip", "relu"): "SkipTranscoder",
               ("skip", "jumprelu"): "JumpReLUSkipTranscoder"}


@pytest.mark.slow
def test_exported_transcoders_give_our_features_and_outputs_in_saelens(tmp_path, trained_runs, saelens_python):
    """`sae.py export --to saelens` of a per-layer or skip transcoder: SAELens's own loader opens it as
    its transcoder class, and from the same MLP inputs computes our features and our reconstruction
    of the MLP's output (the skip path included) to float32's rounding; a TopK one is refused by name."""
    hooks = {}
    for (kind, arch), _ in TRANSCODERS.items():
        trained = sae_module.main([trained_runs["modular"], *QUICK, "--transcoder", kind, "--layer", "0", "--arch",
                                   arch, "--k", "4", "--name", f"export-{kind}-{arch}"])
        folder = tmp_path / f"{kind}-{arch}"
        if kind == "skip":  # a skip path far from its start at zero, so that its export is checked
            path = os.path.join(trained["sae_dir"], "last.pt")
            checkpoint = torch.load(path, weights_only=False)
            checkpoint["model"]["W_skip"] = torch.randn_like(checkpoint["model"]["W_skip"])
            torch.save(checkpoint, path)
        out = str(folder / "saelens")
        sae_module.main(["export", trained["sae_dir"], "--to", "saelens", out])
        transcoder, cfg, _ = sae_module.load_sae(trained["sae_dir"], device="cpu")
        hooks[str(folder)] = cfg.hook
        x = torch.randn(256, transcoder.d) * 2 + 0.5
        with torch.no_grad():
            y_hat, f, _ = transcoder(torch.cat([x, torch.zeros(256, transcoder.d_out)], 1))
        for name, value in (("x", x), ("f", f), ("x_hat", y_hat)):
            np.save(folder / f"{name}.npy", value.numpy())
    result = subprocess.run([saelens_python, CHECK, *hooks], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["class"] for r in found] == list(TRANSCODERS.values())
    for theirs in found:
        assert theirs["hook_name"] == hooks[theirs["folder"]] and theirs["same_active"], theirs
        assert theirs["features"] < 1e-5 and theirs["reconstruction"] < 1e-5, theirs
    topk = sae_module.main([trained_runs["modular"], *QUICK, "--transcoder", "per_layer", "--layer", "0", "--arch",
                            "topk", "--k", "4", "--name", "export-topk-transcoder"])
    run_bad_input("sae.py", ["export", topk["sae_dir"], "--to", "saelens", str(tmp_path / "topk")], tmp_path,
                  "--to saelens: SAELens has no topk transcoder", watch=[trained_runs["modular"]])


# `python sae.py ARGS` ({tmp}: the test's tmp_path, holding taken/ with a file of its own and gated/, a
# SAELens SAE of a kind sae.py does not open; {modular}: the shared run), and the pattern its one line
# must match.
BAD_INPUT = {
    "export-to-a-folder-that-holds-files": (["export", "{tmp}/whatever", "--to", "saelens", "{tmp}/taken"],
                                            "already exists and is not an empty folder"),
    "export-to-another-format": (["export", "{tmp}", "--to", "dictionary_learning", "{tmp}/out"],
                                 "'dictionary_learning' is not a format"),
    "export-without-to": (["export", "{tmp}"], "usage: python sae.py export"),
    # A report on a folder that holds no SAE of either kind; a SAELens kind sae.py does not open.
    "report-on-no-sae": (["report", "{tmp}/taken"], "holds no SAE: neither last.pt .* nor cfg.json"),
    "report-on-a-gated-sae": (["report", "{tmp}/gated", "--model", "{modular}"],
                              "a SAELens 'gated' SAE; sae.py opens standard, topk, jumprelu"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUT)
def test_export_and_report_refuse_bad_input(tmp_path, trained_runs, case):
    """As a user meets it: exit 2, one 'error: ' line that says what is wrong, nothing written."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 64, "d_sae": 256}))
    (gated / "sae_weights.safetensors").write_bytes(b"")
    args, pattern = BAD_INPUT[case]
    result = run_bad_input("sae.py", [a.format(tmp=tmp_path, modular=trained_runs["modular"]) for a in args],
                           tmp_path, watch=[trained_runs["modular"]])
    assert re.search(pattern, result.stderr)
    assert (taken / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_export_refuses_an_sae_whose_model_has_moved_on(tmp_path, trained_runs):
    """An SAE trained on the model at one step says nothing about the model at another: its export is
    refused, by name, and nothing is written."""
    trained = sae_module.main([trained_runs["modular"], *QUICK, "--max_steps", "2", "--name", "export-stale"])
    stale = tmp_path / "stale"
    stale.mkdir()
    checkpoint = torch.load(os.path.join(trained["sae_dir"], "last.pt"), weights_only=False)
    checkpoint["model_step"] += 100  # as if the run trained on after the SAE was made
    torch.save(checkpoint, stale / "last.pt")
    run_bad_input("sae.py", ["export", str(stale), "--to", "saelens", str(tmp_path / "out")], tmp_path,
                  "trained on the model at step", watch=[trained_runs["modular"]])
    assert not os.path.exists(tmp_path / "out")
