"""Sample text from a trained run: nanoGPT's sample.py, for tinylab runs.

    python sample.py runs/shakespeare                                   # 3 samples of 500 tokens from best.pt
    python sample.py runs/shakespeare --start "ROMEO:" --num_samples 5 --max_new_tokens 200
    python sample.py runs/shakespeare --start FILE:prompt.txt --temperature 0.7 --top_k 50
    python sample.py runs/shakespeare/last.pt --seed 7 --device cpu     # a named checkpoint
    python sample.py --model gpt2 --start "Hello, I'm a language model,"  # a pretrained model (hub id or folder)

Generation keeps a key/value cache, so each new token costs one position's forward pass, and gives
the tokens the uncached loop gives (--kv_cache false runs that loop). Once prompt and sample outgrow
the model's context, the window slides as nanoGPT's does: each further token is predicted from the
last context_len tokens, run afresh, at the uncached loop's cost. Samples go to stdout, separated
by a line of dashes; what was loaded and the speed go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from analysis.runs import encode_exactly, load_run, open_pretrained
from config import DEVICES, DTYPES, ConfigError, need, need_one_of, parse_flags, section
from plumbing.hardware import autocast, pick_dtype
from plumbing.session import run_command

_what = section("what to sample from")
_how = section("how")


@dataclass
class SampleConfig:
    run_dir: str = _what("", "a run directory (runs/<run>) or a checkpoint file in one")
    model: str = _what("", "a pretrained model instead of a run: a Hugging Face hub id (gpt2) or a folder in its "
                           "layout (config.json + *.safetensors)")
    checkpoint: str = _what("best", "best | last: which checkpoint of a run directory (the other when it is missing)")
    start: str = _what("\n", "the prompt, or FILE:path to read it from a file (left out: the run's own start, its "
                             "end-of-text token <|endoftext|> when it was trained on documents, else a newline)")
    num_samples: int = _how(3, "samples to draw, one after another")
    max_new_tokens: int = _how(500, "tokens generated per sample")
    temperature: float = _how(0.8, "1.0: the model's distribution; lower is more conservative; 0: greedy")
    top_k: int = _how(200, "sample from the k most likely tokens only (0: all)")
    seed: int = _how(1337, "seed of the sampling generator")
    device: str = _how("auto", "auto | cpu | cuda | mps")
    dtype: str = _how("auto", "auto (bf16 autocast on capable GPUs, else fp32) | float32 | bfloat16 | float16")
    kv_cache: bool = _how(True, "reuse the keys and values of earlier positions (false: re-run the window for "
                                "every token, the slow loop, for comparison)")

    def validate(self) -> "SampleConfig":
        need(bool(self.run_dir) != bool(self.model), "run_dir", "name a run directory or checkpoint (python sample.py "
             "runs/<run>), or a pretrained model (--model gpt2), one of the two")
        need(not self.run_dir or os.path.exists(self.run_dir), "run_dir", f"{self.run_dir} does not exist")
        for name, choices in (("checkpoint", ("best", "last")), ("device", DEVICES), ("dtype", DTYPES)):
            need_one_of(self, name, choices)
        for name in ("num_samples", "max_new_tokens"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        need(self.temperature >= 0, "temperature", f"must not be negative, got {self.temperature}")
        need(self.top_k >= 0, "top_k", f"must be 0 or more, got {self.top_k}")
        return self


def read_prompt(start: str) -> str:
    """--start's text: itself, or with FILE: the named file's contents."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if not os.path.isfile(path):
        raise ConfigError(f"--start: {start}: {path} does not exist; name a prompt file, or give the text itself")
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv: list[str] | None = None) -> list[str]:
    cfg, explicit = parse_flags(SampleConfig, argv, "sample.py", __doc__.split("\n\n")[0], positional="run_dir")
    prompt = read_prompt(cfg.start)
    if cfg.model:  # no text to read: its own tokenizer and whole context
        run = open_pretrained({"model": cfg.model, "data_path": "", "context_len": 0}, cfg.device)
    else:
        run = load_run(cfg.run_dir, cfg.device, prefer=cfg.checkpoint)
    if "start" not in explicit:  # where the run's text starts: a document's end-of-text token, or a newline
        prompt = getattr(run.data, "SAMPLE_PROMPTS", (prompt,))[0]
    if not run.data.generates_text:
        raise ConfigError(f"--run_dir: {run.checkpoint_path} is a {run.cfg.task} run; sample.py samples text "
                          f"models (--task text). For its predictions, open it with interp.py")
    model, device = run.model, run.device
    ids = encode_exactly(run, prompt, "start") if prompt else []
    if not ids:
        raise ConfigError("--start: the prompt is empty; give at least one character (the default is a newline)")
    dtype = pick_dtype(cfg.dtype, device)
    C = run.cfg.context_len
    print(f"{run.checkpoint_path} · step {run.step} · {model.num_params():,} parameters · context {C} · "
          f"prompt {len(ids)} tokens · {device.type} {str(dtype).replace('torch.', '')} · "
          f"{'KV cache' if cfg.kv_cache else 'no cache (the whole window per token)'}", file=sys.stderr)
    if len(ids) + cfg.max_new_tokens > C:
        print(f"note: prompt + {cfg.max_new_tokens} new tokens = {len(ids) + cfg.max_new_tokens} is more than the "
              f"context of {C}: " + ("after the first" if len(ids) < C else "from the first")
              + f" {max(0, C - len(ids))} new tokens the window slides, each token predicted from the last {C} "
              f"(run afresh, uncached)", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt_tokens = torch.tensor([ids], device=device)
    samples, seconds = [], 0.0
    for _ in range(cfg.num_samples):
        start = time.perf_counter()
        with autocast(device, dtype):
            out = model.generate(prompt_tokens, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, generator,
                                 use_cache=cfg.kv_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        text = run.data.decode(out[0].tolist())
        samples.append(text)
        print(text)
        print("---------------", flush=True)
    total = cfg.num_samples * cfg.max_new_tokens
    print(f"{total:,} tokens in {seconds:.2f} s: {1000 * seconds / total:.2f} ms/token", file=sys.stderr)
    return samples


if __name__ == "__main__":
    run_command(main)
