"""Your own corpus at scale: prepare throughput and memory, start-up on a billion tokens, loader speed.

    TIKTOKEN_CACHE_DIR=... python bench/corpus.py --source data/tiny_shakespeare.txt   # about 10 minutes on 2 cores

What it builds, under --work (deleted at the end unless --keep): jsonl documents cut from --source
(paragraph runs, shuffled, repeated) in files of 128 MB, grouped into corpora of 0.5, 1 and 2 GB;
1e9 synthetic GPT-2 tokens as ten llm.c shards (and a small shard set of 1e6); a raw 1e8-token file.
Then, each prepare in a process of its own (prepare.py):
  * prepare throughput, GPT-2 tokenizer, 1 GB: every core against one process (--prepare_workers 1)
  * peak resident memory summed over every prepare process, for the 0.5 GB and the 2 GB corpus
  * train.py start-up to the end of its first step on the 1e9-token shards against the small set
  * the loader's tokens/s (TextData.train_batches) on the shards against the single-file memmap
    loader train.py had before corpus.py (the yardstick: one np.memmap, windows stacked)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FILE_MB = 128


def build_documents(source: str, folder: str, total_mb: int, file_mb: int = FILE_MB, seed: int = 0) -> list[str]:
    """jsonl files of file_mb each, documents of 2-40 paragraphs of `source` in a shuffled order."""
    text = open(source, encoding="utf-8").read()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    files = []
    for n in range(-(-total_mb // file_mb)):
        path = os.path.join(folder, f"docs_{n:03d}.jsonl")
        files.append(path)
        if os.path.isfile(path) and os.path.getsize(path) >= file_mb << 20:
            continue
        written = 0
        with open(path + ".tmp", "w") as f:
            while written < file_mb << 20:
                lines = []
                for _ in range(2000):
                    start = int(rng.integers(0, len(paragraphs) - 40))
                    doc = "\n\n".join(paragraphs[start:start + int(rng.integers(2, 40))])
                    lines.append(json.dumps({"text": doc}) + "\n")
                chunk = "".join(lines)
                f.write(chunk)
                written += len(chunk.encode())
        os.replace(path + ".tmp", path)
    return files


def corpus_of(files: list[str], folder: str) -> str:
    """A folder of hard links to `files`: a corpus of its own (its own cache) without a copy."""
    os.makedirs(folder, exist_ok=True)
    for path in files:
        link = os.path.join(folder, os.path.basename(path))
        if not os.path.exists(link):
            os.link(path, link)
    return folder


def prepare(folder: str, cache: str, workers: int) -> dict:
    """prepare.py in a process of its own; its manifest's figures."""
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--data_path", folder, "--tokenizer",
                             "gpt2", "--cache_dir", cache, "--prepare_workers", str(workers)],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"prepare.py failed:\n{result.stdout}\n{result.stderr}")
    wall = time.perf_counter() - started
    manifest = json.load(open(os.path.join(cache, os.listdir(cache)[0], "manifest.json")))
    source_bytes = manifest["source"]["bytes"]
    shutil.rmtree(cache)
    return {"mb": source_bytes / 1e6, "seconds": manifest["prepare_seconds"], "wall": wall,
            "mb_per_s": source_bytes / 1e6 / manifest["prepare_seconds"],
            "peak_rss_mb": sum(manifest["peak_rss_bytes"].values()) / 2**20,
            "processes": len(manifest["peak_rss_bytes"]), "tokens": sum(manifest["tokens"].values())}


def llmc_shards(folder: str, shards: int, tokens_per_shard: int) -> str:
    """llm.c-format shards of synthetic GPT-2 tokens (and one val shard); returns the train glob."""
    os.makedirs(folder, exist_ok=True)
    header = np.zeros(256, dtype=np.int32)
    for name, count in [("val_000000", min(tokens_per_shard, 1_000_000))] + \
                       [(f"train_{i + 1:06d}", tokens_per_shard) for i in range(shards)]:
        path = os.path.join(folder, f"synthetic_{name}.bin")
        if os.path.isfile(path) and os.path.getsize(path) == 1024 + 2 * count:
            continue
        header[:3] = [20240520, 1, count]
        with open(path, "wb") as f:
            f.write(header.tobytes())
            for start in range(0, count, 10_000_000):
                n = min(10_000_000, count - start)
                ((np.arange(start, start + n, dtype=np.int64) * 7919) % 50257).astype(np.uint16).tofile(f)
    return os.path.join(folder, "synthetic_train_*.bin")


