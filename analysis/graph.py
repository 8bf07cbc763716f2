"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"; the circuit-tracer library): for one
prompt, the direct linear effect of every node on every other in the local replacement model.

The local replacement model is the real model on this prompt with each MLP replaced by its
transcoder's features, attention patterns and norm scales frozen at their values in the real forward
pass, and an error node per MLP and position holding what the transcoder misses, so that it
reproduces the real model exactly on this prompt. With the features held fixed, everything between
them is linear: each attention layer moves vectors through its value and output matrices with the
frozen pattern, each norm divides by its frozen scale, a skip transcoder's skip path is a matrix.

Nodes, in circuit-tracer's order: the active features (layer, position, index, sorted), the error
nodes (layer-major, then position), the input tokens (what the embedding writes at each position,
positions included), and the output logits (the most likely next tokens at the last position until
their probability reaches `desired_logit_prob`, at most `max_n_logits`). The edge s → t is what s
writes (a feature: its activation times its decoder vector, into each MLP output it writes to; an
error: its vector; a token: its embedding), carried through the frozen linear system to t's input:
a feature's pre-activation (its encoder row on its MLP input) or a logit minus the mean logit. One
backward pass from a batch of targets gives every edge into them. The edges into a node add up to its
value less a constant (the biases: the frozen system's output with every source removed).

Pruning keeps what matters to the logits, as circuit-tracer does: each node's influence is the
weight of all paths from it to the logits in |A| with rows normalised to sum 1, weighted by the
logits' probabilities; nodes are kept, most influential first, up to `node_threshold` of the total,
edges likewise up to `edge_threshold` by their share of their target's influence, and features and
errors left without an edge out (features: or in) go, until nothing changes."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from analysis.runs import token_names
from config import ConfigError
from plumbing.checkpoints import CheckpointError


# ---------------------------------------------------------------- the transcoders that replace the MLPs


@dataclass
class Transcoders:
    """Every MLP's replacement: one per-layer (or skip) transcoder per block, or one cross-layer
    transcoder; what the graph reads of them, in the model's units."""
    saes: list  # a per-layer transcoder per block, or [the cross-layer one]
    hooks_in: list[str]  # what each layer's features read
    folders: list[str]
    cross: bool = False
    positions: str = "all"  # the positions they were trained on (the top contexts read only those)

    @property
    def layers(self) -> int:
        return len(self.hooks_in)

    def of(self, layer: int):
        """The dictionary that holds layer `layer`'s features."""
        return self.saes[0] if self.cross else self.saes[layer]

    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d, n], b [n]) of layer `layer`'s features: pre-activation = x W + b for its MLP input x."""
        return self.of(layer).encoder(layer)

    def decoder(self, source: int, target: int) -> torch.Tensor | None:
        """[n, d]: what layer `source`'s features write, per unit of activation, to MLP `target`'s output
        (None: nothing)."""
        if self.cross:
            n = self.saes[0].layer_n
            return self.saes[0].decoder(target)[source * n:(source + 1) * n] if target >= source else None
        return self.saes[source].decoder(source) if target == source else None

    def skip(self, layer: int) -> torch.Tensor | None:
        sae = self.of(layer)
        return sae.W_skip if sae.skip else None

    @torch.no_grad()
    def features(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]):
        """(each layer's feature activations [T, n], each MLP output's reconstruction [T, d], skip path
        and decoder bias included) from the MLPs' real inputs and outputs."""
        if self.cross:
            clt = self.saes[0]
            rows = torch.cat(inputs + outputs, -1)
            recon, f, _ = clt(rows)
            return list(f.split(clt.layer_n, -1)), list(recon.split(clt.layer_d_out, -1))
        acts, recons = [], []
        for sae, x, y in zip(self.saes, inputs, outputs):
            recon, f, _ = sae(torch.cat([x, y], -1))
            acts.append(f)
            recons.append(recon)
        return acts, recons

    def bias(self, layer: int) -> torch.Tensor:
        """[d]: what MLP `layer`'s replacement writes with no feature active (its decoder bias)."""
        return self.of(layer).decoder_bias(layer)

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s feature activations [..., n] from its MLP input x [..., d]. A cross-layer
        transcoder's other layers are held far below any threshold, so that its activation (k per
        layer, or per feature) chooses among this layer's alone."""
        if not self.cross:
            return self.saes[layer].encode(x)
        clt, (W, b) = self.saes[0], self.encoder(layer)
        n = clt.layer_n
        pre = x.new_full((*x.shape[:-1], clt.dict_size), -1e30)
        pre[..., layer * n:(layer + 1) * n] = x @ W + b
        return clt.activate(pre)[..., layer * n:(layer + 1) * n]

    @torch.no_grad()
    def activations(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's feature activations [..., n] from each MLP's input [..., d] (no outputs needed)."""
        if self.cross:
            clt = self.saes[0]
            return list(clt.encode(torch.cat(inputs, -1)).split(clt.layer_n, -1))
        return [sae.encode(x) for sae, x in zip(self.saes, inputs)]

    def to(self, dtype) -> "Transcoders":
        for sae in self.saes:
            sae.to(dtype)
        return self


def open_transcoders(spec: str, device: str = "auto", source=None):
    """--transcoders: a cross-layer transcoder's folder, per-layer transcoders' folders joined by commas,
    or a folder holding them (<run>/sae: one per block) -> (Transcoders, the run they were trained on).
    A ConfigError naming --transcoders for anything else."""
    from saes.config import load_sae  # saes sits beside analysis and reads runs through it

    folders = [f for f in spec.split(",") if f]
    if len(folders) == 1 and os.path.isdir(folders[0]) and not os.path.isfile(os.path.join(folders[0], "last.pt")):
        inside = sorted(os.path.join(folders[0], name) for name in os.listdir(folders[0]))
        folders = [f for f in inside if os.path.isfile(os.path.join(f, "last.pt"))]
        if not folders:
            raise ConfigError(f"--transcoders: {spec} holds no transcoder (folders with last.pt); train one with "
                              f"python sae.py RUN --transcoder cross_layer")
    loaded = []
    for folder in folders:
        if not os.path.exists(folder):
            raise ConfigError(f"--transcoders: {folder} does not exist")
        try:
            loaded.append((folder, *load_sae(folder, device=device, source=source)))
        except CheckpointError as error:
            raise ConfigError(f"--transcoders: {error}") from None
    transcoders = [item for item in loaded if item[2].transcoder]
    run = loaded[0][3]
    blocks = run.model.cfg.num_blocks
    cross = [item for item in transcoders if item[2].transcoder == "cross_layer"]
    if cross:
        if len(transcoders) > 1:
            raise ConfigError(f"--transcoders: {cross[0][0]} is a cross-layer transcoder and replaces every MLP "
                              f"alone; name it by itself")
        folder, sae, cfg, run = cross[0]
        return Transcoders([sae.eval()], cfg.hook.split("+"), [folder], cross=True, positions=cfg.positions), run
    by_layer: dict[int, list] = {}
    for item in transcoders:
        layer = int(item[2].hook_out.split(".")[1]) if item[2].hook_out.startswith("blocks.") else -1
        if item[2].hook_out != f"blocks.{layer}.hook_mlp_out":
            continue  # a transcoder of something other than an MLP
        by_layer.setdefault(layer, []).append(item)
    missing = [layer for layer in range(blocks) if layer not in by_layer]
    if missing:
        raise ConfigError(f"--transcoders: no transcoder of block {missing[0]}'s MLP among {spec}; a graph replaces "
                          f"every MLP: train one (python sae.py RUN --transcoder per_layer --layer {missing[0]}) or "
                          f"a cross-layer one")
    several = [layer for layer in range(blocks) if len(by_layer[layer]) > 1]
    if several:
        names = ", ".join(item[0] for item in by_layer[several[0]])
        raise ConfigError(f"--transcoders: several transcoders of block {several[0]}'s MLP ({names}); name the "
                          f"ones to use, joined by commas")
    chosen = [by_layer[layer][0] for layer in range(blocks)]
    steps = {item[3].checkpoint_path for item in chosen}
    if len(steps) > 1:
        raise ConfigError(f"--transcoders: these were trained on different models ({', '.join(sorted(steps))})")
    return Transcoders([item[1].eval() for item in chosen], [item[2].hook for item in chosen],
                       [item[0] for item in chosen], positions=chosen[0][2].positions), chosen[0][3]


# ---------------------------------------------------------------- the frozen linear system


NORMS = ("ln1", "ln2")  # each block's; ln_final after them


def _norms(model) -> list[tuple[str, str, nn.Module]]:
    """(the hook before the norm, the norm's name, the norm) for every norm on the residual stream."""
    found = []
    for i, block in enumerate(model.blocks):
        for name, before in (("ln1", "hook_resid_pre"), ("ln2", "hook_resid_mid")):
            module = getattr(block, name)
            if module is not None and hasattr(module, "norm"):
                found.append((f"blocks.{i}.{before}", f"blocks.{i}.{name}", module.norm))
    if hasattr(model.ln_final, "norm"):
        found.append(("hook_resid_final", "ln_final", model.ln_final.norm))
    return found


def _frozen_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the norm divides x [.., D] by (its input centred first under LayerNorm)."""
    if isinstance(norm, nn.LayerNorm):
        return (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@dataclass
class Clean:
    """The real forward pass on one prompt [1, T]: what the replacement freezes and what its nodes hold."""
    tokens: torch.Tensor
    logits: torch.Tensor  # [T, vocab], as the model returns them
    inputs: list[torch.Tensor]  # each MLP's input as its transcoder reads it [T, d]
    outputs: list[torch.Tensor]  # each MLP's output [T, d]
    embedding: torch.Tensor  # what block 0 receives [T, d]: the token (and position) embedding
    patterns: dict[str, torch.Tensor]  # hook name -> [1, H, T, T]
    scales: dict[str, torch.Tensor]  # norm name -> [1, T, 1]
    final: torch.Tensor  # the final norm's output, its gain and bias applied [T, d]: what the unembedding reads


@torch.no_grad()
def clean_pass(model, tokens: torch.Tensor, transcoders: Transcoders) -> Clean:
    """The real model on tokens [1, T], with everything the replacement needs."""
    norms = _norms(model)
    names = ["blocks.0.hook_resid_pre", "hook_resid_final", *transcoders.hooks_in,
             *(f"blocks.{i}.hook_mlp_out" for i in range(transcoders.layers)),
             *(f"blocks.{i}.attn.hook_pattern" for i in range(len(model.blocks))), *(before for before, _, _ in norms)]
    logits, cache = model.run_with_cache(tokens, list(dict.fromkeys(names)))
    scales = {name: _frozen_scale(norm, cache[before]) for before, name, norm in norms}
    final = cache["hook_resid_final"]
    if hasattr(model.ln_final, "norm"):
        final = model.ln_final(final)
    return Clean(tokens, logits[0], [cache[h][0] for h in transcoders.hooks_in],
                 [cache[f"blocks.{i}.hook_mlp_out"][0] for i in range(transcoders.layers)],
                 cache["blocks.0.hook_resid_pre"][0],
                 {f"blocks.{i}.attn.hook_pattern": cache[f"blocks.{i}.attn.hook_pattern"] for i in range(len(model.blocks))},
                 scales, final[0])


def frozen_forward(model, clean: Clean, transcoders: Transcoders, mlp_outputs, injections: dict, copies: int,
                   freeze: bool = True) -> dict:
    """The frozen linear system on `copies` copies of the prompt: each attention pattern and norm scale
    the clean pass's, MLP m's output `mlp_outputs[m]` [T, d] (what its features and error write, the
    decoder bias too) plus its skip path on the input it now receives, and injections[key] [copies, T,
    d] added: key "tokens" to what block 0 receives, key m to MLP m's output. Returns {"inputs": each
    MLP's input [copies, T, d], "final": the final norm's output [copies, T, d], "logits"}.
    mlp_outputs may be a function (layer, the input it receives) -> output (skip path not included);
    freeze=False recomputes the patterns and norm scales."""
    live: dict[str, torch.Tensor] = {}
    hooks = []

    def add_tokens(x, hook):
        return x + injections["tokens"] if "tokens" in injections else x

    hooks.append(("blocks.0.hook_resid_pre", add_tokens))
    for before, name, norm in _norms(model):
        def keep(x, hook):
            live[hook.name] = x
            return x

        def normalise(x, hook, before=before, name=name, norm=norm):
            stream = live[before]
            if isinstance(norm, nn.LayerNorm):
                stream = stream - stream.mean(-1, keepdim=True)
            return stream / clean.scales[name]

        hooks += [(before, keep)] + ([(f"{name}.hook_normalized", normalise)] if freeze else [])
    for name, pattern in clean.patterns.items() if freeze else ():
        hooks.append((name, lambda x, hook, pattern=pattern: pattern.expand(copies, -1, -1, -1)))
    for layer, hook_in in enumerate(transcoders.hooks_in):
        def read(x, hook, layer=layer):
            live[f"input{layer}"] = x
            return x

        def write(x, hook, layer=layer):
            out = (mlp_outputs(layer, live[f"input{layer}"]) if callable(mlp_outputs) else
                   mlp_outputs[layer].expand(copies, -1, -1))
            W_skip = transcoders.skip(layer)
            if W_skip is not None:
                out = out + live[f"input{layer}"] @ W_skip
            return out + injections[layer] if layer in injections else out

        hooks += [(hook_in, read), (f"blocks.{layer}.hook_mlp_out", write)]

    def final(x, hook):
        live["final"] = x
        return x

    hooks.append(("ln_final.hook_normalized" if hasattr(model.ln_final, "norm") else "hook_resid_final", final))
    logits = model.run_with_hooks(clean.tokens.expand(copies, -1), hooks)
    h = live["final"]
    norm = getattr(model.ln_final, "norm", None)
    if norm is not None and norm.weight is not None:
        h = h * norm.weight
    if norm is not None and getattr(norm, "bias", None) is not None:
        h = h + norm.bias
    return {"inputs": [live[f"input{layer}"] for layer in range(transcoders.layers)], "final": h, "logits": logits}


# ---------------------------------------------------------------- the graph


@dataclass
class Graph:
    """An attribution graph: nodes [features, errors, tokens, logits] and A[target, source]."""
    tokens: list[int]
    active: torch.Tensor  # [F, 3]: layer, position, feature index within its layer
    activations: torch.Tensor  # [F]
    logit_tokens: list[int]
    logit_probabilities: torch.Tensor  # [K]
    adjacency: torch.Tensor  # [N, N], rows the targets, columns the sources
    values: torch.Tensor  # [N]: each feature's activation and each logit's value less the mean logit (others 0)
    constants: torch.Tensor  # [N]: what a feature's or a logit's input is with every source removed
    layers: int
    errors: torch.Tensor = field(default=None)  # [L, T, d]: each error node's vector

    @property
    def n_features(self) -> int:
        return len(self.active)

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    def index(self, kind: str, *where: int) -> int:
        """The node number of ("error", layer, position), ("token", position) or ("logit", k)."""
        F, T = self.n_features, self.n_positions
        if kind == "error":
            return F + where[0] * T + where[1]
        if kind == "token":
            return F + self.layers * T + where[0]
        return F + self.layers * T + T + where[0]


def salient_logits(logits: torch.Tensor, max_n_logits: int, desired_logit_prob: float):
    """(token ids, probabilities): the most likely tokens until their probability reaches
    `desired_logit_prob`, at most `max_n_logits` (circuit-tracer's choice)."""
    probs = logits.double().softmax(-1)
    top_p, top_ids = probs.topk(min(max_n_logits, len(probs)))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob, dtype=top_p.dtype))) + 1
    return top_ids[:cutoff], top_p[:cutoff]


