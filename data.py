"""What every task gives the training loop (TaskData), and build_data, which finds the task by\nname in tasks/ (modular.py, dyck.py, text.py: each one file, with what it knows).

Batches are a pure function of (seed, step): the global batch of step s is the same whatever the
world size or accumulation, each rank takes its own slice of it, and resuming at step s draws
exactly the batches the uninterrupted run would have. The "data-iterator position" of a
checkpoint is therefore just its step.

Every task yields `(tokens, targets)` pairs: tokens [batch, seq], targets [batch, seq] with IGNORE
wherever no loss is taken (padding after a Dyck sequence's EOS) — or, for tasks whose loss reads
only the end of the sequence (modular arithmetic), targets [batch, loss_positions] for the last
positions, and the model computes only those logits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from config import Config, ConfigError
from plumbing.distributed import Dist

IGNORE = -100  # cross_entropy's ignore_index


def loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy where targets are set (targets [B, n] cover the last n
    positions of logits [B, T, vocab]; data.IGNORE marks positions without a target)."""
    logits = logits[:, -targets.shape[1]:]
    keep = targets != IGNORE
    picked = logits[keep].float()
    loss = F.cross_entropy(picked, targets[keep]).item()
    accuracy = (picked.argmax(-1) == targets[keep]).float().mean().item()
    return loss, accuracy


def _step_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed for (seed, *parts), so nearby steps get unrelated streams."""
    digest = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class ReportSample:
    """The sequences interp's report reads, and how it shows them."""
    tokens: torch.Tensor  # [B, T] on the run's device
    targets: torch.Tensor  # [B, T] or [B, loss_positions]
    what: str  # what they are, in a figure's title
    about: str = ""  # a sentence for the report's head
    labels: list[str] | None = None  # each position's name (modular: a, b, =); None: numbered
    norm_positions: list[int] | None = None  # the positions whose residual norms are drawn (None: all)
    attention_positions: int = 0  # attention patterns show the first this many positions (0: all)


def _shift_tokens(tokens: torch.Tensor, position: int, span: int, seed: int) -> tuple[torch.Tensor, int]:
    """tokens with the token at `position` moved by a random nonzero shift modulo span, per row."""
    generator = torch.Generator().manual_seed(seed)
    corrupted = tokens.clone()
    shift = torch.randint(1, span, (tokens.shape[0],), generator=generator).to(tokens.device)
    corrupted[:, position] = (tokens[:, position] + shift) % span
    return corrupted, position


