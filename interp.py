"""Look inside a trained run or a pretrained model: `python interp.py` writes a report; the functions
behind it (residual stream, logit lens, attribution, ablation, patching, probes, the Fourier analysis
of grokked modular arithmetic) live in the analysis package and fourier.py.

    python interp.py runs/<run>        # writes runs/<run>/interp/: plots and report.md
    python interp.py --model gpt2 --data_path my.txt   # a pretrained model: runs/gpt2/interp/
    python interp.py graph runs/<run> --transcoders runs/<run>/sae/cross_layer-topk-512 --prompt "..."
                                       # an attribution graph: <transcoders>/graphs/<prompt>/graph.json
    python interp.py intervene runs/<run> --transcoders DIR --prompt "..." --feature 0_31_1 --scale 0
                                       # the logits' change: the graph's prediction against the model's

In a notebook, `import interp` (or `import analysis`) gives every analysis function by name:

    from interp import load_run
    run = load_run("runs/add113-20261122-105839")       # model in eval mode, config, data
    logits, cache = run.model.run_with_cache(run.data.val_x)
"""

from __future__ import annotations

from dataclasses import dataclass

import os
import sys

import torch

from analysis import *  # noqa: F401,F403 (a notebook's namespace: `import interp; interp.logit_lens(...)`)
from analysis.graph import intervene, open_transcoders, slug_of, write_graph
from analysis.report import write_report
from analysis.runs import encode_exactly, run_folder
from config import ConfigError, ModelSourceConfig, need, parse_flags, section
from plumbing.session import run_command


_report = section("report")
_graph = section("attribution graph")


@dataclass
class ReportConfig(ModelSourceConfig):
    run_dir: str = _report("", "a run directory (runs/<run>) or a checkpoint file (or --model)")
    out: str = _report("", "output directory (default <run>/interp)")
    device: str = _report("auto", "auto | cpu | cuda | mps")

    def validate(self) -> "ReportConfig":
        self.validate_source()
        return self