@dataclass
class Parts:
    """The replacement on one prompt: its nodes and what each writes."""
    active: torch.Tensor  # [F, 3]: layer, position, feature index within its layer (sorted)
    activations: torch.Tensor  # [F]
    errors: list[torch.Tensor]  # each MLP's error [T, d]: its output less the transcoder's reconstruction
    bases: list[torch.Tensor]  # each MLP's output less its skip path [T, d]: frozen_forward's mlp_outputs
    writes: dict  # MLP m -> [(feature numbers, their positions, what they write there [f, d])]
    logit_ids: torch.Tensor  # [K]
    logit_probabilities: torch.Tensor  # [K]
    logit_vectors: torch.Tensor  # [K, d]: each logit's unembedding less the mean one

    def targets(self) -> list[tuple[str, int]]:
        """The nodes with edges into them: the logits, then the features."""
        return [("logit", k) for k in range(len(self.logit_ids))] + [("feature", f) for f in range(len(self.active))]


@torch.no_grad()
def decompose(model, clean: Clean, transcoders: Transcoders, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, skip_first: bool = False) -> Parts:
    """The replacement's nodes on the clean pass: the active features, the error nodes, the logits.
    skip_first: the first position's features and errors are no nodes (circuit-tracer's choice, for a
    first token that is always <bos>): what they write stays in the constants."""
    L = transcoders.layers
    acts, recons = transcoders.features(clean.inputs, clean.outputs)
    errors = [y - r for y, r in zip(clean.outputs, recons)]
    bases = []
    for m in range(L):
        skip = transcoders.skip(m)
        bases.append(clean.outputs[m] - (clean.inputs[m] @ skip if skip is not None else 0))
    found = [torch.cat([torch.full((len(where), 1), layer, device=where.device), where], 1)
             for layer, a in enumerate(acts) for where in [(a > 0).nonzero()]]
    active = torch.cat(found).cpu()
    if skip_first:
        active = active[active[:, 1] > 0]
        errors = [e.clone().index_fill_(0, torch.tensor([0], device=e.device), 0) for e in errors]
    activations = torch.stack([acts[l][p, i] for l, p, i in active.tolist()]) if len(active) else \
        clean.final.new_zeros(0)
    writes = {m: [] for m in range(L)}
    for source in range(L):
        rows = (active[:, 0] == source).nonzero().squeeze(1)
        for m in range(source, L):
            decoder = transcoders.decoder(source, m)
            if decoder is not None and len(rows):
                writes[m].append((rows, active[rows, 1], activations[rows, None] * decoder[active[rows, 2]]))
    logit_ids, logit_p = salient_logits(clean.logits[-1], max_n_logits, desired_logit_prob)
    unembed = model.unembed.weight  # [vocab, d]
    return Parts(active, activations, errors, bases, writes, logit_ids, logit_p, unembed[logit_ids] - unembed.mean(0))


