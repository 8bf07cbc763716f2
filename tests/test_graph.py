"""Attribution graphs (analysis/graph.py, `interp.py graph`): the local replacement model with error
nodes is the real model on its prompt, and each edge is the direct effect it claims to be."""

from __future__ import annotations

import pytest
import torch

from analysis.graph import (Transcoders, attribute, clean_pass, decompose, frozen_forward, intervene, prune,
                            read_nodes, replacement_forward, without)
from saes import build_sae
from saes.config import mlp_hooks
from test_architecture import PIECES, make

KINDS = ["per_layer", "skip", "cross_layer"]
MODELS = {"layernorm": dict(norm="layernorm"), "rmsnorm-rotary-gqa-swiglu-softcap": PIECES["all"],
          "no-norm-learned-positions": dict(norm="none")}


def transcoders_for(model, kind: str, arch: str = "topk", n: int = 24) -> Transcoders:
    """Random transcoders of every MLP of `model`, calibrated on its own activations, in float64, with
    encoder biases lifted so that many features fire (a graph with something in it), skip paths random."""
    tokens = torch.randint(0, model.vocab_size, (8, 12), generator=torch.Generator().manual_seed(2))
    hooks = [mlp_hooks(model, layer) for layer in range(len(model.blocks))]
    _, cache = model.run_with_cache(tokens, [h for pair in hooks for h in pair])
    d = cache[hooks[0][1]].shape[-1]
    torch.manual_seed(3)
    if kind == "cross_layer":
        rows = torch.cat([cache[h_in] for h_in, _ in hooks] + [cache[h_out] for _, h_out in hooks], -1).flatten(0, 1)
        saes = [build_sae(d, n, arch, k=6, d_out=d, layers=len(hooks)).double()]
        saes[0].calibrate(rows, True)
    else:
        saes = []
        for h_in, h_out in hooks:
            sae = build_sae(d, n, arch, k=6, d_out=d, skip=kind == "skip").double()
            sae.calibrate(torch.cat([cache[h_in], cache[h_out]], -1).flatten(0, 1), True)
            saes.append(sae)
    with torch.no_grad():
        for sae in saes:
            sae.b_enc.add_(0.5)
            if kind == "skip":
                sae.W_skip.normal_(0, 0.1)
    return Transcoders([s.eval() for s in saes], [h_in for h_in, _ in hooks], ["x"], cross=kind == "cross_layer")


