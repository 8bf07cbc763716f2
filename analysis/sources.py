"""A trained run's activations at one hook point, for sparse autoencoders (sae.py) and probes:
dumped to disk in shards, or streamed from the model through a shuffling buffer. Both sources
hand out the same thing, `ActivationBatch(acts, sequence, position)`, from `source.batch(step)`;
`TokenSource` gives a dump's batches computed on the fly (the consistency lens's small batches).

`dump` is what `python activations.py dump` runs.

A dump is `<run>/activations/<hook>/<split>-<positions>/`: `manifest.json` (what was dumped, from which
checkpoint, how many rows), `tokens.npy` and `targets.npy` (the split's sequences, [S, T] and the
task's targets), and shards `acts-00000.npy` [rows, d] with `rows-00000.npy` [rows, 2] (sequence
index, position) beside each. Everything loads with `np.load(..., mmap_mode="r")`. An interrupted
dump picks up where it stopped: a shard is written under a temporary name and renamed once whole,
so the shards present are the shards done. Under torchrun rank r writes shards r, r + world, ...
and rank 0 the manifest.

Which positions: `answer` takes the positions the task's loss reads (the `=` of a modular example,
every supervised position of a Dyck or text sequence); `all` takes every position that holds a
token (padding after a Dyck sequence excluded).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from analysis.runs import (POSITIONS, SPLITS, ActivationBatch, Run, Sequences, capture, hook_width, load_run, rows_of,
                           run_folder, split_sequences)
from config import DEVICES, DTYPES, ConfigError, ModelSourceConfig, need, need_one_of, section
from data import _step_seed
from plumbing.checkpoints import CheckpointError
from plumbing.distributed import broadcast_object, gather_objects, setup_distributed, teardown_distributed
from plumbing.hardware import autocast, pick_device, pick_dtype
from utils import write_json

# ---------------------------------------------------------------- dumping


_what = section("what to dump")
_how = section("how")


@dataclass
class DumpConfig(ModelSourceConfig):
    run_dir: str = _what("", "a run directory (runs/<run>) or a checkpoint file (or --model)")
    hook: str = _what("", "hook point, e.g. blocks.0.mlp.hook_post or blocks.0.hook_resid_post; hooks joined by + "
                          "side by side (a transcoder's rows: blocks.0.ln2.hook_normalized+blocks.0.hook_mlp_out)")
    positions: str = _what("answer", "answer (the positions the loss reads) | all (every token)")
    split: str = _what("train", "train | val")
    max_tokens: int = _what(0, "cap on tokens taken from the split (0: all of it)")
    out: str = _how("", "output directory (default <run>/activations/<hook>/<split>-<positions>)")
    shard_rows: int = _how(262144, "about this many rows per shard file")
    batch_tokens: int = _how(65536, "tokens per forward pass")
    store_dtype: str = _how("float32", "float32 | float16 on disk (read back as float32)")
    device: str = _how("auto", "auto | cpu | cuda | mps")
    dtype: str = _how("auto", "forward pass precision: auto (bf16 autocast on capable GPUs) | float32 | bfloat16")
    overwrite: bool = _how(False, "replace a dump with other settings in --out")

    def validate(self) -> "DumpConfig":
        for name, choices in (("positions", POSITIONS), ("split", SPLITS), ("store_dtype", ("float32", "float16")),
                              ("device", DEVICES), ("dtype", DTYPES)):
            need_one_of(self, name, choices)
        for name in ("shard_rows", "batch_tokens"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        need(self.max_tokens >= 0, "max_tokens", f"must be 0 or more, got {self.max_tokens}")
        need(bool(self.hook), "hook", "name the hook point to dump, e.g. --hook blocks.0.mlp.hook_post")
        self.validate_source()
        return self


def default_dump_dir(run_dir: str, hook: str, split: str, positions: str) -> str:
    return os.path.join(run_folder(run_dir), "activations", hook, f"{split}-{positions}")


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def dump(settings: DumpConfig, log=print) -> str:
    """Writes (or completes) a dump; returns its directory. Every rank of a torchrun job calls it."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(settings.device, local_rank)
    dist_info = setup_distributed(device.type)
    say = log if dist_info.is_main else (lambda *a: None)
    try:
        run = load_run(settings.run_dir, device=str(device), source=settings)
        width = hook_width(run, settings.hook)
        dtype = pick_dtype(settings.dtype, device)
        sequences = split_sequences(run, settings.split, settings.positions, settings.max_tokens)
        out = settings.out or default_dump_dir(settings.run_dir, settings.hook, settings.split, settings.positions)
        S, T = sequences.tokens.shape
        per_sequence = max(1.0, float(sequences.mask.sum()) / S)
        shard_sequences = max(1, int(settings.shard_rows / per_sequence))
        num_shards = math.ceil(S / shard_sequences)
        what = {"hook": settings.hook, "positions": settings.positions, "split": settings.split,
                "checkpoint": os.path.abspath(run.checkpoint_path), "step": run.step, "task": run.cfg.task,
                "num_sequences": S, "seq_len": T, "d": width, "shard_sequences": shard_sequences,
                "num_shards": num_shards, "store_dtype": settings.store_dtype}
        problem = None
        if dist_info.is_main:
            problem = _plan_dump(out, what, sequences, settings.overwrite)
        problem = broadcast_object(problem)
        if problem:
            raise ConfigError(problem)
    except (ConfigError, CheckpointError):
        teardown_distributed(info=dist_info)
        raise

    model = run.model
    mine = [k for k in range(num_shards) if k % dist_info.world_size == dist_info.rank]
    todo = [k for k in mine if not os.path.isfile(os.path.join(out, f"acts-{k:05d}.npy"))]
    if len(todo) < len(mine):
        say(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of this rank already written")
    say(f"dumping {settings.hook} ({settings.positions} positions, d={width}) of {S:,} {settings.split} "
        f"sequences into {num_shards} shard(s) at {out}"
        + (f" on {dist_info.world_size} ranks" if dist_info.enabled else ""))
    batch = max(1, settings.batch_tokens // T)
    started, rows_done = time.perf_counter(), 0
    for n, k in enumerate(todo):
        first, last = k * shard_sequences, min(S, (k + 1) * shard_sequences)
        parts = [rows_of(model, sequences, s, min(last, s + batch), settings.hook, device, dtype)
                 for s in range(first, last, batch)]
        acts = torch.cat([p.acts for p in parts]).cpu().numpy().astype(settings.store_dtype)
        where = torch.stack([torch.cat([p.sequence for p in parts]), torch.cat([p.position for p in parts])], 1)
        _save_npy(os.path.join(out, f"rows-{k:05d}.npy"), where.cpu().numpy())
        _save_npy(os.path.join(out, f"acts-{k:05d}.npy"), acts)  # written last: its presence marks the shard done
        rows_done += len(acts)
        elapsed = time.perf_counter() - started
        say(f"shard {k + 1}/{num_shards}: {len(acts):,} rows | {rows_done / elapsed:,.0f} rows/s | "
            f"ETA {(len(todo) - n - 1) * elapsed / (n + 1):.0f}s")
    finished = gather_objects(True)  # every rank is done writing
    if dist_info.is_main and all(finished):
        counts = [len(np.load(os.path.join(out, f"rows-{k:05d}.npy"), mmap_mode="r")) for k in range(num_shards)]
        write_json(os.path.join(out, "manifest.json"), {**what, "complete": True, "rows_per_shard": counts,
                                                         "num_rows": sum(counts)})
        say(f"done: {sum(counts):,} rows of width {width} in {out}")
    teardown_distributed(barrier=True, info=dist_info)
    return out


def _ours(name: str) -> bool:
    """A file a dump writes (and --overwrite may delete); anything else in --out is left alone."""
    return name.startswith(("acts-", "rows-", "tokens.npy", "targets.npy", "manifest.json"))


def _plan_dump(out: str, what: dict, sequences: Sequences, overwrite: bool) -> str | None:
    """Rank 0: checks an existing dump in `out` and writes the sequences and an incomplete
    manifest. Returns a message when `out` holds a dump of something else."""
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        differs = [k for k in what if old.get(k) != what[k]]
        if differs and not overwrite:
            return (f"--out: {out} holds a dump with another {differs[0]} ({old.get(differs[0])!r}, now "
                    f"{what[differs[0]]!r}); pass another --out, or --overwrite to replace it")
        if differs:
            for name in os.listdir(out):
                if _ours(name):
                    os.remove(os.path.join(out, name))
    elif os.path.isdir(out) and any(_ours(n) and ".tmp-" not in n for n in os.listdir(out)):
        return f"--out: {out} holds dump files but no manifest.json; pass an empty or new --out"
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # half-written files of a dump that was killed
        if _ours(name) and ".tmp-" in name:
            os.remove(os.path.join(out, name))
    if not os.path.isfile(manifest_path):
        _save_npy(os.path.join(out, "tokens.npy"), sequences.tokens.numpy())
        _save_npy(os.path.join(out, "targets.npy"), sequences.targets.numpy())
        write_json(manifest_path, {**what, "complete": False})
    return None


# ---------------------------------------------------------------- sources


class _RowOrder:
    """The order in which a source hands out rows 0..num_rows-1: a fresh seeded permutation of all
    rows each epoch, cut into batches of `batch_size`; rank r of `world` takes its slice. The rows
    of step s are a pure function of (seed, s), so resuming needs no state."""
    num_rows: int
    batch_size: int
    seed: int
    rank: int
    world: int
    _epoch: tuple = (-1, None)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's row indices for `step` (CPU, int64)."""
        epoch, offset = divmod(step, self.num_rows // self.batch_size)
        if self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(_step_seed(self.seed, 11, epoch))
            self._epoch = (epoch, torch.randperm(self.num_rows, generator=generator))
        index = self._epoch[1][offset * self.batch_size:(offset + 1) * self.batch_size]
        return torch.tensor_split(index, self.world)[self.rank]

    def state_dict(self) -> dict:
        return {}  # batches are a function of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        pass


class DumpSource(_RowOrder):
    """Batches of rows from a finished dump. The global batch of step s is a pure function of
    (seed, s): a fresh permutation of all rows each epoch, cut into batches of `batch_size`; rank r
    of `world` takes its slice. Resuming needs no state, and two ranks see what one process would."""

    def __init__(self, directory: str, batch_size: int, device, seed: int = 0, rank: int = 0, world: int = 1,
                 in_memory_bytes: int = 2**31):
        manifest_path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise ConfigError(f"--dump: {directory} has no manifest.json; write it with "
                              f"`python activations.py dump RUN --hook NAME`")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if not self.manifest.get("complete"):
            raise ConfigError(f"--dump: the dump in {directory} is incomplete; run the same "
                              f"`python activations.py dump` again to finish it")
        self.directory, self.device = directory, torch.device(device)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.d, self.num_rows = self.manifest["d"], self.manifest["num_rows"]
        self.tokens = torch.from_numpy(np.load(os.path.join(directory, "tokens.npy")))
        self.targets = torch.from_numpy(np.load(os.path.join(directory, "targets.npy")))
        shards = range(self.manifest["num_shards"])
        self._acts = [np.load(os.path.join(directory, f"acts-{k:05d}.npy"), mmap_mode="r") for k in shards]
        rows = [np.load(os.path.join(directory, f"rows-{k:05d}.npy")) for k in shards]
        self.where = torch.from_numpy(np.concatenate(rows))  # [N, 2] (sequence, position)
        self._starts = np.cumsum([0] + [len(a) for a in self._acts])
        self._all = None
        if self.num_rows * self.d * 4 <= in_memory_bytes:  # small enough: one tensor, gathers are cheap
            self._all = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.float32) for a in self._acts]))
        if self.num_rows < batch_size:
            raise ConfigError(f"--batch_size: {batch_size} is more than the {self.num_rows} rows in {directory}")

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Activations of rows `index` (into the whole dump) as float32 on the device."""
        if self._all is not None:
            return self._all[index].to(self.device, non_blocking=True)
        index = index.numpy()
        shard = np.searchsorted(self._starts, index, side="right") - 1
        out = np.empty((len(index), self.d), dtype=np.float32)
        for k in np.unique(shard):
            pick = np.nonzero(shard == k)[0]
            out[pick] = self._acts[k][index[pick] - self._starts[k]]
        return torch.from_numpy(out).to(self.device)

    def batch(self, step: int) -> ActivationBatch:
        index = self.indices(step)
        where = self.where[index].to(self.device)
        return ActivationBatch(self.rows(index), where[:, 0], where[:, 1])

    def require(self, wanted: dict, who: str, run_dir: str, why: str = "") -> "DumpSource":
        """Refuses, naming the first manifest entry that differs, a dump that is not what `who` (an
        SAE, a lens) of `run_dir` needs: `wanted` maps manifest keys to their values (with hook and
        positions, for the command that writes the right one); `why` says what they mean."""
        for key, value in wanted.items():
            if self.manifest.get(key) != value:
                raise ConfigError(f"--dump: {self.directory} holds {key} {self.manifest.get(key)!r}, and this {who} "
                                  f"needs {value!r}{why}; dump it with `python activations.py dump {run_dir} --hook "
                                  f"{wanted['hook']} --positions {wanted['positions']}`")
        return self


class TokenSource(_RowOrder):
    """A dump's batches without the dump: the rows of a split (its taken positions, in the order a
    dump stores them: by sequence, then position) handed out in DumpSource's order, their
    activations computed when a batch is asked for. Step s gives the rows a DumpSource of the same
    split, positions and seed gives, with the same activations up to float rounding. Each batch
    runs the model on its sequences, cut after the last position it needs: cheap for the small
    batches of a consistency lens, wasteful for an SAE's thousands of rows (LiveSource serves those)."""

    def __init__(self, run: Run, hook: str, positions: str, split: str, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, max_tokens: int = 0, dtype: str = "auto"):
        self.run, self.hook, self.device = run, hook, run.device
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.sequences = split_sequences(run, split, positions, max_tokens)
        self.tokens, self.targets = self.sequences.tokens, self.sequences.targets
        self.where = self.sequences.mask.nonzero()  # [N, 2] (sequence, position)
        self.num_rows, self.d = len(self.where), hook_width(run, hook)
        self.dtype = pick_dtype(dtype, self.device)
        if self.num_rows < batch_size:
            raise ConfigError(f"--batch_size: {batch_size} is more than the {self.num_rows} rows of the {split} split")

    def locate(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, position) [B] of this rank's rows for `step`, on the CPU: the batch without its
        activations, for a caller that runs the model on these contexts anyway."""
        where = self.where[self.indices(step)]
        return where[:, 0], where[:, 1]

    @torch.no_grad()
    def batch(self, step: int) -> ActivationBatch:
        sequence, position = self.locate(step)
        unique, inverse = sequence.unique(return_inverse=True)
        tokens = self.tokens[unique, :int(position.max()) + 1].to(self.device)
        with autocast(self.device, self.dtype):
            acts = capture(self.run.model, tokens, self.hook)  # [U, T', d]
        sequence, position = sequence.to(self.device), position.to(self.device)
        return ActivationBatch(acts[inverse.to(self.device), position], sequence, position)


class LiveSource:
    """Activations computed from the model as they are needed, through a shuffling buffer on the
    device (SAELens' mixing buffer): the buffer holds `buffer_rows` rows in random order; batches
    are served from its front, and once half of it has been served, those rows are replaced by
    fresh ones from the next sequences and the whole buffer is shuffled again, mixing old and new.
    Consecutive rows therefore rarely come from the same sequence.

    Sequences are read in a seeded random order, a new one each pass over the split; under
    torchrun each rank reads its own share. The buffer and the read position go into the
    checkpoint (`state_dict`), so a resumed SAE sees the batches it would have seen."""

    def __init__(self, run: Run, hook: str, positions: str, split: str, batch_size: int, buffer_rows: int,
                 seed: int = 0, rank: int = 0, world: int = 1, max_tokens: int = 0, batch_tokens: int = 65536,
                 dtype: str = "auto"):
        self.run, self.hook, self.device = run, hook, run.device
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.sequences = split_sequences(run, split, positions, max_tokens)
        self.tokens, self.targets = self.sequences.tokens, self.sequences.targets
        self.d = hook_width(run, hook)
        self.dtype = pick_dtype(dtype, self.device)
        if len(self.tokens) < world:
            raise ConfigError(f"--max_tokens: the {split} split gives {len(self.tokens)} sequence(s), fewer than "
                              f"the {world} ranks that each read a share; use more tokens or fewer ranks")
        self.sequences_per_forward = max(1, batch_tokens // self.sequences.tokens.shape[1])
        self.capacity = max(buffer_rows, 2 * batch_size)
        self.generator = torch.Generator().manual_seed(_step_seed(seed, 13, rank))
        self.cursor = (0, 0)  # (pass over the split, sequences of this rank read in it)
        self._order = (-1, None)
        self.pending = ActivationBatch(torch.empty(0, self.d, device=self.device),
                                       *(torch.empty(0, dtype=torch.long, device=self.device),) * 2)
        self.buffer = None
        self.served = 0

    def _my_order(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(_step_seed(self.seed, 12, epoch))
            order = torch.randperm(len(self.tokens), generator=generator)
            self._order = (epoch, order[self.rank::self.world])
        return self._order[1]

    def _fresh(self, n: int) -> ActivationBatch:
        """The next n rows from the model (whole sequences; the rest waits in `pending`)."""
        parts = [self.pending]
        have = len(self.pending.acts)
        while have < n:
            epoch, done = self.cursor
            order = self._my_order(epoch)
            if done >= len(order):
                self.cursor = (epoch + 1, 0)
                continue
            pick = order[done:done + self.sequences_per_forward]
            self.cursor = (epoch, done + len(pick))
            sub = Sequences(self.tokens[pick], self.targets[pick], self.sequences.mask[pick])
            part = rows_of(self.run.model, sub, 0, len(pick), self.hook, self.device, self.dtype)
            parts.append(ActivationBatch(part.acts, pick.to(self.device)[part.sequence], part.position))
            have += len(part.acts)
        joined = ActivationBatch(*(torch.cat(column) for column in zip(*parts)))
        self.pending = ActivationBatch(*(column[n:] for column in joined))
        return ActivationBatch(*(column[:n] for column in joined))

    def _shuffle(self) -> None:
        order = torch.randperm(self.capacity, generator=self.generator).to(self.device)
        self.buffer = ActivationBatch(*(column[order] for column in self.buffer))

    def batch(self, step: int) -> ActivationBatch:
        """The next batch (step is not used: a live source is a stream; call it once per step)."""
        if self.buffer is None:
            self.buffer = self._fresh(self.capacity)
            self._shuffle()
        if self.served + self.batch_size > self.capacity // 2:
            fresh = self._fresh(self.served)
            self.buffer = ActivationBatch(*(torch.cat([new, old[self.served:]])
                                            for new, old in zip(fresh, self.buffer)))
            self._shuffle()
            self.served = 0
        out = ActivationBatch(*(column[self.served:self.served + self.batch_size] for column in self.buffer))
        self.served += self.batch_size
        return out

    def state_dict(self) -> dict:
        """What an exact resume needs: the rows not yet served (the served ones are replaced before
        they are read again), the rows waiting to enter, the read position, the shuffling stream.
        Copies, so that a view never drags its whole storage into the checkpoint."""
        def cpu(batch, start=0):
            return None if batch is None else [t[start:].to("cpu", copy=True) for t in batch]

        return {"unserved": cpu(self.buffer, self.served), "pending": cpu(self.pending), "served": self.served,
                "cursor": list(self.cursor), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        def device(batch):
            return None if batch is None else ActivationBatch(*(t.to(self.device) for t in batch))

        self.served, self.cursor = state["served"], tuple(state["cursor"])
        self.buffer, self.pending = device(state["unserved"]), device(state["pending"])
        if self.buffer is not None:  # the served rows are never read again: zeros hold their places
            self.buffer = ActivationBatch(*(torch.cat([column.new_zeros((self.served, *column.shape[1:])), column])
                                            for column in self.buffer))
        self.generator.set_state(state["generator"])
