"""The feature browser `sae.py report` writes, opened in a real headless Chromium from disk: it loads
without a console error, a feature's panel shows the context where that feature is largest (found
here independently of the report), the list sorts and filters, and a missing file is reported."""

from __future__ import annotations

import html
import os
import re
import shutil

import pytest
import torch

import sae as sae_module
from analysis.runs import capture, split_sequences
from harness.headless_chromium import MISSING, open_page as open_in_chromium
from fourier import neuron_frequencies

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]
QUICK = ["--hook", "blocks.0.hook_resid_post", "--arch", "topk", "--k", "4", "--dict_size", "96", "--batch_size", "64",
         "--max_steps", "20", "--eval_every", "20", "--buffer_rows", "512", "--eval_tokens", "600", "--warmup_steps", "2",
         "--lr_schedule", "constant", "--save_every", "0"]


def open_page(page: str, fragment: str, profile) -> tuple[str, list[str]]:
    """(the DOM after the page has loaded and settled, the console's messages) of page#fragment."""
    opened = open_in_chromium(page, fragment, profile)
    return opened.dom, opened.console


def panel_of(dom: str) -> str:
    return dom[dom.index('<section id="panel"'):]


def listed(dom: str) -> list[int]:
    return [int(f) for f in re.findall(r'<tr class="row[^"]*" data-f="(\d+)"', dom)]


@pytest.fixture(scope="module")
def reported(trained_runs):
    """{task: (the SAE folder, its report page)} for a text and a modular SAE."""
    out = {}
    for task, positions in (("text", "all"), ("modular", "answer")):
        trained = sae_module.main([trained_runs[task], *QUICK, "--positions", positions, "--name", "browser"])
        report = sae_module.main(["report", trained["sae_dir"]])
        out[task] = trained["sae_dir"], os.path.join(os.path.dirname(report), "features.html")
    return out


def largest_feature(sae_dir: str):
    """Computed here, not by the report: the feature with the largest total activation on held-out
    rows, its density, and the token and activation where it is largest."""
    sae, cfg, run = sae_module.load_sae(sae_dir, device="cpu")
    held_out = split_sequences(run, "val", cfg.positions, cfg.eval_tokens)
    with torch.no_grad():
        acts = sae.encode(capture(run.model, held_out.tokens, cfg.hook)).masked_fill(~held_out.mask[..., None], 0)
    feature = int(acts.sum((0, 1)).argmax())
    s, t = divmod(int(acts[..., feature].argmax()), acts.shape[1])
    density = (acts > 0).float().sum((0, 1)) / held_out.mask.sum()
    return feature, float(acts[s, t, feature]), int(held_out.tokens[s, t]), density, run


def opened(page: str, feature: int, profile) -> tuple[str, str, float, str]:
    """(the DOM, the panel, the first context's activation, that context's tokens as HTML) of
    page#feature=N, which must open that feature's panel with no console message."""
    dom, console = open_page(page, f"feature={feature}", profile)
    assert console == []
    panel = panel_of(dom)
    assert f'data-feature="{feature}"' in panel and f"<h2>Feature {feature}</h2>" in panel
    first = re.search(r'<div class="context[^"]*"><span class="value">([^<]+)</span>(.*?)</div>', panel)
    return dom, panel, float(first.group(1)), first.group(2)


def test_a_features_panel_shows_where_it_is_largest_with_no_console_error(reported, tmp_path):
    sae_dir, page = reported["text"]
    feature, value, token, density, run = largest_feature(sae_dir)
    dom, panel, shown_value, tokens = opened(page, feature, tmp_path / "profile")
    assert shown_value == pytest.approx(value, rel=1e-3) and '<div class="context">' in panel  # text: joined
    top = re.search(r'<span class="tok top"[^>]*>([^<]*)</span>', tokens).group(1)
    assert html.unescape(top) == run.data.decode([token]).replace("\n", "\u21b5")
    shown = float(re.search(r"fires on <b>([\d.]+)%</b>", panel).group(1))
    assert shown == pytest.approx(100 * float(density[feature]), rel=5e-3)  # 3 significant digits
    assert "Pushes up" in panel and "Pushes down" in panel and "<svg" in panel  # logits, histogram
    assert listed(dom) == list(range(96)) and "1\u201396 of 96" in dom  # the list, by index


def test_the_list_sorts_by_density_and_filters_by_top_token(reported, tmp_path):
    sae_dir, page = reported["text"]
    _, _, _, density, _ = largest_feature(sae_dir)
    dom, console = open_page(page, "sort=density", tmp_path / "profile")
    assert console == []
    shown = listed(dom)
    assert len(shown) == 96 and sorted(shown) == list(range(96))
    assert [float(density[f]) for f in shown] == sorted(density.tolist(), reverse=True)
    dom, _ = open_page(page, "q=%22e%22", tmp_path / "profile")  # features whose top token is "e"
    rows = dom[dom.index('<tbody id="rows">'):dom.index("</tbody>")]
    labels = re.findall(r'<td class="label">([^<]*)</td>', rows)
    assert labels and all(html.unescape(label) == '"e"' for label in labels)


def test_a_grokking_sae_shows_each_features_fourier_frequency_and_its_pairs(reported, tmp_path):
    sae_dir, page = reported["modular"]
    feature, value, _, _, _ = largest_feature(sae_dir)
    _, panel, shown_value, tokens = opened(page, feature, tmp_path / "profile")
    # The frequency, found here: the feature at "=" over all p² pairs (a b =, the token after p - 1
    # being "="), and interp.neuron_frequencies (tested on planted frequencies in test_interp.py).
    sae, cfg, run = sae_module.load_sae(sae_dir, device="cpu")
    p = run.cfg.modulus
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    grid_tokens = torch.cat([pairs, torch.full((p * p, 1), p)], 1)
    with torch.no_grad():
        grid = sae.encode(capture(run.model, grid_tokens, cfg.hook)[:, -1])[:, feature].reshape(p, p, 1)
    frequency = int(neuron_frequencies(grid).frequency[0])
    assert re.search(rf"Fourier frequency <b>k = {frequency}</b>", panel), (frequency, panel[:2000])
    assert shown_value == pytest.approx(value, rel=1e-3) and '<div class="context apart">' in panel
    tokens = re.findall(r'<span class="tok[^"]*"[^>]*>([^<]*)</span>', tokens)
    assert len(tokens) == 3 and tokens[2] == "=" and all(t.isdigit() for t in tokens[:2])  # "a b ="


def test_a_missing_panel_file_is_reported_in_the_console_and_on_the_page(reported, tmp_path):
    sae_dir, page = reported["text"]
    copy = tmp_path / "report"
    shutil.copytree(os.path.dirname(page), copy)
    os.remove(copy / "features" / "chunk-0000.js")
    dom, console = open_page(str(copy / "features.html"), "feature=3", tmp_path / "profile")
    assert len(console) == 1 and "features/chunk-0000.js did not load" in console[0]
    assert "features/chunk-0000.js is missing" in panel_of(dom)
    dom, console = open_page(page, "feature=96", tmp_path / "profile")
    assert console == [] and "There is no feature 96: this SAE has features 0 to 95." in panel_of(dom)
