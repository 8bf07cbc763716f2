"""nanoGPT's laptop recipe on a CPU: which recipe reaches a validation loss first, in steps and seconds.

    python bench/small_lm.py --data_path ../shared/data/tiny_shakespeare.txt     # 3 recipes x 3 seeds
    python bench/small_lm.py --recipes shakespeare_char_modern --seeds 0 --max_steps 600

nanoGPT's README trains shakespeare_char "on a laptop" with 4 layers, 4 heads, 128 wide, context 64,
batch 12, 2,000 AdamW iterations with cosine decay and no dropout, and reports val loss 1.88. This
script trains each recipe (a preset) cut to exactly that shape, batch and step budget, as its own
`python train.py` process on the CPU, one after another, for each seed:

  shakespeare_char_adamw   nanoGPT's recipe (AdamW 1e-3, cosine to 1e-4, warm-up 100): the yardstick
  shakespeare_char         today's Muon preset
  shakespeare_char_modern  the 2026 pieces (rotary positions, QK-norm, ReLU², untied and zero-started
                           output matrices, parameter-free RMSNorm, soft-capped logits) with Muon

Every recipe is evaluated every --eval_every steps on the same fixed validation windows (the first
--eval_windows windows of context 64 of the held-out tail). Seconds are training seconds: the
sum of train.py's ms/step over the steps, so evaluations (the same for every recipe) are left out.
The target is the loss the yardstick ends at (the median over seeds) unless --target names one.
It prints every evaluation side by side (medians over seeds), then for each recipe and seed the
first evaluation at or below the target, the medians, and the verdicts the recipe is judged on:
the modern recipe reaches the target in at most a quarter of the yardstick's steps and a third of
its training seconds, and ends below today's Muon preset. Then the step-time cost of each piece,
timed in this process on the Muon preset's laptop model (--piece_steps steps each, median).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import PRESETS  # noqa: E402
from plumbing.tracking import read_metrics  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shakespeare import first_at_or_below, plot, recipes_and_corpus  # noqa: E402

YARDSTICK, MUON, MODERN = "shakespeare_char_adamw", "shakespeare_char", "shakespeare_char_modern"
LAPTOP = dict(num_blocks=4, num_heads=4, embedding_dim=128, context_len=64, batch_size=12, max_steps=2000,
              dropout=0.0)  # nanoGPT's README, "I only have a macbook"
# Each piece alone on top of today's Muon preset, for its step-time cost.
PIECES = {"rope": dict(positional="rope"), "qk_norm": dict(qk_norm=True), "relu2": dict(activation="relu2"),
          "swiglu": dict(activation="swiglu"), "kv_heads 1": dict(num_kv_heads=1),
          "logit_softcap": dict(logit_softcap=15.0), "parameter-free rmsnorm": dict(norm="rmsnorm", norm_weights=False)}


def flags(values: dict) -> list[str]:
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


def train_seconds(records: list[dict]) -> dict[int, float]:
    """step -> training seconds up to that step, from the ms/step of each logged window."""
    seconds, previous, total = {}, 0, 0.0
    for r in records:
        if "ms_per_step" in r:
            total += r["ms_per_step"] * (r["step"] - previous) / 1000
            previous = r["step"]
        seconds[r["step"]] = total
    return seconds


def run_recipe(recipe: str, seed: int, args, out: str) -> list[dict]:
    """One train.py run; its evaluations as [{step, val_loss, seconds}]."""
    name = f"{recipe}-seed{seed}"
    shape = {**LAPTOP, "max_steps": args.max_steps}
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", recipe, "--run", name,
               "--save_model_dir", out, "--data_path", args.data_path, "--seed", str(seed), *flags(shape),
               "--eval_every", str(args.eval_every), "--log_every", str(args.eval_every),
               "--eval_batch_size", str(args.eval_windows), "--eval_max_batches", "1",
               "--sample_tokens", "0", "--save_model", "false", "--device", "cpu", "--torch_compile", "false",
               *shlex.split(args.extra)]
    print(f"[{name}] {shlex.join(command)}", file=sys.stderr, flush=True)
    if subprocess.run(command, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode:
        sys.exit(f"{name}: train.py failed; its log is {os.path.join(out, name, 'train.log')}")
    records = read_metrics(os.path.join(out, name, "metrics.jsonl"))
    seconds = train_seconds(records)
    return [{"step": r["step"], "val_loss": r["val_loss"], "seconds": seconds[r["step"]]}
            for r in records if "val_loss" in r]


def median_curve(runs: list[list[dict]]) -> list[dict]:
    return [{"step": rows[0]["step"], "val_loss": statistics.median(r["val_loss"] for r in rows),
             "seconds": statistics.median(r["seconds"] for r in rows)} for rows in zip(*runs)]


def piece_costs(args) -> list[tuple[str, float]]:
    """(piece, median ms per training step) for the Muon preset's laptop model, each piece alone on
    it, and the modern preset's, on one random batch. The models take turns, --piece_steps / 5
    steps at a time, so that a CPU's drifting clock and cache weigh on every row alike."""
    import numpy as np
    import torch

    from config import Config
    from data import IGNORE
    from model import ModelWithLoss, Transformer
    from optimizer import build_optimizers

    rows = [("none (shakespeare_char)", {})] + list(PIECES.items()) + [(f"all ({MODERN})", None)]
    setups = []
    for label, extra in rows:
        values = {**PRESETS[MODERN], **LAPTOP} if extra is None else {**PRESETS[MUON], **LAPTOP, **extra}
        cfg = Config(**values).validate()
        torch.manual_seed(0)
        model = ModelWithLoss(Transformer(cfg, 65), None, IGNORE).train()
        setups.append((model, build_optimizers(model.model, cfg)))
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randint(65, (LAPTOP["batch_size"], LAPTOP["context_len"]), generator=generator) for _ in range(2))
    times: list[list[float]] = [[] for _ in rows]

    def step(model, optimizers) -> float:
        start = time.perf_counter()
        loss, _ = model(x, y)
        (loss / y.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return 1000 * (time.perf_counter() - start)

    for setup in setups:  # warm-up, left out
        for _ in range(3):
            step(*setup)
    turn = max(1, args.piece_steps // 5)
    for _ in range(5):
        for row, setup in enumerate(setups):
            times[row] += [step(*setup) for _ in range(turn)]
    return [(label, float(np.median(t))) for (label, _), t in zip(rows, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=f"{YARDSTICK},{MUON},{MODERN}", help="presets, in order; the first is the yardstick")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data_path", default="data/tiny_shakespeare.txt")
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_windows", type=int, default=512, help="fixed validation windows of context 64 per eval")
    parser.add_argument("--target", type=float, default=0.0, help="val loss to reach (0: where the yardstick ends)")
    parser.add_argument("--piece_steps", type=int, default=30, help="timed steps per piece (0: skip the piece costs)")
    parser.add_argument("--out", default="", help="directory for the runs and the plot (default runs/bench-small-lm-<time>)")
    parser.add_argument("--extra", default="", help="more train.py flags for every run")
    args = parser.parse_args()
    recipes = recipes_and_corpus(parser, args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = args.out or os.path.join("runs", time.strftime("bench-small-lm-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)

    runs = {name: [run_recipe(name, seed, args, out) for seed in seeds] for name in recipes}
    curves = {name: median_curve(r) for name, r in runs.items()}
    yardstick = recipes[0]
    target = args.target or curves[yardstick][-1]["val_loss"]

    print(f"nanoGPT's laptop recipe, {args.max_steps} steps; val loss every {args.eval_every} steps on "
          f"{args.eval_windows} fixed windows; medians over seeds {','.join(map(str, seeds))}; seconds: training only")
    print(f"{'step':>6}" + "".join(f"{name + ' s':>28}{'val':>8}" for name in recipes))
    for i, row in enumerate(curves[yardstick]):
        print(f"{row['step']:>6}" + "".join(f"{curves[n][i]['seconds']:>28.1f}{curves[n][i]['val_loss']:>8.4f}"
                                           for n in recipes if i < len(curves[n])))
    print(f"\ntarget: val loss {target:.4f}" + (" (where the yardstick ends)" if not args.target else ""))
    summary = {}
    for name in recipes:
        hits = [first_at_or_below(evals, target) for evals in runs[name]]
        for seed, hit, evals in zip(seeds, hits, runs[name]):
            reached = f"step {hit['step']:>5}, {hit['seconds']:6.1f} s" if hit else "not reached    "
            print(f"  {name:<24} seed {seed}: {reached} · ends {evals[-1]['val_loss']:.4f} after "
                  f"{evals[-1]['seconds']:.1f} s · best {min(r['val_loss'] for r in evals):.4f}")
        steps = statistics.median(h["step"] if h else float("inf") for h in hits)
        seconds = statistics.median(h["seconds"] if h else float("inf") for h in hits)
        summary[name] = dict(steps=steps, seconds=seconds, end=statistics.median(e[-1]["val_loss"] for e in runs[name]),
                             total=statistics.median(e[-1]["seconds"] for e in runs[name]))
        s = summary[name]
        print(f"  {name:<24} median: target at step {s['steps']}, {s['seconds']:.1f} s · ends {s['end']:.4f} · "
              f"{s['total']:.1f} s for {args.max_steps} steps ({1000 * s['total'] / args.max_steps:.1f} ms/step)")
    if MODERN in summary and yardstick == YARDSTICK:
        m, y = summary[MODERN], summary[YARDSTICK]
        print(f"\n{MODERN} against the yardstick: target in {m['steps']} steps (a quarter of {args.max_steps} is "
              f"{args.max_steps / 4:.0f}: {'yes' if m['steps'] <= args.max_steps / 4 else 'NO'}), "
              f"{m['seconds']:.1f} s (a third of {y['total']:.1f} s is {y['total'] / 3:.1f}: "
              f"{'yes' if m['seconds'] <= y['total'] / 3 else 'NO'})")
        if MUON in summary:
            print(f"{MODERN} ends at {m['end']:.4f}, {MUON} at {summary[MUON]['end']:.4f}: "
                  f"{'lower' if m['end'] < summary[MUON]['end'] else 'NOT lower'}")
    path = os.path.join(out, "small_lm_speed.png")
    plot(curves, target, path, seconds="seconds", seconds_label="training seconds (evaluations left out)",
         y_label="val loss (median of seeds)",
         title="tiny-shakespeare, char level, nanoGPT's laptop shape (4 x 4 x 128, context 64, batch 12), CPU")
    print(f"plot: {path}")
    if args.piece_steps:
        print(f"\nstep time of each piece alone on {MUON} at the laptop shape (median of {args.piece_steps} steps "
              f"in 5 turns, this process, {os.cpu_count()} CPUs):")
        costs = piece_costs(args)
        base = costs[0][1]
        for label, ms in costs:
            print(f"  {label:<32} {ms:7.1f} ms/step  {100 * (ms / base - 1):+6.1f} %")


if __name__ == "__main__":
    main()
