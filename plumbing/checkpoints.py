"""Checkpoint files and RNG state: atomic writes, loads that name the file when they fail, every
global RNG in a form `torch.load(weights_only=True)` accepts. The run layer's Checkpointer
(session.py) decides when and what to save; this is the file format."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be read or used; the message names the file."""


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


def save_checkpoint(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash (or kill) mid-write leaves the previous checkpoint intact and loadable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads with weights_only=True; any failure becomes a CheckpointError naming the file."""
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
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a tinylab checkpoint (no 'model' and 'config' entries)")
    return ckpt


def newest_checkpoint(run_dir: str) -> str | None:
    """The later of a run directory's last.pt and best.pt, or None when it holds neither.

    last.pt is written every save_every steps, best.pt at every eval that improves val_loss, so
    after a preemption either may be the later one; both hold the full training state.
    """
    candidates = [os.path.join(run_dir, n) for n in ("last.pt", "best.pt")]
    candidates = [c for c in candidates if os.path.isfile(c)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or a run directory's newest checkpoint."""
    if os.path.isdir(path):
        newest = newest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{path} holds no last.pt or best.pt")
        return newest
    return path
