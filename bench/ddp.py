"""DDP benchmark: per-rank training throughput next to one process, and whether DDP's gradient
all-reduce overlaps the backward pass or waits for it.

    python bench/ddp.py                                   # shakespeare_char, batch 8 per process, 2 ranks
    python bench/ddp.py --config small --steps 10         # 2 x 256 wide, context 128: quicker
    python bench/ddp.py --bucket_cap_mb 5                 # smaller DDP buckets than train.py's 25 MiB
    python bench/ddp.py --nproc 4 --batch_size 32         # on a GPU box: nccl, one GPU per rank

It runs in two parts. This process first times train.py's step on one process; then it launches
itself under `python -m torch.distributed.run --standalone --nproc_per_node=N` (gloo on a CPU, nccl
with one GPU per LOCAL_RANK on CUDA) with the model wrapped in DistributedDataParallel with
train.py's settings (DDP's default buckets unless --bucket_cap_mb), and prints one report.
(train.py wraps model.ModelWithLoss, the model with its loss inside, so that compile sees both;
here the loss stays outside the wrapper, because the A/B below needs the logits. Eager, the
arithmetic and the gradients DDP reduces are the same.)

A step computes train.py's: forward under autocast, fp32 cross-entropy on the flattened logits (summed,
scaled by world size / all targets of the global batch), backward, clip_grad_norm_, the optimizer
steps from optimizer.build_optimizers, zero_grad; under DDP also train.py's per-step agreement on
stop signals (one tiny all-reduce). Batches are fixed random tokens, one per rank. Each process gets
the same --batch_size (weak scaling), so a rank's tokens/s compares directly with one process's.

Throughput table
  ms/step, tokens/s per proc    the timed steps only (warm-up steps left out); under DDP each rank
                                times its own steps, and the row gives the mean over ranks
  tokens/s total                all ranks' tokens / the slowest rank's seconds
  other load                    CPUs that other processes kept busy during the row, on average, steal
                                time in a VM included (/proc/stat's busy time minus this
                                benchmark's own): 0 on an idle machine; anything above ~0.1 on a
                                small CPU box spoils the row
  scaling efficiency            DDP total / (N x one process with the same threads per process):
                                100% when adding ranks costs nothing
  speed-up over all CPUs        DDP total / one process using every usable CPU: what a CPU-only box
                                gains from running DDP instead of one process
Threads: each process gets usable CPUs / N torch threads (--threads to change), and the one-process
baseline runs with that many too, so per-rank and single-process figures are like for like; on a CPU
the baseline is also timed with every usable CPU. On a 2-core machine two ranks share the two cores,
so a rank cannot beat one single-threaded process and the total cannot beat one process using both
cores by much: the figures say what DDP costs here, not what it gains on real hardware.

Overlap (the gradient all-reduce during backward, not after it)
  buckets             DDP's first backward reduces every gradient as one bucket, because it does
                      not yet know the order gradients become ready; then it rebuilds the buckets in
                      that order (first bucket capped at 1 MiB, the rest at 25 MiB by default; a
                      bucket closes once it reaches its cap, so one may exceed it by a tensor) and
                      the all-reduce of the last layers' gradients starts while earlier layers still
                      run backward. Sizes are listed in launch order.
  DDP's own timings   from ddp._get_ddp_logging_data(), per backward pass after warm-up, mean over
                      ranks and passes: backward compute (end of forward to end of autograd), the
                      all-reduce span (first bucket launched to last bucket done), the overlap
                      (first bucket launched to end of autograd) and what is left after autograd
                      (span - overlap): the all-reduce time a step still waits for. The first
                      backward, with its single bucket, is the control: nothing can overlap there.
  A/B                 median per-rank wall time of a DDP backward (compute and bucketed all-reduce
                      overlapped) against a no_sync() backward followed by one all-reduce of all
                      gradients after it (the "after backward" alternative, flattened into one
                      buffer: one collective, the cheapest way to do it afterwards). The arms take
                      turns going first, and ranks pass a barrier before each forward; either way
                      an all-reduce also waits for the slower rank. Only wall time can show that
                      overlap pays: on a CPU, compute and gloo's threads compete for the same cores.
Progress goes to stderr, the report to stdout. Exits non-zero (with the workers' last output) if
the DDP launch fails.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from plumbing import distributed  # noqa: E402
from plumbing import hardware  # noqa: E402
from config import PRESETS, Config  # noqa: E402
from model import Transformer  # noqa: E402
from optimizer import build_optimizers  # noqa: E402

SHAKESPEARE_CHAR_VOCAB = 65  # distinct characters in tiny-shakespeare
# `small`: shakespeare_char made narrow and short, for a quick look (about 1.6M parameters).
SMALL = dict(num_blocks=2, num_heads=4, embedding_dim=256, context_len=128)
MIB = 2**20


def model_config(name: str) -> Config:
    cfg = dataclasses.replace(Config(), **PRESETS["shakespeare_char"])
    if name == "small":
        cfg = dataclasses.replace(cfg, **SMALL)
    return cfg.validate()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # progress on stderr, so stdout is just the report


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def usable_cpus() -> int:
    """CPUs this process may run on (a container or taskset may allow fewer than os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def machine_busy_seconds() -> float | None:
    """CPU-seconds since boot (Linux /proc/stat) that every process on this machine used, plus those
    a hypervisor gave to other machines while ours wanted to run (steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_busy_seconds() -> float:
    """CPU-seconds of this process and of the children it has waited for (torchrun and its workers)."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


class OtherLoad:
    """`with OtherLoad() as other:` -> other.cpus, how many CPUs other processes kept busy on average
    meanwhile (None off Linux). The load average cannot tell our own work from theirs; this can."""

    def __enter__(self):
        self.start = (machine_busy_seconds(), own_busy_seconds(), time.perf_counter())
        self.cpus = None
        return self

    def __exit__(self, *exc):
        machine, own, wall = machine_busy_seconds(), own_busy_seconds(), time.perf_counter()
        if machine is not None and self.start[0] is not None:
            others = (machine - self.start[0]) - (own - self.start[1])
            self.cpus = max(0.0, others / (wall - self.start[2]))


def build_training(cfg: Config, device: torch.device, batch: int, data_seed: int):
    """(model, optimizers, inputs, targets): the same initial weights everywhere (seed 0), and a
    fixed random batch of `batch` sequences drawn from data_seed (each rank its own)."""
    torch.manual_seed(0)
    model = Transformer(cfg, SHAKESPEARE_CHAR_VOCAB).to(device)
    model.train()
    optimizers = build_optimizers(model, cfg)
    generator = torch.Generator().manual_seed(data_seed)
    tokens = torch.randint(SHAKESPEARE_CHAR_VOCAB, (2, batch, cfg.context_len), generator=generator)
    x, y = tokens.to(device)
    return model, optimizers, x, y


def train_step(model, raw_model, optimizers, x, y, cfg, device, dtype, info: distributed.Dist,
               agree_to_stop=None) -> torch.Tensor:
    """train.py's step with one micro-batch. `model` is raw_model or its DDP wrapper. The dtype is
    train.py's 'auto' choice, which is never fp16, so the GradScaler (fp16 only) is left out."""
    with hardware.autocast(device, dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
    num_targets = y.numel() * info.world_size  # targets in the global batch
    (loss * (info.world_size / num_targets)).backward()  # DDP averages over ranks: scale by world size
    correct = (logits.argmax(-1) == y).sum()  # train.py counts train_acc every step, so do we
    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
    for optimizer in optimizers:
        optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    # train.py makes the ranks agree on stop signals after every step (distributed.StopAgreement: an
    # all-reduce on the CPU now and then, read some steps later; nothing at all in a single process).
    if agree_to_stop is not None:
        agree_to_stop(0)
    return correct


def timed_steps(step, warmup: int, steps: int, device: torch.device, progress=say, after_step=None) -> float:
    """Runs warm-up then timed steps; returns the timed steps' seconds. after_step() runs after each
    step, inside the timing, so it must be cheap (reading DDP's counters is: a dict of ~50 numbers)."""
    for i in range(warmup):
        started = time.perf_counter()
        step()
        synchronize(device)
        if after_step:
            after_step()
        progress(f"  warm-up step {i + 1}/{warmup}: {time.perf_counter() - started:.1f} s")
    if dist.is_initialized():
        dist.barrier()  # every rank starts its clock together
    synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step()
        if after_step:
            after_step()
        if device.type != "cuda":  # on a GPU a step returns before its kernels finish
            progress(f"  timed step {i + 1}/{steps}: {time.perf_counter() - started:.1f} s so far")
    synchronize(device)
    return time.perf_counter() - started


def measure_single_process(cfg, args, device, dtype, threads: int) -> dict:
    """train.py's step in this process, with `threads` torch threads."""
    torch.set_num_threads(threads)
    model, optimizers, x, y = build_training(cfg, device, args.batch_size, data_seed=1)

    def step():
        train_step(model, model, optimizers, x, y, cfg, device, dtype, distributed.Dist())

    seconds = timed_steps(step, args.warmup, args.steps, device)
    tokens = args.batch_size * cfg.context_len * args.steps
    return {"ms_per_step": 1000 * seconds / args.steps, "tokens_per_sec": tokens / seconds}


# ---------------------------------------------------------------- the DDP worker (under torchrun)


def all_reduce_after_backward(params: list[torch.Tensor], world_size: int) -> None:
    """Gradient sync that waits for the whole backward: every gradient flattened into one buffer,
    one all-reduce, averaged, copied back (what DDP would cost if it could not overlap)."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for grad, synced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(synced.view_as(grad))


def worker(args) -> None:
    """One rank under torchrun. A failure leaves its traceback in <result_file>.rank<N>.error, so the
    launching process can print the workers' own error rather than torchrun's summary of it."""
    try:
        run_worker(args)
    except BaseException:
        with open(f"{args.result_file}.rank{os.environ.get('RANK', '?')}.error", "w") as f:
            f.write(traceback.format_exc())
        raise


def run_worker(args) -> None:
    device = hardware.pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    info = distributed.setup_distributed(device.type)  # train.py's init: gloo on a CPU, nccl on CUDA
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py does
    say_here = say if info.is_main else (lambda message: None)  # progress from rank 0 only (its timings)
    cfg = model_config(args.config)
    dtype = hardware.pick_dtype(cfg.dtype, device)
    raw_model, optimizers, x, y = build_training(cfg, device, args.batch_size, data_seed=1 + info.rank)

    # Wrapped as train.py wraps it: DDP's defaults for everything but device_ids.
    bucket_args = {"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb else {}
    model = DDP(raw_model, device_ids=[info.local_rank] if device.type == "cuda" else None, **bucket_args)
    # DDP records its timings on iterations 1-10 and then every 100th; ask for every one. (Both calls
    # here are private DDP API, present in torch 2.0-2.13; without them the report says so.)
    has_counters = hasattr(model, "_get_ddp_logging_data") and hasattr(model, "_set_ddp_runtime_logging_sample_rate")
    if has_counters:
        model._set_ddp_runtime_logging_sample_rate(1)

    # DDP folds a backward pass's timings into its logging data at the start of the next synced
    # forward, under that forward's iteration number: after forward i they describe backward i - 1.
    backward_stats: dict[int, dict] = {}
    logging_data: dict = {}

    def read_ddp_counters():
        if not has_counters:
            return
        logging_data.update(model._get_ddp_logging_data())
        iteration = logging_data.get("iteration", 0)
        if iteration >= 1 and "backward_compute_time" in logging_data:
            backward_stats[iteration - 1] = {
                "compute_ms": logging_data["backward_compute_time"] / 1e6,
                "comm_ms": logging_data["backward_comm_time"] / 1e6,
                "overlap_ms": logging_data["backward_compute_comm_overlap_time"] / 1e6,
            }

    # ---- throughput: train.py's step under DDP
    agree_to_stop = distributed.StopAgreement(info)

    def step():
        train_step(model, raw_model, optimizers, x, y, cfg, device, dtype, info, agree_to_stop)

    say_here(f"[DDP, {info.world_size} ranks x {args.threads} thread(s), batch {args.batch_size} per rank]")
    seconds = timed_steps(step, args.warmup, args.steps, device, progress=say_here, after_step=read_ddp_counters)

    # ---- overlap A/B: the same forward, then (a) DDP's backward or (b) no_sync backward + all-reduce
    say_here(f"[overlap A/B, {args.overlap_reps} repetitions after one warm-up]")
    params = [p for p in raw_model.parameters() if p.requires_grad]  # tied weights once
    timings = {"ddp_backward_ms": [], "no_sync_backward_ms": [], "all_reduce_after_ms": []}

    def loss_of(logits):
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") / y.numel()

    def ddp_backward() -> float:
        """ms of a backward whose gradient hooks launch each bucket's all-reduce as it fills."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        with hardware.autocast(device, dtype):
            logits = model(x)
        loss = loss_of(logits)
        synchronize(device)
        started = time.perf_counter()
        loss.backward()  # returns once every bucket's all-reduce is done (on a GPU: once queued)
        synchronize(device)
        backward_ms = 1000 * (time.perf_counter() - started)
        read_ddp_counters()  # the forward above folded the previous DDP backward's timings in
        return backward_ms

    def backward_then_all_reduce() -> tuple[float, float]:
        """ms of a no_sync backward (no gradient hooks: it computes and nothing else), then ms of the
        all-reduce of every gradient after it."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        with model.no_sync():
            with hardware.autocast(device, dtype):
                logits = model(x)
            loss = loss_of(logits)
            synchronize(device)
            started = time.perf_counter()
            loss.backward()
            synchronize(device)
            backward_done = time.perf_counter()
        all_reduce_after_backward(params, info.world_size)
        synchronize(device)
        return 1000 * (backward_done - started), 1000 * (time.perf_counter() - backward_done)

    for rep in range(args.overlap_reps + 1):  # repetition 0 warms both arms up and is dropped
        # The arms take turns going first, so neither always runs on the other's warm caches.
        if rep % 2 == 0:
            ddp_ms = ddp_backward()
            no_sync_ms, after_ms = backward_then_all_reduce()
        else:
            no_sync_ms, after_ms = backward_then_all_reduce()
            ddp_ms = ddp_backward()
        if rep:
            timings["ddp_backward_ms"].append(ddp_ms)
            timings["no_sync_backward_ms"].append(no_sync_ms)
            timings["all_reduce_after_ms"].append(after_ms)
        say_here(f"  repetition {rep}{' (warm-up)' if not rep else ''}: DDP backward {ddp_ms:.0f} ms · "
                 f"no_sync backward {no_sync_ms:.0f} ms + all-reduce after {after_ms:.0f} ms")

    result = {
        "rank": info.rank,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "backend": dist.get_backend(),
        "first_backward": backward_stats.get(0),
        "backward_stats": [s for i, s in sorted(backward_stats.items()) if i >= args.warmup],
        "ab": timings,
        "bucket_cap_bytes": model.bucket_bytes_cap,
        "gradient_as_bucket_view": model.gradient_as_bucket_view,
        "static_graph": model.static_graph,
        "find_unused_parameters": model.find_unused_parameters,
        "first_bucket_sizes": logging_data.get("bucket_sizes", ""),
        "rebuilt_bucket_sizes": logging_data.get("rebuilt_bucket_sizes", ""),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        "parameter_tensors": len(params),
    }
    agree_to_stop.finish()
    results = distributed.gather_objects(result)
    if info.is_main:
        with open(args.result_file, "w") as f:
            json.dump(results, f)
    distributed.teardown_distributed(barrier=True, info=info)


# ---------------------------------------------------------------- launching and reporting


def launch_workers(args, threads: int) -> list[dict]:
    """Runs this file under torchrun; returns every rank's result. If the launch fails, prints the
    workers' errors (or torchrun's last output) and exits with torchrun's status, or 1."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = os.path.join(scratch, "ranks.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", os.path.abspath(__file__), "--worker",
                   "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch_size", str(args.batch_size), "--threads", str(threads),
                   "--overlap_reps", str(args.overlap_reps), "--device", args.device,
                   "--bucket_cap_mb", str(args.bucket_cap_mb), "--result_file", result_file]
        # torchrun would set OMP_NUM_THREADS=1 itself (and warn); the workers call set_num_threads too.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        say(f"[launching: python {' '.join(command[1:5])} bench/ddp.py --worker ...]")
        last_lines = collections.deque(maxlen=40)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:  # pass the workers' progress on, keep the tail for errors
            last_lines.append(line.rstrip("\n"))
            say(line.rstrip("\n"))
        returncode = process.wait()
        if returncode != 0 or not os.path.isfile(result_file):
            errors = sorted(name for name in os.listdir(scratch) if name.endswith(".error"))
            print(f"error: the DDP workers failed (torchrun exit status {returncode})"
                  + ("; their errors:" if errors else "; their last output:"), file=sys.stderr)
            shown = set()
            for name in errors:  # "ranks.json.rank0.error"; ranks that failed alike are named, not repeated
                with open(os.path.join(scratch, name)) as f:
                    text = f.read().rstrip()
                rank = name.split(".")[-2]
                print(f"  {rank}: " + ("the same error" if text in shown else text.replace("\n", "\n    ")),
                      file=sys.stderr)
                shown.add(text)
            if not errors:
                print("\n".join("  " + line for line in last_lines), file=sys.stderr)
            sys.exit(returncode or 1)
        with open(result_file) as f:
            return json.load(f)


