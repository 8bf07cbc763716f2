"""Our BatchTopK and Matryoshka SAEs against SAELens's own trainers, on the same activations.

    python bench/sae_vs_saelens.py                               # a text model and the grokking MLP, 3 seeds
    python bench/sae_vs_saelens.py --models grokking --seeds 1 --steps 100

For each model: train it with train.py (or take --text_run / --grokking_run), dump the hook's
train-split activations once (activations.py dump), then for each kind and seed train ours
(`sae.py --source dump`) and SAELens's (bench/saelens_trainer.py, SAELens's SAETrainer, in the
.venv-saelens virtualenv that tests/test_saelens.py builds) at the same width, k, rows per step,
steps, learning rate and schedule (linear warmup, then cosine to 0), one after the other. Each side
keeps its own defaults for the rest (SAELens: AuxK weight 1, dead after 1000 steps, decoder norms
folded into the activations, b_dec from 0; ours: AuxK weight 1/32, dead after 1M rows, unit decoder
rows, b_dec from the mean input). Both SAEs are then judged by the same code, ours, on the model's
held-out val split (SAELens's folder opened by sae.load_saelens, which gives the features SAELens's
own loader gives): in use, with its learned threshold, explained variance, L0, the CE-loss and KL
scores with the reconstruction spliced in, and the share of features that never fired; and, at equal
L0, explained variance and CE-loss score with exactly k x rows features kept over each batch of
held-out rows (the rule both trained with), since the two learned thresholds give different L0s. rows/s is each trainer's own training time
(ours: the steps its log times, evals left out; SAELens's: trainer.fit()). Medians over the seeds;
everything goes to <out>/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch  # noqa: E402

import activations  # noqa: E402
import sae as sae_module  # noqa: E402
from interop.saelens import load_saelens  # noqa: E402
from saes.batchtopk import batch_topk_cut  # noqa: E402
from saes.metrics import held_out_metrics, spliced_metrics  # noqa: E402
import train  # noqa: E402
from plumbing.tracking import read_metrics  # noqa: E402

MODELS = {  # what each model is, the hook its SAEs read, the positions, width and k
    "text": dict(args=["--preset", "shakespeare_char_modern", "--num_blocks", "2", "--embedding_dim", "128",
                       "--num_heads", "4", "--context_len", "128", "--batch_size", "32", "--max_steps", "400",
                       "--dropout", "0", "--eval_every", "400", "--sample_tokens", "0", "--save_every", "0"],
                 hook="blocks.1.hook_resid_post", positions="all", width=1024, k=16),
    "grokking": dict(args=[], hook="blocks.0.mlp.hook_post", positions="answer", width=2048, k=16),
}
KINDS = ("batchtopk", "matryoshka")
METRICS = ("explained_variance", "l0", "ce_loss_score", "kl_div_score", "never_fired_frac")  # mse: units differ


def quietly(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def saelens_python() -> str:
    from harness.overlay_venv import overlay_python
    from test_saelens import PACKAGES

    python, why_not = overlay_python(".venv-saelens", PACKAGES)
    if python is None:
        sys.exit(f"no SAELens virtualenv: {why_not}")
    return python


def at_k(sae, k: int):
    """Rows [B, d] -> reconstruction with the k x B largest ReLU'd pre-activations of the batch kept
    (the rule both sides train with): every SAE at the same L0, k."""
    def reconstruct(rows):
        positive = torch.relu(sae.pre_activations(rows))
        cut, _ = batch_topk_cut(positive, k * len(rows))
        return sae.decode(positive * (positive >= cut))
    return reconstruct


@torch.no_grad()
def judge(sae, run, hook: str, positions: str, eval_tokens: int, k: int) -> dict:
    """On the run's held-out val split: the metrics sae.py reports for the SAE in use (its learned
    threshold), and explained variance and CE-loss score at L0 = k exactly (at_k, 4,096 rows at a time)."""
    held_out = activations.split_sequences(run, "val", positions, eval_tokens)
    rows = activations.capture_all(run, held_out.tokens, hook)[held_out.mask.to(run.device)]
    metrics, _ = held_out_metrics(sae, run, held_out, rows, hook)
    result = {key: float(metrics[key]) for key in METRICS}
    squared = sum(float((part - at_k(sae, k)(part)).pow(2).sum()) for part in rows.split(4096))
    result["explained_variance_at_k"] = 1 - squared / float((rows - rows.mean(0)).pow(2).sum())
    spliced = spliced_metrics(run.model, held_out, hook, at_k(sae, k), run.data.loss_positions)
    result["ce_loss_score_at_k"] = float(spliced["ce_loss_score"])
    return result


def our_rows_per_sec(sae_dir: str, batch_size: int) -> float:
    """Rows over the seconds the SAE's log timed (each logged window's ms/step x its steps)."""
    records = [r for r in read_metrics(os.path.join(sae_dir, "metrics.jsonl")) if "ms_per_step" in r]
    seconds, last = 0.0, 0
    for r in records:
        seconds += r["ms_per_step"] / 1000 * (r["step"] - last)
        last = r["step"]
    return last * batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="text,grokking", help="comma-separated: text, grokking")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--eval_tokens", type=int, default=32768, help="held-out tokens each SAE is judged on")
    parser.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "tiny_shakespeare.txt"),
                        help="the text model's corpus")
    parser.add_argument("--text_run", default="", help="a trained text run to use instead of training one")
    parser.add_argument("--grokking_run", default="", help="a trained grokking run to use instead of training one")
    parser.add_argument("--out", default="", help="folder for runs, dumps and SAEs (default runs/bench-sae-<time>)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    if "text" in models and not args.text_run and not os.path.isfile(args.data_path):
        parser.error(f"--data_path: {args.data_path} does not exist; name the corpus or pass --text_run")
    out = os.path.abspath(args.out or os.path.join("runs", time.strftime("bench-sae-%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    python = saelens_python()
    print(f"torch {torch.__version__} · {os.cpu_count()} CPUs · torch threads {torch.get_num_threads()} · "
          f"{args.steps} steps x {args.batch_size} rows, lr {args.lr:g} (warmup {args.warmup_steps}, cosine to 0), "
          f"{args.seeds} seed(s) · {out}", flush=True)

    results = []
    for name in models:
        spec = MODELS[name]
        run_dir = getattr(args, f"{name}_run")
        if not run_dir:
            run_dir = os.path.join(out, name)
            extra = ["--data_path", args.data_path] if name == "text" else []
            started = time.perf_counter()
            quietly(train.main, spec["args"] + extra + ["--save_model_dir", out, "--run_name", name])
            print(f"{name}: trained {run_dir} in {time.perf_counter() - started:.0f}s", flush=True)
        dump_dir = os.path.join(out, f"dump-{name}")
        quietly(activations.main, ["dump", run_dir, "--hook", spec["hook"], "--positions", spec["positions"], "--out", dump_dir])
        with open(os.path.join(dump_dir, "manifest.json")) as f:
            rows = json.load(f)["num_rows"]
        run = activations.load_run(run_dir, device="cpu")
        width, k = spec["width"], spec["k"]
        sizes = f"{width // 16},{width // 4}"  # our default prefixes, given to both
        print(f"{name}: {spec['hook']} ({spec['positions']} positions), {rows:,} train rows dumped; "
              f"width {width}, k {k}, matryoshka prefixes {sizes}", flush=True)
        for kind in KINDS:
            for seed in range(args.seeds):
                common = ["--arch", kind, "--dict_size", str(width), "--k", str(k), "--batch_size", str(args.batch_size),
                          "--max_steps", str(args.steps), "--lr", str(args.lr), "--warmup_steps", str(args.warmup_steps),
                          "--seed", str(seed)]
                ours_name = f"ours-{kind}-{seed}"
                quietly(sae_module.main, [run_dir, "--hook", spec["hook"], "--positions", spec["positions"],
                                          "--source", "dump", "--dump", dump_dir, *common, "--lr_schedule", "cosine",
                                          "--min_lr_frac", "0", "--eval_every", str(args.steps), "--save_every", "0",
                                          "--log_every", "25", "--eval_tokens", "2048", "--name", ours_name,
                                          "--save_model_dir", os.path.join(out, f"sae-{name}")]
                        + (["--matryoshka_sizes", sizes] if kind == "matryoshka" else []))
                ours_dir = os.path.join(out, f"sae-{name}", ours_name)
                sae, _, _ = sae_module.load_sae(ours_dir, device="cpu")
                ours = {"model": name, "kind": kind, "seed": seed, "side": "tinylab",
                        "rows_per_sec": our_rows_per_sec(ours_dir, args.batch_size),
                        **judge(sae, run, spec["hook"], spec["positions"], args.eval_tokens, k)}
                theirs_dir = os.path.join(out, f"saelens-{name}-{kind}-{seed}")
                done = subprocess.run([python, os.path.join(ROOT, "bench", "saelens_trainer.py"), "--dump", dump_dir,
                                       "--arch", kind, "--d_sae", str(width), "--k", str(k), "--steps", str(args.steps),
                                       "--batch_size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
                                       "--warmup_steps", str(args.warmup_steps), "--out", theirs_dir]
                                      + (["--matryoshka_sizes", sizes] if kind == "matryoshka" else []),
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"SAELens's trainer failed:\n{done.stderr[-3000:]}")
                timing = json.loads(done.stdout.strip().splitlines()[-1])
                sae, _, _ = load_saelens(theirs_dir, run_dir, device="cpu")
                theirs = {"model": name, "kind": kind, "seed": seed, "side": "SAELens",
                          "rows_per_sec": timing["rows_per_sec"],
                          **judge(sae, run, spec["hook"], spec["positions"], args.eval_tokens, k)}
                for r in (ours, theirs):
                    print(f"  {name:9s} {kind:10s} seed {seed}  {r['side']:8s}  EV {r['explained_variance']:.4f} at L0 "
                          f"{r['l0']:.2f}, {r['explained_variance_at_k']:.4f} at L0 {k}  CE score "
                          f"{r['ce_loss_score']:.4f}, {r['ce_loss_score_at_k']:.4f} at L0 {k}  never fired "
                          f"{r['never_fired_frac']:.1%}  {r['rows_per_sec']:,.0f} rows/s", flush=True)
                results += [ours, theirs]
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    print(f"\nmedians over {args.seeds} seed(s); in use = with its learned threshold, at L0 = k = the batch's "
          f"k x rows largest kept (EV range over the seeds in brackets):")
    print("| model | kind | trainer | EV at L0 = k | CE-loss score at L0 = k | in use: L0 | EV | CE-loss score | "
          "KL score | never fired | rows/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in models:
        for kind in KINDS:
            for side in ("tinylab", "SAELens"):
                mine = [r for r in results if (r["model"], r["kind"], r["side"]) == (name, kind, side)]
                keys = (*METRICS, "explained_variance_at_k", "ce_loss_score_at_k", "rows_per_sec")
                med = {key: statistics.median(r[key] for r in mine) for key in keys}
                ev = [r["explained_variance_at_k"] for r in mine]
                print(f"| {name} | {kind} | {side} | {med['explained_variance_at_k']:.4f} [{min(ev):.4f}, {max(ev):.4f}] "
                      f"| {med['ce_loss_score_at_k']:.4f} | {med['l0']:.2f} | {med['explained_variance']:.4f} | "
                      f"{med['ce_loss_score']:.4f} | {med['kl_div_score']:.4f} | {med['never_fired_frac']:.1%} | "
                      f"{med['rows_per_sec']:,.0f} |")
    print(f"\nresults: {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
