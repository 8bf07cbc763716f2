"""Training throughput of our transformer: tokens/s, ms/step, peak memory and (on known GPUs) MFU.

    python bench/throughput.py                                  # both shapes, compile off and on
    python bench/throughput.py --configs shakespeare_char --compile off --steps 5
    python bench/throughput.py --device cuda --batch_size 32    # one batch size for every row

Rows: the `shakespeare_char` preset (6 x 6 x 384, context 256, batch 64, dropout 0.2 as trained)
and a GPT-2-small shape (12 x 12 x 768, mlp 3072, context 1024, vocab 50304, tied, dropout 0),
each eager and under torch.compile, each with two loops on the same weights and batch:

  tinylab  train.py's step: model.ModelWithLoss (forward under autocast, fp32 cross-entropy, the
           count of correct predictions) compiled whole, backward, clip_grad_norm_, our
           optimizers (AdamW, plus Muon where the preset uses it), zero_grad.
  nanogpt  the yardstick: nanoGPT's step on bench/plain_gpt.py's model (ours minus the hooks),
           forward+mean loss compiled whole, backward, clip, one AdamW (fused on CUDA).

The batch is fixed and random: the data loader is timed on its own, below the table.

ms/step and tokens/s average the timed steps only; the warm-up steps before them are left out.
"1st step s" is the first warm-up step's wall time: under compile it includes compiling forward
and backward, so the eager row beside it shows what compilation cost. Inductor keeps compiled
kernels on disk (/tmp/torchinductor_$USER), so a second run of this script compiles faster.
Peak memory is torch.cuda.max_memory_allocated on CUDA; on a CPU it is the peak resident memory
of the whole process during the row (torch itself included), which says less.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from data import IGNORE  # noqa: E402
from plumbing import distributed  # noqa: E402
from plumbing import hardware  # noqa: E402
from config import DTYPES, PRESETS, Config, ConfigError  # noqa: E402
from model import ModelWithLoss, Transformer  # noqa: E402
from optimizer import build_optimizers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_gpt import PlainWithLoss, plain_copy  # noqa: E402

SHAKESPEARE_CHAR_VOCAB = 65  # distinct characters in tiny-shakespeare
GPT2_SMALL = dict(  # GPT-2 small (124M), with the vocabulary padded to a multiple of 64 as nanoGPT does
    task="text", tokenizer="gpt2", num_blocks=12, num_heads=12, embedding_dim=768, mlp_dim=3072,
    context_len=1024, norm="layernorm", activation="gelu", tie_embeddings=True, bias=True,
    dropout=0.0, use_muon=False, lr=6e-4, weight_decay=0.1, beta2=0.95,
)


def shape(name: str, on_gpu: bool) -> tuple[Config, int, int]:
    """(config, vocab size, default batch) of a row. GPT-2 small gets batch 1 off a GPU: one
    1,024-token sequence already takes seconds per step on a 2-core CPU."""
    if name == "shakespeare_char":
        cfg = dataclasses.replace(Config(), **PRESETS["shakespeare_char"])
        return cfg.validate(), SHAKESPEARE_CHAR_VOCAB, cfg.batch_size
    cfg = dataclasses.replace(Config(), **GPT2_SMALL)
    return cfg.validate(), 50304, 16 if on_gpu else 1


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # progress on stderr, so stdout is just the report


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set, to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # then peak_memory_mib falls back to the peak since the process started


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
        return kib / (2**20 if sys.platform == "darwin" else 1024)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(cfg: Config, vocab_size: int, loop: str, compiled: bool, batch: int, args, device, dtype,
                     title: str = "") -> dict:
    """Builds the model and optimizers of one row, runs warm-up + timed steps, returns the figures.
    args: warmup, steps, compile_mode and profile, as this script's flags."""
    T = cfg.context_len
    reset_peak_memory(device)
    torch.manual_seed(0)
    raw_model = ours = Transformer(cfg, vocab_size).to(device)
    x = torch.randint(vocab_size, (batch, T), device=device)
    y = torch.randint(vocab_size, (batch, T), device=device)
    num_params, flops_params = ours.num_params(), ours.num_params(exclude_embeddings=True)
    if loop == "tinylab":
        model = ModelWithLoss(raw_model, None, IGNORE)
        optimizers = build_optimizers(raw_model, cfg)
    else:  # nanoGPT's loop: its model (ours minus the hooks) computing the mean loss, one AdamW
        raw_model = plain_copy(ours, cfg, vocab_size)
        del ours  # so that peak memory counts one copy of the weights
        gc.collect()
        reset_peak_memory(device)
        model = PlainWithLoss(raw_model)
        optimizers = [torch.optim.AdamW(
            [{"params": [p for p in raw_model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in raw_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None)]
    model = torch.compile(model, mode=args.compile_mode) if compiled else model
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def tinylab_step():  # train.py's step, with one micro-batch and no DDP
        with hardware.autocast(device, dtype):
            loss, correct = model(x, y)  # train.py counts train_acc every step, so do we
        scaler.scale(loss / y.numel()).backward()
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        return correct

    def nanogpt_step():  # nanoGPT's train.py with one micro-batch: forward+loss, backward, clip, step
        with hardware.autocast(device, dtype):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizers[0])
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        scaler.step(optimizers[0])
        scaler.update()
        optimizers[0].zero_grad(set_to_none=True)
        return loss

    train_step = tinylab_step if loop == "tinylab" else nanogpt_step

    warmup_seconds = []
    for i in range(args.warmup):
        say(f"  warm-up step {i + 1}/{args.warmup}" + (" (compiling: may take a minute)" if compiled and i == 0 else ""))
        synchronize(device)
        started = time.perf_counter()
        train_step()
        synchronize(device)
        warmup_seconds.append(time.perf_counter() - started)
        say(f"    {warmup_seconds[-1]:.1f} s")
    synchronize(device)
    started = time.perf_counter()
    for i in range(args.steps):
        train_step()
        if device.type != "cuda":  # on a GPU a step returns before its kernels finish: no per-step time
            say(f"  timed step {i + 1}/{args.steps}: {time.perf_counter() - started:.1f} s so far")
    synchronize(device)
    seconds = time.perf_counter() - started
    if args.profile:
        profile(train_step, args.profile, device, f"{title}, {loop}, compile {'on' if compiled else 'off'}")

    tokens_per_sec = batch * T * args.steps / seconds
    ms_per_step = 1000 * seconds / args.steps
    peak = hardware.peak_flops(device)
    flops = hardware.flops_per_token(flops_params, cfg.num_blocks,
                                  cfg.num_heads, cfg.embedding_dim // cfg.num_heads, T)
    return {
        "params": num_params, "ms_per_step": ms_per_step, "tokens_per_sec": tokens_per_sec,
        "mfu": flops * tokens_per_sec / peak if peak else None,
        "first_step_seconds": warmup_seconds[0] if warmup_seconds else None,
        "peak_mib": peak_memory_mib(device),
    }


def profile(train_step, steps: int, device: torch.device, title: str) -> None:
    """torch.profiler over `steps` more steps: the operators and kernels that took the time, to stderr."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            train_step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    say(f"--- profile of {steps} steps: {title} (sorted by {sort_by})")
    say(profiler.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=60))


def measure_loader(path: str, batch: int, num_batches: int, device: torch.device) -> str:
    """tokens/s of tasks.text.TextData.train_batches on the char task: windows cut, stacked, moved.

    The text is linked into a scratch directory first: data.py writes its token cache beside the
    text, and a benchmark should leave nothing behind (nor find a cache from an earlier run).
    """
    source = f"real corpus {path}"
    with tempfile.TemporaryDirectory() as scratch:
        if os.path.isfile(path):
            os.symlink(os.path.abspath(path), os.path.join(scratch, "corpus.txt"))
            path = os.path.join(scratch, "corpus.txt")
        else:
            # Random characters, not Shakespeare: the loader's speed depends on the corpus size and
            # the window shape, not on what the characters say.
            synthetic = os.path.join(scratch, "random.txt")
            alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-\n"))
            with open(synthetic, "w") as f:
                f.write("".join(np.random.default_rng(0).choice(alphabet, 1_115_394)))
            source = f"synthetic random text, 1.1 MB ({path} is missing)"
            path = synthetic
        cfg = dataclasses.replace(Config(), **PRESETS["shakespeare_char"])
        cfg = dataclasses.replace(cfg, data_path=path, batch_size=batch).validate()
        started = time.perf_counter()
        text_data = data.build_data(cfg, distributed.Dist(), device)
        build_seconds = time.perf_counter() - started
        text_data.train_batches(0)  # first touch of the token memmap and of pinned memory
        synchronize(device)
        started = time.perf_counter()
        for step in range(1, num_batches + 1):
            text_data.train_batches(step)
        synchronize(device)
        seconds = time.perf_counter() - started
    tokens_per_sec = batch * cfg.context_len * num_batches / seconds
    return (f"data loader (text, char, batch {batch} x {cfg.context_len} to {device}): "
            f"{tokens_per_sec:,.0f} tokens/s · {1000 * seconds / num_batches:.2f} ms/batch over "
            f"{num_batches} batches · build_data (tokenise, cache) {build_seconds:.2f} s · source: {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="shakespeare_char,gpt2", help="rows: shakespeare_char, gpt2")
    parser.add_argument("--compile", default="both", choices=("both", "on", "off"), help="torch.compile rows")
    parser.add_argument("--loops", default="tinylab,nanogpt",
                        help="tinylab (train.py's step) and/or nanogpt (a plain nanoGPT-style model and loop)")
    parser.add_argument("--compile_mode", default=None, choices=(None, "default", "reduce-overhead", "max-autotune",
                                                                  "max-autotune-no-cudagraphs"),
                        help="torch.compile's mode for the compiled rows")
    parser.add_argument("--profile", type=int, default=0, help="after each row, profile N more steps (table on stderr)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per row (0: 20 on CUDA, 3 elsewhere)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps first (-1: 3 on CUDA, 1 elsewhere)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="sequences per step for every row (0: 64 for shakespeare_char; gpt2 16 on CUDA, 1 elsewhere)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="autocast dtype (auto: bf16 on capable GPUs)")
    parser.add_argument("--data_path", default="data/tiny_shakespeare.txt", help="text file for the loader figure")
    parser.add_argument("--loader_batches", type=int, default=200, help="batches drawn to time the loader (0: skip)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in ("shakespeare_char", "gpt2"):
            parser.error(f"--configs: {n!r} is not one of shakespeare_char, gpt2")
    loops = [n.strip() for n in args.loops.split(",") if n.strip()]
    for n in loops:
        if n not in ("tinylab", "nanogpt"):
            parser.error(f"--loops: {n!r} is not one of tinylab, nanogpt")
    try:
        device = hardware.pick_device(args.device)
    except ConfigError as e:
        parser.error(str(e))
    dtype = hardware.pick_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    args.steps = args.steps or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup >= 0 else (3 if on_gpu else 1)
    if args.steps < 0 or args.warmup < -1:
        parser.error("--steps and --warmup count steps: 0 or more (0 / -1 pick the defaults)")
    if args.compile != "off" and args.warmup == 0:
        args.warmup = 1  # compilation must not land inside the timed steps

    gpu = f" · {torch.cuda.get_device_name(device)}" if on_gpu else ""
    print(f"torch {torch.__version__} · device {device}{gpu} · dtype {str(dtype).replace('torch.', '')} · "
          f"{os.cpu_count()} CPUs · {torch.get_num_threads()} torch threads · "
          f"{args.warmup} warm-up + {args.steps} timed steps per row", flush=True)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = (f"{'config':<17}{'loop':<9}{'compile':<9}{'batch x ctx':>12}{'params':>9}{'ms/step':>11}{'tokens/s':>11}"
              f"{'MFU':>7}{'1st step s':>12}{'peak MiB':>10}")
    rows = []
    for name in names:
        batch = args.batch_size or shape(name, on_gpu)[2]
        for compiled, loop in [(c, lp) for c in {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
                               for lp in loops]:
            say(f"[{name}, {loop}, compile {'on' if compiled else 'off'}, batch {batch}]")
            cfg, vocab_size, _ = shape(name, on_gpu)
            lead = f"{name:<17}{loop:<9}{'on' if compiled else 'off':<9}{f'{batch} x {cfg.context_len}':>12}"
            try:
                r = measure_training(cfg, vocab_size, loop, compiled, batch, args, device, dtype, name)
                rows.append(lead + f"{r['params'] / 1e6:>8.1f}M{r['ms_per_step']:>11.1f}{r['tokens_per_sec']:>11,.0f}"
                            + (f"{r['mfu']:>7.1%}" if r["mfu"] is not None else f"{'-':>7}")
                            + (f"{r['first_step_seconds']:>12.1f}" if r["first_step_seconds"] is not None else f"{'-':>12}")
                            + f"{r['peak_mib']:>10,.0f}")
            except Exception as e:  # a compiler missing, out of memory, ...: report the row, go on
                reason = next((line for line in str(e).splitlines() if line.strip()), "")[:160]
                rows.append(lead + f"   failed: {type(e).__name__}: {reason}")
                say(f"  failed: {type(e).__name__}: {reason}")
            finally:
                gc.collect()
                if compiled:
                    torch._dynamo.reset()
                if on_gpu:
                    torch.cuda.empty_cache()
    print(header)
    print("\n".join(rows), flush=True)
    if load_before is not None:  # CPU figures mean little if something else was using the cores
        print(f"load average (1 min): {load_before:.2f} before the rows, {os.getloadavg()[0]:.2f} after; "
              f"this process alone accounts for about {min(torch.get_num_threads(), os.cpu_count() or 1)}")
    print("peak MiB: " + ("torch.cuda.max_memory_allocated during the row (weights, optimizer state, activations)"
                          if on_gpu else "peak resident memory of the whole process during the row, torch's own "
                          "libraries and allocator caches included; MFU needs a known GPU"))
    if args.loader_batches:
        say("[data loader]")
        try:
            print(measure_loader(args.data_path, args.batch_size or PRESETS["shakespeare_char"]["batch_size"],
                                 args.loader_batches, device))
        except ConfigError as e:  # e.g. a --data_path that is not UTF-8 text
            print(f"data loader: failed: {e}")


if __name__ == "__main__":
    main()
