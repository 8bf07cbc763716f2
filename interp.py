"""Look inside a trained run or a pretrained model: `python interp.py` writes a report; the functions
behind it (residual stream, logit lens, attribution, ablation, patching, probes, the Fourier analysis
of grokked modular arithmetic) live in the analysis package and fourier.py.

    python interp.py runs/<run>        # writes runs/<run>/interp/: plots and report.md
    python interp.py --model gpt2 --data_path my.txt   # a pretrained model: runs/gpt2/interp/
    python interp.py graph runs/<run> --transcoders runs/<run>/sae/cross_layer-topk-512 --prompt "..."
                                       # an attribution graph: <transcoders>/graphs/<prompt>/graph.json
    python interp.py intervene runs/<run> --transcoders DIR --prompt "..." --feature 0_31_1 --scale 0
                                       # the logits' change: the graph's prediction against the model's
    python interp.py circuit runs/<run> --pairs builtin --method eap_ig --faithfulness 0.9
                                       # the circuit: <run>/circuit/<method>-<ablation>-<metric>/circuit.json

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
from analysis.circuit import ABLATIONS, IG_PATHS, METHODS, METRICS, SEARCHES, edge_graph, find_circuit, read_pairs, score
from analysis.circuit_page import summary_of, write_circuit
from analysis.graph import intervene, open_transcoders, slug_of, write_graph
from analysis.report import write_report
from analysis.runs import encode_tokens, load_run, run_folder
from config import ConfigError, ModelSourceConfig, need, parse_flags, section
from plumbing.session import run_command


_report = section("report")
_graph = section("attribution graph")
_circuit = section("circuit discovery")


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


@dataclass
class CircuitConfig(ModelSourceConfig):
    run_dir: str = _circuit("", "a run directory (runs/<run>) or a checkpoint file (or --model)")
    pairs: str = _circuit("builtin", "clean/corrupted pairs: a JSONL file of {clean, corrupted, right, wrong} rows, or "
                                     "builtin (the run's task's own: modular, another operand; Dyck, a bracket "
                                     "swapped; text and --model, IOI-style sentences)")
    num_pairs: int = _circuit(64, "use at most this many pairs (0: every pair in the file, or 128 built-in ones)")
    method: str = _circuit("eap_ig", "eap_ig | eap | attribution (nodes) | exact (one patched pass per edge)")
    ablation: str = _circuit("resample", "what an ablated edge carries: resample (the corrupted run's value) | mean "
                                         "(its mean over the corrupted inputs) | zero")
    metric: str = _circuit("logit_diff", "logit_diff (right - wrong answer) | loss (the right answer's log-probability)")
    ig_steps: int = _circuit(5, "with eap_ig: points on the path from ablated to clean")
    ig_path: str = _circuit("inputs", "with eap_ig: inputs (interpolate the input embeddings, Hanna et al.; resample "
                                      "only) | edges (every edge ablated by the same amount, auto-circuit's)")
    level: str = _circuit("edge", "edge | node (heads and MLPs; attribution is always node-level)")
    positions: bool = _circuit(False, "score each edge at each position apart (pairs of one length)")
    faithfulness: float = _circuit(0.9, "the share of the behaviour the circuit must keep, in (0, 1]")
    search: str = _circuit("topn", "topn (the best |score| first) | greedy (grow a connected circuit from the logits)")
    batch_size: int = _circuit(32, "pairs per pass")
    out: str = _circuit("", "output directory (default <run>/circuit/<method>-<ablation>-<metric>)")
    device: str = _circuit("cpu", "cpu | cuda | auto (on cpu in float64)")

    def validate(self) -> "CircuitConfig":
        for name, allowed in (("method", METHODS), ("ablation", ABLATIONS), ("metric", METRICS),
                              ("search", SEARCHES), ("ig_path", IG_PATHS), ("level", ("edge", "node"))):
            need(getattr(self, name) in allowed, name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        need(0 < self.faithfulness <= 1, "faithfulness", f"must be in (0, 1], got {self.faithfulness}")
        need(self.ig_steps >= 1, "ig_steps", f"must be at least 1, got {self.ig_steps}")
        need(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        need(self.num_pairs >= 0, "num_pairs", f"must be 0 or more, got {self.num_pairs}")
        need(bool(self.pairs), "pairs", "name a JSONL file of clean/corrupted pairs, or builtin")
        need(not (self.method == "eap_ig" and self.ig_path == "inputs" and self.ablation != "resample"), "ig_path",
             f"inputs interpolates towards the corrupted inputs, so it needs --ablation resample; use --ig_path edges "
             f"with --ablation {self.ablation}")
        self.validate_source()
        return self


def circuit(argv: list[str]) -> str:
    """interp.py circuit: scores, circuit.json, circuit.html, faithfulness.png and report.md under --out."""
    from utils import new_or_empty, write_folder

    cfg, _ = parse_flags(CircuitConfig, argv, "interp.py circuit", "Score every edge of the model's graph on "
                         "clean/corrupted pairs and find the smallest circuit that keeps --faithfulness of the "
                         "behaviour, with MIB's CPR and CMD.", positional="run_dir")
    run = load_run(cfg.run_dir, cfg.device, source=cfg)
    pairs, source = read_pairs(run, cfg.pairs, cfg.num_pairs)
    if cfg.positions and not pairs.same_length:
        raise ConfigError("--positions: the pairs have different lengths; per-position scores need pairs of one length")
    out = cfg.out or os.path.join(run_folder(cfg.run_dir), "circuit", f"{cfg.method}-{cfg.ablation}-{cfg.metric}")
    if not new_or_empty(out):
        raise ConfigError(f"--out: {out} already holds files; name another folder with --out")
    model = run.model.double() if run.device.type == "cpu" else run.model
    pairs = pairs.to(run.device)
    graph = edge_graph(model)
    print(f"{len(pairs)} pairs, {graph.num_edges:,} edges between {len(graph.senders)} senders and "
          f"{len(graph.receivers)} receivers; {cfg.method} with {cfg.ablation} ablation", flush=True)
    scores = score(model, graph, pairs, cfg.method, cfg.ablation, cfg.metric, cfg.ig_steps, cfg.positions,
                   cfg.level == "node", cfg.batch_size, cfg.ig_path, quiet=False)
    result = find_circuit(model, scores, pairs, cfg.faithfulness, cfg.search, cfg.batch_size)
    doc = write_folder(out, lambda staging: write_circuit(staging, result, cfg.run_dir, source, len(pairs), cfg.ig_path,
                                                          run.cfg.num_blocks, run.cfg.num_heads))
    print(summary_of(doc))
    print(f"wrote {out}/circuit.json")
    return os.path.join(out, "circuit.json")


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
    return encode_tokens(run, prompt, "prompt") if prompt else run.data.graph_example()


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
    if argv and argv[0] == "circuit":
        return circuit(argv[1:])
    cfg, _ = parse_flags(ReportConfig, argv, "interp.py", "Write an interpretability report for a run or a "
                         "pretrained model.", positional="run_dir")
    path = write_report(cfg.run_dir, cfg.out or None, cfg.device, source=cfg)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_command(main)
