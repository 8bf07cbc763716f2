"""Ranks and the process group: torchrun's environment read once, collectives on small Python
values, and workers tied to their launcher. Without torchrun's variables a run is one process and
every helper here is the identity."""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # A gloo group of its own for small control messages such as "stop after this step": they never
    # wait for the GPU, and never queue behind (or hold up) DDP's gradients on the default group.
    control_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def elastic_restart_count() -> int:
    """How many times `torchrun --max-restarts` has restarted this worker (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def setup_distributed(device_kind: str, timeout=None) -> Dist:
    """Reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE; without them the run is one process. `timeout` (a
    timedelta, None for torch's default) is every process group's collective timeout."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    # Imported before the group exists, on purpose: its functions take `group=group.WORLD` as a
    # default argument, evaluated at import. DDP imports it on first use (through
    # torch.distributed._shard); imported then, those defaults hold the default process group for
    # ever, destroy_process_group cannot free it, and gloo's worker threads live on into the
    # interpreter's shutdown (see teardown_distributed).
    import torch.distributed.nn.functional  # noqa: F401
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        restart = elastic_restart_count()
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's default static rendezvous keeps one store for every attempt, so restarted
            # workers would read the dead attempt's addresses and fail to connect. Give each
            # attempt keys of its own (harmless where the rendezvous made a fresh store).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  info.world_size, is_master=False)
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"tinylab/attempt_{restart}", store),
                                    rank=info.rank, world_size=info.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    info.control_group = dist.new_group(backend="gloo", timeout=timeout)
    return info


def shared_store(timeout: float = 10.0):
    """A client of the key-value store every rank of this launch shares (torchrun's agent holds it
    under torchrun, so it outlives a worker that stopped), with keys of this attempt's own; None in
    a single process."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    import datetime
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    return dist.PrefixStore(f"tinylab/watchdog/attempt_{elastic_restart_count()}", store)


def teardown_distributed(barrier: bool = False, info: Dist | None = None) -> None:
    """Destroys the process group, and with it gloo's threads (`info`: its control group too).

    barrier=True (every rank at the normal end of a run) first waits for all ranks, so none tears
    its group down while a peer still works on its end (rank 0 plotting, say).

    The group is only freed, and its worker threads (`pt_gloo_runloop`, `gloo_tcp_loop`) only
    joined, when nothing holds it any more: the caller drops its DDP wrapper first (the reducer
    holds the group), and setup_distributed keeps torch's own default arguments off it. A gloo
    thread still running when the interpreter shuts down can be the one to drop the last reference
    to a tensor that Python owns; it then needs the GIL of an interpreter that is finalising,
    which ends the thread with pthread_exit, unwinding through C++ that must not be unwound:
    `terminate called without an active exception`, SIGABRT, after a run that had finished.
    """
    if info is not None:
        info.control_group = None  # held here, the control group's threads would outlive the rest
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        gc.collect()  # wrappers caught in reference cycles (torch.compile's, say) let go of the group too
        dist.destroy_process_group()


def gloo_threads() -> list[str]:
    """The names of this process's threads that belong to gloo (Linux; [] elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(name for name in names if "gloo" in name)


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sums a dict of floats over ranks (identity in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist()))


def max_over_ranks(value: int, info: Dist) -> int:
    """The largest of every rank's integer `value` (itself in a single process), sent on the CPU."""
    return _reduce_int(value, info, dist.ReduceOp.MAX) if info.enabled else value


def min_over_ranks(value: int, info: Dist) -> int:
    return _reduce_int(value, info, dist.ReduceOp.MIN) if info.enabled else value


def _reduce_int(value: int, info: Dist, op) -> int:
    packed = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(packed, op=op, group=info.control_group)
    return int(packed.item())


