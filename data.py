"""Tasks -> train/val data and batches: modular arithmetic, Dyck languages, text (corpus.py: any corpus, char or tiktoken).

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

import copy
import glob
import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from config import SHAKESPEARE_URL, Config, ConfigError
from plumbing.corpus import (CharTokenizer, HFTokenizer, TiktokenTokenizer, TokenStream, open_corpus,
                              tokenizer_label)
from plumbing.distributed import Dist
from utils import write_json

IGNORE = -100  # cross_entropy's ignore_index


def _step_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed for (seed, *parts), so nearby steps get unrelated streams."""
    digest = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


# ---------------------------------------------------------------- modular arithmetic


def modular_table(p: int, operation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair (a, b) in 0..p-1 with its answer; division skips b = 0. Ordered by a*p + b."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if operation == "divide":
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([pow(int(x), -1, p) for x in b])  # b⁻¹ mod p (p prime)
        answer = (a * inverse) % p
    else:
        answer = {"add": a + b, "subtract": a - b, "multiply": a * b}[operation] % p
    return a, b, answer


class ModularData(_IndexedData):
    """`a b =` → answer at `=`. Tokens 0..p-1 are numbers, token p is `=`. Targets [N, 1]: the answer.

    All p² pairs (p(p-1) for division) are split once, by a permutation seeded with cfg.seed,
    into frac_train for training and the rest for validation.
    """

    def __init__(self, cfg, dist_info, device):
        super().__init__(cfg, dist_info, device)
        p = cfg.modulus
        self.p = p
        self.equals_token = p
        self.vocab_size = p + 1
        self.a, self.b, self.answer = modular_table(p, cfg.operation)
        n = len(self.a)
        tokens = torch.stack([self.a, self.b, torch.full_like(self.a, p)], dim=1)
        targets = self.answer[:, None]
        self.loss_positions = 1
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        num_train = int(round(cfg.frac_train * n))
        if not 0 < num_train < n:
            raise ConfigError(f"--frac_train: {cfg.frac_train} of {n} pairs leaves an empty split")
        # Indices into the full table (ordered by a*p + b), kept for analysis of the run.
        self.train_idx = order[:num_train].sort().values
        self.val_idx = order[num_train:].sort().values
        self.tokens, self.targets = tokens.to(device), targets.to(device)
        self.train_x, self.train_y = self.tokens[self.train_idx.to(device)], self.targets[self.train_idx.to(device)]
        self.val_x, self.val_y = self.tokens[self.val_idx.to(device)], self.targets[self.val_idx.to(device)]
        self._finish()


# ---------------------------------------------------------------- Dyck languages


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


# ---------------------------------------------------------------- text


def download(url: str, path: str) -> None:
    """Fetches `url` to `path` through a temporary file, so a failed download leaves nothing: not the
    file, nor the folders made for it."""
    made, folder = [], os.path.dirname(os.path.abspath(path))  # the folders this call creates, deepest first
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.download-{os.getpid()}"
    done = False
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, path)
        done = True
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConfigError(
            f"--data_path: {path} is missing and downloading it from {url} failed ({e}); "
            f"place the file there by hand or point --data_path at a copy") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        for folder in made if not done else ():
            try:
                os.rmdir(folder)
            except OSError:  # something else was put there meanwhile: it stays
                break


def _wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ConfigError(f"--data_path: {path} did not appear within {timeout:.0f}s (--claim_timeout) while "
                              f"this node's first process downloaded it; place it there by hand")
        time.sleep(0.2)


def _may_download(cfg: Config) -> bool:
    """Whether a missing --data_path is fetched from --data_url: the default corpus, or a URL the
    user named (a mistyped path of their own must not silently become tiny-shakespeare)."""
    return bool(cfg.data_url) and (cfg.data_path == Config.data_path or cfg.data_url != SHAKESPEARE_URL) \
        and not any(c in cfg.data_path for c in "*?[") and not cfg.data_path.endswith(os.sep)