def read_nodes(out: dict, parts: Parts, transcoders: Transcoders, targets: list[tuple[str, int]]) -> torch.Tensor:
    """Each target's input in frozen_forward's output `out`, target b read from copy b (or copy 0 for
    all when there is one): a feature's pre-activation, a logit less the mean logit."""
    reads = []
    for b, (kind, j) in enumerate(targets):
        copy = b if len(out["final"]) > 1 else 0
        if kind == "logit":
            reads.append(out["final"][copy, -1] @ parts.logit_vectors[j])
        else:
            layer, position, index = parts.active[j].tolist()
            W, bias = transcoders.encoder(layer)
            reads.append(out["inputs"][layer][copy, position] @ W[:, index] + bias[index])
    return torch.stack(reads)


def attribute(model, tokens: torch.Tensor, transcoders: Transcoders, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, batch_size: int = 64, log=None, skip_first: bool = False) -> Graph:
    """The attribution graph of tokens [1, T] (every active feature's and logit's row of edges), in the
    model's dtype; skip_first: see decompose."""
    clean = clean_pass(model, tokens, transcoders)
    parts = decompose(model, clean, transcoders, max_n_logits, desired_logit_prob, skip_first)
    T, L, F, K = tokens.shape[1], transcoders.layers, len(parts.active), len(parts.logit_ids)
    N = F + L * T + T + K
    dtype, device, width = clean.final.dtype, clean.final.device, clean.final.shape[-1]
    A = torch.zeros(N, N, dtype=dtype)
    values, constants = torch.zeros(N, dtype=dtype), torch.zeros(N, dtype=dtype)
    targets = parts.targets()
    row_of = {("logit", k): F + L * T + T + k for k in range(K)} | {("feature", f): f for f in range(F)}
    for start in range(0, len(targets), batch_size):
        batch = targets[start:start + batch_size]
        injections = {key: torch.zeros(len(batch), T, width, dtype=dtype, device=device, requires_grad=True)
                      for key in ["tokens", *range(L)]}
        with torch.enable_grad():
            reads = read_nodes(frozen_forward(model, clean, transcoders, parts.bases, injections, len(batch)),
                               parts, transcoders, batch)
            leaves = [injections[key] for key in ["tokens", *range(L)]]
            grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in  # nothing reached it: no edges
                     zip(leaves, torch.autograd.grad(reads.sum(), leaves, allow_unused=True))]
        rows = torch.tensor([row_of[target] for target in batch])
        A[rows, F + L * T:F + L * T + T] = (grads[0] * clean.embedding).sum(-1).detach().cpu()
        for m in range(L):
            g = grads[1 + m]
            A[rows, F + m * T:F + (m + 1) * T] = (g * parts.errors[m]).sum(-1).detach().cpu()
            for numbers, positions, vectors in parts.writes[m]:
                A[rows[:, None], numbers[None, :]] += (g[:, positions] * vectors).sum(-1).detach().cpu()
        values[rows] = reads.detach().cpu()
        if log:
            log(f"  edges into {start + len(batch):,} of {len(targets):,} nodes")
    # The constant part of each target's input: the frozen system with every source removed (features
    # and errors write nothing, nor do the tokens), the decoder biases and the model's own biases left.
    with torch.no_grad():
        out = frozen_forward(model, clean, transcoders, without(parts, range(F), range(L * T)),
                             {"tokens": -clean.embedding[None]}, 1)
        constants[[row_of[t] for t in targets]] = read_nodes(out, parts, transcoders, targets).cpu()
    return Graph(tokens[0].tolist(), parts.active, parts.activations.detach().cpu(), parts.logit_ids.tolist(),
                 parts.logit_probabilities.cpu(), A, values, constants, L, torch.stack(parts.errors).detach().cpu())


