"""Reading a trained run or a pretrained model, and looking inside it. Everything here takes a loaded
model (or a Run) and returns tensors or small dataclasses; every plot function returns a matplotlib
figure (pass `path=` to also save it). A notebook imports this package (or `interp`, which is the
same namespace):

    from analysis import load_run, logit_lens
    run = load_run("runs/add113-20261122-105839")       # model in eval mode, config, data
    logits, cache = run.model.run_with_cache(run.data.val_x)

    runs.py       load_run -> Run (a run directory, a checkpoint, or a pretrained model), the sequences
                  of its splits, its activations at a hook point (capture)
    sources.py    activations dumped to shards or streamed live, behind one batch(step) (sae.py, lens.py)
    residual.py   the residual stream as a stack, the logit lens, direct logit attribution
    ablation.py   zero and mean ablation of heads, MLPs and neurons
    patching.py   activation patching and path patching on a clean and a corrupted input
    probes.py     linear probes
    plots.py      the figures
    report.py     interp.py's report: the sections every run gets, then the task's own

The Fourier analysis of modular addition is in fourier.py, beside the task (it is re-exported here).
"""

from __future__ import annotations

from data import loss_and_accuracy  # noqa: F401
from fourier import (FourierAblation, FourierLosses, NeuronFrequencies, embedding_frequency_norms,  # noqa: F401
                     fourier_2d, fourier_ablation, fourier_basis, fourier_losses, fourier_measures, frequency_norms,
                     frequency_rows, gini, key_frequencies, logit_frequency_norms, neuron_frequencies, neuron_grid,
                     plot_frequency_norms, plot_neuron_frequencies, restrict_to_frequencies, restricted_and_excluded,
                     sum_directions)
from analysis.runs import (Run, Sequences, capture, capture_all, encode_exactly, hook_width, load_run,  # noqa: F401
                           run_folder, split_sequences, token_names)
from analysis.residual import direct_logit_attribution, logit_lens, residual_stack  # noqa: F401
from analysis.ablation import Ablation, ablation_hook, ablation_sweep  # noqa: F401
from analysis.patching import corrupt, logit_difference, patch_heads, patch_residual, path_patch  # noqa: F401
from analysis.probes import Probe, probe_residual, train_probe  # noqa: F401
from analysis.plots import (plot_ablation, plot_attention, plot_patching, plot_probes,  # noqa: F401
                            plot_residual_norms)
from analysis.report import write_report  # noqa: F401

__all__ = [  # what `from analysis import *` (and interp) gives a notebook
    "Ablation", "FourierAblation", "FourierLosses", "NeuronFrequencies", "Probe", "Run", "Sequences",
    "ablation_hook", "ablation_sweep", "capture", "capture_all", "corrupt", "direct_logit_attribution",
    "embedding_frequency_norms", "encode_exactly", "fourier_2d", "fourier_ablation", "fourier_basis",
    "fourier_losses", "fourier_measures", "frequency_norms", "frequency_rows", "gini", "hook_width",
    "key_frequencies", "load_run", "logit_difference", "logit_frequency_norms", "logit_lens",
    "loss_and_accuracy", "neuron_frequencies", "neuron_grid", "patch_heads", "patch_residual", "path_patch",
    "plot_ablation", "plot_attention", "plot_frequency_norms", "plot_neuron_frequencies", "plot_patching",
    "plot_probes", "plot_residual_norms", "probe_residual", "residual_stack", "restrict_to_frequencies",
    "restricted_and_excluded", "run_folder", "split_sequences", "sum_directions", "token_names", "train_probe",
    "write_report",
]
