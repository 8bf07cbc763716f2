"""Checkpoint files and RNG state: atomic writes, loads that name the file when they fail, every
global RNG in a form `torch.load(weights_only=True)` accepts. The run layer's Checkpointer
(session.py) decides when and what to save; this is the file format."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be read or used; the message names the file."""


@contextlib.contextmanager
def todays_settings(optimizers: list):
    """Optimizer states loaded in this block keep the hyperparameters the optimizers were built with
    from today's settings (LR, weight decay, betas, momentum, the peak `initial_lr`, any entry of a
    group but its parameters), so that flags typed at resume time take effect."""
    kept = [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in optimizers]
    yield
    for optimizer, groups in zip(optimizers, kept):
        for group, settings in zip(optimizer.param_groups, groups):
            group.update(settings)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every global RNG, in types that `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_path(path: str) -> str:
    """Where `path` is written before it is renamed into place (beside it, named for this process)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")


def save_checkpoint(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash (or kill) mid-write leaves the previous checkpoint intact and loadable.
    """
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu", weights: bool = True) -> dict:
    """A checkpoint file (loaded with weights_only=True) or a sharded checkpoint folder (its entries,
    with "sharded": the folder, and the whole weights as "model" unless weights=False: a sharded
    resume reads its own shards); any failure becomes a CheckpointError naming the file."""
    if os.path.isdir(path):
        from plumbing.sharding import load_full, load_meta
        meta = load_meta(path)
        meta["sharded"] = path
        meta["model"] = load_full(path) if weights else None
        if "config" not in meta:
            raise CheckpointError(f"{path} is not a tinylab checkpoint (no 'config' entry)")
        return meta
    return load_checkpoint_file(path, map_location)


def load_checkpoint_file(path: str, map_location="cpu", check: bool = True) -> dict:
    """One torch.save file, loaded with weights_only=True; `check`: it must be a tinylab checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that needs code to load
        text = str(e)
        if "weights_only" in text or "npickl" in type(e).__name__:
            detail = "not a torch checkpoint, or one that only loads by running its own code"
        elif isinstance(e, EOFError) or not text:
            detail = "empty or cut short"
        else:  # e.g. "PytorchStreamReader failed reading zip archive: failed finding central directory"
            detail = text.splitlines()[0].split(". ")[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({detail})") from None
    if check and (not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt):
        raise CheckpointError(f"{path} is not a tinylab checkpoint (no 'model' and 'config' entries)")
    return ckpt


def checkpoint_in(run_dir: str, name: str) -> str | None:
    """<run_dir>/<name> (last.pt, best.pt) or its sharded twin (last.dcp, best.dcp) if complete."""
    from plumbing.sharding import is_sharded_checkpoint, recover
    stem = name[:-3] if name.endswith(".pt") else name
    path = os.path.join(run_dir, stem + ".pt")
    if os.path.isfile(path):
        return path
    folder = os.path.join(run_dir, stem + ".dcp")
    recover(folder)
    return folder if is_sharded_checkpoint(folder) else None


def newest_checkpoint(run_dir: str) -> str | None:
    """The later of a run directory's last and best checkpoints (last.pt and best.pt, or a sharded
    run's last.dcp and best.dcp folders), or None when it holds neither.

    last is written every save_every steps, best at every eval that improves val_loss, so after a
    preemption either may be the later one; both hold the full training state.
    """
    candidates = [c for c in (checkpoint_in(run_dir, "last"), checkpoint_in(run_dir, "best")) if c]
    return max(candidates, key=_written_at) if candidates else None


def _written_at(path: str) -> float:
    from plumbing.sharding import META
    return os.path.getmtime(os.path.join(path, META) if os.path.isdir(path) else path)


def find_checkpoint(path: str) -> str:
    """A checkpoint file or sharded checkpoint folder, or a run directory's newest checkpoint."""
    from plumbing.sharding import SUFFIX
    if os.path.isdir(path) and (path.rstrip("/").endswith(SUFFIX) or os.path.isfile(os.path.join(path, ".metadata"))):
        return path
    if os.path.isdir(path):
        newest = newest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no last.pt or best.pt")
        return newest
    return path