def without(parts: Parts, features=(), errors=()) -> list[torch.Tensor]:
    """frozen_forward's MLP outputs with these features' writes and these error nodes (numbered m T + t)
    taken out."""
    outputs = [base.clone() for base in parts.bases]
    T = len(outputs[0])
    chosen = torch.zeros(len(parts.active), dtype=torch.bool)
    chosen[list(features)] = True
    for m in range(len(outputs)):
        for numbers, positions, vectors in parts.writes[m]:
            take = chosen[numbers]
            outputs[m].index_add_(0, positions[take].to(outputs[m].device), -vectors[take])
    for number in errors:
        m, t = divmod(number, T)
        outputs[m][t] -= parts.errors[m][t]
    return outputs


# ---------------------------------------------------------------- interventions


def replacement_forward(model, clean: Clean, transcoders: Transcoders, parts: Parts, clamp: dict, freeze: bool,
                        copies: int = 1) -> dict:
    """The replacement model on the prompt with its features recomputed from the inputs they receive
    (not held, unlike frozen_forward's) and each error node held: MLP m writes its features' decoded
    sum, its decoder bias, its skip path and its error. clamp {(layer, position, index): value} sets
    features. freeze: the clean pass's attention patterns and norm scales (else recomputed)."""
    features: dict[int, torch.Tensor] = {}

    def write(layer, x):
        f = transcoders.encode_layer(layer, x)
        for (where, position, index), value in clamp.items():
            if where == layer:
                f = f.clone()
                f[..., position, index] = value
        features[layer] = f
        out = transcoders.bias(layer) + parts.errors[layer]
        for source in range(layer + 1):
            decoder = transcoders.decoder(source, layer)
            if decoder is not None:
                out = out + features[source] @ decoder
        return out

    return frozen_forward(model, clean, transcoders, write, {}, copies, freeze)


