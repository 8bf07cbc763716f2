"""Opening a trained run or a pretrained model for reading (`load_run` -> `Run`), the sequences of
its splits and the positions taken from them, and its activations at a hook point (`capture`).
interp, sae.py, lens.py, sample.py and export.py all read runs through this module."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from config import PRETRAINED_FILE, ConfigError, ModelSourceConfig, config_from_dict
from data import TaskData, build_data
from tasks.text import encode_text, open_run_data
from model import Transformer
from interop.huggingface import DEFAULT_TRAIN_CONTEXT, load_pretrained
from plumbing.checkpoints import checkpoint_in, find_checkpoint, load_checkpoint, newest_checkpoint
from plumbing.corpus import make_tokenizer
from plumbing.distributed import Dist
from plumbing.hardware import autocast, pick_device
from utils import write_json

POSITIONS = ("answer", "all")
SPLITS = ("train", "val")


class ActivationBatch(NamedTuple):
    acts: torch.Tensor  # [B, d] float32 on the source's device
    sequence: torch.Tensor  # [B] index of the sequence (row of tokens.npy) each row came from
    position: torch.Tensor  # [B] position in that sequence


# ---------------------------------------------------------------- a trained run


@dataclass
class Run:
    """A trained run (or a pretrained model) loaded for reading; `load_run` makes one."""
    model: Transformer  # in eval mode
    cfg: object  # config.Config
    data: object  # data.TaskData of the run's task
    device: torch.device
    checkpoint_path: str
    step: int


def load_run(path: str, device: str = "auto", prefer: str = "best", source=None) -> Run:
    """A run directory (its best.pt, else last.pt; prefer="last" for the other order) or a
    checkpoint file -> the model in eval mode, its config and its data, on the best device.

    A pretrained model reads like a run: `source` is a program's settings (config.ModelSourceConfig) and,
    with --model, `path` is the folder that stands for the model (<runs_dir>/<model name>/), where
    rank 0 records pretrained.json; that folder, or its pretrained.json, opens the same model
    and text again later (an SAE's report, say).

    A text run opens without its corpus: its tokenizer.json gives the tokenizer (data.RunTextData),
    and the corpus is read only by what needs its text; with `source`, its --data_path names where
    the corpus is now when it moved. Runs from before tokenizer.json read their corpus, as ever."""
    spec = source.pretrained_spec() if source is not None else None
    if spec is not None:
        return open_pretrained(spec, device, os.path.join(path, PRETRAINED_FILE))
    recorded = path if path.endswith(PRETRAINED_FILE) else os.path.join(path, PRETRAINED_FILE)
    if os.path.isfile(recorded) and not (os.path.isdir(path) and newest_checkpoint(path)):
        return open_pretrained(_read_spec(recorded), device, recorded)
    path = os.path.normpath(path)
    if os.path.isdir(path) and find_checkpoint(path) != path:  # a run directory, not a sharded checkpoint
        names = ("best", "last") if prefer == "best" else ("last", "best")
        found = [c for c in (checkpoint_in(path, n) for n in names) if c]
        path = found[0] if found else find_checkpoint(path)  # find_checkpoint names what is missing
    checkpoint = load_checkpoint(path)  # weights_only=True
    cfg = config_from_dict(checkpoint["config"], {})
    if getattr(source, "data_path", ModelSourceConfig.data_path) != ModelSourceConfig.data_path:
        cfg.data_path = source.data_path  # --data_path: where the run's corpus is now
    torch_device = pick_device(device)
    data = open_run_data(cfg, os.path.dirname(path), torch_device, data_path_flag=source is not None)
    model = Transformer(cfg, data.vocab_size).to(torch_device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return Run(model, cfg, data, torch_device, path, checkpoint["step"])


def model_of(model_or_run) -> Transformer:
    """The model of a Run, or the model itself: the analysis functions take either."""
    return model_or_run.model if isinstance(model_or_run, Run) else model_or_run


def run_folder(path: str) -> str:
    """The folder a run's outputs go under (interp/, sae/, lens/, activations/): the run directory
    itself (or a pretrained model's folder, which may not exist yet), or a checkpoint file's folder."""
    return os.path.dirname(path) if os.path.isfile(path) else path


def _read_spec(path: str) -> dict:
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        spec = None
    if not isinstance(spec, dict) or not spec.get("model"):
        raise ConfigError(f"{path} is not a pretrained model's record (JSON with its model, data_path and "
                          f"context_len); open the model again with --model")
    return spec


class TokenizerOnly:
    """The data of a pretrained model opened with no text to read (sample.py): its tokenizer."""

    def __init__(self, cfg):
        self.tokenizer = make_tokenizer(cfg.tokenizer)
        self.seq_len = cfg.context_len

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    generates_text = True
    token_names = TaskData.token_names


def open_pretrained(spec: dict, device: str = "auto", record: str | None = None) -> Run:
    """A pretrained checkpoint as a Run: its model, the text spec["data_path"] tokenized with its
    own tokenizer in windows of spec["context_len"] (0: its context, at most 1024); with no text
    (sample.py), its tokenizer and whole context. With `record`, rank 0 writes the spec there once
    the model and text opened; a record of other settings already there is refused before anything
    is loaded (the SAEs and lenses under that folder read it)."""
    if record is not None and newest_checkpoint(os.path.dirname(record) or "."):
        raise ConfigError(f"--model: {os.path.dirname(record)} is a run's directory, and {spec['model']} would stand "
                          f"there too; pass --runs_dir another folder (or open the run itself)")
    if record is not None and os.path.isfile(record):
        before = _read_spec(record)
        for key in ("model", "data_path", "context_len"):
            if before.get(key) != spec.get(key):
                raise ConfigError(f"--{key}: {os.path.dirname(record)} stands for {before['model']} reading "
                                  f"{before.get('data_path')!r} in windows of {before.get('context_len') or 'its context'}"
                                  f", and what is under it was made so; give the same --{key} {before.get(key)!r}, "
                                  f"or --runs_dir another folder")
    torch_device = pick_device(device)
    model, cfg = load_pretrained(spec["model"], "model", torch_device)
    limit = cfg.context_len
    data_path = spec.get("data_path") or ""
    context = spec.get("context_len") or (min(limit, DEFAULT_TRAIN_CONTEXT) if data_path else limit)
    if context > limit:
        raise ConfigError(f"--context_len: {spec['model']} reads at most {limit} positions; pass {limit} or fewer")
    cfg = config_from_dict({**cfg.to_dict(), "context_len": context, "data_path": data_path or cfg.data_path})
    data = build_data(cfg, Dist(), torch_device) if data_path else TokenizerOnly(cfg)
    if record is not None and int(os.environ.get("RANK", "0")) == 0 and not os.path.isfile(record):
        os.makedirs(os.path.dirname(record) or ".", exist_ok=True)
        write_json(record, {"model": spec["model"], "data_path": data_path, "context_len": spec.get("context_len", 0)})
    return Run(model, cfg, data, torch_device, record or spec["model"], 0)


def encode_exactly(run: Run, text: str, flag: str) -> list[int]:
    """The run's token ids for `text`; a ConfigError naming the flag when its tokenizer cannot write
    the text (a character tokenizer would drop unknown characters without a word)."""
    encoded = run.data.encode(text)
    if run.data.decode(encoded) != text:
        missing = sorted(set(text) - set(run.data.decode(encoded)))
        raise ConfigError(f"--{flag}: the run's tokenizer cannot write {text!r}"
                          + (f" (no token for {''.join(missing)!r})" if missing else "")
                          + "; use text from its vocabulary")
    return encoded


def encode_tokens(run: Run, text: str, flag: str) -> list[int]:
    """Token ids from what a person types: a text run's text (encode_exactly), or a modular or Dyck run's
    token names separated by spaces (`3 5 =`); a ConfigError naming the flag for a word that is no token."""
    if run.data.generates_text:
        return encode_exactly(run, text, flag)
    names = {name: i for i, name in enumerate(run.data.token_names(range(run.data.vocab_size)))}
    unknown = [word for word in text.split() if word not in names]
    if unknown:
        raise ConfigError(f"--{flag}: {unknown[0]!r} is not one of this run's tokens "
                          f"({', '.join(list(names)[:12])}{', ...' if len(names) > 12 else ''})")
    return [names[word] for word in text.split()]


# ---------------------------------------------------------------- which tokens, which positions


@dataclass
class Sequences:
    """A split's sequences with the task's targets and the positions whose activations we take."""
    tokens: torch.Tensor  # [S, T] int64, CPU
    targets: torch.Tensor  # [S, T] or [S, loss_positions] (modular: [S, 1], the answer)
    mask: torch.Tensor  # [S, T] bool: positions taken


def split_sequences(run: Run, split: str, positions: str, max_tokens: int = 0) -> Sequences:
    """The sequences of a run's train or val split. Text splits are cut into consecutive,
    non-overlapping windows of context_len (the first max_tokens' worth when max_tokens > 0)."""
    tokens, targets = run.data.split_tokens(split, max_tokens)  # each task knows its splits and positions
    mask = run.data.position_mask(tokens, targets, positions)
    if not bool(mask.any()):
        raise ConfigError(f"--split: the {split} split of this run has no {positions} positions to take "
                          f"(a text split shorter than context_len + 1 tokens, or --max_tokens too small)")
    return Sequences(tokens, targets, mask)


def token_names(run: Run, ids) -> list[str]:
    """How a person reads each token id: the tokenizer's text for text and pretrained runs, the number
    or `=` for modular arithmetic, the bracket (or <pad>, <bos>, <eos>) for Dyck."""
    return run.data.token_names(ids)


class _Captured(Exception):
    """Raised by the capturing hook: the forward pass need not go past the hook point."""


def hook_width(run: Run, hook: str, flag: str = "hook") -> int:
    """The width d of one position's activation at `hook` (hooks joined by `+`: their widths added,
    as capture() puts them side by side); a ConfigError naming --`flag` for a hook the model lacks or
    one that is not per position (attention scores and patterns are [batch, head, query, key])."""
    model = run.model
    for name in hook.split("+"):
        if name not in model.hook_names:
            import difflib

            close = difflib.get_close_matches(name, model.hook_names, n=3)
            raise ConfigError(f"--{flag}: this model has no hook point {name!r}"
                              + (f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names"))
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            raise ConfigError(f"--{flag}: {name} is [batch, head, query, key], not one vector per position; "
                              f"take hook_z, hook_result or hook_attn_out instead")
    tokens = torch.zeros(1, run.data.seq_len, dtype=torch.long, device=run.device)
    return capture(model, tokens, hook).shape[-1]


@torch.no_grad()
def capture(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """The activation at `hook` for tokens [B, T] as [B, T, d] (head dimensions flattened), in
    float32; hooks joined by `+` (a transcoder's input and output) side by side, in that order. The
    forward pass stops at the last hook point it reaches."""
    names = hook.split("+")
    box = {}

    def grab(x, hook_point):
        box[hook_point.name] = x
        if len(box) == len(names):
            raise _Captured

    try:
        model.run_with_hooks(tokens, [(name, grab) for name in names])
    except _Captured:
        pass
    return torch.cat([box[n].reshape(*box[n].shape[:2], -1).float() for n in names], -1)


def capture_all(run: Run, tokens: torch.Tensor, hook: str, chunk: int = 1024) -> torch.Tensor:
    """capture() of every sequence of tokens [S, T] on the run's device, `chunk` sequences at a time:
    [S, T, d]."""
    return torch.cat([capture(run.model, tokens[s:s + chunk].to(run.device), hook) for s in range(0, len(tokens), chunk)])


def rows_of(model, sequences: Sequences, start: int, stop: int, hook: str, device, dtype) -> ActivationBatch:
    """Activations at the taken positions of sequences [start, stop), in sequence then position order."""
    tokens = sequences.tokens[start:stop].to(device)
    with autocast(device, dtype):
        acts = capture(model, tokens, hook)
    mask = sequences.mask[start:stop].to(device)
    sequence, position = mask.nonzero(as_tuple=True)
    return ActivationBatch(acts[sequence, position], sequence + start, position)
