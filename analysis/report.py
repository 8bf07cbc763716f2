"""interp.py's report: `<run>/interp/report.md` and its figures. What every run gets (residual norms,
attention, ablation), what a task with one answer at the end gets (patching, probes: the task's
`answer_tokens`, `corrupt` and `probe_labels`), then the task's own sections (`report_sections`;
modular addition's Fourier analysis)."""

from __future__ import annotations

import os

import torch

from analysis.ablation import ablation_sweep
from analysis.patching import patch_heads, patch_residual, path_patch
from analysis.plots import plot_ablation, plot_attention, plot_patching, plot_probes, plot_residual_norms
from analysis.probes import probe_residual
from analysis.runs import load_run, run_folder


def write_report(run_dir: str, out_dir: str | None = None, device: str = "auto", source=None) -> str:
    """Writes <run>/interp/: plots and report.md with the findings in numbers; returns its path.
    `source` (a config.ModelSourceConfig) opens a pretrained model instead (load_run)."""
    import matplotlib.pyplot as plt

    open_before = set(plt.get_fignums())
    try:
        run = load_run(run_dir, device, source=source)
        out_dir = out_dir or os.path.join(run_folder(run_dir), "interp")
        os.makedirs(out_dir, exist_ok=True)
        sample = run.data.report_sample()
        cfg = run.cfg
        header = [f"# {os.path.basename(os.path.normpath(run_dir))}: interpretability report", "",
                  f"Checkpoint `{run.checkpoint_path}` (step {run.step}), task `{cfg.task}`, "
                  f"{cfg.num_blocks} block(s) x {cfg.num_heads} heads x {cfg.embedding_dim}."
                  + (f" {sample.about}" if sample.about else ""), ""]
        summary, lines = [], []
        for section in (streams, ablations, patching):
            found, written = section(run, sample, out_dir)
            summary += found
            lines += written
        found, written = run.data.report_sections(run, out_dir)  # the task's own, last; its findings lead
        summary, lines = found + summary, lines + written
        lines += circuits(run_folder(run_dir), out_dir)
        path = os.path.join(out_dir, "report.md")
        with open(path, "w") as f:
            f.write("\n".join(header + ["## Findings", "", *summary, ""] + lines))
        return path
    finally:  # the report's figures are on disk; close them, and only them
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)


def streams(run, sample, out_dir: str) -> tuple[list[str], list[str]]:
    """The residual stream's norm by layer, and each block's attention patterns."""
    with torch.no_grad():
        _, cache = run.model.run_with_cache(sample.tokens, lambda n: n.endswith(("hook_pattern", "hook_resid_pre",
                                                                                  "hook_resid_final")))
    if sample.norm_positions is not None:
        cache.update({k: v[:, sample.norm_positions] for k, v in cache.items() if not k.endswith("hook_pattern")})
    plot_residual_norms(run.model, cache, sample.labels, path=os.path.join(out_dir, "residual_norms.png"))
    lines = ["![residual stream norm by layer](residual_norms.png)", ""]
    shown = slice(0, sample.attention_positions or None)
    labels = None if sample.norm_positions is not None else sample.labels  # labels of every position only
    for i in range(run.cfg.num_blocks):
        name = f"attention_L{i}.png"
        plot_attention(cache[f"blocks.{i}.attn.hook_pattern"][..., shown, shown], labels,
                       title=f"block {i}, mean over {len(sample.tokens)} {sample.what}", path=os.path.join(out_dir, name))
        lines.append(f"![attention, block {i}]({name})")
    return [], lines + [""]


def ablations(run, sample, out_dir: str) -> tuple[list[str], list[str]]:
    """Mean ablation of every head and MLP (and, where the task asks, every neuron), ranked."""
    clean, every = ablation_sweep(run.model, sample.tokens, sample.targets, kind="mean",
                                  neurons=run.data.ablate_neurons)
    results = [r for r in every if " N" not in r.component]  # heads and MLPs
    neurons_ranked = [r for r in every if " N" in r.component]
    plot_ablation(results, clean[0], title="mean ablation", path=os.path.join(out_dir, "ablation.png"))
    lines = ["## Ablation (mean over the batch)", "",
             f"Clean validation loss {clean[0]:.4f}, accuracy {clean[1]:.4f}.", "",
             "| component | loss | accuracy | loss change |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.component} | {r.loss:.4f} | {r.accuracy:.4f} | {r.loss_change:+.4f} |" for r in results]
    lines += ["", "![ablation](ablation.png)", ""]
    if neurons_ranked:
        lines += ["The neurons whose mean ablation costs the most loss: " + ", ".join(
            f"{r.component.split()[-1]} (block {r.component[1:r.component.index(' ')]}, {r.loss_change:+.4f})"
            for r in neurons_ranked[:10]) + f"; {sum(r.loss_change > 0.01 for r in neurons_ranked)} of "
            f"{len(neurons_ranked)} cost more than 0.01 each.", ""]
    summary = ["- Components that matter most (mean ablation, loss change): "
               + ", ".join(f"{r.component} {r.loss_change:+.3f}" for r in results[:4]) + "."]
    return summary, lines