@dataclass
class Intervention:
    """The change in each of the graph's logits (less the mean logit) when a feature is set: predicted
    by the graph, and in the replacement model with attention frozen and with it recomputed."""
    logit_tokens: list[int]
    clean: torch.Tensor  # [K]
    predicted: torch.Tensor  # [K]: through the graph's edges, every downstream feature linear
    frozen: torch.Tensor  # [K]: features recomputed, patterns and norm scales frozen
    recomputed: torch.Tensor  # [K]: features, patterns and norm scales recomputed
    before: float  # the feature's activation on the prompt
    after: float  # what it was set to


def intervene(model, tokens: torch.Tensor, transcoders: Transcoders, feature: tuple[int, int, int],
              value: float | None = None, scale: float | None = None, graph: Graph | None = None) -> Intervention:
    """Sets `feature` (layer, position, index; active on the prompt) to `value`, or to its activation
    times `scale`, and measures each logit's change three ways (Intervention)."""
    clean = clean_pass(model, tokens, transcoders)
    parts = decompose(model, clean, transcoders)
    graph = graph or attribute(model, tokens, transcoders)
    match = ((parts.active == torch.tensor(feature)).all(1)).nonzero()
    if not len(match):
        raise ConfigError(f"--feature: feature {feature[2]} of layer {feature[0]} is not active at position "
                          f"{feature[1]} of this prompt; pick one of the graph's features (graph.json's node ids "
                          f"are layer_feature_position)")
    s = int(match[0, 0])
    before = float(parts.activations[s])
    after = float(value) if value is not None else before * float(scale)
    F, L, T = graph.n_features, graph.layers, graph.n_positions
    A = graph.adjacency.double()
    per_unit = A[:, :F] / graph.activations.double().clamp_min(1e-30)  # each feature source's edges per unit
    inner = per_unit[:F].clone()
    inner[s] = 0  # the clamped feature does not follow its inputs
    delta = torch.linalg.solve(torch.eye(F, dtype=A.dtype) - inner, torch.eye(F, dtype=A.dtype)[s] * (after - before))
    predicted = per_unit[F + L * T + T:] @ delta
    logit_vectors = parts.logit_vectors

    def logits(freeze: bool, clamp: dict) -> torch.Tensor:
        with torch.no_grad():
            out = replacement_forward(model, clean, transcoders, parts, clamp, freeze)
        return (out["final"][0, -1] @ logit_vectors.T).double().cpu()

    base = {freeze: logits(freeze, {}) for freeze in (True, False)}
    moved = {freeze: logits(freeze, {feature: after}) for freeze in (True, False)}
    return Intervention(graph.logit_tokens, base[True], predicted, moved[True] - base[True], moved[False] - base[False],
                        before, after)


