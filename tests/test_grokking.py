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
    graph_leads_through_the_key_frequencies(str(run_dir), losses.key_frequencies)
    circuit_is_the_one_the_report_finds(str(run_dir))


def circuit_is_the_one_the_report_finds(run_dir: str) -> None:
    """`interp.py circuit --pairs builtin` (another `a`, EAP-IG, resample ablation, faithfulness 0.9) finds
    the circuit the report's ablations and Nanda et al. describe: every head (each costs loss when
    mean-ablated) reads the numbers through its value and writes to the MLP, which writes to the
    logits; left out are what carries nothing: the direct path from the embeddings to the logits and to
    the MLP, the heads' direct paths to the logits, and every query (the `=` query is the same in both
    inputs). Its complement keeps almost nothing. Seen: 10 of 23 edges, faithfulness 0.91, complement
    0.004; exact edge scores rank the same way (Spearman 0.997)."""
    import json

    from analysis.ablation import ablation_sweep
    from analysis.circuit import edge_graph, make_pairs, score, spearman
    run = interp.load_run(run_dir, "cpu")
    sample = run.data.report_sample()
    _, ablations = ablation_sweep(run.model, sample.tokens, sample.targets)
    matter = {a.component for a in ablations if a.loss_change > 0.1}
    assert matter == {"L0H0", "L0H1", "L0H2", "L0H3", "L0 MLP"}, [(a.component, a.loss_change) for a in ablations]
    doc = json.load(open(interp.main(["circuit", run_dir, "--pairs", "builtin", "--faithfulness", "0.9"])))
    kept = {e["name"] for e in doc["edges"] if e["in_circuit"]}
    print("circuit:", sorted(kept), doc["faithfulness"], doc["complement"])
    assert doc["reached"] and doc["faithfulness"] >= 0.9 and doc["complement"] < 0.05
    heads = [f"a0.h{h}" for h in range(4)]
    assert {f"input->{h}<v>" for h in heads} | {f"{h}->m0" for h in heads} | {"m0->logits"} <= kept
    assert not kept & ({"input->logits", "input->m0"} | {f"{h}->logits" for h in heads} | {f"input->{h}<q>" for h in heads})
    assert {n["name"] for n in doc["nodes"] if n["in_circuit"]} >= {"a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"}
    model = run.model.double()
    graph, pairs = edge_graph(model), make_pairs(run.data.circuit_pairs(64))
    assert spearman(score(model, graph, pairs, "eap_ig").edges, score(model, graph, pairs, "exact").edges) > 0.95


def graph_leads_through_the_key_frequencies(run_dir: str, key_frequencies: list[int]) -> None:
    """The attribution graph of the run's own example `a b =` through a per-layer transcoder of its
    MLP (300 steps): every feature the pruned graph keeps varies over the (a, b) grid mostly in one of
    the run's key frequencies, and ablating those features on every pair costs more accuracy than
    ablating as many other features active on that example (20 random draws). Seen on this run: 6
    features kept, all of frequency 7 or 41 (key: 7, 41, 8) with 88-95 % of their variance there;
    accuracy 0.54 with them ablated, 0.69 on average (0.58 to 0.83) with random ones."""
    import json

    import sae
    from analysis.graph import open_transcoders
    from analysis.runs import capture
    from fourier import neuron_frequencies

    sae.main([run_dir, "--transcoder", "per_layer", "--layer", "0", "--arch", "topk", "--k", "16", "--max_steps", "300",
              "--batch_size", "1024", "--eval_every", "300", "--save_every", "0"])
    path = interp.main(["graph", run_dir, "--transcoders", os.path.join(run_dir, "sae")])
    document = json.load(open(path))
    kept = sorted((n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"),
                  key=lambda n: n["influence"])
    assert len(kept) >= 3 and {n["ctx_idx"] for n in kept} == {2}  # at `=`, where the answer is read
    transcoders, run = open_transcoders(os.path.join(run_dir, "sae"), "cpu")
    p, tokens, answers = run.cfg.modulus, run.data.tokens, run.data.targets[:, 0]
    with torch.no_grad():
        acts = transcoders.activations([capture(run.model, tokens, transcoders.hooks_in[0])[:, -1]])[0]  # [p², n]
    frequencies = neuron_frequencies(acts.reshape(p, p, -1))
    top = [int(n["node_id"].split("_")[1]) for n in kept]  # layer_index_position
    print("graph features:", [(f, int(frequencies.frequency[f]), round(float(frequencies.explained[f]), 3)) for f in top],
          "key frequencies:", key_frequencies)
    assert all(int(frequencies.frequency[f]) in key_frequencies and float(frequencies.explained[f]) > 0.5 for f in top)

    decoder = transcoders.decoder(0, 0)

    def accuracy(features: list[int]) -> float:
        """Every pair's accuracy with these features' writes taken out of the MLP's output at `=`."""
        chosen = torch.tensor(features)

        def ablate(out, hook):
            out = out.clone()
            out[:, -1] -= acts[:, chosen] @ decoder[chosen]
            return out

        with torch.no_grad():
            logits = run.model.run_with_hooks(tokens, [("blocks.0.hook_mlp_out", ablate)])[:, -1]
        return float((logits.argmax(-1) == answers).float().mean())

    a, b = document["metadata"]["prompt_tokens"][:2]
    active = (acts[int(a) * p + int(b)] > 0).nonzero().squeeze(1).tolist()
    generator = torch.Generator().manual_seed(0)
    random = [accuracy([active[i] for i in torch.randperm(len(active), generator=generator)[:len(top)].tolist()])
              for _ in range(20)]
    mean = sum(random) / len(random)
    print(f"accuracy with the graph's {len(top)} features ablated {accuracy(top):.3f}; with as many random active "
          f"ones {mean:.3f} ({min(random):.3f} to {max(random):.3f})")
    assert accuracy(top) < mean