@dataclass
class GraphConfig(ModelSourceConfig):
    run_dir: str = _graph("", "the run the transcoders replace the MLPs of (optional: the transcoders know it)")
    transcoders: str = _graph("", "a cross-layer transcoder's folder, per-layer transcoders' folders joined by commas, "
                                  "or a folder holding one per block (<run>/sae)")
    prompt: str = _graph("", "the text to trace (a text run); a modular or Dyck run: its tokens as the report names "
                             "them, e.g. '3 5 =' (empty: the run's first validation example)")
    out: str = _graph("", "output directory (default <transcoders>/graphs/<prompt>)")
    node_threshold: float = _graph(0.8, "keep the most influential nodes up to this share of all influence")
    edge_threshold: float = _graph(0.98, "keep the most influential edges up to this share")
    max_n_logits: int = _graph(10, "at most this many output logits")
    desired_logit_prob: float = _graph(0.95, "output logits until their probability adds up to this")
    batch_size: int = _graph(64, "targets per backward pass")
    device: str = _graph("cpu", "cpu | cuda | auto (on cpu the graph is computed in float64)")

    def validate(self) -> "GraphConfig":
        need(bool(self.transcoders), "transcoders", "name the transcoders that replace the MLPs, e.g. "
             "--transcoders runs/<run>/sae/cross_layer-topk-512 (python sae.py RUN --transcoder cross_layer)")
        for name in ("node_threshold", "edge_threshold", "desired_logit_prob"):
            need(0 < getattr(self, name) <= 1, name, f"must be in (0, 1], got {getattr(self, name)}")
        for name in ("max_n_logits", "batch_size"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        if self.run_dir or self.model:
            self.validate_source()
        return self


@dataclass
class InterveneConfig(GraphConfig):
    feature: str = _graph("", "with intervene: the feature to set, by its graph.json node id layer_feature_position")
    scale: float = _graph(0.0, "with intervene: set it to its activation times this (0: ablate it)")
    value: float = _graph(-1.0, "with intervene: set it to this activation instead (-1: use --scale)")

    def validate(self) -> "InterveneConfig":
        super().validate()
        parts = self.feature.split("_")
        need(len(parts) == 3 and all(p.isdigit() for p in parts), "feature",
             f"{self.feature!r}: name a feature by its node id in graph.json, layer_feature_position, e.g. 0_31_1")
        need(self.value == -1 or self.value >= 0, "value", f"must be 0 or more (or -1: use --scale), got {self.value}")
        return self

    @property
    def where(self) -> tuple[int, int, int]:
        layer, feature, position = map(int, self.feature.split("_"))
        return layer, position, feature


def open_graph_run(cfg: GraphConfig):
    """(transcoders, run, the prompt's tokens) for `interp.py graph` and `interp.py intervene`."""
    # The transcoders record the model they read (a run, or a pretrained model's folder); --data_path only
    # says where a run's corpus is now.
    moved = cfg.data_path if cfg.data_path != ModelSourceConfig.data_path and not cfg.model else ""
    transcoders, run = open_transcoders(cfg.transcoders, cfg.device, source=ModelSourceConfig.corpus_at(moved))
    if cfg.run_dir and os.path.realpath(run_folder(cfg.run_dir)) != os.path.realpath(run_folder(run.checkpoint_path)):
        raise ConfigError(f"--transcoders: they replace the MLPs of {run_folder(run.checkpoint_path)}, not {cfg.run_dir}")
    if run.device.type == "cpu":
        run.model.double()
        transcoders.to(torch.float64)
    return transcoders, run, graph_tokens(run, cfg.prompt)


def intervention(argv: list[str]):
    cfg, _ = parse_flags(InterveneConfig, argv, "interp.py intervene", "Set or scale one transcoder feature on a "
                         "prompt: each logit's change as the attribution graph predicts it, and in the replacement "
                         "model with attention frozen and recomputed.", positional="run_dir")
    transcoders, run, tokens = open_graph_run(cfg)
    result = intervene(run.model, torch.tensor([tokens], device=run.device), transcoders, cfg.where,
                       value=None if cfg.value == -1 else cfg.value, scale=cfg.scale)
    names = run.data.token_names(result.logit_tokens)
    layer, position, feature = cfg.where
    print(f"feature {feature} of layer {layer} at position {position}: {result.before:.4f} -> {result.after:.4f}")
    print("| logit | value | change predicted by the graph | attention frozen | attention recomputed |")
    print("| --- | --- | --- | --- | --- |")
    for k, name in enumerate(names):
        print(f"| {name!r} | {float(result.clean[k]):.4f} | {float(result.predicted[k]):+.4f} | "
              f"{float(result.frozen[k]):+.4f} | {float(result.recomputed[k]):+.4f} |")
    return result


def graph_tokens(run, prompt: str) -> list[int]:
    """The prompt's token ids: a text run's tokenizer, else the tokens named as the run names them
    (`3 5 =`); no prompt: the run's task's own example (modular: the first pair the report reads;
    Dyck: the first example before its last closing bracket)."""
    if not prompt:
        return run.data.graph_example()
    if run.data.generates_text:
        return encode_exactly(run, prompt, "prompt")
    names = {name: i for i, name in enumerate(run.data.token_names(range(run.data.vocab_size)))}
    unknown = [word for word in prompt.split() if word not in names]
    if unknown:
        raise ConfigError(f"--prompt: {unknown[0]!r} is not one of this run's tokens "
                          f"({', '.join(list(names)[:12])}{', ...' if len(names) > 12 else ''})")
    return [names[word] for word in prompt.split()]


def graph(argv: list[str]) -> str:
    cfg, _ = parse_flags(GraphConfig, argv, "interp.py graph", "The attribution graph of one prompt through "
                         "transcoders that replace the model's MLPs (circuit-tracer's graph.json).",
                         positional="run_dir")
    transcoders, run, tokens = open_graph_run(cfg)
    out = cfg.out or os.path.join(transcoders.folders[0], "graphs", slug_of(cfg.prompt or "example"))
    path = write_graph(run, transcoders, tokens, out, cfg.prompt, cfg.node_threshold, cfg.edge_threshold,
                       cfg.max_n_logits, cfg.desired_logit_prob, cfg.batch_size)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "graph":
        return graph(argv[1:])
    if argv and argv[0] == "intervene":
        return intervention(argv[1:])
    cfg, _ = parse_flags(ReportConfig, argv, "interp.py", "Write an interpretability report for a run or a "
                         "pretrained model.", positional="run_dir")
    path = write_report(cfg.run_dir, cfg.out or None, cfg.device, source=cfg)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