# ---------------------------------------------------------------- pruning (circuit-tracer's)


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    weights = matrix.abs()
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-10)


def influence(matrix: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """weights (A + A² + ...): the total weight of every path from each node to the weighted ones."""
    current = weights @ matrix
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ matrix
        total += current
    raise RuntimeError("the influence did not converge: the graph has a cycle")


def cut_at(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The score above which the largest scores hold `share` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))),
                       len(ordered) - 1)]


@dataclass
class Pruned:
    influence: torch.Tensor  # [N]: each node's influence on the logits
    nodes: torch.Tensor  # [N] bool
    edges: torch.Tensor  # [N, N] bool
    cumulative: torch.Tensor  # [N]: the share of all influence held by the nodes at least as influential


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    T, K, F = graph.n_positions, len(graph.logit_tokens), graph.n_features
    A = graph.adjacency.double()
    weights = torch.zeros(len(A), dtype=A.dtype)
    weights[-K:] = graph.logit_probabilities.double()
    node_influence = influence(normalise_rows(A), weights)
    keep = node_influence >= cut_at(node_influence, node_threshold)
    keep[-K - T:] = True  # tokens and logits always
    pruned = A.clone()
    pruned[~keep] = 0
    pruned[:, ~keep] = 0
    normalised = normalise_rows(pruned)
    edge_scores = normalised * (influence(normalised, weights) + weights)[:, None]
    edges = edge_scores >= cut_at(edge_scores.flatten(), edge_threshold)
    while True:
        before = keep.clone()
        edges[~keep] = False
        edges[:, ~keep] = False
        keep[:-K - T] &= edges[:, :-K - T].any(0)  # features and errors: an edge out
        keep[:F] &= edges[:F].any(1)  # features: an edge in
        if torch.equal(keep, before):
            break
    order = node_influence.sort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum()
    return Pruned(node_influence, keep, edges, cumulative)


