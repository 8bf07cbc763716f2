"""`sae.py report`: an SAE's held-out metrics, its feature-density histogram, the task's views of its
top features (TaskData.sae_sections: for modular runs over the (a, b) grid and by frequency; for text
runs the contexts that activate them; for Dyck runs by nesting depth), and the feature browser
(browser.py)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from analysis.runs import Sequences, capture, capture_all, split_sequences, token_names
from config import ConfigError, ModelSourceConfig
from interop.saelens import is_saelens_folder, load_saelens
from saes.base import SparseAutoencoder
from saes.browser import write_feature_browser
from saes.config import SAEConfig, load_sae
from saes.metrics import held_out_metrics


@dataclass
class SAEView:
    """What a task's views of an SAE's top features read (TaskData.sae_sections)."""
    sae: SparseAutoencoder
    run: object  # analysis.runs.Run
    held_out: Sequences  # the val split's sequences the report reads
    stats: dict  # feature_statistics
    ranked: list[int]  # the top features, by total activation on held-out rows
    model_acts: torch.Tensor  # the model's activations at the hook over held_out [S, T, d], on the run's device
    mask: torch.Tensor  # [S, T] the positions the SAE reads, on the run's device
    out: str  # the report folder, for figures
    top: int
    encode: Callable[[torch.Tensor], torch.Tensor]  # tokens [B, T] -> the SAE's features [B, T, n]


def describe(cfg: SAEConfig, n: int, quote: str = "") -> str:
    """`relu SAE with 512 features on HOOK`, or `per_layer relu transcoder with 512 features from IN to OUT`."""
    if cfg.transcoder == "cross_layer":
        layers = cfg.layers
        return (f"cross-layer {cfg.arch} transcoder with {n:,} features ({n // layers:,} at each of {layers} layers; "
                f"feature g is layer g // {n // layers}'s) from {quote}{cfg.hook}{quote} to {quote}{cfg.hook_out}{quote}")
    if cfg.transcoder:
        return (f"{cfg.transcoder} {cfg.arch} transcoder with {n:,} features from {quote}{cfg.hook}{quote} to "
                f"{quote}{cfg.hook_out}{quote}")
    return f"{cfg.arch} SAE with {n:,} features on {quote}{cfg.hook}{quote}"


def plot_feature_density(density: torch.Tensor, path: str) -> str:
    """Histogram of log10 firing frequency (share of held-out rows on which each feature fires)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    alive = density[density > 0]
    ax.hist(torch.log10(alive).numpy(), bins=40)
    ax.set(xlabel="log10 firing frequency on held-out rows", ylabel="features",
           title=f"feature density ({int((density == 0).sum())} of {len(density)} never fired)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@torch.no_grad()
def feature_statistics(sae: SparseAutoencoder, model_acts: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                       contexts: int = 8, before: int = 20, after: int = 4, bins: int = 24) -> dict:
    """Every feature's numbers over held-out activations [S, T, d] of `tokens` [S, T] at the positions
    `mask` [S, T] marks (the rows the SAE reads), a few sequences at a time so that 16k features fit
    in memory: `density` (share of rows it fires on), `total` and `largest` activation, the
    `contexts` rows where it is largest (`top_values`, `top_index` = s * T + t, [contexts, n]), the
    window t - before .. t + after around each: its tokens (`window_tokens` [contexts, n, before + 1
    + after], -1 off the sequence) and its activations (`windows`, NaN off the mask or the
    sequence), and a `histogram` [n, bins] of its nonzero activations in equal bins from 0 to its
    largest."""
    S, T, _ = model_acts.shape
    n = sae.dict_size
    per_chunk = max(1, (1 << 22) // (n * T))  # sequences per chunk: about 4M activations at a time

    def chunks():  # (first sequence, features [c, T, n], mask [c, T], the rows read as positions and as [r, n])
        for s in range(0, S, per_chunk):
            acts, on = sae.encode(model_acts[s:s + per_chunk]).float(), mask[s:s + per_chunk]
            read = on.reshape(-1).nonzero().squeeze(1)
            yield s, acts, on, read, acts.reshape(-1, n) if len(read) == on.numel() else acts.reshape(-1, n)[read]

    fired, total = torch.zeros(n, device=mask.device), torch.zeros(n, device=mask.device)
    top_values = torch.full((contexts, n), -1.0, device=mask.device)
    top_index = torch.zeros((contexts, n), dtype=torch.long, device=mask.device)
    for s, _, _, read, rows in chunks():
        if not len(rows):
            continue
        fired += torch.count_nonzero(rows, dim=0)  # every kind's features are 0 or positive
        total += rows.sum(0)
        values, index = rows.topk(min(contexts, len(rows)), dim=0)
        values, index = torch.cat([top_values, values]), torch.cat([top_index, read[index] + s * T])
        top_values, pick = values.topk(contexts, dim=0)
        top_index = index.gather(0, pick)
    largest = top_values[0].clamp(min=0)
    # Second pass: the histograms (their bins need each feature's largest) and the context windows.
    offsets = torch.arange(-before, after + 1, device=mask.device)
    windows = torch.full((contexts, n, len(offsets)), float("nan"), device=mask.device)
    histogram = torch.zeros(n * bins, device=mask.device)
    sequence, position = top_index // T, top_index % T
    around = position[..., None] + offsets  # [contexts, n, window]
    window_tokens = tokens.to(mask.device)[sequence[..., None], around.clamp(0, T - 1)]
    window_tokens = window_tokens.masked_fill((around < 0) | (around >= T), -1)
    for s, acts, on, _, rows in chunks():
        row, feature = (rows > 0).nonzero(as_tuple=True)
        which = (rows[row, feature] / largest[feature] * bins).long().clamp(max=bins - 1)
        histogram += torch.bincount(feature * bins + which, minlength=n * bins)
        slot, feature = ((sequence >= s) & (sequence < s + len(acts)) & (top_values > 0)).nonzero(as_tuple=True)
        where = around[slot, feature]  # [contexts here, window]
        inside = (where >= 0) & (where < T)
        where = where.clamp(0, T - 1)
        local = (sequence[slot, feature] - s)[:, None].expand_as(where)
        seen = acts[local, where, feature[:, None].expand_as(where)]
        windows[slot, feature] = seen.masked_fill(~(inside & on[local, where]), float("nan"))
    return {"density": fired / mask.sum().clamp(min=1), "total": total, "largest": largest,
            "top_values": top_values, "top_index": top_index, "windows": windows, "window_tokens": window_tokens,
            "histogram": histogram.reshape(n, bins), "before": before}


def residual_directions(model, hook: str, directions: torch.Tensor) -> torch.Tensor | None:
    """What `directions` [n, width] at `hook` write into the residual stream [n, d_model]: themselves
    at a point of the stream (or a block's output into it), through the block's output matrix for
    `mlp.hook_post` and `attn.hook_z`; None elsewhere (queries, keys, patterns...)."""
    stream = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
              "hook_attn_out", "hook_mlp_out", "hook_resid_final")
    if hook.split(".")[-1] in stream:
        return directions
    parts = hook.split(".")
    if len(parts) == 4 and parts[0] == "blocks":
        block = model.blocks[int(parts[1])]
        if parts[2:] == ["mlp", "hook_post"] and block.mlp is not None:
            return directions @ block.mlp.fc_out.weight.T
        if parts[2:] == ["attn", "hook_z"]:
            return directions @ block.attn.out.weight.T
    return None


@torch.no_grad()
def logit_effects(model, hook: str, directions: torch.Tensor, top: int = 10):
    """The tokens each feature's decoder direction pushes up and down most, through the final norm's
    gain (the mean removed under LayerNorm) and the unembedding, as SAE dashboards show them:
    (up ids, up values, down ids, down values), each [n, top]; None for a hook off the residual stream."""
    stream = residual_directions(model, hook, directions.float())
    if stream is None:
        return None
    norm = getattr(model.ln_final, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        stream = stream - stream.mean(-1, keepdim=True)
    if norm is not None and norm.weight is not None:
        stream = stream * norm.weight.float()
    unembed = model.unembed.weight.float()  # [vocab, d_model]
    top = min(top, len(unembed) // 2)  # a small vocabulary: no token in both lists
    results = [[], [], [], []]
    for start in range(0, len(stream), 1024):
        logits = stream[start:start + 1024] @ unembed.T
        up, down = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        for bucket, value in zip(results, (up.indices, up.values, down.indices, down.values)):
            bucket.append(value)
    return tuple(torch.cat(bucket) for bucket in results)


@torch.no_grad()
def write_browser(sae: SparseAutoencoder, cfg: SAEConfig, run, held_out: Sequences, stats: dict, metrics: dict,
                  out: str, fourier=None) -> str:
    """The feature browser (feature_browser.py) of `sae` from its feature_statistics on `held_out`."""
    n, C, before = sae.dict_size, len(stats["top_values"]), stats["before"]
    fired = (stats["top_values"] > 0).cpu().tolist()
    around, windows = stats["window_tokens"].cpu().numpy(), stats["windows"].cpu().numpy()
    values = stats["top_values"].cpu().tolist()
    contexts = []
    for feature in range(n):
        shown = []
        for slot in range(C):
            if not fired[slot][feature]:
                break
            ids = around[slot, feature]
            on = ids >= 0
            shown.append((ids[on], windows[slot, feature][on], before - int((~on[:before]).sum()), values[slot][feature]))
        contexts.append(shown)
    logits = logit_effects(run.model, (cfg.hook_out or cfg.hook).split("+")[-1], sae.residual_writes())
    used = set(np.unique(around[around >= 0]).tolist())
    if logits is not None:
        logits = tuple(x.cpu().numpy() for x in logits)
        used |= set(np.unique(logits[0]).tolist()) | set(np.unique(logits[2]).tolist())
    used = sorted(used)
    token_text = dict(zip(used, token_names(run, used)))
    joined = run.data.generates_text  # text: tokens are pieces of it; else shown apart

    def label(f):  # what the list shows and searches: the top token (and, apart, the two before it)
        if not fired[0][f]:
            return ""
        ids = around[0, f, before if joined else max(0, before - 2):before + 1]
        return (" ".join(token_text[int(i)] for i in ids if i >= 0) if not joined
                else json.dumps(token_text[int(ids[0])], ensure_ascii=False))

    labels = [label(f) for f in range(n)]
    name = os.path.basename(os.path.normpath(os.path.dirname(out)))
    summary = (f"{describe(cfg, n)} of {cfg.run_dir} ({cfg.positions} positions); "
               f"{int(held_out.mask.sum()):,} held-out rows of the val split")
    shown_metrics = {k: v for k, v in metrics.items() if k in ("explained_variance", "l0", "mse", "ce_loss_score",
                                                                "kl_div_score", "never_fired_frac")}
    return write_feature_browser(out, title=f"SAE {name}", summary=summary, metrics=shown_metrics,
                                 density=stats["density"].cpu().numpy(), largest=stats["largest"].cpu().numpy(),
                                 labels=labels, histogram=stats["histogram"].cpu().numpy(), contexts=contexts,
                                 token_text=token_text, joined=joined,
                                 logits=logits, fourier=fourier)


@torch.no_grad()
def report(sae_path: str, top: int = 12, model: str = "", log=None, data_path: str = "") -> str:
    """Writes <sae>/report/: a summary with the held-out metrics, the feature-density histogram, and
    views of the top features (by total activation on held-out rows): for modular runs each one's
    activation over the (a, b) grid and its share of variance per frequency; for text runs the
    contexts that activate it most; for Dyck runs its mean activation by nesting depth; and the
    feature browser, features.html (write_browser). A folder that SAELens saved opens too, with
    `model` naming what it reads (load_saelens). `log`: a function that takes each stage's line.
    `data_path`: where the run's corpus is now, when the report reads past what the run carries."""
    clock, say = time.perf_counter(), log or (lambda line: None)
    if os.path.isdir(sae_path) and is_saelens_folder(sae_path):
        sae, cfg, run = load_saelens(sae_path, model)
    elif os.path.isdir(sae_path) and not os.path.isfile(os.path.join(sae_path, "last.pt")):
        raise ConfigError(f"{sae_path} holds no SAE: neither last.pt (an SAE of sae.py) nor cfg.json and "
                          f"sae_weights.safetensors (one of SAELens); pass <run>/sae/<name>")
    else:
        sae, cfg, run = load_sae(sae_path, source=ModelSourceConfig.corpus_at(data_path))
    directory = sae_path if os.path.isdir(sae_path) else os.path.dirname(sae_path)
    out = os.path.join(directory, "report")
    os.makedirs(out, exist_ok=True)
    held_out = split_sequences(run, "val", cfg.positions, cfg.eval_tokens)
    # One pass of the model: its activations at every position [S, T, d], and the rows at the taken
    # positions (what the SAE was trained and evaluated on); the features' numbers a few sequences at
    # a time (feature_statistics), so that a wide SAE fits in memory.
    model_acts = capture_all(run, held_out.tokens, cfg.rows_hook)
    mask = held_out.mask.to(run.device)
    rows = model_acts[mask]
    metrics, density = held_out_metrics(sae, run, held_out, rows, cfg.rows_hook)
    say(f"{len(rows):,} held-out rows read and the metrics computed ({time.perf_counter() - clock:.1f}s)")
    stats = feature_statistics(sae, model_acts, mask, held_out.tokens)
    say(f"every feature's density, top contexts and histogram ({time.perf_counter() - clock:.1f}s)")
    ranked = torch.argsort(stats["total"], descending=True)[:top].tolist()

    plot_feature_density(density, os.path.join(out, "feature_density.png"))

    lines = [f"# SAE {os.path.basename(os.path.normpath(directory))}", "",
             f"{describe(cfg, sae.dict_size, '`')} ({cfg.positions} positions) of "
             f"`{cfg.run_dir}`; {len(rows):,} held-out rows from the val split.", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    lines += ["", "![feature density](feature_density.png)", ""]

    view = SAEView(sae, run, held_out, stats, ranked, model_acts, mask, out, top,
                   lambda tokens: sae.encode(capture(run.model, tokens, cfg.rows_hook)))
    more, fourier = run.data.sae_sections(view)  # the task's views of the top features
    lines += more
    page = write_browser(sae, cfg, run, held_out, stats, metrics, out, fourier)
    say(f"the feature browser: {page} ({time.perf_counter() - clock:.1f}s)")
    lines[4:4] = [f"Every feature, one after another: [{os.path.basename(page)}]({os.path.basename(page)}) "
                  f"(a page that opens from disk).", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