class TextData(TaskData):
    """Next-token prediction on a corpus (corpus.py: a text file, documents or token shards, read
    by memmap): random windows of context_len across every training shard, consecutive
    non-overlapping windows of the validation split for evaluation.

    Under torchrun the first process of each node may prepare documents into shards; exactly one
    does (a claim in the cache folder), the others wait for its files, outside any collective.

    SAMPLE_PROMPTS (train.py's --sample_tokens) come from the corpus: its end-of-text token on a
    corpus of documents, else a newline, then that and the opening of two documents (lines) of the
    validation split (`sample_prompts`)."""

    SAMPLE_PROMPTS = ("\n",)

    def __init__(self, cfg, dist_info, device):
        super().__init__(cfg, dist_info, device)
        if not os.path.exists(cfg.data_path) and _may_download(cfg):
            if dist_info.local_rank == 0:
                download(cfg.data_url, cfg.data_path)
            else:  # one download per node: a second would give the file another mtime, so another cache
                _wait_for_file(cfg.data_path, cfg.claim_timeout)
        text = open_corpus(cfg, may_build=dist_info.local_rank == 0, claim_timeout=cfg.claim_timeout,
                           live=False)
        self.tokenizer = text.tokenizer
        self.train_tokens, self.val_tokens = text.train, text.val
        self.description = text.description
        self.seq_len = cfg.context_len
        for name, part in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(part) <= self.seq_len + 1:
                raise ConfigError(f"--context_len: the {name} split of {cfg.data_path} has {len(part)} "
                                  f"tokens, too few for windows of {self.seq_len}; lower --context_len")
        n = self.tokenizer.n_vocab
        self.vocab_size = text_vocab_size(cfg, n)
        if self.vocab_size < n:
            raise ConfigError(f"--vocab_size: {cfg.vocab_size} rows cannot embed the {n:,} tokens of the "
                              f"tokenizer {cfg.tokenizer}; raise it to at least {n} (or 0)")
        self.train_size = len(self.train_tokens) // self.seq_len
        self._pin = device.type == "cuda"
        # A corpus of documents: the end-of-text token sits between them (in its first million tokens).
        eot = self.tokenizer.eot_token
        self.documents = eot is not None and any(bool((part[: 1 << 20] == eot).any())
                                                 for part in (self.train_tokens, self.val_tokens))
        self.val_head = self.val_tokens[: EXCERPT_WINDOWS * self.seq_len + 1]
        self.SAMPLE_PROMPTS = sample_prompts(self.tokenizer, self.val_head, self.documents)

    def global_batch_size(self):
        return self.cfg.batch_size or 64  # "full batch" has no meaning for a corpus

    def _windows(self, source: TokenStream, starts: np.ndarray):
        batch = torch.from_numpy(source.windows(starts, self.seq_len + 1))
        if self._pin:
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def train_batches(self, step):
        batch = self.global_batch_size()
        generator = np.random.default_rng(_step_seed(self.cfg.seed, 3, step))
        starts = generator.integers(0, len(self.train_tokens) - self.seq_len, size=batch)  # s + T + 1 <= n
        mine = self._my_chunks(torch.from_numpy(starts))
        return [self._windows(self.train_tokens, chunk.numpy()) for chunk in mine], batch * self.seq_len

    def val_batches(self):
        size = self.cfg.eval_batch_size or self.global_batch_size()
        mine = self._val_share((len(self.val_tokens) - 1) // self.seq_len, size).numpy() * self.seq_len
        for start in range(0, len(mine), size):
            x, y = self._windows(self.val_tokens, mine[start : start + size])
            yield x, y, {}

    def eval_metrics(self, sums):
        metrics = super().eval_metrics(sums)
        metrics["val_perplexity"] = float(np.exp(min(metrics["val_loss"], 50.0)))
        return metrics

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def save_to_run(self, run_dir: str) -> None:
        """tokenizer.json (the tokenizer; a Hugging Face one copied into hf_tokenizer/) and
        val_excerpt.npy (the first EXCERPT_WINDOWS windows of the validation split, what interp.py's
        report reads), so the run opens without its corpus (`open_run_data`)."""
        record = {"format": RUN_TOKENIZER_FORMAT, **tokenizer_record(self.tokenizer), "documents": self.documents,
                  "val_tokens": len(self.val_tokens)}
        if record["kind"] == "huggingface":
            folder = os.path.join(run_dir, RUN_HF_TOKENIZER)
            os.makedirs(folder, exist_ok=True)
            beside = os.path.join(os.path.dirname(self.tokenizer.path), "tokenizer_config.json")
            for source in (self.tokenizer.path, beside):
                if os.path.isfile(source) and os.path.dirname(os.path.abspath(source)) != os.path.abspath(folder):
                    shutil.copyfile(source, os.path.join(folder, os.path.basename(source)))
        tmp = os.path.join(run_dir, f"{RUN_VAL_EXCERPT}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(self.val_head))
        os.replace(tmp, os.path.join(run_dir, RUN_VAL_EXCERPT))
        write_json(os.path.join(run_dir, RUN_TOKENIZER), record)  # last: its presence says the run is whole


# ---------------------------------------------------------------- a text run's own record of its data

RUN_TOKENIZER, RUN_TOKENIZER_FORMAT = "tokenizer.json", "tinylab-tokenizer"
RUN_HF_TOKENIZER = "hf_tokenizer"  # a Hugging Face tokenizer's files, copied (tokenizer.json is ours)
RUN_VAL_EXCERPT = "val_excerpt.npy"
EXCERPT_WINDOWS = 16  # windows of context_len: interp.py's text report reads the first 16 (TEXT_WINDOWS)
PROMPT_CHARS = 20  # a sample prompt's opening: whole words, at most this many characters


def text_vocab_size(cfg: Config, n_vocab: int) -> int:
    """Embedding rows for a tokenizer of n_vocab tokens: --vocab_size, else n_vocab padded to a multiple of
    64 for large vocabularies (faster matmuls; the padded rows are never targets)."""
    return cfg.vocab_size or (n_vocab if n_vocab <= 256 else (n_vocab + 63) // 64 * 64)


def encode_text(tokenizer, text: str) -> list[int]:
    """The tokenizer's ids for `text`, where the text of its end-of-text token (<|endoftext|>) is that
    token, so a prompt can start a document as training did; the corpus itself is encoded without it."""
    eot = tokenizer.eot_token
    marker = tokenizer.decode([eot]) if eot is not None else ""
    if not marker or marker not in text:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, piece in enumerate(text.split(marker)):
        ids += ([eot] if i else []) + (tokenizer.encode(piece) if piece else [])
    return ids


def sample_prompts(tokenizer, head, documents: bool) -> tuple[str, ...]:
    """Prompts that start where the corpus's text starts: its end-of-text token on a corpus of
    documents, else a newline; then that followed by the opening words of the first two distinct
    documents (lines) of `head`, the start of the validation split (tiny-shakespeare: a newline, and
    a newline and two of its lines)."""
    start = tokenizer.decode([tokenizer.eot_token]) if documents else "\n"
    units = tokenizer.decode([int(i) for i in head]).split(start)[1:-1]  # whole units: after a start, before one
    openings: list[str] = []
    for unit in units:
        words, opening = unit.split("\n")[0].split(" "), ""
        for word in words:
            if opening and len(opening) + 1 + len(word) > PROMPT_CHARS:
                break
            opening = f"{opening} {word}" if opening else word
        opening = opening[:PROMPT_CHARS]
        if opening.strip() and opening not in openings:
            openings.append(opening)
        if len(openings) == 2:
            break
    return (start,) + tuple(start + opening for opening in openings)


def tokenizer_record(tokenizer) -> dict:
    """What tokenizer.json says of a tokenizer: enough to make it again with no corpus (the BPE
    ranks of a tiktoken encoding stay in tiktoken's cache: TIKTOKEN_CACHE_DIR when offline)."""
    if isinstance(tokenizer, CharTokenizer):
        what = {"kind": "char", "vocab": tokenizer.vocab}
    elif isinstance(tokenizer, HFTokenizer):
        what = {"kind": "huggingface", "label": tokenizer_label(tokenizer.path), "files": RUN_HF_TOKENIZER}
    elif isinstance(tokenizer, TiktokenTokenizer):
        what = {"kind": "tiktoken", "name": tokenizer._encoding.name}
    else:
        raise TypeError(f"no record for a {type(tokenizer).__name__}")
    return {**what, "n_vocab": tokenizer.n_vocab, "eot_token": tokenizer.eot_token}


def read_run_tokenizer(run_dir: str) -> dict | None:
    """A run directory's tokenizer.json (None for runs made before it, and modular or Dyck runs)."""
    path = os.path.join(run_dir, RUN_TOKENIZER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != RUN_TOKENIZER_FORMAT:
        raise ConfigError(f"--run_dir: {path} is damaged (not the tokenizer record train.py writes); delete it to "
                          f"open the run through its corpus again")
    return record


def tokenizer_from_record(record: dict, run_dir: str):
    if record["kind"] == "char":
        return CharTokenizer(record["vocab"], record["eot_token"] is not None)
    if record["kind"] == "tiktoken":
        return TiktokenTokenizer(record["name"])
    tokenizer = HFTokenizer(os.path.join(run_dir, record["files"]))
    tokenizer.eot_token = record["eot_token"]  # the one found beside the original file
    return tokenizer


def _describe(record: dict) -> str:
    what = {"char": lambda: f"{len(record['vocab'])} characters", "tiktoken": lambda: f"tiktoken {record['name']}",
            "huggingface": lambda: f"tokenizer.json {record['label']}"}[record["kind"]]()
    return what + (" and an end-of-text token" if record["kind"] == "char" and record["eot_token"] is not None else "")


def _missing_corpus(cfg: Config) -> str | None:
    """The first of --data_path and --val_path that names nothing here, or None."""
    for path in [cfg.data_path] + ([cfg.val_path] if cfg.val_path else []):
        if not (glob.glob(path, recursive=True) if any(c in path for c in "*?[") else os.path.exists(path)):
            return path
    return None


class _ValExcerpt:
    """The validation split as a run directory keeps it: its length, and the first tokens
    (val_excerpt.npy); a slice past them reads the corpus (`open`), which may be missing."""

    def __init__(self, head: np.ndarray, length: int, open_corpus):
        self.head, self.length, self._open = head, length, open_corpus

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.length)
            if stop <= len(self.head):
                return self.head[start:stop]
        return self._open().val_tokens[key]


class RunTextData:
    """A text run's data as its directory records it (tokenizer.json, val_excerpt.npy): the
    tokenizer, vocabulary, context and sample prompts, and the start of the validation split,
    without the corpus. What needs the corpus's text (train_tokens, the validation split past the
    excerpt, batches) opens it on first use, as train.py did; when it is missing, or not the run's,
    a ConfigError says so, names --data_path and how to point at it."""

    loss_positions = None
    EVAL_KEYS = TaskData.EVAL_KEYS

    def __init__(self, cfg: Config, run_dir: str, record: dict, device: torch.device, data_path_flag: bool = True):
        self.cfg, self.run_dir, self.record, self.device = cfg, run_dir, record, device
        self.tokenizer = tokenizer_from_record(record, run_dir)
        self.vocab_size = text_vocab_size(cfg, self.tokenizer.n_vocab)
        self.seq_len = cfg.context_len
        self.documents = bool(record.get("documents"))
        excerpt = os.path.join(run_dir, RUN_VAL_EXCERPT)
        self.val_head = np.load(excerpt) if os.path.isfile(excerpt) else np.zeros(0, dtype=np.int64)
        self.SAMPLE_PROMPTS = sample_prompts(self.tokenizer, self.val_head, self.documents)
        self._flag = data_path_flag  # whether the program reading the run takes --data_path
        self._corpus: TextData | None = None

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def corpus(self) -> TextData:
        """The run's data read from its corpus, opened once (downloaded where train.py would)."""
        if self._corpus is None:
            cfg, name = copy.copy(self.cfg), os.path.basename(os.path.normpath(self.run_dir))
            fix = f"put it back at {cfg.data_path}" + (" or pass --data_path with where it is now" if self._flag
                                                         else "")
            missing = _missing_corpus(cfg)
            if missing and not (missing == cfg.data_path and _may_download(cfg)):
                raise ConfigError(f"--data_path: the corpus {name} was trained on, {missing}, is missing here, and "
                                  f"this reads its text (the run carries only its tokenizer and the start of its "
                                  f"validation split); {fix}")
            if self.record["kind"] == "huggingface":  # the run's copy, wherever the original went
                cfg.tokenizer = self.tokenizer.path
            data = TextData(cfg, Dist(), self.device)
            compared = ("kind", "vocab", "name", "label", "n_vocab") + (("eot_token",) if "vocab" in self.record
                                                                         else ())
            found = {k: v for k, v in tokenizer_record(data.tokenizer).items() if k in compared}
            ours = {k: self.record.get(k) for k in found}
            if found != ours:
                raise ConfigError(f"--data_path: {cfg.data_path} is not the corpus {name} was trained on: it makes "
                                  f"{_describe(found)}, the run's tokenizer.json {_describe(self.record)}; {fix}")
            self._corpus = data
        return self._corpus

    @property
    def train_tokens(self):
        return self.corpus().train_tokens

    @property
    def val_tokens(self):
        if self._corpus is None and _missing_corpus(self.cfg) and "val_tokens" in self.record:
            return _ValExcerpt(self.val_head, self.record["val_tokens"], self.corpus)
        return self.corpus().val_tokens

    def __getattr__(self, name: str):  # the rest of TextData (batches, train_size, description): the corpus's
        if name.startswith("_") or not (hasattr(TextData, name) or name in ("train_size", "description")):
            raise AttributeError(name)
        return getattr(self.corpus(), name)


def open_run_data(cfg: Config, run_dir: str, device: torch.device, data_path_flag: bool = True):
    """The data of a saved run: a text run that carries its tokenizer (tokenizer.json) opens without its
    corpus (RunTextData); anything else builds its data from the config, as training did."""
    record = read_run_tokenizer(run_dir) if cfg.task == "text" else None
    if record is None:
        return build_data(cfg, Dist(), device)
    return RunTextData(cfg, run_dir, record, device, data_path_flag)


def build_data(cfg: Config, dist_info: Dist, device: torch.device) -> TaskData:
    data = {"modular": ModularData, "dyck": DyckData, "text": TextData}[cfg.task](cfg, dist_info, device)
    if data.seq_len > cfg.context_len:
        raise ConfigError(f"--context_len: {cfg.task} sequences have {data.seq_len} tokens; "
                          f"raise --context_len to at least that")
    return data
