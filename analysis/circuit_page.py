"""What `interp.py circuit` writes: scores.pt, circuit.json, circuit.html (a static view of the circuit:
the input at the bottom, each layer's heads and MLP above it, the logits at the top; edges by score,
blue where the edge carries the behaviour and red where it works against it), faithfulness.png (the
faithfulness curve over circuit sizes) and report.md (the section interp's report includes)."""

from __future__ import annotations

import html
import json
import os

import torch

from analysis.circuit import MIB_FRACTIONS, CircuitResult, slot_names

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 12px; color: #222; }
  h1 { font-size: 16px; margin: 0 0 4px; } .muted { color: #666; font-size: 12px; }
  circle { stroke: #333; stroke-width: 0.6; } circle.out { opacity: 0.25; }
  path { fill: none; stroke-opacity: 0.7; }
  text { font-size: 11px; font-family: ui-monospace, monospace; }
  table { border-collapse: collapse; font-size: 12px; margin-top: 10px; } td, th { padding: 1px 8px; text-align: left; }
</style></head>
<body><h1>__TITLE__</h1><div class="muted" id="summary"></div><svg id="circuit"></svg>
<table id="edges"><tr><th>edge</th><th>score</th></tr></table>
<script>
const C = __DATA__;
const NS = "http://www.w3.org/2000/svg";
function el(name, attrs, parent) { const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]); parent.appendChild(e); return e; }
const rows = 2 * C.layers + 2, rowH = 64, cell = 58, left = 80, width = left + (C.heads + 1) * cell + 30;
const place = {};
C.nodes.forEach(n => {
  const r = n.name === "input" ? 0 : n.name === "logits" ? rows - 1 : 1 + 2 * Math.floor(n.layer) + (n.name[0] === "m" ? 1 : 0);
  const x = n.name[0] === "a" ? left + (Number(n.name.split(".h")[1]) + 0.5) * cell
    : n.name[0] === "m" ? left + (C.heads + 0.5) * cell : left + (C.heads + 1) * cell / 2;  // MLPs right of the heads
  place[n.name] = [x, 20 + (rows - 1 - r) * rowH + rowH / 2];
});
const svg = document.getElementById("circuit");
svg.setAttribute("width", width); svg.setAttribute("height", rows * rowH + 30);
for (let r = 0; r < rows; r++) el("text", {x: 4, y: 24 + (rows - 1 - r) * rowH + rowH / 2}, svg).textContent =
  r === 0 ? "input" : r === rows - 1 ? "logits" : (r % 2 ? "attn " : "mlp ") + Math.floor((r - 1) / 2);
const kept = C.edges.filter(e => e.in_circuit);
const largest = Math.max(1e-12, ...kept.map(e => Math.abs(e.score)));
const offset = {"q": -7, "k": 0, "v": 7};
kept.forEach(e => { const [x1, y1] = place[e.src], [x2, y2] = place[e.dst.split("<")[0]];
  const kind = (e.dst.match(/<(.)>/) || [])[1], dx = kind ? offset[kind] : 0;
  const p = el("path", {d: `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2 + dx},${(y1 + y2) / 2} ${x2 + dx},${y2 + 6}`,
    stroke: e.score > 0 ? "#2563eb" : "#dc2626", "stroke-width": 0.6 + 5 * Math.abs(e.score) / largest}, svg);
  el("title", {}, p).textContent = `${e.name}: ${e.score.toPrecision(4)}`; });
C.nodes.forEach(n => { const [x, y] = place[n.name];
  const c = el("circle", {cx: x, cy: y, r: 7, fill: n.name[0] === "a" ? "#f4a261" : n.name[0] === "m" ? "#8ecae6" : "#90be6d",
    class: n.in_circuit ? "in" : "out"}, svg);
  el("title", {}, c).textContent = n.name + (n.score == null ? "" : `: ${n.score.toPrecision(4)}`);
  if (n.name[0] !== "a" || n.in_circuit) el("text", {x: x + 9, y: y - 8}, svg).textContent = n.name; });