def prompt(model, length: int = 6) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (1, length), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", MODELS)
def test_the_replacement_with_error_nodes_is_the_real_model_on_its_prompt(kind, shape):
    """Each MLP's output rebuilt from its parts (every active feature's write, its error node, the
    decoder bias, the skip path on the input the replacement gives it), with patterns and norm scales
    frozen: the real logits to 1e-9 (float64), and every feature's input is its activation."""
    model = make(**MODELS[shape])
    transcoders = transcoders_for(model, kind)
    tokens = prompt(model)
    clean = clean_pass(model, tokens, transcoders)
    parts = decompose(model, clean, transcoders)
    assert len(parts.active) > 10
    rebuilt = []
    for m in range(transcoders.layers):
        sae = transcoders.saes[0] if transcoders.cross else transcoders.saes[m]
        d = clean.outputs[m].shape[-1]
        bias = (sae.b_dec * sae.target_scale)[m * d:(m + 1) * d] if transcoders.cross else sae.b_dec * sae.out_scale
        out = parts.errors[m] + bias
        for _, positions, vectors in parts.writes[m]:
            out = out.index_add(0, positions, vectors)
        rebuilt.append(out)
    with torch.no_grad():
        out = frozen_forward(model, clean, transcoders, rebuilt, {}, 1)
        real = model(tokens)
    assert torch.allclose(out["logits"], real, rtol=0, atol=1e-9 * float(real.abs().max()))
    reads = read_nodes(out, parts, transcoders, parts.targets())
    features = reads[len(parts.logit_ids):]
    assert torch.allclose(features, parts.activations, rtol=0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_edge_is_the_change_in_its_target_when_its_source_is_removed(kind):
    """For every source of a small graph (each feature, error node and token), a forward pass of the
    frozen system without it: the change in every feature's pre-activation and every logit is that
    source's column of the adjacency matrix; and each target's edges plus its constant (the system with
    every source removed) are its value: the activation of a feature, the logit less the mean logit."""
    model = make(**PIECES["all"])
    transcoders = transcoders_for(model, kind)
    tokens = prompt(model, 5)
    graph = attribute(model, tokens, transcoders, batch_size=7)
    clean = clean_pass(model, tokens, transcoders)
    parts = decompose(model, clean, transcoders)
    F, L, T, K = graph.n_features, graph.layers, graph.n_positions, len(graph.logit_tokens)
    rows = list(range(F)) + [F + L * T + T + k for k in range(K)]
    targets = [("feature", f) for f in range(F)] + [("logit", k) for k in range(K)]
    with torch.no_grad():
        full = read_nodes(frozen_forward(model, clean, transcoders, parts.bases, {}, 1), parts, transcoders, targets)
        assert torch.allclose(full[:F], graph.activations, atol=1e-9)
        logits, cap = model(tokens)[0, -1], model.cfg.logit_softcap
        logits = cap * torch.atanh(logits / cap) if cap else logits  # the logits before the soft cap
        assert torch.allclose(full[F:], logits[graph.logit_tokens] - logits.mean(), atol=1e-9)
        assert torch.allclose(graph.adjacency[rows].sum(1) + graph.constants[rows], full, rtol=0, atol=1e-9)
        scale = float(graph.adjacency.abs().max())
        for source in range(F + L * T + T):
            injections = {}
            if source < F:
                outputs = without(parts, features=[source])
            elif source < F + L * T:
                outputs = without(parts, errors=[source - F])
            else:
                outputs = parts.bases
                injections = {"tokens": torch.zeros_like(clean.embedding)[None]}
                injections["tokens"][0, source - F - L * T] = -clean.embedding[source - F - L * T]
            removed = read_nodes(frozen_forward(model, clean, transcoders, outputs, injections, 1), parts,
                                 transcoders, targets)
            assert torch.allclose(full - removed, graph.adjacency[rows, source], rtol=0, atol=1e-9 * scale), source
    # Nothing flows backwards: a feature's edges come from earlier layers (or, cross-layer, the same
    # layer's MLP output it reads after... never) and from its own position or before.
    for f, (layer, position, _) in enumerate(graph.active.tolist()):
        for g, (other_layer, other_position, _) in enumerate(graph.active.tolist()):
            if other_layer >= layer or other_position > position:
                assert graph.adjacency[f, g] == 0


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_an_intervention_moves_the_logits_as_the_graph_predicts_while_no_feature_turns_on_or_off(kind):
    """The replacement model with its features recomputed (not held) is the real model on its prompt,
    attention frozen or not. Scaling an early feature by 0.999 moves no other feature across its
    threshold, so the frozen-attention replacement is linear there and the graph's prediction (the
    paths of its edges) is its change to 1e-6 of the change. With attention recomputed the change
    differs (the patterns and norm scales move too)."""
    model = make(**PIECES["all"])
    transcoders = transcoders_for(model, kind)
    tokens = prompt(model, 5)
    clean = clean_pass(model, tokens, transcoders)
    parts = decompose(model, clean, transcoders)
    with torch.no_grad():
        real = model(tokens)
        for freeze in (True, False):
            out = replacement_forward(model, clean, transcoders, parts, {}, freeze)
            assert torch.allclose(out["logits"], real, rtol=0, atol=1e-9 * float(real.abs().max()))
    graph = attribute(model, tokens, transcoders)
    first = next(tuple(f) for f in graph.active.tolist() if f[0] == 0 and f[1] == 0)
    small = intervene(model, tokens, transcoders, first, scale=0.999, graph=graph)
    assert float(small.frozen.abs().max()) > 0
    assert torch.allclose(small.predicted, small.frozen, rtol=0, atol=1e-6 * float(small.frozen.abs().max()))
    ablated = intervene(model, tokens, transcoders, first, scale=0.0, graph=graph)
    assert ablated.after == 0 and ablated.before == pytest.approx(float(graph.activations[0]))
    assert not torch.allclose(ablated.recomputed, ablated.frozen, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_pruning_keeps_the_tokens_and_logits_and_the_most_influential_nodes():
    model = make(**PIECES["all"])
    transcoders = transcoders_for(model, "per_layer")
    graph = attribute(model, prompt(model, 5), transcoders)
    everything = prune(graph, 1.0, 1.0)
    pruned = prune(graph, 0.5, 0.9)
    F, T, K = graph.n_features, graph.n_positions, len(graph.logit_tokens)
    assert bool(pruned.nodes[-K - T:].all())
    assert int(pruned.nodes[:F].sum()) < int(everything.nodes[:F].sum())
    assert int(pruned.edges.sum()) < int(everything.edges.sum())
    assert not bool((pruned.nodes & ~everything.nodes).any())


# ---------------------------------------------------------------- interp.py graph


@pytest.fixture(scope="module")
def text_transcoder(trained_runs):
    """A per-layer transcoder of the text run's one MLP (the 2026 architecture: rotary, GQA, SwiGLU)."""
    import sae as sae_module
    from test_transcoders import QUICK
    run_dir = trained_runs["text"]
    summary = sae_module.main([run_dir, "--transcoder", "per_layer", "--layer", "0", "--arch", "topk", "--k", "8",
                               "--positions", "all", *QUICK, "--name", "graph-tc"])
    return run_dir, summary["sae_dir"]


@pytest.mark.slow
def test_interp_py_graph_writes_circuit_tracers_graph_file(text_transcoder, tmp_path):
    """`interp.py graph RUN --transcoders DIR --prompt TEXT`: graph.json in circuit-tracer's format
    (metadata, qParams, nodes with its node ids and types, links between nodes that are there), the
    prompt's tokens as the embedding nodes, the logits at the last position, and the pruned graph no
    larger than the whole one."""
    import json

    import interp
    run_dir, folder = text_transcoder
    path = interp.main(["graph", run_dir, "--transcoders", folder, "--prompt", "But, soft", "--out",
                        str(tmp_path / "g"), "--node_threshold", "0.9"])
    document = json.load(open(path))
    assert set(document) == {"metadata", "qParams", "nodes", "links"}
    meta = document["metadata"]
    assert meta["prompt"] == "But, soft" and "".join(meta["prompt_tokens"]) == "But, soft"
    assert meta["node_threshold"] == 0.9 and meta["slug"] == "But-soft" and meta["scan"] == "graph-tc"
    assert document["qParams"]["linkType"] == "both"
    kinds = {node["feature_type"] for node in document["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    ids = {node["node_id"] for node in document["nodes"]}
    assert len(ids) == len(document["nodes"])
    tokens = [node for node in document["nodes"] if node["feature_type"] == "embedding"]
    assert [node["ctx_idx"] for node in tokens] == list(range(9))
    for node in document["nodes"]:
        kind = node["feature_type"]
        if kind == "cross layer transcoder":  # its feature number: circuit-tracer 0.5's pairing of layer and index
            layer, index, position = map(int, node["node_id"].split("_"))
            assert (layer, position) == (int(node["layer"]), node["ctx_idx"]) and node["activation"] > 0
            assert node["feature"] == (layer + index) * (layer + index + 1) // 2 + index
        elif kind == "mlp reconstruction error":
            assert node["node_id"] == f"0_{node['layer']}_{node['ctx_idx']}" and node["feature"] == -1
        elif kind == "logit":
            assert node["layer"] == "2" and node["ctx_idx"] == 8 and node["node_id"] == f"2_{node['feature']}_8"
    assert sum(node["is_target_logit"] for node in document["nodes"]) == 1
    for link in document["links"]:
        assert link["source"] in ids and link["target"] in ids and isinstance(link["weight"], float)
    saved = torch.load(str(tmp_path / "g" / "graph.pt"), weights_only=False)
    assert len(document["links"]) <= int(saved["edge_mask"].sum())
    page_shows_the_graph(str(tmp_path / "g" / "graph.html"), document, tmp_path / "profile")


def page_shows_the_graph(page: str, document: dict, profile) -> None:
    """graph.html in headless Chromium: a circle per node and a line per link, and the most
    influential feature's panel (opened by its address) with its edges and its top held-out
    contexts, whose first is the largest; no console message."""
    import re

    from harness.headless_chromium import open_page
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    chosen = min(features, key=lambda n: n["influence"])  # the smallest cumulative share: the most influential
    opened = open_page(page, f"node={chosen['node_id']}", profile)
    assert opened.console == []
    assert opened.dom.count("<circle") == len(document["nodes"]) and opened.dom.count("<line") == len(document["links"])
    panel = opened.dom[opened.dom.index('<section id="panel"'):]
    assert f'data-node="{chosen["node_id"]}"' in panel
    index = chosen["node_id"].split("_")[1]
    assert f"feature {index} of layer {chosen['layer']} at {chosen['ctx_idx']}" in panel
    assert f"{chosen['activation']:.4f}" in panel and "Strongest edges in" in panel and "Top contexts" in panel
    values = [float(v) for v in re.findall(r'<span class="value">([\d.]+)</span>', panel)]
    assert values and values == sorted(values, reverse=True)


@pytest.mark.slow
def test_interp_py_intervene_prints_the_three_changes(text_transcoder, capsys):
    import json

    import interp
    run_dir, folder = text_transcoder
    path = interp.main(["graph", run_dir, "--transcoders", folder, "--prompt", "But, soft"])
    feature = next(n for n in json.load(open(path))["nodes"] if n["feature_type"] == "cross layer transcoder")
    capsys.readouterr()
    result = interp.main(["intervene", run_dir, "--transcoders", folder, "--prompt", "But, soft", "--feature",
                          feature["node_id"], "--scale", "0"])
    printed = capsys.readouterr().out
    layer, index, position = feature["node_id"].split("_")
    assert f"feature {index} of layer {layer} at position {position}" in printed
    assert "| logit | value | change predicted by the graph | attention frozen | attention recomputed |" in printed
    assert printed.count("\n| '") == len(result.logit_tokens) and result.after == 0


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    ([], "--transcoders: name the transcoders"),
    (["--transcoders", "nowhere"], "--transcoders: nowhere does not exist"),
    (["--transcoders", "TC", "--prompt", "To be \u00e6"], "--prompt: the run's tokenizer cannot write"),
    (["--transcoders", "TC", "--node_threshold", "1.5"], "--node_threshold: must be in (0, 1]"),
    (["intervene", "--transcoders", "TC", "--feature", "0-1-2"], "--feature: '0-1-2': name a feature by its node id"),
    (["intervene", "--transcoders", "TC", "--prompt", "But", "--feature", "0_9999_0"],
     "--feature: feature 9999 of layer 0 is not active at position 0"),
])
def test_bad_graph_flags_name_the_flag(text_transcoder, tmp_path, args, message):
    """`interp.py graph` and `interp.py intervene` given bad flags: one line naming the flag, exit 2,
    nothing written."""
    from conftest import run_bad_input
    run_dir, folder = text_transcoder
    command = ["intervene"] if args[:1] == ["intervene"] else ["graph"]
    args = args[len(command):] if command == ["intervene"] else args
    run_bad_input("interp.py", [*command, run_dir, *[folder if a == "TC" else a for a in args]], tmp_path, message,
                  watch=(run_dir,))


# ---------------------------------------------------------------- circuit-tracer, the peer

# circuit-tracer's release, pinned, and what it needs beyond the main environment: TransformerLens 3,
# and the transformers and huggingface_hub it was released against (it imports names the main
# environment's newer ones dropped).
CIRCUIT_TRACER = ["circuit-tracer==0.5.0", "transformer_lens>=3,<4", "better-abc>=0.0.3", "transformers==4.57.3",
                  "huggingface-hub<1.0", "tokenizers>=0.22,<0.23", "datasets==4.0.0"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["per_layer", "skip"])
def test_circuit_tracer_builds_the_same_graph_from_the_exported_transcoders(kind, tmp_path, trained_runs):
    """A JumpReLU per-layer transcoder of the text run (rotary, RMSNorm, multi-query, SwiGLU, soft cap),
    exported by `sae.py export --to circuit-tracer`, opened by circuit-tracer's own load_transcoder_set
    in a second virtualenv, on our model converted to TransformerLens 3 with its norms folded:
    circuit-tracer's `attribute` finds the same features and logits as ours and the same edges, with its
    convention of leaving the first position out. It computes in float32: its edges are as far from
    our float64 ones as our own float32 edges are (4.9e-5 of the largest edge, 2.2, both, here), and
    the test allows twice that. And circuit-tracer's schema for its viewer's files reads our graph.json
    unchanged."""
    import os
    import subprocess

    import interp
    import sae as sae_module
    from analysis.graph import open_transcoders
    from analysis.runs import encode_exactly
    from harness import overlay_venv
    from test_transcoders import QUICK
    python, why_not = overlay_venv.overlay_python(".venv-circuit-tracer", CIRCUIT_TRACER)
    assert python, why_not
    run_dir = trained_runs["text"]
    trained = sae_module.main([run_dir, "--transcoder", kind, "--layer", "0", "--arch", "jumprelu",
                               "--positions", "all", *QUICK, "--name", f"graph-jumprelu-{kind}"])
    if kind == "skip":  # a skip path far from its start at zero, so that its export is checked
        path = os.path.join(trained["sae_dir"], "last.pt")
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["model"]["W_skip"] = 0.1 * torch.randn_like(checkpoint["model"]["W_skip"])
        torch.save(checkpoint, path)
    out = str(tmp_path / "circuit-tracer")
    sae_module.main(["export", trained["sae_dir"], "--to", "circuit-tracer", out])
    assert sorted(os.listdir(out)) == ["config.yaml", "layer_0.safetensors"]
    transcoders, run = open_transcoders(trained["sae_dir"], "cpu")
    tokens = encode_exactly(run, "But, soft! what", "prompt")  # the run's context is 16
    ours_file = interp.main(["graph", run_dir, "--transcoders", trained["sae_dir"], "--prompt", "But, soft! what",
                             "--out", str(tmp_path / "ours")])
    check = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness", "circuit_tracer_check.py")
    done = subprocess.run([python, check, run_dir, out, ",".join(map(str, tokens)), str(tmp_path / "theirs.pt"),
                           ours_file], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "schema ok" in done.stdout  # its viewer's schema reads our graph.json unchanged
    theirs = torch.load(str(tmp_path / "theirs.pt"), weights_only=False)
    single = attribute(run.model, torch.tensor([tokens]), transcoders, skip_first=True)  # float32, as theirs
    run.model.double()
    transcoders.to(torch.float64)
    ours = attribute(run.model, torch.tensor([tokens]), transcoders, skip_first=True)
    assert torch.equal(ours.active, theirs["active"][theirs["selected"]]) and ours.logit_tokens == theirs["logit_tokens"]
    assert torch.equal(single.active, ours.active)
    scale = float(ours.adjacency.abs().max())
    difference = float((theirs["adjacency"].double() - ours.adjacency).abs().max())
    rounding = float((single.adjacency.double() - ours.adjacency).abs().max())
    print(f"{len(ours.active)} features, {len(ours.logit_tokens)} logits, {ours.adjacency.shape[0]} nodes: largest edge "
          f"{scale:.4f}; from our float64 edges, circuit-tracer's differ by at most {difference:.2e}, our float32 "
          f"ones by {rounding:.2e}")
    assert 0 < difference <= 2 * rounding and rounding < 1e-4 * scale


@pytest.mark.slow
def test_a_transcoder_circuit_tracers_files_cannot_hold_is_refused(text_transcoder, tmp_path):
    """circuit-tracer's files hold ReLU and JumpReLU transcoders: a TopK one is refused by name, and
    nothing is written."""
    from conftest import run_bad_input
    run_dir, folder = text_transcoder
    run_bad_input("sae.py", ["export", folder, "--to", "circuit-tracer", str(tmp_path / "out")], tmp_path,
                  "--to circuit-tracer:", "is a topk transcoder, and circuit-tracer's files hold ReLU or JumpReLU",
                  watch=(run_dir,))


@pytest.mark.slow
def test_a_dyck_runs_own_example_is_the_graph_of_a_closing_bracket(trained_runs):
    """`interp.py graph` of a Dyck run with no prompt traces its first example up to its last closing
    bracket: the graph's logits are read where the next token is that bracket."""
    import json

    import interp
    import sae as sae_module
    from analysis.runs import load_run
    from test_transcoders import QUICK
    run_dir = trained_runs["dyck"]
    trained = sae_module.main([run_dir, "--transcoder", "per_layer", "--layer", "0", "--arch", "topk", "--k", "8",
                               "--positions", "all", *QUICK, "--name", "graph-dyck"])
    document = json.load(open(interp.main(["graph", run_dir, "--transcoders", trained["sae_dir"]])))
    run = load_run(run_dir, device="cpu")
    example = run.data.report_sample().tokens[0].tolist()
    shown = document["metadata"]["prompt_tokens"]
    assert shown == run.data.token_names(example[:len(shown)]) and shown[0] == "<bos>"
    cut = len(shown)
    assert example[cut] in run.data.close_tokens  # next: a closing bracket
    assert not set(example[cut + 1:]) & set(run.data.close_tokens)  # the example's last one
