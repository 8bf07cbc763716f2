"""The GPU check: what only a GPU shows, in one command and one table (under 8 minutes on one H100).

    python bench/gpu.py                                  # on a GPU box; paste the table into docs/benchmarks.md
    python bench/gpu.py --smoke                          # tiny shapes on a CPU: the script itself still works

Rows, each measured in this one run:

  GPT-2 small MFU      GPT-2 small (124M, context 1024), compiled, bf16: train.py's step against the
                       nanoGPT-style step on the same weights (bench/throughput.py's two loops), at
                       two batch sizes.
  shakespeare_char_modern
                       train.py itself for a fixed number of steps (compiled on a GPU): ms/step as
                       its log reports it and the val loss at the last step, on tiny-shakespeare.
  attention kernel     which scaled_dot_product_attention kernel a training step of each architecture
                       really ran (read from the profiler), so that a silent fallback to the math
                       kernel shows: GPT-2, the 2026 pieces, grouped-query attention, a gated MLP, and
                       an attention sink (which needs a mask, so no flash kernel: expected).
  SAE rows/s           one training step of every SAE kind (sae.update) on random rows, d_model 768.
  sampling             model.generate's tokens/s with the KV cache and without (the loop sample.py runs).
  data loader          tokens/s of train.py's text loader (bench/throughput.py's measure_loader).
  largest Llama shape  the largest Llama-family shape (8B, 3B, 1B, TinyLlama) whose fine-tune step
                       train.py fits on this card, without and with --activation_checkpointing:
                       tok/s, MFU and peak memory (an out-of-memory start says which, in train.py's
                       own words).

Without a GPU, --smoke runs the same code on tiny shapes in eager float32: the extended test tier runs
it that way (tests/test_bench.py), so the script cannot rot between the days a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import os
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the project: bench/corpus.py is not corpus.py
import torch  # noqa: E402

from plumbing import hardware  # noqa: E402
import saes  # noqa: E402
from saes.base import update  # noqa: E402
from saes.config import SAEConfig  # noqa: E402
import train  # noqa: E402
from config import PRESETS, Config, ConfigError  # noqa: E402
from model import Transformer  # noqa: E402
from sampling import timed_generate  # noqa: E402
from throughput import GPT2_SMALL, measure_loader, measure_training, synchronize  # noqa: E402
from plumbing.tracking import read_metrics  # noqa: E402

SHARED_CORPUS = os.path.join(ROOT, "..", "shared", "data", "tiny_shakespeare.txt")

# The kernels scaled_dot_product_attention dispatches to, as the profiler names them.
KERNELS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
           "_scaled_dot_product_cudnn_attention": "cuDNN", "_scaled_dot_product_efficient_attention": "memory-efficient",
           "_scaled_dot_product_attention_math": "math", "_scaled_dot_product_fused_attention_overrideable": "fused"}

ARCHITECTURES = {  # name: (preset, changes, the kernel family it must not fall back from)
    "GPT-2 (layernorm, learned positions)": ("shakespeare_char", {}),
    "2026 pieces (rope, QK-norm, relu², soft cap)": ("shakespeare_char_modern", {}),
    "grouped-query attention (6 heads, 2 kv)": ("shakespeare_char_modern", {"num_kv_heads": 2}),
    "gated MLP (swiglu)": ("shakespeare_char_modern", {"activation": "swiglu"}),
    "attention sink (a mask: no flash, expected)": ("shakespeare_char", {"attention_sink": True}),
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # progress on stderr; the table on stdout


class Table:
    """Rows of (what, setting, tinylab, yardstick or note), printed as one markdown table."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, what: str, setting: str, ours: str, other: str = "") -> None:
        self.rows.append((what, setting, ours, other))
        say(f"  {what} · {setting}: {ours}" + (f" · {other}" if other else ""))

    def print(self) -> None:
        print("| what | setting | tinylab | yardstick, or what it means |")
        print("| --- | --- | --- | --- |")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def gpt2_rows(table: Table, args, device, dtype) -> None:
    cfg = dataclasses.replace(Config(), **GPT2_SMALL)
    vocab = 50304
    if args.smoke:
        cfg = dataclasses.replace(cfg, num_blocks=2, num_heads=2, embedding_dim=64, mlp_dim=256, context_len=64)
        vocab = 512
    cfg = cfg.validate()
    timing = types.SimpleNamespace(warmup=args.warmup, steps=args.steps, compile_mode=None, profile=0)
    name = "GPT-2 small" if not args.smoke else "GPT-2 shape (smoke: 2 x 64)"
    for batch in args.gpt2_batches:
        results = {}
        for loop in ("tinylab", "nanogpt"):
            say(f"[{name}, {loop}, batch {batch}, compile {args.compile}]")
            try:
                results[loop] = measure_training(cfg, vocab, loop, args.compile, batch, timing, device, dtype, name)
            except Exception as e:  # out of memory, a compiler missing: the row says so, the check goes on
                results[loop] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            finally:
                gc.collect()
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        cells = [r if isinstance(r, str) else
                 (f"{r['mfu']:.1%} MFU · " if r["mfu"] is not None else "") + f"{r['ms_per_step']:.1f} ms/step · "
                 f"{r['tokens_per_sec']:,.0f} tok/s · {r['peak_mib']:,.0f} MiB" for r in (results["tinylab"], results["nanogpt"])]
        table.add(f"{name}, {'compiled' if args.compile else 'eager'} {str(dtype).replace('torch.', '')}",
                  f"batch {batch} x {cfg.context_len}", cells[0], "nanoGPT loop: " + cells[1])


