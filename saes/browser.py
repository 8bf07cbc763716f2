"""A static page for looking through every feature of a sparse autoencoder, one after another: its
density, the held-out contexts where it is largest with each token shaded by its activation, the
tokens it pushes up and down through the unembedding, its activation histogram and, for grokking
runs, its Fourier frequency. `sae.py report` computes the numbers and calls `write_feature_browser`.

The page opens from disk with no server: `features.html` and a folder `features/` beside it. A
browser will not fetch() files from file://, but it does run <script src> files, so the data is
JavaScript: `features/index.js` (one row per feature, for the list), `features/tokens.js` (the
text of every token shown), and `features/chunk-NNNN.js` (the panels of CHUNK features each), loaded
only when one of their features is opened. The page's state lives in its address
(`features.html#feature=12&sort=density`), so a feature can be linked to."""

from __future__ import annotations

import json
import math
import os

import numpy as np

CHUNK = 128  # features per panel file: 16k features -> 128 files of about 100 KB


def _numbers(values, digits: int = 3) -> str:
    """A JSON array of numbers at `digits` significant digits (NaN and infinities -> null), fast enough
    for 16k features."""
    values = np.asarray(values, dtype=np.float64).ravel()
    text = ",".join(map(f"{{:.{digits}g}}".format, np.where(np.isfinite(values), values, np.nan).tolist()))
    return "[" + text.replace("nan", "null") + "]"


def _ints(values) -> str:
    return "[" + ",".join(map(str, np.asarray(values).astype(np.int64).ravel().tolist())) + "]"


