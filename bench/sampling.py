"""Generation speed: the KV cache against re-running the whole window for every token.

    python bench/sampling.py                                   # shakespeare_char's shape, random weights
    python bench/sampling.py --run runs/shakespeare --tokens 500
    python bench/sampling.py --presets shakespeare_char,shakespeare_char_modern --device cuda

For each model, draws --tokens new tokens after a one-token prompt with model.generate twice, the
cached loop and the uncached one (nanoGPT's: the last context_len tokens run afresh for each token),
from the same generator seed, and prints ms per token for each, the speed-up, and whether the two
drew the same tokens. The first token of the prompt plus 256 new ones is one more than the
context of 256, so the last token of each sample is predicted from a slid window (uncached, in
both loops). Without --run the weights are random: speed depends on the shape, not on training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from config import PRESETS, Config  # noqa: E402
from plumbing.hardware import pick_device  # noqa: E402
from model import Transformer  # noqa: E402


def timed_generate(model, prompt, tokens: int, use_cache: bool, device) -> tuple[torch.Tensor, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    out = model.generate(prompt, tokens, temperature=0.8, top_k=200, generator=generator, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="shakespeare_char,shakespeare_char_modern",
                        help="model shapes to build with random weights (ignored with --run)")
    parser.add_argument("--run", default="", help="a trained run directory or checkpoint instead")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sample")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = pick_device(args.device)
    models = []
    if args.run:
        from analysis.runs import load_run

        run = load_run(args.run, args.device)
        models.append((run.checkpoint_path, run.model))
    else:
        for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
            if name not in PRESETS:
                parser.error(f"--presets: {name!r} is not a preset ({', '.join(PRESETS)})")
            torch.manual_seed(0)
            models.append((name, Transformer(Config(**PRESETS[name]).validate(), 65).to(device).eval()))
    print(f"{args.tokens} new tokens after a 1-token prompt, temperature 0.8, top-k 200, {device.type}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<28}{'params':>12}{'context':>9}{'cached ms/tok':>15}{'uncached ms/tok':>17}{'speed-up':>10}"
          f"{'same tokens':>13}")
    for name, model in models:
        prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
        timed_generate(model, prompt, 8, True, device)  # warm-up: first calls allocate
        timed_generate(model, prompt, 8, False, device)
        cached, cached_s = timed_generate(model, prompt, args.tokens, True, device)
        plain, plain_s = timed_generate(model, prompt, args.tokens, False, device)
        print(f"{os.path.basename(name):<28}{model.num_params():>12,}{model.cfg.context_len:>9}"
              f"{1000 * cached_s / args.tokens:>15.2f}{1000 * plain_s / args.tokens:>17.2f}"
              f"{plain_s / cached_s:>9.1f}x{'yes' if torch.equal(cached, plain) else 'no':>13}")


if __name__ == "__main__":
    main()