document.getElementById("summary").textContent = C.summary;
const table = document.getElementById("edges");
kept.slice(0, 200).forEach(e => { const tr = document.createElement("tr");
  tr.innerHTML = `<td>${e.name.replace(/</g, "&lt;")}</td><td>${e.score.toPrecision(4)}</td>`; table.appendChild(tr); });
</script></body></html>
"""


def _number(x) -> float | None:
    x = float(x)
    return None if x != x else x


def circuit_document(result: CircuitResult, source: str, pairs_source: str, num_pairs: int, ig_path: str) -> dict:
    """circuit.json: the settings, the behaviour clean and ablated, the circuit found (its size,
    faithfulness, complement, CPR and CMD, the curves) and every edge and node with its score."""
    s = result.scores
    g = s.graph
    T = None
    values = s.edges if s.edges is not None else s.nodes
    if s.positions:
        T = values.shape[0]
    names = slot_names(s, T)
    flat = values.flatten()
    kept = set(result.order[:result.size].tolist())
    items = [{"name": names[i], "score": float(flat[i]), "in_circuit": i in kept}
             for i in result.order.tolist()]  # ranked: the circuit first
    node_level = s.edges is None
    if not node_level:
        for item in items:
            src, dst = item["name"].split("@")[0].split("->")
            item["src"], item["dst"] = src, dst
    in_circuit_nodes = {"input", "logits"}
    for item in items:
        if item["in_circuit"]:
            if node_level:
                in_circuit_nodes.add(item["name"].split("@")[0])
            else:
                in_circuit_nodes |= {item["src"], item["dst"].split("<")[0]}
    node_scores = s.nodes if not s.positions else s.nodes.nan_to_num(0).sum(0)
    nodes = [{"name": name, "layer": g.layer_of(name), "in_circuit": name in in_circuit_nodes,
              "score": _number(node_scores[i])} for i, name in enumerate(g.senders)]
    nodes.append({"name": "logits", "layer": g.layer_of("logits"), "in_circuit": True, "score": None})
    curve = lambda points: [{"fraction": f, "size": n, "faithfulness": v} for f, n, v in points]  # noqa: E731
    return {
        "format": "tinylab circuit 1", "model": source, "pairs": pairs_source, "num_pairs": num_pairs,
        "method": s.method, "ablation": s.ablation, "metric": s.metric, "ig_steps": s.ig_steps,
        "ig_path": ig_path if s.method == "eap_ig" else "", "level": "node" if node_level else "edge",
        "positions": s.positions, "search": result.search, "seconds": round(s.seconds, 3),
        "clean_metric": s.clean, "ablated_metric": s.ablated,
        "target": result.target, "reached": result.reached, "size": result.size, "total": len(result.order),
        "faithfulness": result.faithfulness, "complement": result.complement, "cpr": result.cpr, "cmd": result.cmd,
        "curve": curve(result.curve), "signed_curve": curve(result.signed_curve),
        "nodes": nodes, ("nodes_ranked" if node_level else "edges"): items,
    }


def summary_of(doc: dict) -> str:
    what = "nodes" if doc["level"] == "node" else "edges"
    return (f"{doc['method']} ({doc['ablation']} ablation, {doc['metric']}) on {doc['num_pairs']} pairs: "
            f"{doc['size']} of {doc['total']} {what} keep {doc['faithfulness']:.3f} of the behaviour "
            f"(target {doc['target']}); with only them ablated, {doc['complement']:.3f} is left. "
            f"CPR {doc['cpr']:.3f}, CMD {doc['cmd']:.3f}. Clean {doc['metric']} {doc['clean_metric']:.4f}, "
            f"everything ablated {doc['ablated_metric']:.4f}.")


def plot_faithfulness(doc: dict, path: str | None = None):
    from utils import figure, finish_figure

    fig, ax = figure(figsize=(6, 3.8))
    for key, label in (("curve", "ranked by |score| (CMD)"), ("signed_curve", "ranked by score (CPR)")):
        points = doc[key]
        ax.plot([p["fraction"] for p in points], [p["faithfulness"] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="#999", lw=0.8)
    ax.axhline(doc["target"], color="#999", lw=0.8, ls="--")
    if doc["total"]:
        ax.axvline(doc["size"] / doc["total"], color="#2a9d8f", lw=1, label=f"circuit: {doc['size']} {doc['level']}s")
    ax.set(xscale="log", xlabel=f"share of {doc['level']}s kept", ylabel="faithfulness",
           title=f"{doc['method']}, {doc['ablation']} ablation: CPR {doc['cpr']:.3f}, CMD {doc['cmd']:.3f}")
    ax.set_xticks(list(MIB_FRACTIONS), [f"{f:g}" for f in MIB_FRACTIONS], fontsize=7)
    ax.legend(fontsize=8)
    return finish_figure(fig, path)


def report_lines(doc: dict, folder_name: str) -> list[str]:
    what = "nodes" if doc["level"] == "node" else "edges"
    ranked = doc.get("edges") or doc.get("nodes_ranked")
    lines = [f"## Circuit ({doc['method']}, {doc['ablation']} ablation)", "", summary_of(doc), "",
             f"| {what[:-1]} | score |", "| --- | --- |"]
    lines += [f"| `{item['name']}` | {item['score']:+.4f} |" for item in ranked if item["in_circuit"]][:30]
    lines += ["", "| share kept | " + " | ".join(f"{p['fraction']:g}" for p in doc["curve"]) + " |",
              "|---" * (len(doc["curve"]) + 1) + "|",
              "| faithfulness (by \\|score\\|) | " + " | ".join(f"{p['faithfulness']:.3f}" for p in doc["curve"]) + " |",
              "| faithfulness (by score) | " + " | ".join(f"{p['faithfulness']:.3f}" for p in doc["signed_curve"]) + " |",
              "", f"![faithfulness]({folder_name}/faithfulness.png) · [circuit.html]({folder_name}/circuit.html)", ""]
    return lines


def write_circuit(out_dir: str, result: CircuitResult, source: str, pairs_source: str, num_pairs: int,
                  ig_path: str, layers: int, heads: int) -> dict:
    """Writes the folder's files; returns circuit.json's document."""
    from utils import write_json

    doc = circuit_document(result, source, pairs_source, num_pairs, ig_path)
    s = result.scores
    torch.save({"edges": s.edges, "nodes": s.nodes, "senders": s.graph.senders, "receivers": s.graph.receivers,
                "order": result.order, "size": result.size, "settings": {k: doc[k] for k in (
                    "method", "ablation", "metric", "ig_steps", "ig_path", "level", "positions")}},
               os.path.join(out_dir, "scores.pt"))
    write_json(os.path.join(out_dir, "circuit.json"), doc)
    plot_faithfulness(doc, os.path.join(out_dir, "faithfulness.png"))
    kept = [e for e in doc.get("edges", []) if e["in_circuit"]]
    if doc["level"] == "node":  # draw a node circuit as the edges between its nodes
        kept_nodes = {n["name"] for n in doc["nodes"] if n["in_circuit"]}
        kept = [{"name": s.graph.edge_name(a, b), "src": s.graph.senders[a], "dst": s.graph.receivers[b],
                 "score": 0.0, "in_circuit": True}
                for a, b in s.graph.valid.nonzero().tolist()
                if s.graph.senders[a] in kept_nodes and s.graph.receiver_node(b) in kept_nodes]
    data = {"nodes": doc["nodes"], "edges": kept if doc["level"] == "node" else doc["edges"],
            "layers": layers, "heads": heads, "summary": summary_of(doc)}
    title = html.escape(f"Circuit: {doc['method']} on {pairs_source}")
    page = PAGE.replace("__TITLE__", title).replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    with open(os.path.join(out_dir, "circuit.html"), "w") as f:
        f.write(page)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(report_lines(doc, ".")))
    return doc
