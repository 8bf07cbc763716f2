"""What the hook points cost: nothing when unused, little when caching everything.

    python bench/hooks.py                                   # shakespeare_char and grokking shapes, CPU or GPU
    python bench/hooks.py --configs grokking --repeats 21
    python bench/hooks.py --device cuda --compile           # also the compiled pair

Two ratios per model shape, both measured on the same weights:

  unused hooks   forward+backward of our Transformer with no hooks attached, over the same of
                 bench/plain_gpt.py's PlainGPT: our arithmetic with every hook call deleted.
                 Target <= 1.02.
  run_with_cache run_with_cache(tokens) caching every hook point (attention patterns and per-head
                 results included), over a plain forward of the same model, both under no_grad in
                 eval mode. Target <= 1.5.

Timing: the two sides of a ratio alternate, block after block (each leading every other time), and
each side's median over the blocks is taken, so drift in the machine's speed (turbo, other
processes) hits both alike. A block
is `--inner` calls (more for tiny models, whose calls take well under a millisecond).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from plumbing import hardware  # noqa: E402
from config import DTYPES, PRESETS, Config, ConfigError  # noqa: E402
from model import Transformer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_gpt import check_same_function, plain_copy  # noqa: E402

UNUSED_TARGET, CACHE_TARGET = 1.02, 1.5  # the two ratios' targets (module docstring)

SHAPES = {
    # name: (preset, vocab size, batch on CPU, batch on GPU, calls per timed block on CPU / GPU)
    "shakespeare_char": ("shakespeare_char", 65, 8, 64, (1, 10)),
    "grokking": ("grokking", 114, 3830, 3830, (20, 50)),  # the full training batch of p = 113, 30 %
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def alternate(first, second, repeats: int, inner: int, device) -> tuple[float, float]:
    """Median seconds per call of first() and second(), timed in alternating blocks of `inner` calls."""
    times = ([], [])
    for fn in (first, second):  # warm-up: allocator caches, kernels, compilation
        for _ in range(2):
            fn()
    for repeat in range(repeats):
        order = ((0, first), (1, second)) if repeat % 2 == 0 else ((1, second), (0, first))  # neither always leads
        for side, fn in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(inner):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[side].append((time.perf_counter() - started) / inner)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(name: str, args, device, dtype) -> list[str]:
    preset, vocab_size, cpu_batch, gpu_batch, inners = SHAPES[name]
    cfg = dataclasses.replace(Config(), **PRESETS[preset]).validate()
    on_gpu = device.type == "cuda"
    batch = args.batch_size or (gpu_batch if on_gpu else cpu_batch)
    inner = args.inner or inners[on_gpu]
    torch.manual_seed(0)
    ours = Transformer(cfg, vocab_size).to(device)
    plain = plain_copy(ours, cfg, vocab_size)
    difference = check_same_function(ours, plain, vocab_size, cfg.context_len)
    tokens = torch.randint(vocab_size, (batch, cfg.context_len), device=device)
    targets = torch.randint(vocab_size, (batch, cfg.context_len), device=device)
    say(f"[{name}: batch {batch} x {cfg.context_len}, {inner} calls per block, {args.repeats} blocks per side; "
        f"same function: max logit difference {difference:.1e} of the largest]")

    def train_step(model):
        def step():
            with hardware.autocast(device, dtype):
                logits = model(tokens)
            F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
            for p in model.parameters():
                p.grad = None
        return step

    pairs = [("eager", ours, plain)]
    if args.compile:
        pairs.append(("compiled", torch.compile(ours), torch.compile(plain)))
    rows = []
    for mode, a, b in pairs:
        ours.train(), plain.train()
        say(f"  {mode}: forward+backward, ours (no hooks) vs plain")
        t_ours, t_plain = alternate(train_step(a), train_step(b), args.repeats, inner, device)
        rows.append(row(name, mode, "fwd+bwd, no hooks / plain", t_ours, t_plain, UNUSED_TARGET))

    ours.eval()

    @torch.no_grad()
    def forward():
        with hardware.autocast(device, dtype):
            ours(tokens)

    @torch.no_grad()
    def cached():
        with hardware.autocast(device, dtype):
            ours.run_with_cache(tokens)

    say("  run_with_cache (every hook point) vs forward, no_grad, eval")
    t_cache, t_forward = alternate(cached, forward, args.repeats, inner, device)
    rows.append(row(name, "eager", "run_with_cache (all) / forward", t_cache, t_forward, CACHE_TARGET))
    return rows


def row(name: str, mode: str, what: str, seconds: float, base: float, target: float) -> str:
    """One line of the table; the verdict is this row's ratio against its target."""
    ratio = seconds / base
    return (f"{name:<17}{mode:<10}{what:<34}{1000 * seconds:>10.2f}{1000 * base:>10.2f}{ratio:>8.3f}"
            f"{f'<= {target:g}':>9}{'met' if ratio <= target else 'MISSED':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="shakespeare_char,grokking", help=f"shapes: {', '.join(SHAPES)}")
    parser.add_argument("--batch_size", type=int, default=0, help="sequences per call for every shape (0: per shape)")
    parser.add_argument("--repeats", type=int, default=11, help="timed blocks per side (the median is reported)")
    parser.add_argument("--inner", type=int, default=0, help="calls per timed block (0: per shape and device)")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="autocast dtype (auto: bf16 on capable GPUs)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in SHAPES:
            parser.error(f"--configs: {n!r} is not one of {', '.join(SHAPES)}")
    if args.repeats < 1 or args.inner < 0 or args.batch_size < 0:
        parser.error("--repeats must be at least 1; --inner and --batch_size 0 or more")
    try:
        device = hardware.pick_device(args.device)
    except ConfigError as e:
        parser.error(str(e))
    dtype = hardware.pick_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.set_flush_denormal(True)
    gpu = f" · {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__} · device {device}{gpu} · dtype {str(dtype).replace('torch.', '')} · "
          f"{os.cpu_count()} CPUs · {torch.get_num_threads()} torch threads", flush=True)
    rows = []
    for name in names:
        rows += measure(name, args, device, dtype)
    print(f"{'config':<17}{'mode':<10}{'ratio':<34}{'ms':>10}{'ms base':>10}{'ratio':>8}{'target':>9}{'':>8}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