def first_step_seconds(data_path: str, work: str) -> float:
    """Wall time of `train.py --max_steps 1` (start-up, one step, one small eval) on `data_path`."""
    best = float("inf")
    for attempt in range(3):
        out = os.path.join(work, "runs")
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--task", "text", "--tokenizer", "gpt2",
                                 "--data_path", data_path, "--max_steps", "1", "--eval_every", "1", "--eval_max_batches",
                                 "1", "--batch_size", "8", "--context_len", "64", "--num_blocks", "1", "--embedding_dim",
                                 "64", "--save_model", "false", "--save_model_dir", out, "--device", "cpu"],
                                capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"train.py failed:\n{result.stdout}\n{result.stderr}")
        best = min(best, time.perf_counter() - started)
    return best


def loader_tokens_per_second(data_path: str, batch: int, context: int, steps: int) -> float:
    import torch

    from config import Config
    from tasks.text import TextData
    from plumbing.distributed import Dist

    cfg = Config(task="text", data_path=data_path, tokenizer="gpt2", batch_size=batch, context_len=context)
    data = TextData(cfg, Dist(), torch.device("cpu"))
    data.train_batches(0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        data.train_batches(step)
    return steps * batch * context / (time.perf_counter() - started)


def yardstick_tokens_per_second(raw_path: str, batch: int, context: int, steps: int) -> float:
    """The loader before corpus.py: one memmap of the whole file, windows stacked and moved."""
    import torch

    from data import _step_seed

    tokens = np.memmap(raw_path, dtype=np.uint16, mode="r")
    train = tokens[: int(len(tokens) * 0.9)]
    started = time.perf_counter()
    for step in range(1, steps + 1):
        starts = np.random.default_rng(_step_seed(0, 3, step)).integers(0, len(train) - context, size=batch)
        rows = np.stack([train[s:s + context + 1] for s in starts]).astype(np.int64)
        batch_tensor = torch.from_numpy(rows)
        batch_tensor[:, :-1], batch_tensor[:, 1:]
    return steps * batch * context / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="data/tiny_shakespeare.txt", help="text the documents are cut from")
    parser.add_argument("--work", default="/tmp/tinylab-bench-corpus", help="where the corpora and shards go")
    parser.add_argument("--sizes_mb", default="512,1024,2048", help="corpus sizes (MB): memory at the first and "
                                                                   "last, throughput at the middle one")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per synthetic shard (x10)")
    parser.add_argument("--file_mb", type=int, default=FILE_MB, help="MB per jsonl file")
    parser.add_argument("--steps", type=int, default=300, help="loader batches timed")
    parser.add_argument("--keep", action="store_true", help="keep --work afterwards (reruns skip the building)")
    args = parser.parse_args()
    if not os.path.isfile(args.source):
        parser.error(f"--source: {args.source} does not exist; point it at a text file (tiny-shakespeare will do)")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and not os.path.isdir(os.path.expanduser("~/.cache")):
        print("note: set TIKTOKEN_CACHE_DIR when offline")
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    work = args.work
    os.environ["TINYLAB_CACHE_DIR"] = os.path.join(work, "train-cache")
    cores = len(os.sched_getaffinity(0))
    print(f"bench/corpus.py · {cores} cores · source {args.source} · work {work}")
    try:
        started = time.perf_counter()
        files = build_documents(args.source, os.path.join(work, "files"), max(sizes), args.file_mb)
        os.sync()  # written pages flushing to disk would slow whichever prepare runs first
        print(f"built {len(files)} jsonl files of {args.file_mb} MB in {time.perf_counter() - started:.0f} s")
        corpora = {mb: corpus_of(files[: -(-mb // args.file_mb)], os.path.join(work, f"corpus-{mb}MB"))
                   for mb in sizes}

        print("\n== prepare, gpt2 (each in a process of its own)")
        middle = sizes[len(sizes) // 2]
        one = prepare(corpora[middle], os.path.join(work, "cache"), 1)
        every = prepare(corpora[middle], os.path.join(work, "cache"), 0)
        for label, r in (("1 process", one), (f"all {cores} cores", every)):
            print(f"  {r['mb']:,.0f} MB, {label:>12}: {r['seconds']:7.1f} s · {r['mb_per_s']:5.1f} MB/s · "
                  f"{r['tokens'] / 1e6:,.0f}M tokens · peak RSS {r['peak_rss_mb']:,.0f} MiB over {r['processes']} "
                  f"process{'es' if r['processes'] > 1 else ''}")
        print(f"  speed-up {every['mb_per_s'] / one['mb_per_s']:.2f}x (target >= 1.8x on 2 cores)")
        memory = {mb: (every if mb == middle else prepare(corpora[mb], os.path.join(work, "cache"), 0))
                  for mb in (sizes[0], sizes[-1])}
        for mb, r in memory.items():
            print(f"  {r['mb']:,.0f} MB corpus, all cores: peak RSS summed over {r['processes']} processes "
                  f"{r['peak_rss_mb']:,.0f} MiB · {r['mb_per_s']:.1f} MB/s (target < 1 GiB, flat in size)")

        print("\n== train.py start-up to its first step (wall time of --max_steps 1, best of 3)")
        big = llmc_shards(os.path.join(work, "shards-1e9"), 10, args.shard_tokens)
        small = llmc_shards(os.path.join(work, "shards-1e6"), 1, 1_000_000)
        os.sync()  # the shards just written must not be flushing to disk during the measurements
        t_small, t_big = first_step_seconds(small, work), first_step_seconds(big, work)
        print(f"  1e6-token shard set: {t_small:.2f} s · {10 * args.shard_tokens:.1e}-token shard set "
              f"({10 * args.shard_tokens * 2 / 1e9:.1f} GB): {t_big:.2f} s · difference {t_big - t_small:+.2f} s "
              f"(target within 3 s)")

        print("\n== loader, tokens/s of train_batches (batch 64 x 1024, CPU tensors; best of 2 passes)")
        raw = os.path.join(work, "raw", "train.bin")
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        tokens = (np.arange(args.shard_tokens, dtype=np.int64) * 7919) % 50257
        tokens.astype(np.uint16).tofile(raw)
        split = os.path.join(work, "raw-in-10")  # the same tokens as ten llm.c shards
        os.makedirs(split, exist_ok=True)
        for i, piece in enumerate(np.array_split(tokens, 10)):
            header = np.zeros(256, dtype=np.int32)
            header[:3] = [20240520, 1, len(piece)]
            with open(os.path.join(split, f"same_train_{i:06d}.bin"), "wb") as f:
                f.write(header.tobytes())
                piece.astype(np.uint16).tofile(f)
        del tokens
        steps = args.steps
        rows = [("yardstick: one np.memmap, the loader before corpus.py", f"{args.shard_tokens:.0e} tokens in one file",
                 lambda: yardstick_tokens_per_second(raw, 64, 1024, steps)),
                ("TextData, that file read in place", "", lambda: loader_tokens_per_second(raw, 64, 1024, steps)),
                ("TextData, the same tokens as 10 shards", "", lambda: loader_tokens_per_second(
                    os.path.join(split, "same_train_*.bin"), 64, 1024, steps)),
                (f"TextData, the {10 * args.shard_tokens:.0e}-token set of the start-up figure",
                 f"{10 * args.shard_tokens * 2 / 1e9:.1f} GB: first touches may read the disk",
                 lambda: loader_tokens_per_second(big, 64, 1024, steps))]
        for label, note, measure in rows:
            best = max(measure(), measure())
            print(f"  {label:<55} {best / 1e6:6.1f}M tokens/s  {note}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
