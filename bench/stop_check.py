"""What agreeing to stop costs a training step when the ranks are on two hosts.

    sudo python bench/stop_check.py                     # 2 hosts x 2 ranks, 10 ms steps, 0 and 5 ms of latency
    sudo python bench/stop_check.py --delays 0 1 5 20 --steps 500 --step_ms 10

Every step, train.py (and sae.py, lens.py) asks whether any rank has been told to stop (SIGTERM,
Slurm's warning signal), so that all ranks stop after the same step. Asked with a blocking
all-reduce every step, that is a round trip between hosts inside every step; distributed.StopAgreement
sends the question asynchronously and reads the answer a few steps later, in rounds of about 0.1 s.

This script makes two hosts of Linux namespaces (tests/virtual_hosts.py: their own addresses and
host names; with a delay, a link that holds each packet that long in each direction, what `tc qdisc
add dev eth0 root netem delay 5ms` does on both ends), runs torchrun on each (`--nnodes 2`, gloo
over the link, 2 processes per host), and on every rank times a stand-in step (a sleep of --step_ms:
a GPU step, during which the CPU waits) three ways: nothing else, the blocking all-reduce every step,
and StopAgreement. It prints, per link, the time each rank spent inside the stop check per step
(the largest over ranks, median of --repeats), as a share of the step, and the wall-clock ms/step.

Needs root (namespaces) and Linux; elsewhere it says why and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

MODES = ("none", "blocking", "agreement")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 5.0], help="added one-way latency, ms")
    parser.add_argument("--step_ms", type=float, default=10.0, help="the stand-in step, ms")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode and repeat")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first, per mode and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc_per_node", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- on every rank

def worker(args) -> None:
    import torch.distributed as torch_dist

    from plumbing import distributed

    info = distributed.setup_distributed("cpu")
    step_seconds = args.step_ms / 1000
    results = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            torch_dist.barrier()  # every rank starts the mode together
            agreement = distributed.StopAgreement(info)
            inside, started = 0.0, time.perf_counter()
            for step in range(args.warmup + args.steps):
                if step == args.warmup:  # the first rounds, before StopAgreement knows the step time, are not timed
                    inside, started = 0.0, time.perf_counter()
                time.sleep(step_seconds)
                checked = time.perf_counter()
                if mode == "blocking":
                    distributed.max_over_ranks(0, info)
                elif mode == "agreement":
                    agreement(0)
                inside += time.perf_counter() - checked
            wall = time.perf_counter() - started
            agreement.finish()  # once per run, up to one round trip: not a per-step cost
            results[mode].append({"inside_ms": 1000 * inside / args.steps, "wall_ms": 1000 * wall / args.steps,
                                  "interval": agreement.interval})
    everyone = distributed.gather_objects(results)
    if info.is_main:
        print("RESULT " + json.dumps(everyone), flush=True)
    distributed.teardown_distributed(barrier=True, info=info)


# ---------------------------------------------------------------- the launcher

def measure(delay_ms: float, args) -> dict:
    from harness.virtual_hosts import VirtualHosts

    with tempfile.TemporaryDirectory(prefix="tinylab-stop-check-") as directory, \
            VirtualHosts(directory, ["node1", "node2"], delay_ms=delay_ms) as hosts:
        processes = []
        for node_rank, name in enumerate(hosts.names):
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                    "--nproc_per_node", str(args.nproc_per_node), "--master_addr", "node1", "--master_port", "29500",
                    os.path.abspath(__file__), "--worker", "--step_ms", str(args.step_ms), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            processes.append(hosts.popen(name, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"}))
        outputs = [p.communicate(timeout=600)[0] for p in processes]
        if any(p.returncode for p in processes):
            raise SystemExit("a worker failed:\n" + "\n".join(o[-3000:] for o in outputs))
        line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
        ranks = json.loads(line[len("RESULT "):])
    summary = {}
    for mode in MODES:
        # per repeat, the slowest rank; then the median over repeats
        inside = statistics.median(max(r[mode][i]["inside_ms"] for r in ranks) for i in range(args.repeats))
        wall = statistics.median(max(r[mode][i]["wall_ms"] for r in ranks) for i in range(args.repeats))
        interval = max(r[mode][-1]["interval"] for r in ranks)
        summary[mode] = {"inside_ms": inside, "wall_ms": wall, "interval": interval}
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from harness.virtual_hosts import hosts_missing_reason

    reason = hosts_missing_reason()
    if reason:
        print(f"bench/stop_check.py: cannot make two hosts here: {reason}", file=sys.stderr)
        sys.exit(2)
    ranks = 2 * args.nproc_per_node
    print(f"stop agreement across 2 hosts x {args.nproc_per_node} ranks ({ranks} ranks, gloo), a {args.step_ms:g} ms "
          f"step, {args.steps} timed steps per mode after {args.warmup} untimed, median of {args.repeats}; 'in check' "
          f"is the slowest rank's time inside the stop check per step", flush=True)
    header = (f"{'added latency':>14} | {'no check':>9} | {'blocking all-reduce every step':>42} | "
              f"{'StopAgreement (async rounds)':>42}")
    print(header)
    print(f"{'(each way)':>14} | {'ms/step':>9} | {'in check':>10} {'% of step':>10} {'ms/step':>9} {'':>9} | "
          f"{'in check':>10} {'% of step':>10} {'ms/step':>9} {'interval':>9}")
    for delay in args.delays:
        started = time.perf_counter()
        s = measure(delay, args)
        b, a = s["blocking"], s["agreement"]
        print(f"{delay:>11g} ms | {s['none']['wall_ms']:>9.2f} | {b['inside_ms']:>7.3f} ms "
              f"{100 * b['inside_ms'] / args.step_ms:>9.2f}% {b['wall_ms']:>9.2f} {'':>9} | "
              f"{a['inside_ms']:>7.3f} ms {100 * a['inside_ms'] / args.step_ms:>9.2f}% {a['wall_ms']:>9.2f} "
              f"{a['interval']:>6} st   ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
