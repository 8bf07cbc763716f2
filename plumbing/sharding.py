"""Training beyond one GPU's memory: FSDP2 over the blocks, and sharded checkpoints that reshard.

`shard(model, ...)` applies PyTorch's `fully_shard` to each block, then to the whole model (the
embeddings, final norm and unembedding), so each rank keeps 1/N of the weights, gradients and
optimizer moments; a block's weights are gathered just before it runs and freed after.

A sharded run saves a folder, `last.dcp/` (or `best.dcp/`), with `torch.distributed.checkpoint`:
each rank writes its own shard of the weights and optimizer moments, rank 0 adds `meta.pt` (the
step, the config, every rank's RNG streams, the schedule: the checkpoint's other entries). The
folder is written under a temporary name and renamed into place once every rank has written: a
checkpoint is complete or absent, and a kill mid-write leaves the previous one. DCP records each
tensor's global shape, so the folder loads onto any number of ranks, sharded or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import torch
import torch.distributed as dist

SUFFIX = ".dcp"
USED = False  # set once this process has sharded a model (session.py: how the process may exit)
META = "meta.pt"  # the non-tensor entries, written by rank 0 inside the folder


def is_sharded_checkpoint(path: str) -> bool:
    """A complete sharded checkpoint folder (DCP's .metadata, written last, and our meta.pt)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata")) and \
        os.path.isfile(os.path.join(path, META))


def shard(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """FSDP2 on each block, on the embedding and unembedding when they are not tied, then on the root
    (the rest: positions, final norm). On a GPU under bf16: bf16 weights in the forward and
    backward, gradients reduced in fp32 (the fp32 master weights stay sharded); elsewhere fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    global USED
    USED = True
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" and dtype == torch.bfloat16 else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    if model.unembed.weight is not model.embed.weight:  # untied: each gathered only while it runs, not
        fully_shard(model.embed, mp_policy=policy)      # for the whole step as the root's weights are
        fully_shard(model.unembed, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # sampling calls generate (its own forward); let FSDP gather the root's weights for it too
    from torch.distributed.fsdp import register_fsdp_forward_method
    register_fsdp_forward_method(model, "forward_cached")


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP's no_sync: with sync False, backward keeps whole gradients here (accumulation) instead
    of reduce-scattering them; the micro-step with sync True reduces the sum."""
    model.set_requires_gradient_sync(sync)


def last_line(error: BaseException) -> str:
    """What went wrong, in a line: DCP's errors carry every rank's traceback, the cause last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:240]


@contextlib.contextmanager
def quiet():
    """DCP warns, on every save or load in a single process, that it assumes one process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def save_sharded(path: str, tensors: dict, meta: dict, is_main: bool, watchdog=None) -> None:
    """Writes `tensors` (DTensors or plain tensors, nested dicts) with DCP and `meta` (rank 0's) as
    <path>/meta.pt, into a temporary folder renamed to `path` once complete. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from plumbing.checkpoints import save_checkpoint
    directory, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(directory, f".{name}.tmp"), os.path.join(directory, f".{name}.old")
    if is_main and os.path.exists(tmp):  # a write that a kill cut short
        shutil.rmtree(tmp)
    if _distributed():
        dist.barrier()
    if watchdog is not None:
        watchdog.writing(tmp)  # bytes arriving there are progress, not a hang
    try:
        with quiet():
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not _distributed())
        if is_main:
            save_checkpoint(meta, os.path.join(tmp, META))
    finally:
        if watchdog is not None:
            watchdog.writing(None)
    if _distributed():
        dist.barrier()  # every shard is on disk
    if is_main:
        if os.path.exists(path):  # a folder cannot be renamed over another: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_directory(directory)
    if _distributed():
        dist.barrier()  # no rank reads the folder before it has its name


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(path: str) -> None:
    """If a rename was cut short between its two steps (`path` moved aside, the new one not yet in
    place), put the previous checkpoint back. Harmless otherwise."""
    directory, name = os.path.split(os.path.abspath(path))
    old = os.path.join(directory, f".{name}.old")
    if not os.path.exists(path) and is_sharded_checkpoint(old):
        os.replace(old, path)


def load_meta(path: str) -> dict:
    from plumbing.checkpoints import CheckpointError, load_checkpoint_file
    if not is_sharded_checkpoint(path):
        missing = ".metadata" if not os.path.isfile(os.path.join(path, ".metadata")) else META
        raise CheckpointError(f"{path} is not a complete sharded checkpoint (no {missing}); it was cut short "
                              f"or is not a tinylab checkpoint: resume from another one")
    return load_checkpoint_file(os.path.join(path, META), check=False)


def load_full(path: str, prefix: str = "model") -> dict:
    """The whole tensors under `prefix` (e.g. the weights) of a sharded checkpoint, in this process
    alone: what the single-process readers (interp, sae, lens, sample, export) take."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    from plumbing.checkpoints import CheckpointError
    try:
        with quiet():
            state = _load_state_dict_from_keys(checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: a shard could not be read ({last_line(e)})") from None
    weights = state.get(prefix)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no {prefix!r} entry")
    return weights


def load_sharded(path: str, model: torch.nn.Module, optimizers: list) -> None:
    """Fills `model` and `optimizers` (sharded or not, on any number of ranks) from the checkpoint
    folder; every rank calls it. Hyperparameters stay today's (the optimizers were built from them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from plumbing.checkpoints import CheckpointError, todays_settings
    state = state_for_saving(model, optimizers)  # the shapes to fill, as this rank holds them
    try:
        with quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{path} does not fit this model or is missing a shard ({last_line(e)})") from None
    with todays_settings(optimizers):
        set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizers"])


def state_for_saving(model: torch.nn.Module, optimizers: list) -> dict:
    """{"model": ..., "optimizers": ...} keyed by parameter names, sharded as they live."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizers)
    return {"model": model_state, "optimizers": optim_state}