def shakespeare_row(table: Table, args, device) -> None:
    steps = args.shakespeare_steps
    with tempfile.TemporaryDirectory() as out:
        argv = ["--preset", "shakespeare_char_modern", "--data_path", args.data_path, "--save_model_dir", out,
                "--run_name", "check", "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", "0",
                "--sample_tokens", "0", "--device", device.type, "--torch_compile", str(args.compile).lower()]
        if args.smoke:
            argv += ["--num_blocks", "1", "--embedding_dim", "32", "--num_heads", "2", "--context_len", "32",
                     "--batch_size", "8", "--eval_max_batches", "2", "--log_every", "1"]
        say(f"[train.py --preset shakespeare_char_modern, {steps} steps]")
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its own log goes to its run directory
            train.main(argv)
        seconds = time.perf_counter() - started
        records = read_metrics(os.path.join(out, "check", "metrics.jsonl"))
    times = [r["ms_per_step"] for r in records if "ms_per_step" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    table.add("shakespeare_char_modern (train.py)", f"{steps} steps{', compiled' if args.compile else ''}",
              f"{times[-1]:.1f} ms/step · val loss {val[-1]:.3f} at step {steps}",
              f"{seconds:.0f} s in all, start-up and compilation included")


def attention_kernels(model: Transformer, tokens: torch.Tensor, device, dtype) -> list[str]:
    """The attention kernels one forward and backward of `model` dispatched to, by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with hardware.autocast(device, dtype):
            logits = model(tokens)
        logits.float().square().mean().backward()
    names = {event.key.removeprefix("aten::") for event in profiler.key_averages()}
    return sorted({label for kernel, label in KERNELS.items() if kernel in names})


def kernel_rows(table: Table, args, device, dtype) -> None:
    for name, (preset, changes) in ARCHITECTURES.items():
        cfg = dataclasses.replace(Config(), **{**PRESETS[preset], **changes, "dropout": 0.0})
        if args.smoke:
            cfg = dataclasses.replace(cfg, num_blocks=1, embedding_dim=48, num_heads=6, context_len=32)
        cfg = cfg.validate()
        torch.manual_seed(0)
        model = Transformer(cfg, 65).to(device)
        tokens = torch.randint(65, (4, cfg.context_len), device=device)
        kernels = attention_kernels(model, tokens, device, dtype)
        fused = bool(kernels) and "math" not in kernels
        table.add(f"attention kernel: {name}", f"{str(dtype).replace('torch.', '')}, training step",
                  ", ".join(kernels) or "none found", "fused" if fused else "NOT FUSED: falls back to the math kernel")


def sae_rows(table: Table, args, device) -> None:
    d, width, rows = (768, 24576, 4096) if not args.smoke else (32, 256, 512)
    x = torch.randn(rows, d, device=device)
    for arch in saes.ARCHS:
        cfg = SAEConfig(arch=arch, k=32 if not args.smoke else 8)
        torch.manual_seed(0)
        sae = saes.build_sae(d, width, arch, cfg.k).to(device)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
        step = lambda: update(sae, optimizer, x, cfg, cfg.l1_coefficient, None)  # noqa: E731
        for _ in range(args.warmup + 1):
            step()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - started) / args.steps
        table.add(f"SAE {arch}", f"d {d}, {width:,} features, {rows:,} rows a step", f"{rows / seconds:,.0f} rows/s",
                  f"{1000 * seconds:.1f} ms/step")


def sampling_row(table: Table, args, device) -> None:
    cfg = Config(**PRESETS["shakespeare_char_modern"])
    tokens = 256
    if args.smoke:
        cfg, tokens = dataclasses.replace(cfg, num_blocks=1, embedding_dim=32, num_heads=2, context_len=32), 16
    torch.manual_seed(0)
    model = Transformer(cfg.validate(), 65).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    timed_generate(model, prompt, 8, True, device)  # warm-up: first calls allocate
    timed_generate(model, prompt, 8, False, device)
    cached, cached_s = timed_generate(model, prompt, tokens, True, device)
    plain, plain_s = timed_generate(model, prompt, tokens, False, device)
    same = "the same tokens" if torch.equal(cached, plain) else "DIFFERENT tokens"
    table.add("sampling (model.generate)", f"shakespeare_char_modern shape, {tokens} tokens",
              f"{tokens / cached_s:,.0f} tok/s cached", f"{tokens / plain_s:,.0f} tok/s uncached "
              f"({plain_s / cached_s:.1f}x); {same}")


def loader_row(table: Table, args, device) -> None:
    line = measure_loader(args.data_path, 64 if not args.smoke else 8, args.loader_batches, device)
    tokens_per_sec, rest = line.split(": ", 1)[1].split(" · ", 1)
    table.add("data loader (text, char)", line.split(" (", 1)[1].split(")", 1)[0], tokens_per_sec, rest.split(" · source")[0])


# Llama-family shapes, largest first: embedding, blocks, heads, key/value heads, MLP width, vocabulary, tied.
LLAMA_SHAPES = {
    "Llama-3.1-8B": (4096, 32, 32, 8, 14336, 128256, False),
    "Llama-3.2-3B": (3072, 28, 24, 8, 8192, 128256, True),
    "Llama-3.2-1B": (2048, 16, 32, 8, 8192, 128256, True),
    "TinyLlama-1.1B": (2048, 22, 32, 4, 5632, 32000, False),
}
SMOKE_SHAPES = {"smoke 2 x 64": (64, 2, 4, 2, 128, 512, False), "smoke 1 x 32": (32, 1, 2, 1, 64, 256, True)}


def largest_shape_rows(table: Table, args, device) -> None:
    """The largest Llama-family shape whose fine-tune step fits this one card, as train.py runs it (the
    whole model, as every DDP rank holds it; then with --activation_checkpointing): the shapes are tried
    largest first, and one that runs out of memory in its first step is told apart by train.py's own
    out-of-memory message. --fsdp on one card has nothing to shard (one process keeps the whole model):
    its saving needs two or more GPUs."""
    shapes = SMOKE_SHAPES if args.smoke else LLAMA_SHAPES
    context, batch, steps = (32, 2, 3) if args.smoke else (2048, 4, 6)
    for setting, flags in (("whole model (each DDP rank's)", []),
                           ("+ --activation_checkpointing", ["--activation_checkpointing"])):
        tried = []
        for name, (width, blocks, heads, kv, mlp, vocab, tied) in shapes.items():
            argv = ["--preset", "shakespeare_char_modern", "--data_path", args.data_path, "--run_name", "largest",
                    "--embedding_dim", str(width), "--num_blocks", str(blocks), "--num_heads", str(heads),
                    "--num_kv_heads", str(kv), "--mlp_dim", str(mlp), "--vocab_size", str(vocab), "--activation",
                    "swiglu", "--norm", "rmsnorm", "--positional", "rope", "--qk_norm", "false", "--bias", "false",
                    "--logit_softcap", "0", "--tie_embeddings", str(tied).lower(), "--use_muon", "false",
                    "--dropout", "0", "--context_len", str(context), "--batch_size", str(batch), "--max_steps",
                    str(steps), "--eval_every", str(steps), "--eval_max_batches", "1", "--log_every", "1",
                    "--save_model", "false", "--sample_tokens", "0", "--device", device.type, *flags]
            say(f"[{name}, {setting}: train.py, {steps} steps of {batch} x {context} tokens]")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with tempfile.TemporaryDirectory() as out:
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        train.main(argv + ["--save_model_dir", out])
                    records = [r for r in read_metrics(os.path.join(out, "largest", "metrics.jsonl"))
                               if "tokens_per_sec" in r]
                except ConfigError as e:
                    if "out of memory" not in str(e):
                        raise
                    tried.append(f"{name}: out of memory")
                    records = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if records:
                last = records[-1]
                peak = (f" · {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB at the peak"
                        if device.type == "cuda" else "")
                mfu = f"{last['mfu']:.1%} MFU · " if "mfu" in last else ""
                table.add(f"largest Llama shape on one card, {setting}", f"batch {batch} x {context}, AdamW, eager",
                          f"{name}: {mfu}{last['tokens_per_sec']:,.0f} tok/s{peak}", "; ".join(tried) or
                          "the largest tried")
                break
        else:
            table.add(f"largest Llama shape on one card, {setting}", f"batch {batch} x {context}, AdamW, eager",
                      "none fits", "; ".join(tried))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, eager float32: checks the script on a CPU")
    parser.add_argument("--data_path", default=SHARED_CORPUS if os.path.isfile(SHARED_CORPUS) else
                        "data/tiny_shakespeare.txt", help="tiny-shakespeare (the char run and the loader read it)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    if not os.path.isfile(args.data_path):
        parser.error(f"--data_path: {args.data_path} does not exist; copy tiny_shakespeare.txt there or name it")
    try:
        device = hardware.pick_device(args.device)
    except ConfigError as e:
        parser.error(str(e))
    if device.type != "cuda" and not args.smoke:
        parser.error("no GPU here: this check is for a GPU box (--smoke runs it on tiny shapes anywhere)")
    on_gpu = device.type == "cuda"
    dtype = hardware.pick_dtype("auto", device) if not args.smoke or on_gpu else torch.float32
    math = hardware.fast_math(device)
    args.compile = on_gpu and not args.smoke
    args.warmup, args.steps = (3, 20) if not args.smoke else (1, 2)
    args.gpt2_batches = (16, 32) if not args.smoke else (2, 4)
    args.shakespeare_steps = 500 if not args.smoke else 4
    args.loader_batches = 200 if not args.smoke else 5
    card = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"tinylab GPU check{' (smoke: tiny shapes)' if args.smoke else ''} · {card} · torch {torch.__version__}"
          f"{f' · CUDA {torch.version.cuda}' if on_gpu else ''} · {math}", flush=True)
    started = time.perf_counter()
    table = Table()
    for section in (lambda: gpt2_rows(table, args, device, dtype), lambda: shakespeare_row(table, args, device),
                    lambda: kernel_rows(table, args, device, dtype), lambda: sae_rows(table, args, device),
                    lambda: sampling_row(table, args, device), lambda: loader_row(table, args, device),
                    lambda: largest_shape_rows(table, args, device)):
        section()
        say(f"  ({time.perf_counter() - started:.0f} s so far)")
    table.print()
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