def write_feature_browser(out_dir: str, *, title: str, summary: str, metrics: dict, density, largest, labels: list[str],
                          histogram, contexts: list[list[tuple[list[int], list[float], int, float]]],
                          token_text: dict[int, str], joined: bool, logits=None, fourier=None) -> str:
    """Writes out_dir/features.html and out_dir/features/; returns the page's path.

    density, largest: [n]; labels: [n] short strings the list shows and searches (the token where each
    feature is largest); histogram: [n, bins] counts from 0 to `largest`; contexts[f]: (token ids,
    activations with NaN where the SAE does not read, the index of the top token, its activation);
    token_text: id -> text for every id used; joined: tokens are pieces of text (else shown apart);
    logits: (up ids, up values, down ids, down values), each [n, top], or None; fourier:
    (frequency [n], share of variance [n]) or None."""
    n = len(density)
    folder = os.path.join(out_dir, "features")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # panels of an earlier report of another size
        if name.startswith("chunk-") and name.endswith(".js"):
            os.remove(os.path.join(folder, name))
    index = {"title": title, "summary": summary, "metrics": {k: float(v) for k, v in metrics.items()}, "n": n,
             "chunk": CHUNK, "joined": joined, "bins": int(np.asarray(histogram).shape[1]),
             "has_logits": logits is not None, "has_fourier": fourier is not None}
    head = json.dumps(index)[:-1]
    columns = [f'"density":{_numbers(density, 6)}', f'"largest":{_numbers(largest, 6)}',  # sorted on
               f'"labels":{json.dumps(labels, ensure_ascii=False)}']
    if fourier is not None:
        columns += [f'"frequency":{_ints(fourier[0])}', f'"share":{_numbers(fourier[1])}']
    with open(os.path.join(folder, "index.js"), "w", encoding="utf-8") as f:
        f.write(f"tinylabFeatures.setIndex({head},{','.join(columns)}}});\n")
    with open(os.path.join(folder, "tokens.js"), "w", encoding="utf-8") as f:
        text = {str(k): v for k, v in token_text.items()}
        f.write(f"tinylabFeatures.setTokens({json.dumps(text, ensure_ascii=False)});\n")
    histogram = np.asarray(histogram)
    for chunk in range(math.ceil(n / CHUNK)):
        panels = []
        for feature in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            shown = ",".join(f"[{_ints(ids)},{_numbers(acts)},{center},{_numbers([value], 4)[1:-1]}]"
                             for ids, acts, center, value in contexts[feature])
            panel = f'{{"h":{_ints(histogram[feature])},"c":[{shown}]'
            if logits is not None:
                up_ids, up, down_ids, down = (np.asarray(x[feature]) for x in logits)
                panel += f',"u":[{_ints(up_ids)},{_numbers(up)}],"d":[{_ints(down_ids)},{_numbers(down)}]'
            panels.append(panel + "}")
        with open(os.path.join(folder, f"chunk-{chunk:04d}.js"), "w", encoding="utf-8") as f:
            f.write(f"tinylabFeatures.setChunk({chunk},[{','.join(panels)}]);\n")
    path = os.path.join(out_dir, "features.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(PAGE)
    return path


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SAE features</title>
<style>
  body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
  header { padding: 12px 20px; background: #fff; border-bottom: 1px solid #ddd; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  .summary, .muted { color: #666; }
  .metrics span { display: inline-block; margin: 6px 14px 0 0; }
  .metrics b { font-variant-numeric: tabular-nums; }
  main { display: flex; gap: 16px; padding: 12px 20px; align-items: flex-start; }
  #list { flex: 0 0 430px; background: #fff; border: 1px solid #ddd; border-radius: 6px; }
  #controls { padding: 8px; display: flex; gap: 6px; flex-wrap: wrap; border-bottom: 1px solid #eee; }
  #controls input { width: 90px; } #controls input#filter { width: 110px; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { padding: 3px 8px; text-align: left; border-bottom: 1px solid #f0f0f0; white-space: nowrap; }
  td.label { max-width: 130px; overflow: hidden; text-overflow: ellipsis; font-family: ui-monospace, monospace; }
  tr.row { cursor: pointer; } tr.row:hover { background: #f3f7ff; } tr.current { background: #e3edff; }
  tr.dead { color: #aaa; }
  .bar { display: inline-block; height: 8px; background: #4a7fd4; vertical-align: middle; margin-right: 4px; }
  #pager { padding: 6px 8px; display: flex; justify-content: space-between; align-items: center; }
  #panel { flex: 1; min-width: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px 16px; }
  #panel h2 { margin: 0 0 4px; font-size: 17px; }
  .context { font-family: ui-monospace, monospace; font-size: 13px; margin: 3px 0; white-space: pre-wrap;
             word-break: break-all; }
  .context .value { display: inline-block; width: 64px; color: #666; text-align: right; margin-right: 8px; }
  .tok { border-radius: 2px; }
  .apart .tok { margin-right: 4px; padding: 0 2px; }
  .tok.top { outline: 1.5px solid #c0392b; }
  .off { color: #999; }
  .columns { display: flex; gap: 28px; flex-wrap: wrap; margin: 8px 0; }
  .logits td { padding: 1px 6px; font-family: ui-monospace, monospace; }
  .up { color: #1a7f37; } .down { color: #b42318; }
  h3 { font-size: 14px; margin: 14px 0 4px; }
</style>
</head>
<body>
<script>
// The data files call these as they load; a panel's file is loaded on first use.
window.tinylabFeatures = {
  index: null, tokens: {}, chunks: {}, waiting: {},
  setIndex(index) { this.index = index; },
  setTokens(tokens) { this.tokens = tokens; },
  setChunk(k, panels) { this.chunks[k] = panels; (this.waiting[k] || []).forEach(f => f()); delete this.waiting[k]; },
};
</script>
<script src="features/index.js"></script>
<script src="features/tokens.js"></script>
<header>
  <h1 id="title">SAE features</h1>
  <div class="summary" id="summary"></div>
  <div class="metrics" id="metrics"></div>
</header>
<main>
  <section id="list">
    <div id="controls">
      <input id="goto" type="number" min="0" placeholder="feature #" title="open a feature by its index">
      <input id="filter" type="search" placeholder="top token" title="show features whose top token contains this">
      <select id="sort" title="order of the list">
        <option value="index">by index</option>
        <option value="density">density, most first</option>
        <option value="density-asc">density, least first</option>
        <option value="largest">largest activation</option>
      </select>
    </div>
    <table><thead id="head"></thead><tbody id="rows"></tbody></table>
    <div id="pager"><button id="prev">&larr;</button><span id="where" class="muted"></span><button id="next">&rarr;</button></div>
  </section>
  <section id="panel"><p class="muted">Pick a feature from the list, or type its index.</p></section>
</main>
<script>
(function () {
  "use strict";
  const TF = window.tinylabFeatures, I = TF.index, PAGE = 100;
  const $ = id => document.getElementById(id);
  if (!I) { console.error("features/index.js did not load"); $("panel").textContent = "features/index.js is missing"; return; }
  const percent = x => x === 0 ? "0" : (100 * x).toPrecision(3) + "%";
  const num = (x, digits) => x === null || x === undefined ? "\u2013" : +x.toPrecision(digits);  // null: not finite
  const escape = s => s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
  const show = id => { const s = TF.tokens[id]; return s === undefined ? "<" + id + ">" : I.joined ? s.replace(/\n/g, "\u21b5") : s; };

  $("title").textContent = I.title;
  $("summary").textContent = I.summary;
  $("metrics").innerHTML = Object.entries(I.metrics).map(([k, v]) => `<span>${escape(k)} <b>${+v.toPrecision(4)}</b></span>`).join("");
  if (I.has_fourier) $("sort").insertAdjacentHTML("beforeend", '<option value="frequency">Fourier frequency</option>');
  $("head").innerHTML = "<tr><th>feature</th><th>density</th><th>largest</th><th>top token</th>" +
                        (I.has_fourier ? "<th>freq</th>" : "") + "</tr>";

  const top = I.density.reduce((a, b) => Math.max(a, b), 0) || 1;  // the longest density bar
  const orders = {};
  function order(sort) {
    if (orders[sort]) return orders[sort];
    const ids = Array.from({length: I.n}, (_, i) => i), d = I.density, m = I.largest;
    const keys = {density: i => -d[i], "density-asc": i => d[i], largest: i => -m[i],
                  frequency: i => d[i] > 0 ? I.frequency[i] : 1e9};
    if (keys[sort]) { const key = keys[sort]; ids.sort((a, b) => key(a) - key(b) || a - b); }
    return (orders[sort] = ids);
  }
  function state() {
    const s = new URLSearchParams(location.hash.slice(1));
    const sort = s.get("sort") || "index", sorts = ["index", "density", "density-asc", "largest"];
    return {feature: s.has("feature") ? +s.get("feature") : null,
            sort: sorts.includes(sort) || (sort === "frequency" && I.has_fourier) ? sort : "index",
            q: s.get("q") || "", page: +(s.get("page") || 0)};
  }
  function go(change) {
    const s = Object.assign(state(), change), p = new URLSearchParams();
    if (s.feature !== null) p.set("feature", s.feature);
    if (s.sort !== "index") p.set("sort", s.sort);
    if (s.q) p.set("q", s.q);
    if (s.page) p.set("page", s.page);
    location.hash = p.toString();
  }

  function visible(s) {  // the list: sorted, then filtered by top token
    const ids = order(s.sort), q = s.q.toLowerCase();
    return q ? ids.filter(i => I.labels[i].toLowerCase().includes(q)) : ids;
  }
  function renderList(s) {
    const ids = visible(s);
    const pages = Math.max(1, Math.ceil(ids.length / PAGE)), page = Math.min(s.page, pages - 1);
    $("rows").innerHTML = ids.slice(page * PAGE, (page + 1) * PAGE).map(i =>
      `<tr class="row${I.density[i] === 0 ? " dead" : ""}${i === s.feature ? " current" : ""}" data-f="${i}">` +
      `<td>${i}</td><td><span class="bar" style="width:${Math.round(40 * I.density[i] / top)}px"></span>` +
      `${percent(I.density[i])}</td><td>${num(I.largest[i], 3)}</td>` +
      `<td class="label">${escape(I.labels[i])}</td>` +
      (I.has_fourier ? `<td>${I.density[i] > 0 ? I.frequency[i] : ""}</td>` : "") + "</tr>").join("");
    $("where").textContent = ids.length ? `${page * PAGE + 1}\u2013${Math.min(ids.length, (page + 1) * PAGE)} of ${ids.length}` : "no feature matches";
    $("prev").disabled = page === 0; $("next").disabled = page >= pages - 1;
    $("sort").value = s.sort; $("filter").value = s.q;
  }

  function load(chunk, then) {
    if (TF.chunks[chunk]) return then();
    if (TF.waiting[chunk]) return TF.waiting[chunk].push(then);
    TF.waiting[chunk] = [then];
    const script = document.createElement("script"), name = `features/chunk-${String(chunk).padStart(4, "0")}.js`;
    script.src = name;
    script.onerror = () => {
      delete TF.waiting[chunk];  // the next feature of this chunk tries again
      console.error(`${name} did not load`);
      if (Math.floor(state().feature / I.chunk) === chunk) $("panel").textContent = `${name} is missing`;
    };
    document.head.appendChild(script);
  }

  function histogram(counts, largest) {
    const w = 360, h = 80, most = Math.max(...counts) || 1, bw = w / counts.length;
    const bars = counts.map((c, i) => `<rect x="${(i * bw).toFixed(1)}" y="${(h - h * c / most).toFixed(1)}" ` +
      `width="${(bw - 1).toFixed(1)}" height="${(h * c / most).toFixed(1)}" fill="#4a7fd4"><title>${c}</title></rect>`).join("");
    return `<svg width="${w}" height="${h + 16}" role="img" aria-label="activation histogram">${bars}` +
           `<text x="0" y="${h + 13}" font-size="11" fill="#666">0</text>` +
           `<text x="${w}" y="${h + 13}" font-size="11" fill="#666" text-anchor="end">${num(largest, 3)}</text></svg>`;
  }
  function logitTable(ids, values, cls) {
    return "<table class='logits'>" + ids.map((t, i) => `<tr><td class="${cls}">${values[i] > 0 ? "+" : ""}` +
           `${num(values[i], 3)}</td><td>${escape(JSON.stringify(show(t)))}</td></tr>`).join("") + "</table>";
  }
  function context([ids, acts, center, value], largest) {
    const toks = ids.map((t, i) => {
      const a = acts[i], off = a === null, alpha = off || !largest ? 0 : Math.min(1, a / largest);
      const tip = off ? "not read by the SAE" : `activation ${num(a, 3)}`;
      return `<span class="tok${i === center ? " top" : ""}${off ? " off" : ""}" title="${escape(tip)}" ` +
             `style="background:rgba(255,140,0,${alpha.toFixed(2)})">${escape(show(t))}</span>`;
    }).join("");
    return `<div class="context${I.joined ? "" : " apart"}"><span class="value">${num(value, 4)}</span>${toks}</div>`;
  }

  function renderPanel(f) {
    const panel = $("panel");
    if (f === null) return;
    if (!(f >= 0 && f < I.n && Number.isInteger(f))) { panel.textContent = `There is no feature ${f}: this SAE has features 0 to ${I.n - 1}.`; return; }
    panel.innerHTML = `<h2>Feature ${f}</h2><p class="muted">loading\u2026</p>`;
    load(Math.floor(f / I.chunk), () => {
      if (state().feature !== f) return;
      const P = TF.chunks[Math.floor(f / I.chunk)][f % I.chunk], d = I.density[f], m = I.largest[f];
      let html = `<h2>Feature ${f}</h2><p>` + (d === 0 ? "never fires on the held-out rows" :
                 `fires on <b>${percent(d)}</b> of held-out rows; largest activation <b>${num(m, 4)}</b>`);
      if (I.has_fourier && d > 0) html += `; Fourier frequency <b>k = ${I.frequency[f]}</b> (${(100 * I.share[f]).toFixed(0)}% of its variance)`;
      html += "</p>";
      if (d > 0) html += "<h3>Activation histogram (rows where it fires)</h3>" + histogram(P.h, m);
      if (P.u) html += `<div class="columns"><div><h3>Pushes up</h3>${logitTable(P.u[0], P.u[1], "up")}</div>` +
                       `<div><h3>Pushes down</h3>${logitTable(P.d[0], P.d[1], "down")}</div></div>`;
      if (P.c.length) html += "<h3>Where it is largest (held-out; the top token outlined, shading = activation)</h3>" +
                              P.c.map(c => context(c, m)).join("");
      panel.innerHTML = html;
      panel.dataset.feature = f;
      document.documentElement.dataset.panelReady = Math.round(performance.now());
    });
  }

  function render() {
    const s = state();
    renderList(s);
    renderPanel(s.feature);
    document.documentElement.dataset.ready = Math.round(performance.now());
  }
  $("rows").addEventListener("click", e => { const row = e.target.closest("tr.row"); if (row) go({feature: +row.dataset.f}); });
  $("goto").addEventListener("keydown", e => { if (e.key === "Enter" && e.target.value !== "") go({feature: +e.target.value}); });
  $("filter").addEventListener("input", e => go({q: e.target.value, page: 0}));
  $("sort").addEventListener("change", e => go({sort: e.target.value, page: 0}));
  $("prev").addEventListener("click", () => go({page: Math.max(0, state().page - 1)}));
  $("next").addEventListener("click", () => go({page: state().page + 1}));
  document.addEventListener("keydown", e => {  // j / k: the next or previous feature in the list's order
    if (e.target.tagName === "INPUT" || (e.key !== "j" && e.key !== "k")) return;
    const s = state(), ids = visible(s), at = ids.indexOf(s.feature === null ? -1 : s.feature);
    if (!ids.length) return;
    const next = ids[Math.min(ids.length - 1, Math.max(0, at + (e.key === "j" ? 1 : -1)))];
    go({feature: next, page: Math.floor(ids.indexOf(next) / PAGE)});
  });
  window.addEventListener("hashchange", render);
  render();
})();
</script>
</body>
</html>
"""