# ---------------------------------------------------------------- circuit-tracer's graph file


def cantor(layer: int, index: int) -> int:
    """A feature's number in circuit-tracer's graph files (0.5): the Cantor pairing of its layer and its
    index, unique over every layer."""
    return (layer + index) * (layer + index + 1) // 2 + index


def feature_of(node: dict) -> tuple[int, int]:
    """(layer, index within the layer) of a graph.json feature node, from its id layer_index_position."""
    layer, index, _ = node["node_id"].split("_")
    return int(layer), int(index)


def graph_json(graph: Graph, pruned: Pruned, names: list[str], prompt: str, slug: str, scan: str,
               node_threshold: float) -> dict:
    """The graph in circuit-tracer's format (frontend/graph_models.py, schema version 1 of its release
    0.5), which its viewer and Neuronpedia read: metadata, qParams, nodes, links. `names`: each token
    id's text, for the prompt and logits."""
    F, T, L = graph.n_features, graph.n_positions, graph.layers
    nodes = {}

    def node(node_id, feature, layer, position, kind, js, **extra):
        return {"node_id": node_id, "feature": feature, "layer": str(layer), "ctx_idx": position,
                "feature_type": kind, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": "", "influence": None, "activation": None, **extra}

    for i in pruned.nodes.nonzero().squeeze(1).tolist():
        influence_share = float(pruned.cumulative[i])
        if i < F:
            layer, position, index = graph.active[i].tolist()
            nodes[i] = node(f"{layer}_{index}_{position}", cantor(layer, index), layer, position, "cross layer transcoder",
                            f"{layer}_{index}-0", influence=influence_share, activation=float(graph.activations[i]))
        elif i < F + L * T:
            layer, position = divmod(i - F, T)
            nodes[i] = node(f"0_{layer}_{position}", -1, layer, position, "mlp reconstruction error",
                            f"{layer}_{position}-0", influence=influence_share)
        elif i < F + L * T + T:
            position = i - F - L * T
            vocab = graph.tokens[position]
            nodes[i] = node(f"E_{vocab}_{position}", position, "E", position, "embedding", f"E_{vocab}-{position}",
                            influence=influence_share)
        else:
            k = i - F - L * T - T
            vocab, p = graph.logit_tokens[k], float(graph.logit_probabilities[k])
            nodes[i] = node(f"{L + 1}_{vocab}_{T - 1}", vocab, L + 1, T - 1, "logit", f"L_{vocab}-{T - 1}",
                            token_prob=p, is_target_logit=k == 0, clerp=f'Output "{names[vocab]}" (p={p:.3f})')
    targets, sources = pruned.edges.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": [names[t] for t in graph.tokens],
                "prompt": prompt, "node_threshold": node_threshold, "schema_version": 1}
    return {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                              "sg_pos": ""}, "nodes": used, "links": links}


def node_number(graph: Graph, node: dict) -> int | None:
    """The adjacency matrix's index of a graph.json node."""
    kind = node["feature_type"]
    if kind == "embedding":
        return graph.index("token", node["ctx_idx"])
    if kind == "logit":
        return graph.index("logit", graph.logit_tokens.index(node["feature"]))
    if kind == "mlp reconstruction error":
        return graph.index("error", int(node["layer"]), node["ctx_idx"])
    layer, index = feature_of(node)
    match = ((graph.active[:, 0] == layer) & (graph.active[:, 1] == node["ctx_idx"])
             & (graph.active[:, 2] == index)).nonzero()
    return int(match[0, 0]) if len(match) else None


