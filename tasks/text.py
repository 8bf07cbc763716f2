"""Language modelling on text: a corpus of any size (plumbing/corpus.py: documents -> shards ->
windows), char or tiktoken or a Hugging Face tokenizer, and the record a text run keeps of its
tokenizer so that it opens without its corpus."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from config import SHAKESPEARE_URL, Config, ConfigError
from data import ReportSample, TaskData, _step_seed, build_data
from plumbing.corpus import (CharTokenizer, HFTokenizer, TiktokenTokenizer, TokenStream, open_corpus,
                              tokenizer_label)
from plumbing.distributed import Dist
from tasks import ioi
from utils import write_json


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

    generates_text = True

    @staticmethod
    def run_name(cfg) -> str:
        return f"text-{cfg.tokenizer}"

    def split_tokens(self, split: str, max_tokens: int = 0):
        return text_windows(self.train_tokens if split == "train" else self.val_tokens, self.seq_len, max_tokens)

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

    def circuit_pairs(self, count: int, seed: int = 0) -> list[tuple[list[int], list[int], int, int]]:
        """IOI-style pairs (tasks/ioi.py) in the run's tokenizer: a BPE tokenizer's (GPT-2's, say)."""
        try:
            return ioi.pairs(self.encode, count, seed)[0]
        except ValueError as error:
            raise ConfigError(f"--pairs builtin: {error}; give a JSONL file of pairs instead (docs/circuits.md)") from None

    # -- what the reports show
    def report_sample(self) -> ReportSample:
        """The first REPORT_WINDOWS windows of the validation split, cut to their first REPORT_POSITIONS
        tokens; residual norms at a few positions, attention over the first 32."""
        tokens, targets = self.split_tokens("val", REPORT_WINDOWS * self.seq_len)
        tokens, targets = tokens[:REPORT_WINDOWS, :REPORT_POSITIONS], targets[:REPORT_WINDOWS, :REPORT_POSITIONS]
        picked = [t for t in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256) if t < tokens.shape[1]]
        return ReportSample(tokens.to(self.device), targets.to(self.device), "windows, their first 32 positions",
                            f"{len(tokens)} windows of {tokens.shape[1]} tokens from the start of the validation split.",
                            [f"position {t}" for t in picked], picked, 32)

    def sae_sections(self, view) -> tuple[list[str], tuple | None]:
        """Text runs: the contexts that activate the top features most."""
        lines = []
        lines += ["## Top features: the contexts that activate them most", "",
                  "The activating token is in ⟦brackets⟧; the number is the activation.", ""]
        T, stats = view.mask.shape[1], view.stats
        for feature in view.ranked:
            lines.append(f"**feature {feature}** (fires on {float(stats['density'][feature]):.1%} of rows)")
            lines.append("")
            for value, index in zip(stats["top_values"][:5, feature].tolist(), stats["top_index"][:5, feature].tolist()):
                if value <= 0:
                    break
                s, t = divmod(index, T)
                ids = view.held_out.tokens[s].tolist()
                before = self.decode(ids[max(0, t - 40):t])
                context = (before + "⟦" + self.decode(ids[t:t + 1]) + "⟧" + self.decode(ids[t + 1:t + 6]))
                lines.append(f"    {value:7.3f}  {context!r}")
            lines.append("")
        return lines, None

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
            # under the names the run reopens them by, whatever the file given to --tokenizer was called
            for source, name in ((self.tokenizer.path, "tokenizer.json"), (beside, "tokenizer_config.json")):
                if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(os.path.join(folder, name)):
                    shutil.copyfile(source, os.path.join(folder, name))
        tmp = os.path.join(run_dir, f"{RUN_VAL_EXCERPT}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(self.val_head))
        os.replace(tmp, os.path.join(run_dir, RUN_VAL_EXCERPT))
        write_json(os.path.join(run_dir, RUN_TOKENIZER), record)  # last: its presence says the run is whole


# ---------------------------------------------------------------- a text run's own record of its data

RUN_TOKENIZER, RUN_TOKENIZER_FORMAT = "tokenizer.json", "tinylab-tokenizer"
RUN_HF_TOKENIZER = "hf_tokenizer"  # a Hugging Face tokenizer's files, copied (tokenizer.json is ours)
RUN_VAL_EXCERPT = "val_excerpt.npy"
EXCERPT_WINDOWS = 16  # windows of context_len: what interp's report reads (REPORT_WINDOWS) opens without the corpus
REPORT_WINDOWS, REPORT_POSITIONS = EXCERPT_WINDOWS, 128  # interp's report reads this much of the validation split
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
    folder = os.path.join(run_dir, record["files"])
    copied = [f for f in sorted(os.listdir(folder)) if f.endswith(".json") and f != "tokenizer_config.json"] \
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "tokenizer.json")) else []
    # runs from before the copy was renamed hold the file under the name it had (my-bpe.json)
    tokenizer = HFTokenizer(os.path.join(folder, copied[0]) if len(copied) == 1 else folder)
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


def text_windows(source, seq_len: int, max_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream cut into consecutive, non-overlapping windows of seq_len (the first max_tokens'
    worth when max_tokens > 0): (tokens, targets shifted by one), each [S, seq_len]."""
    count = (len(source) - 1) // seq_len
    if max_tokens:
        count = min(count, max(1, math.ceil(max_tokens / seq_len)))
    windows = torch.from_numpy(source[: count * seq_len + 1].astype(np.int64))
    return windows[:-1].reshape(count, seq_len), windows[1:].reshape(count, seq_len)


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

    generates_text = True
    position_mask, token_names = TaskData.position_mask, TaskData.token_names
    split_tokens = TextData.split_tokens  # from train_tokens / val_tokens: the excerpt when the corpus is away
    report_sample, sae_sections = TextData.report_sample, TextData.sae_sections  # the excerpt is what they read
    graph_example, circuit_pairs = TaskData.graph_example, TextData.circuit_pairs
    corrupt, probe_labels, report_sections = TaskData.corrupt, TaskData.probe_labels, TaskData.report_sections
    ablate_neurons, answer_tokens = TaskData.ablate_neurons, TaskData.answer_tokens

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