def patching(run, sample, out_dir: str) -> tuple[list[str], list[str]]:
    """For a task with one answer at the last position: activation patching of the residual stream and
    of each head (with its direct path alone) from a clean into a corrupted input, and linear probes
    at the last position."""
    data, cfg = run.data, run.cfg
    if not data.answer_tokens:
        return [], []
    tokens, targets = sample.tokens, sample.targets
    corrupted, position = data.corrupt(tokens)
    changed = sample.labels[position] if sample.labels else f"position {position}"
    right = targets[:, -1]
    wrong = run.model(corrupted)[:, -1, :data.answer_tokens].argmax(-1)  # the corrupted run's answer
    keep = right != wrong
    clean, dirty, right, wrong = tokens[keep], corrupted[keep], right[keep], wrong[keep]
    recovery, names = patch_residual(run.model, clean, dirty, right, wrong)
    columns = sample.labels or [str(t) for t in range(tokens.shape[1])]
    plot_patching(recovery, names, columns, title=f"patching the residual stream ({changed} corrupted)",
                  path=os.path.join(out_dir, "patching_residual.png"))
    heads = patch_heads(run.model, clean, dirty, right, wrong)
    direct = {(i, h): path_patch(run.model, clean, dirty, right, wrong, (i, h), [("hook_resid_final", None)]).item()
              for i in range(cfg.num_blocks) for h in range(cfg.num_heads)}
    lines = [f"## Activation patching (`{changed}` corrupted)", "",
             "Recovery of the logit difference (clean answer minus the corrupted run's answer) when clean "
             "activations are patched into the corrupted run: 0 is as corrupted, 1 as clean.", "",
             "| head | its output | only its direct path to the logits |", "| --- | --- | --- |"]
    lines += [f"| L{i}H{h} | {heads[i, h]:.3f} | {direct[i, h]:.3f} |" for (i, h) in direct]
    lines += ["", "The difference between the columns is what a head does through the MLPs and heads after it.",
              "", "![patching the residual stream](patching_residual.png)", ""]
    probes = {label: probe_residual(run.model, tokens, values, position=-1, num_classes=data.answer_tokens)
              for label, values in data.probe_labels(tokens, targets).items()}
    if not probes:
        return [], lines
    at = sample.labels[-1] if sample.labels else "the last position"
    lines += [f"## Linear probes at `{at}`", "",
              "| label | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, by_layer in probes.items():
        lines.append(f"| {label} | " + " | ".join(f"{by_layer[n].heldout_accuracy:.3f}" for n in names) + " |")
    plot_probes(probes, title=f"linear probes at '{at}'", path=os.path.join(out_dir, "probes.png"))
    lines += ["", f"Held-out accuracy of a linear probe on the residual stream at `{at}`.", "",
              "![probe accuracy by layer](probes.png)", ""]
    summary = [f"- Linear probes at `{at}` on the final residual stream (held-out accuracy): " + ", ".join(
        f"{label} {by_layer[names[-1]].heldout_accuracy:.2f}" for label, by_layer in probes.items()) + "."]
    return summary, lines


def circuits(run_dir: str, out_dir: str) -> list[str]:
    """The sections of the circuits `interp.py circuit` wrote under <run>/circuit/, each with its curve
    and page linked from the report's folder."""
    import json

    from analysis.circuit_page import report_lines

    root = os.path.join(run_dir, "circuit")
    lines = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "circuit.json")
        if os.path.isfile(path):
            with open(path) as f:
                lines += report_lines(json.load(f), os.path.relpath(os.path.join(root, name), out_dir))
    return lines
