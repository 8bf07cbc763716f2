"""Circuit discovery's cost on GPT-2 small's shape (random weights): EAP-IG over every edge against exact
edge patching of the same edges, and against auto-circuit on the same model and pairs, in one run.

    python bench/circuit.py                          # 12 blocks x 12 heads x 768, 32 pairs of 16 tokens, 5 IG steps
    python bench/circuit.py --blocks 2 --width 128 --heads 4 --pairs 8 --exact_sample 64    # a quick look

Ours runs in float32 on the CPU (as `interp.py circuit --device cpu` runs in float64, which takes about
twice as long). Exact patching costs one patched forward pass per edge; it is timed on --exact_sample
edges (batched as the command batches them) and scaled to every edge. auto-circuit 1.0.1 runs in its
own virtualenv (the one tests/test_circuit.py builds, .venv-auto-circuit) on our model converted to
TransformerLens 2; its integrated gradients take k/5 for k = 0..5 (6 points: our --ig_path edges), its
EAP one point. --no_peer leaves it out. Both sides' scores are compared where they compute the same thing."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch  # noqa: E402

from analysis.circuit import Ablated, Pairs, edge_graph, exact_scores, score  # noqa: E402
from config import Config  # noqa: E402
from model import Transformer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--ig_steps", type=int, default=5)
    parser.add_argument("--exact_sample", type=int, default=64, help="edges exact patching is timed on")
    parser.add_argument("--no_peer", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = Config(num_blocks=args.blocks, num_heads=args.heads, embedding_dim=args.width, mlp_dim=4 * args.width,
                 context_len=1024, norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True).validate()
    model = Transformer(cfg, args.vocab).eval()
    graph = edge_graph(model)
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, args.vocab, (args.pairs, args.tokens), generator=generator)
    corrupted = clean.clone()
    corrupted[:, args.tokens // 2] = torch.randint(0, args.vocab, (args.pairs,), generator=generator)
    right, wrong = torch.randint(0, args.vocab, (2, args.pairs), generator=generator)
    pairs = Pairs(clean, corrupted, right, wrong, torch.full((args.pairs,), args.tokens - 1))
    print(f"GPT-2-small shape: {args.blocks} blocks x {args.heads} heads x {args.width}, vocabulary {args.vocab}, "
          f"{model.num_params() / 1e6:.0f}M parameters, random weights; {args.pairs} pairs of {args.tokens} tokens; "
          f"{graph.num_edges:,} edges; float32 on {torch.get_num_threads()} CPU threads", flush=True)

    rows = []
    # auto-circuit first, while this process holds little beyond the model: on GPT-2 small's shape it
    # peaks at 18 GB, which beside our own caches would not fit in 24.
    peer = None
    if not args.no_peer:
        from harness import overlay_venv
        from interop.transformerlens import _hooked_settings, _hooked_state
        from test_circuit import AUTO_CIRCUIT
        python, why_not = overlay_venv.overlay_python(".venv-auto-circuit", AUTO_CIRCUIT)
        if not python:
            print(f"auto-circuit: {why_not}")
        else:
            with tempfile.TemporaryDirectory() as folder:
                given, out = os.path.join(folder, "given.pt"), os.path.join(folder, "peer.pt")
                with torch.no_grad():
                    logits = model(clean)
                torch.save({"settings": _hooked_settings(model), "state": _hooked_state(model), "clean": clean,
                            "corrupted": corrupted, "right": right, "wrong": wrong, "ig_steps": args.ig_steps,
                            "logits": logits}, given)
                done = subprocess.run([python, os.path.join(ROOT, "tests", "harness", "auto_circuit_check.py"), given,
                                       out], capture_output=True, text=True)
                if done.returncode:
                    print(f"auto-circuit failed (exit {done.returncode}):", done.stderr[-2000:], done.stdout[-500:])
                else:
                    peer = torch.load(out, weights_only=False)
                    rows.append(("auto-circuit: EAP", peer["eap_seconds"]))
                    rows.append((f"auto-circuit: integrated gradients, {args.ig_steps + 1} points", peer["ig_seconds"]))


    def timed(label, fn):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        rows.append((label, seconds))
        print(f"  {label}: {seconds:.1f} s", flush=True)
        return result

    ig = timed(f"ours: EAP-IG, {args.ig_steps} steps (inputs, Hanna et al.)",
               lambda: score(model, graph, pairs, "eap_ig", ig_steps=args.ig_steps))
    ig_edges = timed(f"ours: EAP-IG, {args.ig_steps + 1} points (edges, auto-circuit's)",
                     lambda: score(model, graph, pairs, "eap_ig", ig_steps=args.ig_steps, ig_path="edges"))
    eap = timed("ours: EAP", lambda: score(model, graph, pairs, "eap"))
    # Exact: one patched pass per edge, batched as exact_scores batches them, on a sample of the edges.
    ablated = Ablated(model, graph, pairs, "resample", 32)
    sample = graph.valid.clone()
    keep = torch.zeros(graph.num_edges, dtype=torch.bool)
    keep[torch.randperm(graph.num_edges, generator=generator)[:args.exact_sample]] = True
    sample[graph.valid] = keep
    subset = edge_graph(model)
    subset.valid = sample  # score only the sampled edges; each is the same patched pass as any edge's
    ablated.of(0, next(pairs.chunks(32)))  # the corrupted run, which exact_scores reuses, outside the clock
    start = time.perf_counter()
    exact_scores(model, subset, pairs, ablated, "logit_diff", ig.clean, False, False, 32, quiet=True)
    per_edge = (time.perf_counter() - start) / int(sample.sum())
    exact_total = per_edge * graph.num_edges
    rows.append((f"exact patching, every edge (estimated from {int(sample.sum())})", exact_total))
    print(f"  exact: {per_edge * 1000:.1f} ms per edge -> {exact_total:.0f} s for {graph.num_edges:,} edges", flush=True)

    print()
    print("| what | seconds | exact patching's cost in units of it |")
    print("| --- | --- | --- |")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {exact_total / seconds:,.0f}x |")
    if peer is not None:
        where = {graph.edge_name(s, r): (s, r) for s, r in graph.valid.nonzero().tolist()}
        largest = max(abs(v) for v in peer["eap"].values())
        d_eap = max(abs(float(eap.edges[where[k]]) - v) for k, v in peer["eap"].items())
        d_ig = max(abs((args.ig_steps + 1) * float(ig_edges.edges[where[k]]) - v) for k, v in peer["ig"].items())
        print(f"\nauto-circuit against ours (float32 both; largest |EAP| {largest:.3g}): EAP differs by at most {d_eap:.2e}, "
              f"integrated gradients by {d_ig:.2e}; the model converts to logits {peer['logits_differ']:.1e} apart")


if __name__ == "__main__":
    main()
