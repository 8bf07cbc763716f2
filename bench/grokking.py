"""Steps and seconds to val_acc >= 0.99 on modular addition, and what circuit each run learned.

    python bench/grokking.py                       # default once, grokking_muon once, nanda capped at 2,000 steps
    python bench/grokking.py --seeds 5             # seed-to-seed spread
    python bench/grokking.py --presets grokking --nanda_max_steps 0

All runs go one after the other in this one process. Seconds are each run's wall time inside
train.main (data, model, loop, final plot). After each run the Fourier analysis of interp.py reads
its checkpoint: how many key frequencies the embedding concentrates on, and the loss on the
training pairs in full, restricted to those frequencies and with them excluded. A faithful grokked
model has a handful of key frequencies, restricted loss near (or below) the full loss and a high
excluded loss.
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

import interp  # noqa: E402
import train  # noqa: E402


def run(preset: str, seed: int, max_steps: int | None, runs_dir: str) -> dict:
    name = f"{preset}-{seed}"
    argv = ["--preset", preset, "--seed", str(seed), "--save_every", "0", "--save_model_dir", runs_dir,
            "--run_name", name]
    if max_steps:
        argv += ["--max_steps", str(max_steps)]
    if preset == "nanda":  # the paper has no early stop; we stop at the same target as the default
        argv += ["--target_val_acc", "0.99"]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train.main(argv)
    summary["reached"] = summary.get("val_acc", 0.0) >= 0.99
    loaded = interp.load_run(os.path.join(runs_dir, name), device="cpu", prefer="last")
    summary["fourier"] = interp.fourier_losses(loaded)
    return summary


def describe(name: str, s: dict) -> str:
    where = "reached 0.99" if s["reached"] else f"capped, val_acc {s.get('val_acc', 0):.3f}"
    f = s["fourier"]
    keys = f.key_frequencies if len(f.key_frequencies) <= 10 else f"{len(f.key_frequencies)} of them"
    return (f"{name:<26} {s['steps']:>6} steps {s['seconds']:>7.1f} s  ({where})  key frequencies {keys}; "
            f"loss full {f.full_loss:.4f} restricted {f.restricted_loss:.4f} excluded {f.excluded_loss:.2f}")


def spread(name: str, runs: list[dict]) -> str:
    steps, seconds = [s["steps"] for s in runs], [s["seconds"] for s in runs]
    keys = [len(s["fourier"].key_frequencies) for s in runs]
    faithful = sum(len(s["fourier"].key_frequencies) <= 10
                   and s["fourier"].restricted_loss <= 3 * s["fourier"].full_loss + 0.01 for s in runs)
    return (f"{name} over {len(runs)} seeds: steps median {statistics.median(steps):.0f} (min {min(steps)}, "
            f"max {max(steps)}), seconds median {statistics.median(seconds):.1f} (min {min(seconds):.1f}, "
            f"max {max(seconds):.1f}), reached 0.99: {sum(s['reached'] for s in runs)}/{len(runs)}, "
            f"key frequencies {min(keys)}-{max(keys)}, sparse with restricted ~ full: {faithful}/{len(runs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each preset (0, 1, ...)")
    parser.add_argument("--presets", nargs="+", default=["grokking", "grokking_muon"])
    parser.add_argument("--nanda_max_steps", type=int, default=2000, help="cap on the nanda run (0: skip it)")
    args = parser.parse_args()

    print(f"torch {torch.__version__} · {os.cpu_count()} CPUs · {torch.get_num_threads()} threads · "
          f"imports took {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory() as runs_dir:
        results = {}
        for preset in args.presets:
            results[preset] = [run(preset, seed, None, runs_dir) for seed in range(args.seeds)]
            for seed, s in enumerate(results[preset]):
                print(describe(f"{preset} (seed {seed})", s), flush=True)
            if args.seeds > 1:
                print(spread(preset, results[preset]), flush=True)
        if args.nanda_max_steps:
            nanda = run("nanda", 0, args.nanda_max_steps, runs_dir)
            print(describe("nanda (seed 0)", nanda))
            first = results[args.presets[0]][0]
            qualifier = "" if nanda["reached"] else "at least "
            print(f"nanda / {args.presets[0]}: {qualifier}{nanda['steps'] / first['steps']:.1f}x the steps, "
                  f"{qualifier}{nanda['seconds'] / first['seconds']:.1f}x the seconds")


if __name__ == "__main__":
    main()
