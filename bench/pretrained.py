"""A pretrained checkpoint's cost: opening it, a forward pass, and a forward pass that caches every hook,
ours against Hugging Face transformers' GPT-2 and TransformerLens 4's TransformerBridge.

    python bench/pretrained.py                          # GPT-2 small's shape (124M), random weights
    python bench/pretrained.py --layers 2 --repeats 3   # smaller and quicker

Builds GPT-2 small's shape with transformers (random weights: speed depends on the shape, not on
training; no download), saves it in Hugging Face's layout under --work, then times, on one batch of
--batch x --seq tokens, in one process on the same threads, the median of --repeats runs after one
warm-up:

- load: our load_pretrained (config.json + model.safetensors -> our Transformer) against
  transformers' AutoModelForCausalLM.from_pretrained and TransformerBridge.boot_transformers (the
  way TransformerLens 4 opens GPT-2: the HF model wrapped in hooks); transformers maps the file and
  reads it when the weights are first used, so "load + forward" times opening and a first forward pass;
- forward: the logits, no gradients (ours on the fused attention path, HF with its default sdpa
  attention, the bridge as it boots: eager attention, for its hooks);
- run_with_cache: the logits and every hook point's activation that TransformerLens caches by
  default (ours: model.hook_names but the per-head hook_result; the bridge's: all of its hooks);
  then "+ hook_result": ours with it, the bridge with set_use_attn_result(True).

Each row also prints the largest logit difference from ours, so that the three compute one function.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402


def median_seconds(fns: list, repeats: int) -> list[tuple[float, object]]:
    """(median seconds, last result) of each function, timed in turn round after round, so that
    whatever else the machine does falls on all of them alike; one warm-up round first."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), out) for t, out in zip(times, outs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 small has 12")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", default="/tmp/tinylab-bench-pretrained", help="where the checkpoint is written")
    args = parser.parse_args()
    try:
        import transformers
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        sys.exit(f"bench/pretrained.py compares with transformers and TransformerLens 4: pip install -r "
                 f"requirements-dev.txt ({error})")
    from interop import huggingface as pretrained

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    folder = os.path.join(args.work, f"gpt2-{args.layers}x{args.width}")
    shutil.rmtree(folder, ignore_errors=True)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    print(f"GPT-2 shape {args.layers} layers x {args.width} ({args.heads} heads), vocab {config.vocab_size}, "
          f"{size:.0f} MiB of safetensors · batch {args.batch} x {args.seq} tokens · torch {torch.__version__} · "
          f"transformers {transformers.__version__} · {torch.get_num_threads()} threads · median of {args.repeats}")

    rows = []
    (load_ours, (ours, _)), (load_hf, hf), (load_tl, bridge) = median_seconds([
        lambda: pretrained.load_pretrained(folder),
        lambda: transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
        lambda: TransformerBridge.boot_transformers(folder, device="cpu", hf_model=transformers.AutoModelForCausalLM
                                                    .from_pretrained(folder, attn_implementation="eager").eval())],
        args.repeats)
    rows.append(("load", load_ours, load_hf, load_tl))
    with torch.no_grad():  # transformers maps the file and reads it at the first forward pass: time both
        (first_ours, _), (first_hf, _), (first_tl, _) = median_seconds([
            lambda: pretrained.load_pretrained(folder)[0](tokens),
            lambda: transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(tokens).logits,
            lambda: TransformerBridge.boot_transformers(folder, device="cpu", hf_model=transformers.AutoModelForCausalLM
                                                        .from_pretrained(folder, attn_implementation="eager").eval())(tokens)],
            args.repeats)
    rows.append(("load + forward", first_ours, first_hf, first_tl))

    with torch.no_grad():
        (fwd_ours, logits), (fwd_hf, hf_logits), (fwd_tl, tl_logits) = median_seconds(
            [lambda: ours(tokens), lambda: hf(tokens).logits, lambda: bridge(tokens)], args.repeats)
        rows.append(("forward", fwd_ours, fwd_hf, fwd_tl))
        # TransformerLens computes per-head results (hook_result) only when asked: time the hooks it
        # caches by default against ours without hook_result, then both with it.
        without = lambda name: not name.endswith("hook_result")  # noqa: E731
        (cache_ours, (cache_logits, cache)), (cache_tl, (_, tl_cache)) = median_seconds(
            [lambda: ours.run_with_cache(tokens, without), lambda: bridge.run_with_cache(tokens)], args.repeats)
        rows.append(("run_with_cache", cache_ours, None, cache_tl))
        bridge.set_use_attn_result(True)
        (all_ours, (_, every)), (all_tl, (_, tl_every)) = median_seconds(
            [lambda: ours.run_with_cache(tokens), lambda: bridge.run_with_cache(tokens)], args.repeats)
        rows.append(("+ hook_result", all_ours, None, all_tl))

    print(f"\n{'':16}{'tinylab':>12}{'transformers':>14}{'TL4 bridge':>12}   ours vs the others")
    for name, a, b, c in rows:
        cells = "".join(f"{x:>11.3f}s" if x is not None else f"{'-':>12}" for x in (a, b, c))
        others = " · ".join(f"{other / a:.2f}x {label}" for other, label in ((b, "HF"), (c, "TL")) if other)
        print(f"{name:16}{cells[:12]}{cells[12:24]:>14}{cells[24:]:>12}   {others} (their time / ours)")
    print(f"\nhooks cached: tinylab {len(cache)} ({len(every)} with hook_result), TL4 bridge {len(tl_cache)} "
          f"({len(tl_every)}; it also caches each submodule's hook_in/hook_out) · max |logit difference| from ours: "
          f"transformers {(hf_logits - logits).abs().max():.1e}, TL4 bridge {(tl_logits - logits).abs().max():.1e}, "
          f"our run_with_cache {(cache_logits - logits).abs().max():.1e}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
