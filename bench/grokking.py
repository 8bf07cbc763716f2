"""Steps and seconds to val_acc >= 0.99 on modular addition: the default preset against `nanda`.

    python bench/grokking.py                       # default once, nanda capped at 2,000 steps
    python bench/grokking.py --seeds 5             # seed-to-seed spread of the default
    python bench/grokking.py --nanda_max_steps 40000

Both run in this one process, one after the other, with checkpoints off. Seconds are each run's
wall time inside train.main (data, model, loop, final plot); the first line also gives the time
this process took to import torch and the project.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

started = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train  # noqa: E402


def run(preset: str, seed: int, max_steps: int | None, runs_dir: str) -> dict:
    argv = ["--preset", preset, "--seed", str(seed), "--save_model", "false", "--save_model_dir", runs_dir]
    if max_steps:
        argv += ["--max_steps", str(max_steps)]
    if preset == "nanda":  # the paper has no early stop; we stop at the same target as the default
        argv += ["--target_val_acc", "0.99"]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.main(argv)
    summary["reached"] = summary.get("val_acc", 0.0) >= 0.99
    return summary


def describe(name: str, s: dict) -> str:
    where = "reached 0.99" if s["reached"] else f"stopped at the cap with val_acc {s.get('val_acc', 0):.3f}"
    ms_per_step = 1000 * s["train_seconds"] / max(s["steps"], 1)
    return (f"{name:<22} {s['steps']:>6} steps  {s['seconds']:>7.1f} s  {ms_per_step:6.1f} ms/step (with evals)  "
            f"val_acc {s.get('val_acc', 0):.4f}  ({where})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the default preset (0, 1, ...)")
    parser.add_argument("--nanda_max_steps", type=int, default=2000, help="cap on the nanda run (0: skip it)")
    args = parser.parse_args()

    print(f"torch {torch.__version__} · {os.cpu_count()} CPUs · {torch.get_num_threads()} threads · "
          f"imports took {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory() as runs_dir:
        defaults = [run("grokking", seed, None, runs_dir) for seed in range(args.seeds)]
        for seed, s in enumerate(defaults):
            print(describe(f"default (seed {seed})", s))
        if args.seeds > 1:
            steps = [s["steps"] for s in defaults]
            seconds = [s["seconds"] for s in defaults]
            print(f"default over {args.seeds} seeds: steps median {statistics.median(steps):.0f} "
                  f"(min {min(steps)}, max {max(steps)}), seconds median {statistics.median(seconds):.1f} "
                  f"(min {min(seconds):.1f}, max {max(seconds):.1f}), reached 0.99: "
                  f"{sum(s['reached'] for s in defaults)}/{args.seeds}")
        if args.nanda_max_steps:
            nanda = run("nanda", 0, args.nanda_max_steps, runs_dir)
            print(describe("nanda (seed 0)", nanda))
            first = defaults[0]
            qualifier = "" if nanda["reached"] else "at least "
            print(f"nanda / default: {qualifier}{nanda['steps'] / first['steps']:.1f}x the steps, "
                  f"{qualifier}{nanda['seconds'] / first['seconds']:.1f}x the seconds")


if __name__ == "__main__":
    main()