def slug_of(text: str) -> str:
    """A file-safe name for a prompt: its words joined by -, at most 40 characters."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "graph"


@torch.no_grad()
def top_contexts(run, transcoders: Transcoders, wanted: list[tuple[int, int]], contexts: int = 5, before: int = 8,
                 after: int = 2, max_tokens: int = 32768) -> dict[str, list[dict]]:
    """For each (layer, feature) wanted: the held-out contexts (the val split, at most `max_tokens`
    tokens, at the positions the transcoders trained on) where it is largest, as {tokens, values,
    value}: the tokens from `before` before to `after` after, its activation on each (0 off those
    positions), and the largest."""
    from analysis.runs import capture_all, split_sequences
    if not wanted:
        return {}
    held_out = split_sequences(run, "val", transcoders.positions, max_tokens)
    tokens = held_out.tokens
    inputs = [capture_all(run, tokens, hook).to(next(run.model.parameters()).dtype) for hook in transcoders.hooks_in]
    acts = [a * held_out.mask[..., None].to(a.device) for a in transcoders.activations(inputs)]  # per layer [S, T, n]
    S, T = tokens.shape
    ids = sorted(set(tokens.flatten().tolist()))
    names = dict(zip(ids, token_names(run, ids)))
    found = {}
    for layer, feature in wanted:
        values = acts[layer][..., feature].float().cpu()
        best = values.flatten().topk(min(contexts, values.numel()))
        shown = []
        for value, where in zip(best.values.tolist(), best.indices.tolist()):
            if value <= 0:
                break
            s, t = divmod(where, T)
            window = range(max(0, t - before), min(T, t + after + 1))
            shown.append({"tokens": [names[int(tokens[s, i])] for i in window],
                          "values": [round(float(values[s, i]), 4) for i in window], "value": value})
        found[f"{layer}:{feature}"] = shown
    return found


def write_graph(run, transcoders: Transcoders, tokens: list[int], out_dir: str, prompt: str = "",
                node_threshold: float = 0.8, edge_threshold: float = 0.98, max_n_logits: int = 10,
                desired_logit_prob: float = 0.95, batch_size: int = 64, log=print) -> str:
    """Builds, prunes and writes one prompt's graph under out_dir (graph.json, graph.pt, and graph.html
    with each feature's top held-out contexts); returns the json's path."""
    from analysis.graph_page import write_graph_page
    model = run.model
    graph = attribute(model, torch.tensor([tokens], device=run.device), transcoders, max_n_logits,
                      desired_logit_prob, batch_size, log)
    pruned = prune(graph, node_threshold, edge_threshold)
    ids = sorted(set(tokens) | set(graph.logit_tokens))
    names = dict(zip(ids, token_names(run, ids)))
    prompt = prompt or " ".join(names[t] for t in tokens)
    scan = os.path.basename(os.path.normpath(transcoders.folders[0])) if transcoders.cross else \
        "+".join(os.path.basename(os.path.normpath(f)) for f in transcoders.folders)
    document = graph_json(graph, pruned, names, prompt, slug_of(prompt), scan, node_threshold)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "graph.json")
    with open(path + ".tmp", "w") as f:
        json.dump(document, f)
    os.replace(path + ".tmp", path)
    torch.save({"graph": graph.__dict__, "node_mask": pruned.nodes, "edge_mask": pruned.edges},
               os.path.join(out_dir, "graph.pt"))
    kept = int(pruned.nodes[:graph.n_features].sum())
    largest = float(pruned.influence.max()) or 1.0
    sizes = {}  # a node's influence on the logits, the largest 1; a logit's, its probability
    for node in document["nodes"]:
        number = node_number(graph, node)
        sizes[node["node_id"]] = (node["token_prob"] if node["feature_type"] == "logit" else
                                  float(pruned.influence[number]) / largest if number is not None else 0.0)
    wanted = sorted({feature_of(n) for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"})
    log(f"top contexts of {len(wanted)} features")
    summary = (f"{graph.n_features:,} active features, {len(graph.logit_tokens)} logits; kept {kept:,} features and "
               f"{len(document['links']):,} edges (node threshold {node_threshold:g}, edge threshold {edge_threshold:g})")
    write_graph_page(os.path.join(out_dir, "graph.html"), document, graph.layers, sizes,
                     top_contexts(run, transcoders, wanted), run.data.generates_text, summary)
    log(f"{graph.n_features:,} active features, {len(graph.logit_tokens)} logits "
        f"(p {float(graph.logit_probabilities.sum()):.3f}); kept {kept:,} features and {len(document['links']):,} "
        f"edges (thresholds: {node_threshold:g} of node influence, {edge_threshold:g} of edge influence)")
    return path
