"""Text quality per second: which recipe reaches a validation loss first on tiny-shakespeare.

    python bench/shakespeare.py --data_path data/tiny_shakespeare.txt          # on a GPU
    python bench/shakespeare.py --recipes shakespeare_char --target 1.47 --compile false

Trains each recipe (a preset name) as its own `python train.py` process, one after another, with
the same evaluation cadence, and prints every evaluation side by side: step, wall seconds since the
run began (compilation included) and val loss. Then, for each recipe, the first evaluation at or
below --target, and a plot of val loss against steps and against seconds.

The yardstick is `shakespeare_char_adamw`: nanoGPT's shakespeare_char recipe (AdamW at 1e-3,
5,000 iterations, batch 64 x 256, dropout 0.2), which reports val loss 1.4697. The default
`shakespeare_char` preset should get there in fewer steps and less wall time.

Each process compiles from a cold cache (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1), so the run that
goes second does not inherit the first one's compiled kernels. Samples and checkpoints are switched
off (--sample_tokens 0, --save_model false): generating text and writing best.pt at evals would cost
the recipes time that is not training, and not the same time for each.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import PRESETS  # noqa: E402
from plumbing.tracking import read_metrics  # noqa: E402


def first_at_or_below(evals: list[dict], target: float) -> dict | None:
    return next((r for r in evals if r["val_loss"] <= target), None)


def plot(results: dict[str, list[dict]], target: float, path: str, seconds: str = "elapsed_seconds",
         seconds_label: str = "wall seconds since the start (compile included)", y_label: str = "val loss",
         title: str = "tiny-shakespeare, char level: validation loss") -> None:
    """Val loss against steps and against `seconds` (a key of each eval), one line per recipe
    (bench/small_lm.py draws its plot with this too)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    by_step, by_time = figure.subplots(1, 2)
    for name, evals in results.items():
        by_step.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker=".", label=name)
        by_time.plot([r[seconds] for r in evals], [r["val_loss"] for r in evals], marker=".", label=name)
    for axis, label in ((by_step, "optimizer step"), (by_time, seconds_label)):
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.4g}")
        axis.set_xlabel(label)
        axis.set_ylabel(y_label)
        axis.set_ylim(top=2.6)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def recipes_and_corpus(parser: argparse.ArgumentParser, args) -> list[str]:
    """--recipes as a list of presets, and --data_path checked (bench/small_lm.py shares this);
    a bad one is the parser's error, exit status 2."""
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for name in recipes:
        if name not in PRESETS:
            parser.error(f"--recipes: {name!r} is not a preset ({', '.join(PRESETS)})")
    if not os.path.isfile(args.data_path):
        parser.error(f"--data_path: {args.data_path} does not exist (train.py would download it; this benchmark "
                     f"wants the real corpus in place)")
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="shakespeare_char,shakespeare_char_adamw", help="presets, in order")
    parser.add_argument("--data_path", default="data/tiny_shakespeare.txt")
    parser.add_argument("--target", type=float, default=1.47, help="val loss to reach")
    parser.add_argument("--eval_every", type=int, default=100, help="the same cadence for every recipe")
    parser.add_argument("--compile", default="true", choices=("true", "false"), help="--torch_compile for every run")
    parser.add_argument("--out", default="", help="directory for the runs and the plot (default runs/bench-shakespeare-<time>)")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--max_steps 200'")
    args = parser.parse_args()
    recipes = recipes_and_corpus(parser, args)
    out = args.out or os.path.join("runs", time.strftime("bench-shakespeare-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "PYTHONUNBUFFERED": "1"}

    results = {}
    for name in recipes:
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", name, "--run", name,
                   "--save_model_dir", out, "--data_path", args.data_path, "--eval_every", str(args.eval_every),
                   "--sample_tokens", "0", "--save_model", "false", "--torch_compile", args.compile,
                   *shlex.split(args.extra)]
        print(f"[{name}] {shlex.join(command)}", file=sys.stderr, flush=True)
        if subprocess.run(command, env=env, stdout=sys.stderr).returncode != 0:  # its log is progress
            sys.exit(f"{name}: train.py failed; its log is {os.path.join(out, name, 'train.log')}")
        records = read_metrics(os.path.join(out, name, "metrics.jsonl"))
        results[name] = [r for r in records if "val_loss" in r]

    print(f"val loss by evaluation ({args.eval_every} steps apart); seconds are wall time since the run began")
    print(f"{'step':>6}" + "".join(f"{name + ' s':>30}{'val':>8}" for name in recipes))
    steps = sorted({r["step"] for evals in results.values() for r in evals})
    for step in steps:
        cells = []
        for name in recipes:
            r = next((r for r in results[name] if r["step"] == step), None)
            cells.append(f"{r['elapsed_seconds']:>30.1f}{r['val_loss']:>8.4f}" if r else f"{'':>38}")
        print(f"{step:>6}" + "".join(cells))
    print()
    for name in recipes:
        evals = results[name]
        hit, last, best = first_at_or_below(evals, args.target), evals[-1], min(r["val_loss"] for r in evals)
        reached = (f"val loss <= {args.target} first at step {hit['step']}, {hit['elapsed_seconds']:.1f} s"
                   if hit else f"never reached val loss <= {args.target}")
        print(f"{name:<24} {reached} · ran {last['step']} steps in {last['elapsed_seconds']:.1f} s · "
              f"best val loss {best:.4f}, last {last['val_loss']:.4f}")
    path = os.path.join(out, "shakespeare_speed.png")
    plot(results, args.target, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