class TaskData:
    """What the training loop needs from a task. Subclasses fill the fields and batch methods."""

    EVAL_KEYS = ("loss_sum", "correct", "count")  # what eval_sums returns; summed over batches and ranks
    vocab_size: int
    seq_len: int  # length of the model's input sequences
    train_size: int  # training examples (sequences, or windows for text)
    loss_positions: int | None = None  # targets cover only the last N positions (None: all)

    def __init__(self, cfg: Config, dist_info: Dist, device: torch.device):
        self.cfg = cfg
        self.dist = dist_info
        self.device = device

    # -- training
    def global_batch_size(self) -> int:
        full = self.train_size
        return full if self.cfg.batch_size == 0 or self.cfg.batch_size >= full else self.cfg.batch_size

    def train_batches(self, step: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """This rank's micro-batches for optimizer step `step`, and the number of supervised targets
        in the whole global batch (all ranks, all micro-steps), which normalises the loss."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        return max(1, self.train_size // self.global_batch_size())

    def _my_chunks(self, items: torch.Tensor) -> list[torch.Tensor]:
        """Splits a global batch into accumulation_steps × world_size chunks; returns this rank's."""
        accumulation, world = self.cfg.accumulation_steps, self.dist.world_size
        chunks = torch.tensor_split(items, accumulation * world)
        return [chunks[micro * world + self.dist.rank] for micro in range(accumulation)]

    # -- evaluation
    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """This rank's share of the validation split, as (tokens, targets, extras)."""
        raise NotImplementedError

    def eval_sums(self, logits: torch.Tensor, targets: torch.Tensor, extras: dict) -> dict[str, float]:
        """Additive statistics of one validation batch; summed over batches and ranks."""
        mask = targets != IGNORE
        loss_sum = F.cross_entropy(logits.float()[mask], targets[mask], reduction="sum")
        correct = (logits.argmax(-1)[mask] == targets[mask]).sum()
        return {"loss_sum": loss_sum.item(), "correct": correct.item(), "count": int(mask.sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums.get("count", 0), 1)
        return {"val_loss": sums["loss_sum"] / count, "val_acc": sums["correct"] / count}

    def _val_share(self, n: int, batch: int) -> torch.Tensor:
        """This rank's indices into n validation items: the first eval_max_batches x batch of them
        (all when 0), dealt out across ranks, so the set evaluated never depends on world size."""
        if self.cfg.eval_max_batches:
            n = min(n, self.cfg.eval_max_batches * batch)
        return torch.arange(n)[self.dist.rank :: self.dist.world_size]

    # -- what the task knows, for the programs that read a run
    generates_text = False  # sample.py, the lens and Hugging Face export need a language model

    @staticmethod
    def run_name(cfg: Config) -> str:
        """The start of a generated run name (the date and time follow)."""
        raise NotImplementedError

    def split_tokens(self, split: str, max_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [S, T], targets [S, T or loss_positions]) of the train or val split, on the CPU; the
        first sequences holding about max_tokens tokens when max_tokens > 0."""
        tokens = (self.train_x if split == "train" else self.val_x).cpu()
        targets = (self.train_y if split == "train" else self.val_y).cpu()
        if max_tokens:
            count = max(1, math.ceil(max_tokens / tokens.shape[1]))
            tokens, targets = tokens[:count], targets[:count]
        return tokens, targets

    def position_mask(self, tokens: torch.Tensor, targets: torch.Tensor, positions: str) -> torch.Tensor:
        """[S, T] bool: the positions whose activations are taken: `answer`, those the loss reads;
        `all`, every position of the sequence."""
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        if positions == "answer":
            mask[:, tokens.shape[1] - targets.shape[1]:] = targets != IGNORE
        else:
            mask[:] = True
        return mask

    def token_names(self, ids) -> list[str]:
        """How a person reads each token id."""
        return [self.decode([int(i)]) for i in ids]

    # -- what the reports show (analysis/report.py for interp.py, saes/report.py for `sae.py report`)
    ablate_neurons = False  # interp's report ablates single MLP neurons too (small models only)
    answer_tokens = 0  # >0: one answer at the last position, among tokens 0..answer_tokens-1, so the
    #                    report patches a corrupted input (`corrupt`) and probes for `probe_labels`

    def report_sample(self) -> "ReportSample":
        """What interp's report reads: 2,048 validation examples drawn at random (a split may be sorted)."""
        rows = torch.randperm(len(self.val_x), generator=torch.Generator().manual_seed(0))[:2048]
        rows = rows.to(self.val_x.device)
        return ReportSample(self.val_x[rows], self.val_y[rows], "validation examples")

    def graph_example(self) -> list[int]:
        """The prompt `interp.py graph` traces when given none: the first example the report reads."""
        return self.report_sample().tokens[0].tolist()

    def circuit_pairs(self, count: int, seed: int = 0) -> list[tuple[list[int], list[int], int, int]]:
        """`interp.py circuit --pairs builtin`: up to `count` (clean, corrupted, right answer, wrong answer)
        rows of token ids, each pair's two inputs of the same length."""
        raise ConfigError("--pairs builtin: this run's task has no built-in clean/corrupted pairs; give a JSONL "
                          "file of {\"clean\", \"corrupted\", \"right\", \"wrong\"} rows (docs/circuits.md)")

    def corrupt(self, tokens: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
        """A corrupted copy of tokens [B, T] that differs at one position, and that position: here the
        second-to-last token becomes another token of the vocabulary (never the same one)."""
        return _shift_tokens(tokens, tokens.shape[1] - 2, self.vocab_size, seed)

    def probe_labels(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the report's linear probes read off the residual stream at the last position, by name."""
        return {}

    def report_sections(self, run, out_dir: str) -> tuple[list[str], list[str]]:
        """The task's own sections of interp's report: (findings for its head, markdown lines)."""
        return [], []

    def sae_sections(self, view) -> tuple[list[str], tuple | None]:
        """The task's views of an SAE's top features for its report: markdown lines, and what the feature
        browser shows per feature beside its contexts (None: nothing). `view` is a saes.report.SAEView:
        the top features (`ranked`), `encode(tokens)` (the SAE's features at every position [B, T, n]),
        `stats` (saes.report.feature_statistics), the held-out sequences and the report folder."""
        return [], None

    # -- the run directory
    def save_to_run(self, run_dir: str) -> None:
        """What the run directory needs beside config.json to open without the task's source data
        (rank 0 writes it as the run starts). Modular and Dyck data follow from the config: nothing."""


class _IndexedData(TaskData):
    """A dataset held whole on the device; a batch is an index gather (modular, Dyck)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    def _finish(self):
        self.train_size = len(self.train_x)
        self.seq_len = self.train_x.shape[1]
        assert self.train_y.shape[1] == (self.loss_positions or self.seq_len)
        self._epoch_order = (-1, None)
        self._targets_per_example = (self.train_y != IGNORE).sum(1)

    def _global_indices(self, step: int) -> torch.Tensor:
        batch = self.global_batch_size()
        if batch == self.train_size:
            return torch.arange(self.train_size)  # full batch: order is irrelevant
        epoch, offset = divmod(step, self.steps_per_epoch())
        if self._epoch_order[0] != epoch:  # a fresh shuffle per epoch, drop the ragged tail
            generator = torch.Generator().manual_seed(_step_seed(self.cfg.seed, 1, epoch))
            self._epoch_order = (epoch, torch.randperm(self.train_size, generator=generator))
        return self._epoch_order[1][offset * batch : (offset + 1) * batch]

    def train_batches(self, step):
        indices = self._global_indices(step)
        num_targets = int(self._targets_per_example[indices].sum())
        batches = []
        for chunk in self._my_chunks(indices):
            chunk = chunk.to(self.device)
            batches.append((self.train_x[chunk], self.train_y[chunk]))
        return batches, num_targets

    def val_batches(self):
        size = self.cfg.eval_batch_size or len(self.val_x)  # the whole split at once by default
        mine = self._val_share(len(self.val_x), size).to(self.device)
        for start in range(0, len(mine), size):
            chunk = mine[start : start + size]
            yield self.val_x[chunk], self.val_y[chunk], self._val_extras(chunk)

    def _val_extras(self, chunk: torch.Tensor) -> dict:
        return {}


def build_data(cfg: Config, dist_info: Dist, device: torch.device) -> TaskData:
    from tasks import TASKS  # each task's file imports this one

    data = TASKS[cfg.task](cfg, dist_info, device)
    if data.seq_len > cfg.context_len:
        raise ConfigError(f"--context_len: {cfg.task} sequences have {data.seq_len} tokens; "
                          f"raise --context_len to at least that")
    return data