def regroup_ddp_buckets(model, loss, device: torch.device) -> None:
    """Call on a DDP model resumed from a checkpoint, before its first step. DDP all-reduces every
    gradient in one bucket on its first step, and from the second on in buckets regrouped in the
    order that first backward pass produced them. With more than two ranks the grouping decides
    which ranks' values are added first, so it changes the rounding: a resumed run, taking its first
    step with the one bucket where the uninterrupted run had the regrouped ones, drifts from it by
    about 1e-7 (two ranks hide this: a sum of two is the same in either order). One backward pass of
    `loss()` times zero (its gradients thrown away, its random numbers given back) regroups the
    buckets as the uninterrupted run's were, so resuming stays bit-exact on any number of ranks.
    `loss()` runs the model's forward (under autocast if the steps use it) on any batch."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        (loss() * 0).backward()
    model.zero_grad(set_to_none=True)


class StopAgreement:
    """Makes every rank stop after the same step without a round trip between hosts every step.

    Call it once per step on every rank with this rank's stop request (a signal number, 0 for none;
    a request must stand until it takes effect, as a received signal does). It returns the largest
    request any rank made, or 0, and it returns the same on every rank at the same call, so every
    rank leaves its loop after the same step. In a single process it returns the request at once.

    How: the requests travel in an asynchronous all-reduce (MAX) on the CPU control group, posted at
    one call and read `interval` calls later, so the network's round trip overlaps the steps in
    between instead of stalling one. All ranks post and read at the same calls, so they read the
    same values. The interval adapts: each reduction also carries every rank's proposal for the next
    interval (the steps that span ROUND_SECONDS, or twice the round trip when a read had to wait),
    and the largest proposal wins on every rank alike. A request therefore takes effect within two
    rounds, about 0.2 s of steps (two steps, when steps are slower than that; steps that suddenly
    slow down k-fold stretch the round in flight k-fold, once). A round costs one launch of a tiny
    all-reduce, 0.2 to 0.3 ms on a small CPU: bench/stop_check.py measures it. Call it exactly once
    per step on every rank. finish() waits for the reduction in flight, before the process group goes."""

    ROUND_SECONDS = 0.1
    MAX_INTERVAL = 10_000

    def __init__(self, info: Dist):
        self.info = info
        self.interval = 1  # calls from one read to the next, the same on every rank
        self.countdown = 1
        self.work = None  # the reduction in flight
        self.posted = time.perf_counter()  # when the reduction in flight went out: the last round's start
        self.packed = torch.zeros(2, dtype=torch.int64)  # [request, proposal]; one reduction in flight at a time
        self.values = self.packed.numpy()  # the same memory, written and read without torch's dispatcher

    def __call__(self, request: int) -> int:
        if not self.info.enabled:
            return request
        self.countdown -= 1
        if self.countdown > 0:
            return 0
        now = time.perf_counter()
        agreed, proposal = 0, 1
        if self.work is not None:
            self.work.wait()
            waited = time.perf_counter() - now
            agreed, next_interval = int(self.values[0]), int(self.values[1])
            round_seconds = now - self.posted
            step_seconds = max(round_seconds / self.interval, 1e-6)
            round_trip = round_seconds + waited if waited > 1e-4 else 0.0
            wanted = max(self.ROUND_SECONDS, 2 * round_trip)
            proposal = min(max(math.ceil(wanted / step_seconds), 1), self.MAX_INTERVAL)
            self.interval = next_interval
        self.values[0], self.values[1] = request, proposal
        self.work = dist.all_reduce(self.packed, op=dist.ReduceOp.MAX, group=self.info.control_group, async_op=True)
        self.posted = now
        self.countdown = self.interval
        return agreed

    def finish(self) -> None:
        """Waits for the reduction in flight, if any (every rank has the same one in flight)."""
        if self.work is not None:
            work, self.work = self.work, None
            work.wait()


def same_on_all_ranks(tensors) -> bool:
    """True when every tensor is bit-for-bit the same on every rank (elementwise max == min)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    same = True
    for tensor in tensors:
        high, low = tensor.detach().clone(), tensor.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        same = same and torch.equal(high, low)
    return same


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 only (None elsewhere); [obj] in a single process.
    For large objects that only rank 0 writes (an SAE's live buffers)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (e.g. the generated run name)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def stop_with_launcher(interval: float = 1.0) -> None:
    """Under torchrun: this worker gets one SIGTERM when its launcher dies, however it dies.

    torchrun starts each worker in a process session of its own, so a launcher killed outright
    (the OOM killer, kill -9, a lost tmux or ssh session) leaves its workers training on as orphans,
    still writing the run directory. A thread watches the parent process; when the worker is
    re-parented, it sends the worker SIGTERM, and the worker stops the way a preemption stops it:
    the step finishes, rank 0 saves, it exits. (Not the parent-death signal: torchrun's agent has
    several threads, and the kernel sends that signal again each time the thread the worker is
    parented to exits, which can land after training, once the default handler is back.)"""
    if not under_torchrun():
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher != 1:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="tinylab-launcher", daemon=True).start()
