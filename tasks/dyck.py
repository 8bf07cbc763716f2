"""Dyck languages: balanced brackets of k types; the model predicts every next token, and a
sequence is right when every prediction is."""

from __future__ import annotations

import os

import numpy as np
import torch

from config import ConfigError
from data import IGNORE, TaskData, _IndexedData, _step_seed


class DyckData(_IndexedData):
    """Balanced sequences over k bracket types: BOS, brackets, EOS, then PAD.

    Vocabulary: 0 PAD, 1 BOS, 2 EOS, 3..3+k-1 opening brackets, 3+k..3+2k-1 closing brackets.
    Targets are next tokens (PAD ignored). Each validation position also knows its set of valid
    continuations: an opening bracket while depth and remaining length allow one, the closing
    bracket matching the top of the stack, EOS once balanced and long enough. A position is
    *forced* when exactly one continuation is valid (e.g. at maximum depth the stack decides
    the closing bracket); `val_forced_acc` is accuracy there and `val_valid_frac` the share of
    positions whose argmax is a valid continuation.
    """

    PAD, BOS, EOS = 0, 1, 2
    EVAL_KEYS = TaskData.EVAL_KEYS + ("valid_hits", "forced_correct", "forced_count")

    @staticmethod
    def run_name(cfg) -> str:
        return f"dyck{cfg.dyck_types}"

    def position_mask(self, tokens, targets, positions):
        """`all` is every position of the sequence: BOS, brackets and EOS, not the padding after it."""
        return tokens != self.PAD if positions == "all" else super().position_mask(tokens, targets, positions)

    def graph_example(self) -> list[int]:
        """The first report example up to its last closing bracket, left out: the graph of a closing bracket."""
        tokens = self.report_sample().tokens[0].tolist()
        last = max(i for i, t in enumerate(tokens) if t in self.close_tokens)
        return tokens[:last]

    def circuit_pairs(self, count: int, seed: int = 0) -> list[tuple[list[int], list[int], int, int]]:
        """A validation prefix whose next token is a closing bracket, against the same prefix with the
        bracket it closes swapped for another type: right is the closing bracket of the first, wrong that
        of the second. One closing position per sequence, drawn at random."""
        k = self.cfg.dyck_types
        if k < 2:
            raise ConfigError("--pairs builtin: a Dyck run with one bracket type has no bracket to swap")
        rng = np.random.default_rng(seed)
        pairs = []
        for row in self.val_sequences[: 4 * count]:
            row = [int(t) for t in row]
            closes = [t for t in range(1, len(row)) if row[t] in self.close_tokens]
            if not closes:
                continue
            at = int(rng.choice(closes))  # predicted from the prefix row[:at]
            stack = []
            for t in range(at):
                if row[t] in self.open_tokens:
                    stack.append(t)
                elif row[t] in self.close_tokens:
                    stack.pop()
            opened = stack[-1]
            kind = row[opened] - self.open_tokens[0]
            other = (kind + int(rng.integers(1, k))) % k
            corrupted = list(row[:at])
            corrupted[opened] = self.open_tokens[other]
            pairs.append((row[:at], corrupted, self.close_tokens[kind], self.close_tokens[other]))
            if len(pairs) == count:
                break
        return pairs

    def token_names(self, ids) -> list[str]:
        """The brackets, and <pad>, <bos>, <eos>."""
        k, pairs = self.cfg.dyck_types, "([{<"
        opening = [pairs[j] if j < len(pairs) else f"open{j}" for j in range(k)]
        closing = [")]}>"[j] if j < len(pairs) else f"close{j}" for j in range(k)]
        names = ["<pad>", "<bos>", "<eos>"] + opening + closing
        return [names[int(i)] if 0 <= int(i) < len(names) else f"<{int(i)}>" for i in ids]

    def __init__(self, cfg, dist_info, device):
        super().__init__(cfg, dist_info, device)
        k = cfg.dyck_types
        self.open_tokens = list(range(3, 3 + k))
        self.close_tokens = list(range(3 + k, 3 + 2 * k))
        self.vocab_size = 3 + 2 * k
        rng = np.random.default_rng(_step_seed(cfg.seed, 2))
        wanted = cfg.dyck_num_train + cfg.dyck_num_val
        sequences, valid = generate_dyck(2 * wanted + 1000, k, cfg.dyck_max_depth, cfg.dyck_min_len,
                                         cfg.dyck_max_len, rng)
        # Distinct sequences only, in their random order, so validation never appears in training.
        _, first = np.unique(sequences, axis=0, return_index=True)
        first.sort()
        if len(first) < wanted:
            raise ConfigError(
                f"--dyck_num_train: only {len(first)} distinct sequences exist for these settings but "
                f"{wanted} (train + val) were asked for; lower --dyck_num_train/--dyck_num_val "
                f"or raise --dyck_max_len")
        val_rows, train_rows = first[: cfg.dyck_num_val], first[cfg.dyck_num_val : wanted]
        self.train_sequences = sequences[train_rows]
        self.val_sequences = sequences[val_rows]

        def split(rows):
            seq = torch.from_numpy(sequences[rows]).long()
            x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
            y[y == self.PAD] = IGNORE
            return x.to(device), y.to(device)

        self.train_x, self.train_y = split(train_rows)
        self.val_x, self.val_y = split(val_rows)
        self.val_valid = torch.from_numpy(valid[val_rows]).to(device)  # [N, seq, vocab] bool
        self._finish()

    def _val_extras(self, chunk):
        return {"valid": self.val_valid[chunk]}

    def eval_sums(self, logits, targets, extras):
        sums = super().eval_sums(logits, targets, extras)
        mask = targets != IGNORE
        valid = extras["valid"]
        predicted = logits.argmax(-1)
        predicted_valid = valid.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
        forced = mask & (valid.sum(-1) == 1)
        sums["valid_hits"] = int(predicted_valid[mask].sum())
        sums["forced_correct"] = int((predicted == targets)[forced].sum())
        sums["forced_count"] = int(forced.sum())
        return sums

    def eval_metrics(self, sums):
        metrics = super().eval_metrics(sums)
        metrics["val_forced_acc"] = sums["forced_correct"] / max(sums["forced_count"], 1)
        metrics["val_valid_frac"] = sums["valid_hits"] / max(sums["count"], 1)
        return metrics

    # -- what the reports show
    def sae_sections(self, view) -> tuple[list[str], tuple | None]:
        """Dyck runs: the top features' mean activation by nesting depth."""
        from matplotlib.figure import Figure

        lines = []
        k, ranked, mask, device = self.cfg.dyck_types, view.ranked, view.mask, view.run.device
        tokens = view.held_out.tokens.to(device)
        step_ = ((tokens >= 3) & (tokens < 3 + k)).long() - ((tokens >= 3 + k) & (tokens < 3 + 2 * k)).long()
        depth = step_.cumsum(1)  # depth after reading each token
        max_depth = int(depth[mask].max())
        acts = torch.cat([view.sae.encode(view.model_acts[s:s + 256])[..., ranked]
                          for s in range(0, len(view.model_acts), 256)])
        table = torch.stack([acts[(depth == level) & mask].mean(0) if ((depth == level) & mask).any()
                             else torch.zeros(len(ranked), device=device) for level in range(max_depth + 1)])
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for i, feature in enumerate(ranked):
            ax.plot(range(max_depth + 1), table[:, i].cpu().numpy(), marker="o", label=f"feature {feature}")
        ax.set(xlabel="nesting depth after the token", ylabel="mean activation", title="top features by depth")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(view.out, "features_depth.png"), dpi=110)
        lines += ["## Top features by nesting depth", "",
                  "| feature | " + " | ".join(f"depth {level}" for level in range(max_depth + 1)) + " |",
                  "|---" * (max_depth + 2) + "|"]
        lines += [f"| {feature} | " + " | ".join(f"{float(value):.3f}" for value in table[:, i]) + " |"
                  for i, feature in enumerate(ranked)]
        lines += ["", "![features by depth](features_depth.png)", ""]
        return lines, None


