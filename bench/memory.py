"""Memory per rank of a Llama-shaped model of 1.1B parameters: DDP against FSDP (train.py --fsdp),
with and without activation checkpointing, on CPU processes over gloo.

    python bench/memory.py                        # both tables (the full shape on 4 ranks needs about 20 GB)
    python bench/memory.py --part state --ranks 2 # only the first table, two ranks
    python bench/memory.py --blocks 1 --steps 2   # the second table on a shallower model

The shape is TinyLlama-1.1B's: width 2048, 22 blocks, 32 query heads over 4 key/value heads of 64,
SwiGLU 5632, RMSNorm, rotary positions, no biases, untied embeddings, vocabulary 32,000
(1,100,048,384 parameters). Each step trains train.py's way: its model and loss module, its
optimizers (AdamW here: --use_muon false), its gradient clipping; batches are fixed random tokens
(--micro_batch sequences of --seq_len per rank).

Table 1, state per rank (--part state): the bytes of weights, gradients and AdamW's two moments that
one rank holds after a step at the full shape. FSDP: measured, each rank summing its own shards. DDP:
every rank holds the whole model's, counted from the model built on PyTorch's meta device (it
allocates nothing): a DDP run of this shape needs 17.6 GB per rank, and this 24 GB machine cannot hold
two. The last column is FSDP's share of DDP's: 1/N is the target.

Table 2, peak memory per rank (--part peak): Linux's high-water mark of resident memory (VmHWM) over
--steps steps, for a model of the same width and --blocks blocks (default 2, where DDP fits on 4 ranks
of this machine; the count is printed), DDP and FSDP, without and with activation checkpointing. Each
cell gives two peaks: over the forward and backward passes alone (where the activations kept for the
backward pass live, and so where checkpointing acts), then over whole steps (the optimizer step's
temporaries included). Both count everything the process holds: PyTorch itself (about 0.3 GB here),
the state, the activations and the gathered weights of the block running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

SHAPE = ["--embedding_dim", "2048", "--num_blocks", "22", "--num_heads", "32", "--num_kv_heads", "4",
         "--mlp_dim", "5632", "--activation", "swiglu", "--norm", "rmsnorm", "--positional", "rope", "--bias", "false",
         "--tie_embeddings", "false", "--use_muon", "false", "--task", "text", "--context_len", "2048"]
VOCAB = 32000
GB = 1e9


def build(blocks: int | None, checkpointing: bool, device="cpu", width: int = 2048):
    from config import parse_config
    from model import Transformer
    flags = SHAPE + (["--num_blocks", str(blocks)] if blocks else []) + (narrower(width) if width != 2048 else [])
    cfg, _ = parse_config(flags)
    with torch.device(device):
        model = Transformer(cfg, VOCAB)
    model.checkpoint_blocks = checkpointing
    return cfg, model


def narrower(width: int) -> list[str]:
    """The same family at another width: heads of 64, up to 4 key/value heads, SwiGLU 2.75 x width."""
    heads = max(1, width // 64)
    return ["--embedding_dim", str(width), "--num_heads", str(heads), "--num_kv_heads", str(min(4, heads)),
            "--mlp_dim", str(width * 11 // 4)]


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def state_bytes(model, optimizers) -> dict:
    params = {id(p): p for p in model.parameters()}.values()
    moments = [v for o in optimizers for s in o.state.values() for v in s.values()
               if torch.is_tensor(v) and v.numel() > 1]
    return {"weights": local_bytes(params), "gradients": local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": local_bytes(moments)}


def memory_status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the resident high-water mark
        f.write("5")


def worker(args) -> None:
    """One configuration on the ranks torchrun started; rank 0 writes every rank's figures to --out."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from model import ModelWithLoss
    from optimizer import build_optimizers
    from plumbing.sharding import shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg, model = build(args.blocks, args.checkpointing, width=args.width)
    if args.mode == "fsdp":
        shard(model, torch.device("cpu"), torch.float32)
    step_model = ModelWithLoss(model, None, -1)
    if args.mode == "ddp":
        step_model = DDP(step_model, broadcast_buffers=False)
    optimizers = build_optimizers(model, cfg)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randint(0, VOCAB, (args.micro_batch, args.seq_len), generator=generator)
    y = torch.randint(0, VOCAB, (args.micro_batch, args.seq_len), generator=generator)
    before = memory_status()["VmRSS"]
    reset_peak()
    whole = passes = 0  # the high-water marks of everything, and of the forward and backward passes alone
    for _ in range(args.steps):
        whole = max(whole, memory_status()["VmHWM"])
        reset_peak()  # the passes: where the activations kept for the backward pass live
        loss, _ = step_model(x, y)
        (loss / y.numel()).backward()
        passes = max(passes, memory_status()["VmHWM"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        state = state_bytes(model, optimizers)  # gradients are there until zero_grad
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    state["optimizer"] = state_bytes(model, optimizers)["optimizer"]
    whole = max(whole, passes, memory_status()["VmHWM"])
    mine = {"rank": rank, **state, "rss_before": before, "peak": whole, "passes": passes}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    # FSDP2 keeps the process group alive from C++ (plumbing/session.py's _exit): its gloo threads would
    # abort the interpreter's finalisation now and then, so the worker leaves without one.
    sys.stdout.flush()
    os._exit(0)


def launch(ranks: int, mode: str, blocks: int | None, checkpointing: bool, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   os.path.abspath(__file__), "--worker", "--mode", mode, "--out", out, "--steps", str(args.steps),
                   "--micro_batch", str(args.micro_batch), "--seq_len", str(args.seq_len), "--width", str(args.width)]
        command += (["--blocks", str(blocks)] if blocks else []) + (["--checkpointing"] if checkpointing else [])
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{mode} on {ranks} ranks failed:\n{result.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def ddp_state(blocks: int | None, width: int) -> dict:
    """What every DDP rank holds after a step: the whole model's weights and gradients, and AdamW's
    two moments of each weight, counted on the meta device."""
    _, model = build(blocks, False, device="meta", width=width)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"weights": weights, "gradients": weights, "optimizer": 2 * weights,
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["both", "state", "peak"], default="both")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--blocks", type=int, default=0, help="the model's depth (0: 22 in table 1, 2 in table 2)")
    parser.add_argument("--width", type=int, default=2048, help="another width of the same family (heads of 64)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; micro batch {args.micro_batch} x {args.seq_len} tokens "
          f"per rank, {args.steps} steps, AdamW, fp32")
    if args.part in ("both", "state"):
        full = ddp_state(args.blocks or None, args.width)
        shape = ("TinyLlama-1.1B's shape" if (args.blocks or 22, args.width) == (22, 2048)
                 else f"width {args.width}, {args.blocks or 22} blocks")
        print(f"\nState per rank after a step, {shape} ({full['parameters']:,} parameters), GB:\n")
        print("| ranks | DDP: weights + grads + AdamW | FSDP: weights | grads | AdamW | total | FSDP / DDP | 1/N |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        ddp_total = full["weights"] + full["gradients"] + full["optimizer"]
        for ranks in args.ranks:
            rows = launch(ranks, "fsdp", args.blocks or None, False, args)
            worst = max(rows, key=lambda r: r["weights"] + r["gradients"] + r["optimizer"])
            total = worst["weights"] + worst["gradients"] + worst["optimizer"]
            print(f"| {ranks} | {ddp_total / GB:.2f} | {worst['weights'] / GB:.2f} | {worst['gradients'] / GB:.2f} | "
                  f"{worst['optimizer'] / GB:.2f} | {total / GB:.2f} | {total / ddp_total:.3f} | {1 / ranks:.3f} |",
                  flush=True)
    if args.part in ("both", "peak"):
        blocks = args.blocks or 2
        small = ddp_state(blocks, args.width)
        print(f"\nPeak resident memory per rank over {args.steps} steps, the same width with {blocks} blocks "
              f"({small['parameters']:,} parameters), GB (the largest rank's), forward and backward / whole step:\n")
        print("| ranks | DDP | DDP + activation checkpointing | FSDP | FSDP + activation checkpointing |")
        print("| --- | --- | --- | --- | --- |")
        for ranks in args.ranks:
            cells = []
            for mode in ("ddp", "fsdp"):
                for checkpointing in (False, True):
                    rows = launch(ranks, mode, blocks, checkpointing, args)
                    cells.append(f"{max(r['passes'] for r in rows) / GB:.2f} / {max(r['peak'] for r in rows) / GB:.2f}")
            print(f"| {ranks} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