def mean(values) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(args, cfg, device, threads, single: dict, single_all_cores: dict | None, ranks: list[dict],
           ddp_other_cpus: float | None) -> None:
    tokens_per_rank = args.batch_size * cfg.context_len * args.steps
    rank_tokens_per_sec = [tokens_per_rank / r["seconds"] for r in ranks]
    total_tokens_per_sec = tokens_per_rank * len(ranks) / max(r["seconds"] for r in ranks)

    def row(name, processes, threads_each, ms_per_step, per_process, total, other_cpus):
        other = f"{other_cpus:.2f}" if other_cpus is not None else "n/a"
        print(f"{name:<26}{processes:>10}{threads_each:>9}{ms_per_step:>10.1f}{per_process:>19,.0f}{total:>16,.0f}"
              f"{other:>14}")

    print(f"{'':<26}{'processes':>10}{'threads':>9}{'ms/step':>10}{'tokens/s per proc':>19}{'tokens/s total':>16}"
          f"{'other load':>14}")
    row("single process", 1, threads, single["ms_per_step"], single["tokens_per_sec"], single["tokens_per_sec"],
        single["other_cpus"])
    if single_all_cores is not None:
        row("single process, all CPUs", 1, usable_cpus(), single_all_cores["ms_per_step"],
            single_all_cores["tokens_per_sec"], single_all_cores["tokens_per_sec"], single_all_cores["other_cpus"])
    row(f"DDP ({ranks[0]['backend']}), mean of ranks", len(ranks), ranks[0]["threads"],
        1000 * mean([r["seconds"] for r in ranks]) / args.steps, mean(rank_tokens_per_sec), total_tokens_per_sec,
        ddp_other_cpus)
    print("  per rank tokens/s: " + ", ".join(f"rank {r['rank']} {t:,.0f}" for r, t in zip(ranks, rank_tokens_per_sec)))
    efficiency = total_tokens_per_sec / (len(ranks) * single["tokens_per_sec"])
    print(f"  scaling efficiency: {total_tokens_per_sec:,.0f} / ({len(ranks)} x {single['tokens_per_sec']:,.0f}) = "
          f"{efficiency:.0%} (per-rank throughput relative to one process with the same threads)")
    if single_all_cores is not None:
        print(f"  speed-up over one process on all {usable_cpus()} CPUs: "
              f"{total_tokens_per_sec / single_all_cores['tokens_per_sec']:.2f}x")
    loads = [x for x in (single["other_cpus"], (single_all_cores or {}).get("other_cpus"), ddp_other_cpus)
             if x is not None]
    print("  other load: CPUs kept busy by other processes (or a hypervisor's steal) during the row, on average "
          "(/proc/stat minus our own CPU time)" + ("; above 0.1 the row is not clean: rerun on an idle machine"
                             if loads and max(loads) > 0.1 else ""))

    # ---- buckets
    first = ranks[0]
    bucket_cap = first["bucket_cap_bytes"] / MIB

    def mib_list(text: str) -> list[float]:
        return [int(size) / MIB for size in text.split(",") if size.strip()]

    first_buckets, rebuilt = mib_list(first["first_bucket_sizes"]), mib_list(first["rebuilt_bucket_sizes"])
    print()
    print(f"gradient buckets: {first['parameter_tensors']} parameter tensors, "
          f"{first['gradient_bytes'] / MIB:.1f} MiB of gradients; bucket cap {bucket_cap:g} MiB"
          + (" (--bucket_cap_mb; train.py uses DDP's default, 25 MiB)" if args.bucket_cap_mb
             else " (DDP's default, as train.py uses it)"))
    print("  train.py wraps the model as DDP(model, device_ids=[local_rank] on CUDA, else None): "
          f"gradient_as_bucket_view={first['gradient_as_bucket_view']}, static_graph={first['static_graph']}, "
          f"find_unused_parameters={first['find_unused_parameters']}")
    print(f"  first backward: {len(first_buckets)} bucket(s) of " + ", ".join(f"{s:.2f}" for s in first_buckets)
          + " MiB (DDP does not know the order gradients arrive in yet)")
    if rebuilt:
        print(f"  rebuilt after it: {len(rebuilt)} buckets of " + ", ".join(f"{s:.2f}" for s in rebuilt)
              + " MiB, in the order their all-reduces launch")
    else:
        print("  rebuilt buckets: none reported (DDP had not rebuilt them)")

    # ---- DDP's own timings
    samples = [s for r in ranks for s in r["backward_stats"]]
    print()
    if samples:
        compute, comm, overlap = (mean([s[key] for s in samples]) for key in ("compute_ms", "comm_ms", "overlap_ms"))
        print(f"DDP's own timings (_get_ddp_logging_data), mean over {len(ranks)} ranks x "
              f"{len(samples) // len(ranks)} backward passes after warm-up:")
        print(f"  backward compute  {compute:8.1f} ms   end of forward to end of autograd")
        print(f"  all-reduce span   {comm:8.1f} ms   first bucket launched to last bucket done")
        print(f"  overlap           {overlap:8.1f} ms   of that span while backward still computes")
        print(f"  left after it     {comm - overlap:8.1f} ms   all-reduce still running once autograd is done")
        control = [r["first_backward"] for r in ranks if r["first_backward"]]
        if control:
            comm, overlap = (mean([c[key] for c in control]) for key in ("comm_ms", "overlap_ms"))
            print(f"  control, the first backward (one bucket, nothing to overlap): all-reduce span {comm:.1f} ms, "
                  f"overlap {overlap:.1f} ms, left after it {comm - overlap:.1f} ms")
    else:
        print("DDP's own timings: none recorded (this torch's DDP does not report them)")

    # ---- A/B
    ddp_ms = mean([statistics.median(r["ab"]["ddp_backward_ms"]) for r in ranks])
    backward_ms = mean([statistics.median(r["ab"]["no_sync_backward_ms"]) for r in ranks])
    after_ms = mean([statistics.median(r["ab"]["all_reduce_after_ms"]) for r in ranks])
    print()
    print(f"A/B, median of {args.overlap_reps} backward passes per rank, mean over ranks:")
    print(f"  DDP backward (bucketed all-reduce during backward)    {ddp_ms:8.1f} ms")
    print(f"  no_sync backward, then all-reduce of all gradients    {backward_ms:8.1f} + {after_ms:.1f} = "
          f"{backward_ms + after_ms:.1f} ms")
    saved = backward_ms + after_ms - ddp_ms
    if saved >= 0:
        print(f"  DDP's backward is {saved:.1f} ms shorter: it hides {saved / after_ms:.0%} of the after-backward "
              f"all-reduce" if after_ms > 0 else f"  DDP's backward is {saved:.1f} ms shorter")
    else:
        print(f"  DDP's backward is {-saved:.1f} ms longer: here the overlap hides none of the all-reduce in wall time")
    if device.type == "cpu":
        print(f"  (on a CPU, gloo's all-reduce threads and the {len(ranks)} ranks' compute share "
              f"{usable_cpus()} CPUs, so communication hidden behind compute still takes CPU time from it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shakespeare_char", choices=("shakespeare_char", "small"),
                        help="model shape: the shakespeare_char preset (10.7M params), or small (2 x 256, context 128)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 20 on CUDA, 5 elsewhere)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first; at least 2 under DDP (its first backward uses one bucket)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="sequences per process (0: the preset's 64 on CUDA, 8 elsewhere)")
    parser.add_argument("--nproc", type=int, default=2, help="DDP ranks (torchrun --nproc_per_node)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: usable CPUs / nproc, at least 1)")
    parser.add_argument("--bucket_cap_mb", type=float, default=0,
                        help="DDP bucket cap in MiB (0: DDP's default 25, as train.py uses)")
    parser.add_argument("--overlap_reps", type=int, default=0, help="A/B repetitions (0: 10 on CUDA, 5 elsewhere)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if visible")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set when run under torchrun
    parser.add_argument("--result_file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":  # not hardware.pick_device's auto: gloo DDP cannot run on mps
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device == "cuda"
    args.steps = args.steps or (20 if on_gpu else 5)
    args.batch_size = args.batch_size or (PRESETS["shakespeare_char"]["batch_size"] if on_gpu else 8)
    args.overlap_reps = args.overlap_reps or (10 if on_gpu else 5)
    args.warmup = max(args.warmup, 2)  # the first DDP backward is a one-bucket special case
    if args.worker:
        worker(args)
        return

    for name in ("steps", "batch_size", "overlap_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1 (0 picks the default)")
    if args.nproc < 2:
        parser.error("--nproc: DDP needs at least 2 ranks")
    if args.threads < 0 or args.bucket_cap_mb < 0:
        parser.error("--threads, --bucket_cap_mb: 0 (the default) or more")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if on_gpu and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc: {args.nproc} ranks need {args.nproc} GPUs, {torch.cuda.device_count()} visible")
    cpus = usable_cpus()
    threads = args.threads or max(1, cpus // args.nproc)
    device = hardware.pick_device(args.device)
    cfg = model_config(args.config)
    dtype = hardware.pick_dtype(cfg.dtype, device)
    torch.set_flush_denormal(True)  # as train.py does: subnormal Adam state is slow on x86

    num_params = Transformer(cfg, SHAKESPEARE_CHAR_VOCAB).num_params()
    gpu = f" · {torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}" if on_gpu else ""
    print(f"torch {torch.__version__} · device {device.type}{gpu} · dtype {str(dtype).replace('torch.', '')} · "
          f"{os.cpu_count()} CPUs ({cpus} usable) · load average (1 min) {load_average()} before")
    print(f"model {args.config}: {cfg.num_blocks} blocks x {cfg.embedding_dim} wide, context {cfg.context_len}, "
          f"{num_params / 1e6:.1f}M params · batch {args.batch_size} x {cfg.context_len} per process "
          f"({args.batch_size * cfg.context_len:,} tokens) · {args.warmup} warm-up + {args.steps} timed steps · "
          f"{args.nproc} DDP ranks x {threads} torch thread(s) each ({cpus} usable CPUs / {args.nproc} ranks)",
          flush=True)

    say(f"[single process, {threads} thread(s), batch {args.batch_size}]")
    with OtherLoad() as other:
        single = measure_single_process(cfg, args, device, dtype, threads)
    single["other_cpus"] = other.cpus
    single_all_cores = None
    if not on_gpu and cpus != threads:
        say(f"[single process, {cpus} threads (all usable CPUs), batch {args.batch_size}]")
        with OtherLoad() as other:
            single_all_cores = measure_single_process(cfg, args, device, dtype, cpus)
        single_all_cores["other_cpus"] = other.cpus
    with OtherLoad() as other:
        ranks = launch_workers(args, threads)
    report(args, cfg, device, threads, single, single_all_cores, ranks, other.cpus)
    print(f"load average (1 min) {load_average()} after (our own processes included)", flush=True)


if __name__ == "__main__":
    main()