def generate_dyck(n: int, k: int, max_depth: int, min_len: int, max_len: int, rng: np.random.Generator):
    """n random Dyck sequences (vectorised over sequences) and their valid-continuation masks.

    Returns sequences [n, max_len + 2] (BOS ... EOS PAD...) and valid [n, max_len + 1, 3 + 2k]:
    valid[i, t] is the set of tokens that may follow sequences[i, : t + 1].
    """
    PAD, BOS, EOS, OPEN, CLOSE = 0, 1, 2, 3, 3 + k
    vocab = 3 + 2 * k
    lengths = rng.choice(np.arange(min_len, max_len + 1, 2), size=n)
    seq = np.full((n, max_len + 2), PAD, dtype=np.int64)
    seq[:, 0] = BOS
    valid = np.zeros((n, max_len + 1, vocab), dtype=bool)
    stack = np.zeros((n, max_depth), dtype=np.int64)
    depth = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    for t in range(max_len + 1):  # t brackets written so far; choose token t + 1
        # What may follow the prefix (for any sequence, not just this one's sampled length).
        may_open = (depth < max_depth) & (t + depth + 2 <= max_len)
        valid[:, t, OPEN : OPEN + k] = may_open[:, None]
        has_top = depth > 0
        top = stack[rows, np.maximum(depth - 1, 0)]
        valid[rows[has_top], t, CLOSE + top[has_top]] = True
        valid[:, t, EOS] = (depth == 0) & (t >= min_len)
        if t == max_len:
            break
        # The sampled continuation, steering toward this sequence's own length.
        active = t < lengths
        remaining = lengths - t
        can_open = active & (depth < max_depth) & (depth + 1 <= remaining - 1)
        can_close = active & has_top
        opens = can_open & (~can_close | (rng.random(n) < 0.5))
        closes = active & ~opens
        kinds = rng.integers(0, k, n)
        o = rows[opens]
        seq[o, t + 1] = OPEN + kinds[o]
        stack[o, depth[o]] = kinds[o]
        depth[o] += 1
        c = rows[closes]
        seq[c, t + 1] = CLOSE + top[c]
        depth[c] -= 1
    seq[rows, lengths + 1] = EOS
    # Positions after EOS have nothing valid to predict (their targets are PAD, ignored).
    after = np.arange(max_len + 1)[None, :] > lengths[:, None]
    valid[after] = False
    return seq, valid
