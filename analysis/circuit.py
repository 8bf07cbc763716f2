"""Circuit discovery: score every edge of the model's computational graph on clean/corrupted pairs, find
the smallest circuit that keeps a share of the behaviour, and measure how faithful it is (MIB's CPR and
CMD).

The graph is the one the field uses (Conmy et al. 2023; Hanna et al. 2024; MIB): senders are the input
(token and position embeddings), each head's output and each MLP's output; receivers are each head's
query, key and value input, each MLP's input and the logits. A receiver's input is the sum of its
senders' outputs (plus the attention output biases, which no edge carries), so an edge is one term of
that sum. Under grouped-query attention each query head has its own key and value input (MIB and
TransformerLens's `ungroup_grouped_query_attention`). `run_edges` computes the model this way, with
every receiver reading its own copy of the residual stream, and equals the model's forward pass.

Ablating an edge replaces its term by the sender's ablated output: the corrupted run's (`resample`),
the mean over the corrupted inputs at that position (`mean`) or zero (`zero`); everything downstream is
recomputed. A circuit is a set of edges that keep their clean value; every other edge is ablated. With
every edge ablated under `resample` the model computes the corrupted run; with none, the clean run.

An edge's score is its effect on the behaviour b (the logit difference right - wrong at the answer
position, or the answer's log-probability, averaged over pairs): b(clean) - b(that edge ablated),
positive when the edge carries the behaviour.

    exact        one forward pass per edge (batched): the ground truth
    eap          edge attribution patching (Syed et al. 2023): (clean - ablated output) . d b / d input
    eap_ig       EAP with integrated gradients (Hanna et al. 2024): the gradient averaged over `ig_steps`
                 points between the ablated and the clean run (k / steps, k = 0 .. steps - 1)
    attribution  attribution patching of nodes (Nanda 2023): the same product at each node's output
                 (= the sum of its edges' EAP scores)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from config import ConfigError
from model import Transformer, rotate

METHODS = ("eap_ig", "eap", "attribution", "exact")
ABLATIONS = ("resample", "mean", "zero")
METRICS = ("logit_diff", "loss")
SEARCHES = ("topn", "greedy")
IG_PATHS = ("inputs", "edges")
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's circuit sizes (share of edges)


# ---------------------------------------------------------------- pairs


@dataclass
class Pairs:
    """Clean and corrupted inputs of the same length, each with the answer it should give (`right`) and
    the one the corrupted input points to (`wrong`), read at position `last` (pairs of different lengths
    are right-padded: causal attention never lets padding reach an earlier position)."""
    clean: torch.Tensor  # [N, T] token ids
    corrupted: torch.Tensor  # [N, T]
    right: torch.Tensor  # [N]
    wrong: torch.Tensor  # [N]
    last: torch.Tensor  # [N] the position whose next-token logits are read
    names: list[str] = field(default_factory=list)  # how a person reads each clean input

    def __len__(self) -> int:
        return len(self.clean)

    def to(self, device) -> "Pairs":
        return Pairs(*(t.to(device) for t in (self.clean, self.corrupted, self.right, self.wrong, self.last)),
                     self.names)

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            rows = slice(start, start + size)
            yield Pairs(self.clean[rows], self.corrupted[rows], self.right[rows], self.wrong[rows], self.last[rows])

    @property
    def same_length(self) -> bool:
        return bool((self.last == self.clean.shape[1] - 1).all())


def make_pairs(rows: list[tuple[list[int], list[int], int, int]], names: list[str] | None = None, pad: int = 0) -> Pairs:
    """Pairs from (clean ids, corrupted ids, right id, wrong id) rows; each clean and corrupted input must
    have the same length (ValueError naming the row otherwise)."""
    if not rows:
        raise ValueError("no pairs")
    for i, (clean, corrupted, _, _) in enumerate(rows):
        if len(clean) != len(corrupted):
            raise ValueError(f"pair {i + 1}: the clean input has {len(clean)} tokens and the corrupted one "
                             f"{len(corrupted)}; a pair's inputs must have the same length")
        if not clean:
            raise ValueError(f"pair {i + 1}: the inputs are empty")
    T = max(len(r[0]) for r in rows)
    clean = torch.full((len(rows), T), pad, dtype=torch.long)
    corrupted = clean.clone()
    for i, (c, d, _, _) in enumerate(rows):
        clean[i, :len(c)], corrupted[i, :len(d)] = torch.tensor(c), torch.tensor(d)
    return Pairs(clean, corrupted, torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]),
                 torch.tensor([len(r[0]) - 1 for r in rows]), list(names or []))


def behaviour(logits: torch.Tensor, pairs: Pairs, metric: str) -> torch.Tensor:
    """[N] per pair, in float64 or the model's wider dtype: logit[right] - logit[wrong] at `last`
    (`logit_diff`), or log p(right) there (`loss`: minus the answer's cross-entropy)."""
    at = logits[torch.arange(len(logits), device=logits.device), pairs.last.repeat(len(logits) // len(pairs))]
    at = at.to(torch.promote_types(at.dtype, torch.float64))
    right, wrong = (t.repeat(len(logits) // len(pairs)) for t in (pairs.right, pairs.wrong))
    if metric == "loss":
        return at.log_softmax(-1).gather(1, right[:, None])[:, 0]
    return at.gather(1, right[:, None])[:, 0] - at.gather(1, wrong[:, None])[:, 0]


def read_pairs(run, spec: str, count: int = 0, seed: int = 0) -> tuple[Pairs, str]:
    """(pairs, where they came from) for --pairs: `builtin` (the run's task's own, TaskData.circuit_pairs)
    or a JSONL file of {"clean", "corrupted", "right", "wrong"} rows (text, or a modular or Dyck run's
    token names); count > 0 keeps the first count. Bad input is a ConfigError naming the file and line."""
    import json
    import os

    from analysis.runs import encode_tokens

    if spec == "builtin":
        rows = run.data.circuit_pairs(count or 128, seed)
        if not rows:
            raise ConfigError("--pairs builtin: the run's task gave no pairs")
        texts = [" ".join(run.data.token_names(r[0])) for r in rows]
        return make_pairs(rows, texts), "builtin"
    if not os.path.isfile(spec):
        raise ConfigError(f"--pairs: no file {spec}; give a JSONL file of clean/corrupted pairs or 'builtin'")
    rows, texts = [], []
    with open(spec) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ConfigError(f"--pairs: {spec} is empty; write one JSON object per line with clean, corrupted, right, wrong")
    for n, line in lines:
        where = f"pairs ({spec} line {n})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--pairs: {spec} line {n} is not JSON ({e.msg})") from None
        missing = [k for k in ("clean", "corrupted", "right", "wrong") if not isinstance(row.get(k) if isinstance(
            row, dict) else None, str)]
        if missing:
            raise ConfigError(f"--pairs: {spec} line {n} has no text for {', '.join(missing)}; each line needs "
                              f"clean, corrupted, right and wrong")
        clean, corrupted = encode_tokens(run, row["clean"], where), encode_tokens(run, row["corrupted"], where)
        if len(clean) != len(corrupted):
            raise ConfigError(f"--pairs: {spec} line {n}: the clean input is {len(clean)} tokens and the corrupted "
                              f"one {len(corrupted)}; a pair's inputs must have the same length")
        if not clean:
            raise ConfigError(f"--pairs: {spec} line {n}: the clean input is empty")
        answers = []
        for key in ("right", "wrong"):
            ids = encode_tokens(run, row[key], where)
            if len(ids) != 1:
                raise ConfigError(f"--pairs: {spec} line {n}: {key} {row[key]!r} is {len(ids)} tokens; an answer "
                                  f"must be one token" + (" (with a text tokenizer, mind the leading space)"
                                                          if run.data.generates_text else ""))
            answers.append(ids[0])
        if len(clean) > run.cfg.context_len:
            raise ConfigError(f"--pairs: {spec} line {n} is {len(clean)} tokens, more than the model's context "
                              f"({run.cfg.context_len})")
        rows.append((clean, corrupted, answers[0], answers[1]))
        texts.append(row["clean"])
    if count:
        rows, texts = rows[:count], texts[:count]
    return make_pairs(rows, texts), spec


# ---------------------------------------------------------------- the graph


@dataclass
class EdgeGraph:
    """Senders, receivers and which sender reaches which receiver (`valid` [S, R])."""
    senders: list[str]  # "input", "a{layer}.h{head}", "m{layer}"
    receivers: list[str]  # "a{layer}.h{head}<q|k|v>", "m{layer}", "logits"
    valid: torch.Tensor  # [S, R] bool
    num_heads: int
    has_mlp: bool

    @property
    def num_edges(self) -> int:
        return int(self.valid.sum())

    def receiver_node(self, r: int) -> str:
        """The node a receiver is an input of: 'a1.h2' for 'a1.h2<q>', else itself."""
        return self.receivers[r].split("<")[0]

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]}->{self.receivers[r]}"

    def layer_of(self, name: str) -> float:
        """Where a node sits, bottom to top: input -1, a head of layer l at l, an MLP at l + 0.5, logits at L."""
        if name == "input":
            return -1
        if name == "logits":
            return len([s for s in self.senders if s.startswith("a") and s.endswith(".h0")])
        return int(name[1:].split(".")[0].split("<")[0]) + (0.5 if name.startswith("m") else 0)


def edge_graph(model: Transformer) -> EdgeGraph:
    L, H = model.cfg.num_blocks, model.cfg.num_heads
    has_mlp = not model.cfg.attention_only
    senders, receivers, upstream = ["input"], [], []  # upstream[r]: how many senders precede receiver r
    for i in range(L):
        before_block = len(senders)
        for kind in "qkv":
            for h in range(H):
                receivers.append(f"a{i}.h{h}<{kind}>")
                upstream.append(before_block)
        senders += [f"a{i}.h{h}" for h in range(H)]
        if has_mlp:
            receivers.append(f"m{i}")
            upstream.append(len(senders))
            senders.append(f"m{i}")
    receivers.append("logits")
    upstream.append(len(senders))
    valid = torch.arange(len(senders))[:, None] < torch.tensor(upstream)[None, :]
    return EdgeGraph(senders, receivers, valid, H, has_mlp)


# ---------------------------------------------------------------- the model, edge by edge


def _attention_by_head(attn, xq, xk, xv, rope) -> torch.Tensor:
    """Each head's output [N, T, H, D] when head h's query, key and value read xq, xk, xv[:, :, h]
    [N, T, H, D] (already normalised): the model's attention, one head at a time."""
    N, T, H, D = xq.shape
    Hkv, Dh = attn.num_kv_heads, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    rows_q, rows_k, _ = attn.split

    def project(x, rows, heads):
        weight = w[rows].view(heads, Dh, D).repeat_interleave(H // heads, 0)  # [H, Dh, D]
        out = torch.einsum("nthd,hed->nthe", x, weight)
        return out if b is None else out + b[rows].view(heads, Dh).repeat_interleave(H // heads, 0)

    q = project(xq, slice(0, rows_q), H)
    k = project(xk, slice(rows_q, rows_q + rows_k), Hkv)
    v = project(xv, slice(rows_q + rows_k, None), Hkv)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rotary:
        cos, sin = rope
        q, k = rotate(q, cos[:T], sin[:T]), rotate(k, cos[:T], sin[:T])
    scores = torch.einsum("nqhe,nkhe->nhqk", q, k) / math.sqrt(Dh) + attn._causal_bias(T, q)
    pattern = attn._softmax(scores, key_dim=-1, head_dim=1)
    z = torch.einsum("nhqk,nkhe->nqhe", pattern, v)
    return torch.einsum("nqhe,dhe->nqhd", z, attn.out.weight.view(D, H, Dh))


@dataclass
class EdgePass:
    logits: torch.Tensor  # [N, T, vocab]
    outputs: torch.Tensor  # [N, T, S, D] every sender's output in this pass
    probes: list[torch.Tensor]  # with probe=True: zero tensors added to the receivers' inputs, [N, T, R_i, D] each


def run_edges(model: Transformer, graph: EdgeGraph, tokens: torch.Tensor, ablated: torch.Tensor | None = None,
              ablate: torch.Tensor | None = None, probe: bool = False, embedding: torch.Tensor | None = None) -> EdgePass:
    """The model on tokens [B, T] with every receiver reading its own sum of sender outputs.

    ablate [V, T or 1, S, R] (float: 1 ablates an edge, 0 keeps it; fractions interpolate) runs V
    variants at once, batch V x B: receiver r's input gets ablate[s, r] x (ablated[s] - output[s]) added
    for each sender s, ablated [B, T, S, D] being the senders' ablated outputs. probe adds a zero
    tensor that requires grad to every receiver's input, so that a backward pass leaves d/d input in
    its .grad. embedding [B, T, D] replaces the input node's output (integrated gradients)."""
    cfg = model.cfg
    B, T = tokens.shape
    V = 1 if ablate is None else ablate.shape[0]
    x = model.embed(tokens) if embedding is None else embedding
    if model.pos_embed is not None and embedding is None:
        x = x + model.pos_embed(torch.arange(T, device=tokens.device))
    S, H = len(graph.senders), cfg.num_heads
    outputs = x.new_empty(V * B, T, S, x.shape[-1])  # every sender's output, filled in as the pass goes
    resid = x.repeat(V, 1, 1)  # their sum, plus the attention output biases
    outputs[:, :, 0] = resid
    diffs: list[tuple[int, torch.Tensor]] = []  # (first sender, ablated - output [V, n, B, T, D]) per group written
    if ablate is not None:
        diffs.append((0, (ablated[:, :, 0] - x)[None, None].expand(V, 1, B, T, -1)))
    probes: list[torch.Tensor] = []
    done, r0 = 1, 0  # senders written, receivers read

    def inputs(count: int) -> torch.Tensor:
        """[V B, T, count, D]: the next `count` receivers' inputs."""
        nonlocal r0
        x_in = resid[:, :, None].expand(-1, -1, count, -1)
        if ablate is not None:
            delta = 0
            for first, diff in diffs:  # sum over senders of amount x (ablated - output), group by group
                amounts = ablate[:, :, first:first + diff.shape[1], r0:r0 + count].to(diff.dtype)  # [V, T|1, n, count]
                if amounts.shape[1] == 1:  # one amount for every position: a batched matmul over senders
                    part = torch.bmm(amounts[:, 0].transpose(1, 2), diff.reshape(V, diff.shape[1], -1))
                    delta = delta + part.view(V, count, B, T, -1)
                else:
                    delta = delta + torch.einsum("vsbtd,vtsr->vrbtd", diff, amounts)
            x_in = x_in + delta.permute(0, 2, 3, 1, 4).reshape(V * B, T, count, -1)
        if probe:
            zero = torch.zeros(x_in.shape, dtype=x_in.dtype, device=x_in.device, requires_grad=True)
            probes.append(zero)
            x_in = x_in + zero
        r0 += count
        return x_in

    def write(out: torch.Tensor):
        """out [V B, T, n, D]: the next n senders' outputs."""
        nonlocal done, resid
        n = out.shape[2]
        outputs[:, :, done:done + n] = out
        resid = resid + out.sum(2)
        if ablate is not None:
            diffs.append((done, (ablated[:, :, done:done + n] - out.view(V, B, T, n, -1)).permute(0, 3, 1, 2, 4)))
        done += n

    for block in model.blocks:
        x_attn = block.ln1(inputs(3 * H))
        write(_attention_by_head(block.attn, x_attn[:, :, :H], x_attn[:, :, H:2 * H], x_attn[:, :, 2 * H:], model.rope))
        if block.attn.out.bias is not None:
            resid = resid + block.attn.out.bias
        if block.mlp is not None:
            write(block.mlp(block.ln2(inputs(1)[:, :, 0]))[:, :, None])
    logits = model.head(inputs(1)[:, :, 0])
    return EdgePass(logits, outputs, probes)


# ---------------------------------------------------------------- scores


@dataclass
class Scores:
    """Each edge's (or node's) effect on the behaviour: b(clean) - b(it ablated), NaN where no edge is."""
    graph: EdgeGraph
    edges: torch.Tensor | None  # [S, R], or [T, S, R] with positions; None for node-level methods
    nodes: torch.Tensor  # [S], or [T, S]
    method: str
    ablation: str
    metric: str
    ig_steps: int
    clean: float  # b on the clean inputs
    ablated: float  # b with every edge ablated (under resample: the corrupted inputs)
    seconds: float = 0.0
    positions: bool = False


class Ablated:
    """The senders' ablated outputs for each chunk of pairs."""

    def __init__(self, model, graph, pairs: Pairs, ablation: str, batch_size: int):
        self.model, self.graph, self.ablation = model, graph, ablation
        self.mean = None
        self.corrupted: dict[int, torch.Tensor] = {}  # resample: each chunk's, computed once
        if ablation == "mean":
            total, count = 0, torch.zeros(pairs.clean.shape[1], device=pairs.clean.device)
            for chunk in pairs.chunks(batch_size):
                real = (torch.arange(chunk.clean.shape[1], device=chunk.clean.device)[None] <= chunk.last[:, None])
                outs = run_edges(model, graph, chunk.corrupted).outputs.detach()
                total = total + (outs * real[:, :, None, None]).sum(0)
                count += real.sum(0)
            self.mean = total / count.clamp(min=1)[:, None, None]  # [T, S, D]

    def of(self, index: int, chunk: Pairs) -> torch.Tensor:
        """[B, T, S, D] for the index-th chunk of the pairs."""
        if self.ablation == "resample":
            if index not in self.corrupted:
                with torch.no_grad():
                    self.corrupted[index] = run_edges(self.model, self.graph, chunk.corrupted).outputs
            return self.corrupted[index]
        if self.ablation == "mean":
            return self.mean[None].expand(len(chunk), *self.mean.shape)
        S, D = len(self.graph.senders), self.model.cfg.embedding_dim
        return torch.zeros(len(chunk), chunk.clean.shape[1], S, D, device=chunk.clean.device,
                           dtype=next(self.model.parameters()).dtype)


class Progress:
    """A line every few seconds with the share done and the time left, for the slow loops (exact scores)."""

    def __init__(self, what: str, total: int, quiet: bool = False, every: float = 10.0):
        self.what, self.total, self.quiet, self.every = what, total, quiet, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int):
        self.done += n
        now = time.perf_counter()
        if not self.quiet and now - self.last > self.every and self.done < self.total:
            from utils import format_duration
            rate = self.done / (now - self.start)
            print(f"{self.what}: {self.done:,}/{self.total:,} · {format_duration(now - self.start)}, "
                  f"ETA {format_duration((self.total - self.done) / rate)}", flush=True)
            self.last = now


def _behaviour_mean(model, graph, pairs: Pairs, ablated: Ablated, ablate: torch.Tensor | None, metric: str,
                    batch_size: int) -> torch.Tensor:
    """[V] b averaged over pairs, for each of ablate's V variants ([V, T|1, S, R]; None: the clean run)."""
    V = 1 if ablate is None else ablate.shape[0]
    total = torch.zeros(V, dtype=torch.float64, device=pairs.clean.device)
    for index, chunk in enumerate(pairs.chunks(batch_size)):
        with torch.no_grad():
            logits = run_edges(model, graph, chunk.clean, None if ablate is None else ablated.of(index, chunk),
                               ablate).logits
            total += behaviour(logits, chunk, metric).view(V, len(chunk)).sum(1).to(total)
    return total / len(pairs)


def _slots(graph: EdgeGraph, T: int, positions: bool, nodes: bool) -> torch.Tensor:
    """The things a circuit is made of, as a bool mask: edges [S, R] or nodes [S] (input and logits are
    no nodes to drop), each with a leading [T] under positions."""
    base = graph.valid.clone() if not nodes else torch.tensor([s != "input" for s in graph.senders])
    return base.expand(T, *base.shape).clone() if positions else base


def ablation_of(graph: EdgeGraph, keep: torch.Tensor, nodes: bool, positions: bool) -> torch.Tensor:
    """keep [V, *slots] bool -> ablate [V, T|1, S, R] float: every edge not kept (nodes: every edge out
    of a node not kept) ablated."""
    valid = graph.valid.to(keep.device)
    if nodes:
        drop = ~keep[..., :, None] & valid  # [V, (T,) S, R]
        if graph.senders[0] == "input":
            drop[..., 0, :] = False  # the input is always there
    else:
        drop = ~keep & valid
    return (drop if positions else drop[:, None]).double()


def variants_per_pass(model, graph: EdgeGraph, pairs: Pairs, batch_size: int, budget: float = 2e9) -> int:
    """How many patched variants of a batch of pairs one pass runs: about 16,384 rows of tokens, fewer
    when the senders' outputs and their differences (three copies of [V B, T, S, D]) would pass
    `budget` bytes."""
    B, T = min(len(pairs), batch_size), pairs.clean.shape[1]
    parameter = next(model.parameters())
    one = 3 * B * T * len(graph.senders) * model.cfg.embedding_dim * parameter.element_size()
    return max(1, min(16384 // (B * T), int(budget // one)))


def exact_scores(model, graph, pairs, ablated: Ablated, metric: str, clean: float, nodes: bool, positions: bool,
                 batch_size: int, variants: int = 0, quiet: bool = False) -> torch.Tensor:
    """b(clean) - b(one edge, or node, ablated) for every slot: one patched pass per slot, `variants` of
    them per pass (default: variants_per_pass)."""
    T = pairs.clean.shape[1]
    slots = _slots(graph, T, positions, nodes)
    where = slots.nonzero()
    scores = torch.full(slots.shape, float("nan"), dtype=torch.float64)
    per_batch = variants or variants_per_pass(model, graph, pairs, batch_size)
    progress = Progress("exact patching", len(where), quiet)
    for start in range(0, len(where), per_batch):
        part = where[start:start + per_batch]
        keep = slots.expand(len(part), *slots.shape).clone()
        keep[(torch.arange(len(part)),) + tuple(part.T)] = False
        values = _behaviour_mean(model, graph, pairs, ablated, ablation_of(graph, keep, nodes, positions).to(
            pairs.clean.device), metric, batch_size)
        scores[tuple(part.T)] = clean - values.cpu()
        progress.update(len(part))
    return scores


def gradient_scores(model, graph, pairs: Pairs, ablated: Ablated, metric: str, positions: bool, batch_size: int,
                    steps: int = 1, path: str = "inputs") -> torch.Tensor:
    """Linear estimates of b(clean) - b(edge ablated), averaged over pairs: [S, R] or [T, S, R].

    steps 1 (EAP): (clean - ablated output of s) . d b / d input of r at the clean run, summed over
    positions (kept apart with positions). With steps = m > 1, integrated gradients along one of two
    paths from the clean run to the ablated one:
      inputs  Hanna et al.'s EAP-IG (resample only): the same product with the gradient averaged over
              runs whose input embeddings are k / m of the way from corrupted to clean, k = 0 .. m - 1;
      edges   every edge ablated by the same amount a = k / m, k = 0 .. m, and the score the mean of
              -d b / d a_edge over those points (auto-circuit's integrated gradients, which sum them).
              Completeness: the scores add up to about b(clean) - b(everything ablated)."""
    T = pairs.clean.shape[1]
    S, R = graph.valid.shape
    total = torch.zeros((T, S, R) if positions else (S, R), dtype=torch.float64, device=pairs.clean.device)
    valid = graph.valid.to(pairs.clean.device)
    for index, chunk in enumerate(pairs.chunks(batch_size)):
        with torch.no_grad():
            clean_out = run_edges(model, graph, chunk.clean).outputs
            ablated_out = ablated.of(index, chunk)
        if steps > 1 and path == "edges":
            for k in range(steps + 1):
                amount = (k / steps * valid.to(clean_out.dtype)).expand(T if positions else 1, S, R)[None]
                amount = amount.clone().requires_grad_(True)
                with torch.enable_grad():
                    run = run_edges(model, graph, chunk.clean, ablated_out, amount)
                    (grad,) = torch.autograd.grad(behaviour(run.logits, chunk, metric).sum(), [amount])
                grad = grad[0] if positions else grad[0, 0]
                total -= grad.to(total.dtype) / (steps + 1)
            continue
        grads = 0
        for k in range(steps):
            embedding = None
            if steps > 1:
                embedding = ablated_out[:, :, 0] + k / steps * (clean_out[:, :, 0] - ablated_out[:, :, 0])
            with torch.enable_grad():  # gradients for the probes alone, none for the weights
                run = run_edges(model, graph, chunk.clean, probe=True, embedding=embedding)
                found = torch.autograd.grad(behaviour(run.logits, chunk, metric).sum(), run.probes)
            grads = grads + torch.cat(found, 2)  # [B, T, R, D]
        diff = (clean_out - ablated_out).to(total.dtype)
        grads = grads.to(total.dtype) / steps
        total += torch.einsum("btsd,btrd->tsr" if positions else "btsd,btrd->sr", diff, grads)
    scores = (total / len(pairs)).cpu()
    return scores.masked_fill(~graph.valid, float("nan"))


def score(model, graph: EdgeGraph, pairs: Pairs, method: str = "eap_ig", ablation: str = "resample",
          metric: str = "logit_diff", ig_steps: int = 5, positions: bool = False, nodes: bool = False,
          batch_size: int = 32, ig_path: str = "inputs", quiet: bool = True) -> Scores:
    """Scores for every edge (and node) of `graph` on `pairs` by `method` (see the module's doc)."""
    start = time.perf_counter()
    nodes = nodes or method == "attribution"
    ablated = Ablated(model, graph, pairs, ablation, batch_size)
    clean = float(_behaviour_mean(model, graph, pairs, ablated, None, metric, batch_size)[0])
    everything = ablation_of(graph, torch.zeros(1, *graph.valid.shape, dtype=torch.bool), False, False)
    ablated_value = float(_behaviour_mean(model, graph, pairs, ablated, everything.to(pairs.clean.device), metric,
                                          batch_size)[0])
    edges = None
    if method == "exact":
        if nodes:
            node_scores = exact_scores(model, graph, pairs, ablated, metric, clean, True, positions, batch_size,
                                       quiet=quiet)
        else:
            edges = exact_scores(model, graph, pairs, ablated, metric, clean, False, positions, batch_size, quiet=quiet)
            node_scores = exact_scores(model, graph, pairs, ablated, metric, clean, True, positions, batch_size,
                                       quiet=True)
    else:
        steps = ig_steps if method == "eap_ig" else 1
        if method == "eap_ig" and ablation != "resample":
            ig_path = "edges"  # no input embedding to interpolate towards a mean or zero
        edges = gradient_scores(model, graph, pairs, ablated, metric, positions, batch_size, steps, ig_path)
        node_scores = edges.nan_to_num(0).sum(-1)
        node_scores[..., 0] = float("nan")  # the input is no node to drop
        if nodes:
            edges = None
    return Scores(graph, edges, node_scores, method, ablation, metric, ig_steps if method == "eap_ig" else 0, clean,
                  ablated_value, time.perf_counter() - start, positions)


# ---------------------------------------------------------------- circuits


def order_of(scores: Scores, search: str = "topn", signed: bool = False) -> torch.Tensor:
    """The slots (flat indices into the edge or node score tensor) in the order a circuit takes them:
    `topn` by |score| (by score when signed); `greedy` grows a connected circuit from the logits, each
    time taking the best edge into a node the circuit already has (edges that can never connect come
    last, by score)."""
    import heapq

    values = scores.edges if scores.edges is not None else scores.nodes
    flat = (values if signed else values.abs()).flatten()
    finite = ~flat.isnan()
    ranked = flat.masked_fill(~finite, float("-inf")).argsort(descending=True, stable=True)[:int(finite.sum())]
    if search == "topn" or scores.edges is None:
        return ranked
    graph = scores.graph
    S, R = graph.valid.shape
    into: dict[str, list[int]] = {}  # node -> the slots whose receiver is one of its inputs
    for i in ranked.tolist():
        into.setdefault(graph.receiver_node(i % R), []).append(i)
    available = [(-float(flat[i]), i) for i in into.get("logits", [])]
    heapq.heapify(available)
    reached, order, taken = {"logits"}, [], set()
    while available:
        _, i = heapq.heappop(available)
        if i in taken:
            continue
        taken.add(i)
        order.append(i)
        sender = graph.senders[(i % (S * R)) // R]
        if sender not in reached:
            reached.add(sender)
            for j in into.get(sender, []):
                heapq.heappush(available, (-float(flat[j]), j))
    order += [i for i in ranked.tolist() if i not in taken]
    return torch.tensor(order, dtype=torch.long)


@dataclass
class CircuitResult:
    scores: Scores
    order: torch.Tensor  # the slots in the order the circuit takes them
    size: int  # how many slots the circuit has
    faithfulness: float  # (b(circuit) - b(none)) / (b(clean) - b(none))
    complement: float  # the same with only the circuit ablated
    target: float
    reached: bool
    curve: list[tuple[float, int, float]]  # (share of slots, slots, faithfulness) at MIB's sizes, by |score|
    signed_curve: list[tuple[float, int, float]]  # the same ranked by signed score (MIB's CPR)
    cpr: float  # area under the signed curve
    cmd: float  # area between the |score| curve and 1
    search: str = "topn"


class Evaluator:
    """Faithfulness of circuits given as prefixes of an order, several per batch of passes."""

    def __init__(self, model, scores: Scores, pairs: Pairs, batch_size: int):
        self.model, self.scores, self.pairs, self.batch_size = model, scores, pairs, batch_size
        self.nodes = scores.edges is None
        self.slots = _slots(scores.graph, pairs.clean.shape[1], scores.positions, self.nodes)
        self.ablated = Ablated(model, scores.graph, pairs, scores.ablation, batch_size)
        self.per_batch = variants_per_pass(model, scores.graph, pairs, batch_size)

    def behaviour(self, keeps: torch.Tensor) -> torch.Tensor:
        """[V] b for circuits keep [V, *slots]."""
        out = []
        for start in range(0, len(keeps), self.per_batch):
            ablate = ablation_of(self.scores.graph, keeps[start:start + self.per_batch], self.nodes,
                                 self.scores.positions).to(self.pairs.clean.device)
            out.append(_behaviour_mean(self.model, self.scores.graph, self.pairs, self.ablated, ablate,
                                       self.scores.metric, self.batch_size).cpu())
        return torch.cat(out)

    def keep(self, order: torch.Tensor, sizes: list[int], complement: bool = False) -> torch.Tensor:
        keeps = torch.zeros(len(sizes), self.slots.numel(), dtype=torch.bool)
        for v, n in enumerate(sizes):
            keeps[v, order[:n]] = True
        keeps = keeps.view(len(sizes), *self.slots.shape)
        return (self.slots & ~keeps) if complement else keeps

    def faithfulness(self, values: torch.Tensor) -> torch.Tensor:
        s = self.scores
        return (values - s.ablated) / (s.clean - s.ablated)


def area(curve: list[tuple[float, int, float]], fn) -> float:
    """Trapezoids over the share of slots, as MIB integrates its faithfulness curves."""
    return sum((x2 - x1) * (fn(f1) + fn(f2)) / 2 for (x1, _, f1), (x2, _, f2) in zip(curve, curve[1:]))


def find_circuit(model, scores: Scores, pairs: Pairs, target: float = 0.9, search: str = "topn",
                 batch_size: int = 32, exhaustive_below: int = 4096) -> CircuitResult:
    """The smallest prefix of the ranking (`search`) whose faithfulness reaches `target`: every prefix is
    tried when there are at most `exhaustive_below` slots, else MIB's sizes and then a bisection between
    the two around the first that reaches it. Also MIB's curves, CPR and CMD, and the complement."""
    ev = Evaluator(model, scores, pairs, batch_size)
    total = int(ev.slots.sum())
    order = order_of(scores, search)
    sizes = [int(f * total) for f in MIB_FRACTIONS]
    values = ev.faithfulness(ev.behaviour(ev.keep(order, sizes)))
    curve = [(f, n, float(v)) for f, n, v in zip(MIB_FRACTIONS, sizes, values)]
    signed = order_of(scores, "topn", signed=True)
    signed_values = ev.faithfulness(ev.behaviour(ev.keep(signed, sizes)))
    signed_curve = [(f, n, float(v)) for f, n, v in zip(MIB_FRACTIONS, sizes, signed_values)]
    if total <= exhaustive_below:
        every = list(range(total + 1))
        f_all = ev.faithfulness(ev.behaviour(ev.keep(order, every)))
        hits = (f_all >= target).nonzero()
        size = int(hits[0]) if len(hits) else total
        found = float(f_all[size])
    else:
        first = next((i for i, v in enumerate(values) if v >= target), len(sizes) - 1)
        low, high = (sizes[first - 1] if first else 0), sizes[first]
        found = float(values[first])
        while high - low > 1:
            mid = (low + high) // 2
            f_mid = float(ev.faithfulness(ev.behaviour(ev.keep(order, [mid])))[0])
            if f_mid >= target:
                high, found = mid, f_mid
            else:
                low = mid
        size = high
    complement = float(ev.faithfulness(ev.behaviour(ev.keep(order, [size], complement=True)))[0])
    return CircuitResult(scores, order, size, found, complement, target, found >= target, curve, signed_curve,
                         area(signed_curve, lambda f: f), area(curve, lambda f: abs(1 - f)), search)


def slot_names(scores: Scores, T: int | None = None) -> list[str]:
    """A name for every flat slot: 'a0.h1->a1.h2<q>' (with positions: '@3' after it), or a node's name."""
    g = scores.graph
    base = ([g.edge_name(s, r) for s in range(len(g.senders)) for r in range(len(g.receivers))]
            if scores.edges is not None else list(g.senders))
    if not scores.positions:
        return base
    return [f"{name}@{t}" for t in range(T) for name in base]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score tensors over the entries both have (not NaN); ties get
    their average rank."""
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep].double(), b[keep].double()

    def ranks(x):
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=x.dtype)
        for value in x.unique()[torch.unique(x, return_counts=True)[1] > 1]:  # ties: their mean rank
            r[x == value] = r[x == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
