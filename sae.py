"""Sparse autoencoders on a trained run's activations, judged by what they recover.

    python sae.py runs/<run> --hook blocks.0.mlp.hook_post                   # ReLU SAE, activations live
    python sae.py runs/<run> --hook blocks.0.hook_resid_post --arch topk --k 16 --source dump
    torchrun --nproc_per_node=8 sae.py runs/<run> --hook blocks.3.hook_resid_post --arch topk
    python sae.py report runs/<run>/sae/<name>                              # feature views + summary

An SAE lives in `<run>/sae/<name>/` (name: `<hook>-<arch>-<dict_size>` unless --name says
otherwise) and is laid out like a run: config.json, train.log, metrics.jsonl, last.pt, curves.

The dictionary: x̂ = W_dec f + b_dec with f = ReLU(W_enc (x - b_dec) + b_enc) (`relu`, trained with an
L1 penalty on f weighted by each feature's decoder norm, warmed up linearly), f = the k largest
of those pre-activations, ReLU'd (`topk`, no penalty), the k x rows largest of the whole batch
(`batchtopk`; in use, those above a threshold learned in training), those above a threshold per
feature (`jumprelu`, an L0 penalty through a straight-through estimator), or batchtopk whose
nested prefixes each reconstruct (`matryoshka`); each kind is one file in saes/. Inputs are divided by one scalar so that
E‖x‖² = d (estimated on the first rows of the train split), so --l1_coefficient means the same at
every width and layer. Each feature's decoder vector is kept at unit norm: the gradient's component
along it is removed before each step and the vector renormalised after it. Features that have not
fired for --dead_rows rows are dead: a ReLU SAE resamples them every --resample_every steps in the
first half of training (new directions from the inputs it reconstructs worst, Anthropic 2023);
a TopK SAE trains them with the AuxK loss (the dead features' k_aux largest pre-activations
reconstruct what the live ones miss, Gao et al. 2024).

Evaluation uses the val split of the run, which neither the SAE nor the model trained on, under the
names SAELens's evals use: mse, explained_variance, l0, the dead and never-fired fractions, and with
the reconstruction spliced into the model at the hook, ce_loss_score = (CE_ablation - CE_sae) /
(CE_ablation - CE_clean) and kl_div_score = (KL_ablation - KL_sae) / KL_ablation (spliced_metrics).
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from activations import DumpSource, LiveSource, Sequences, default_dump_dir, hook_width, load_run, rows_of, split_sequences
from config import ConfigError, parse_flags, resumed_config
from interop.saelens import export
from optimizer import LRSchedule, apply_lr, load_optimizer_states
from plumbing.checkpoints import load_checkpoint, seed_everything, set_rng_state
from plumbing.distributed import all_reduce_sum, gather_to_main, regroup_ddp_buckets
from plumbing.session import Session, StepClock, run_command
from plumbing.tracking import read_metrics, wandb_settings
from saes import SparseAutoencoder, build_sae
from saes.base import update
from saes.config import SAEConfig, load_sae, sae_dir  # noqa: F401 (load_sae: `sae.load_sae(DIR)` in notebooks)
from saes.metrics import held_out_metrics, modern_metrics
from saes.report import plot_feature_density, report

DIVERGED_ADVICE = "Lower --lr or set --grad_clip, then start again"


def first_step_loss(sae: SparseAutoencoder, model, x: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
    """The loss of a first step (no feature dead yet, so no AuxK) on rows x through `model`: the
    graph whose backward pass set the uninterrupted run's DDP buckets."""
    return sae.loss(x, cfg, cfg.l1_coefficient, None, model)[0]


# ---------------------------------------------------------------- training


def train(cfg: SAEConfig, explicit: set[str] = frozenset()) -> dict:
    """Trains one SAE (every rank of a torchrun job calls this); returns the final metrics and
    where the SAE lives. Bad input raises ConfigError / CheckpointError before anything is written."""
    with Session(cfg.device, cfg.dtype) as session:
        log, dist, device, dtype = session.log, session.dist, session.device, session.dtype
        run = load_run(cfg.run_dir, device=str(device), source=cfg)
        for p in run.model.parameters():
            p.requires_grad_(False)  # the model is only read
        d = hook_width(run, cfg.hook)
        out_dir, name = sae_dir(cfg, d)
        checkpoint = None
        if cfg.resume == "auto" and os.path.isfile(os.path.join(out_dir, "last.pt")):
            checkpoint = load_checkpoint(os.path.join(out_dir, "last.pt"))
            if checkpoint.get("model_step", run.step) != run.step:
                raise ConfigError(f"--resume: this SAE was trained on the model at step {checkpoint['model_step']}, "
                                  f"but {run.checkpoint_path} now holds step {run.step}; start a new SAE (--run_name)")
            cfg = resumed_config(cfg, checkpoint["config"], explicit, "SAE")
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch_size: {cfg.batch_size} rows do not split into {dist.world_size} ranks")
        dict_size = cfg.dict_size or int(cfg.expansion * d)
        cfg.check_kind(dict_size, "--dict_size" if cfg.dict_size else f"--expansion {cfg.expansion:g} x width {d}")
        local_batch = cfg.batch_size // dist.world_size
        if cfg.source == "dump":
            directory = cfg.dump or default_dump_dir(cfg.run_dir, cfg.hook, "train", cfg.positions)
            source = DumpSource(directory, cfg.batch_size, device, cfg.seed, dist.rank, dist.world_size)
            wanted = {"hook": cfg.hook, "d": d, "split": "train", "positions": cfg.positions, "step": run.step}
            for key, value in wanted.items():
                if source.manifest.get(key) != value:
                    raise ConfigError(f"--dump: {directory} holds {key} {source.manifest.get(key)!r}, and this SAE "
                                      f"needs {value!r} (the train split of the model at step {run.step}); dump it "
                                      f"with `python activations.py dump {cfg.run_dir} --hook {cfg.hook} "
                                      f"--positions {cfg.positions}`")
        else:
            source = LiveSource(run, cfg.hook, cfg.positions, "train", local_batch, cfg.buffer_rows // dist.world_size,
                                cfg.seed, dist.rank, dist.world_size, cfg.max_tokens, dtype=cfg.dtype)
        held_out = split_sequences(run, "val", cfg.positions, cfg.eval_tokens)
        session.claim_directory(out_dir, cfg.resume == "auto", f"--run_name: {out_dir} already holds an SAE; pass "
                                f"another --run_name, or --resume auto to continue it", cfg.to_dict(), cfg.claim_timeout)

        # ---- the SAE, its optimizer, its state
        def all_rows(seqs: Sequences) -> torch.Tensor:
            return torch.cat([rows_of(run.model, seqs, s, s + 1024, cfg.hook, device, dtype).acts
                              for s in range(0, len(seqs.tokens), 1024)])

        eval_rows = all_rows(held_out)
        seed_everything(cfg.seed)  # the same initialisation on every rank
        sae = build_sae(d, dict_size, cfg.arch, cfg.k, cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth).to(device)
        # The input scale and b_dec from the rows it will train on: a dump's own (as stored), else the
        # model's on the first 32,768 tokens of the train split.
        sae.calibrate(source.rows(torch.arange(min(source.num_rows, 32768))) if cfg.source == "dump" else
                      all_rows(split_sequences(run, "train", cfg.positions, 32768)), cfg.normalize)
        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        schedule = LRSchedule(cfg, cfg.max_steps)
        rows_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)
        step, elapsed_before = 0, 0.0
        if checkpoint is not None:
            sae.load_state_dict(checkpoint["model"])
            load_optimizer_states([optimizer], checkpoint["optimizers"])
            schedule.load_state_dict(checkpoint.get("lr_schedule"))
            rows_since_fired = checkpoint["rows_since_fired"].to(device)
            step, elapsed_before = checkpoint["step"], checkpoint["elapsed_seconds"]
            states = checkpoint["source"]
            if len(states) == dist.world_size:
                source.load_state_dict(states[dist.rank])
                set_rng_state(checkpoint["rng"][dist.rank])
            elif cfg.source == "live":
                log.warning("warning: resumed on a different number of ranks; the live buffers start afresh")
        model = DDP(sae, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.enabled else sae
        if dist.enabled and checkpoint is not None:  # bit-exact resume on 3+ ranks (see there)
            rows = eval_rows[:cfg.batch_size].to(device)
            regroup_ddp_buckets(model, functools.partial(first_step_loss, sae, model, rows, cfg), device)

        log.info(f"SAE {name} on {cfg.hook} of {cfg.run_dir} (checkpoint {run.checkpoint_path}, step {run.step}) "
                 f"-> {out_dir}")
        log.info("  " + " ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()))
        log.info(f"d={d} -> {dict_size} features ({sae.describe()}) | "
                 f"{cfg.source} source | {cfg.batch_size} rows/step on {dist.world_size} rank(s) | "
                 f"eval on {len(eval_rows):,} val rows | input scale {float(sae.scale):.4g}"
                 + (f" | resumed at step {step}" if checkpoint is not None else ""))

        tracker = session.tracker(out_dir, step, wandb_settings(cfg.wandb_project, name, out_dir, cfg.to_dict())
                                  if cfg.wandb_enabled else None, checkpoint.get("wandb_id") if checkpoint else None)
        last_good = (os.path.join(out_dir, "last.pt"), step) if checkpoint is not None else None
        checkpointer = session.checkpointer(out_dir, sae.parameters, cfg.max_steps, last=last_good, advice=DIVERGED_ADVICE)
        clock = StepClock(cfg.max_steps, elapsed_before)
        density = None  # each feature's firing frequency on the held-out rows, at the latest eval

        def evaluate() -> dict:
            nonlocal density
            sae.eval()
            metrics, density = held_out_metrics(sae, run, held_out, eval_rows, cfg.hook)
            sae.train()
            return metrics

        def state() -> dict:
            return {"model": sae.state_dict(), "optimizers": [optimizer.state_dict()], "step": step,
                    "source": gather_to_main(source.state_dict()),  # a live buffer per rank: only rank 0 needs them
                    "rows_since_fired": rows_since_fired.cpu(), "lr_schedule": schedule.state_dict(),
                    "config": cfg.to_dict(), "elapsed_seconds": clock.elapsed(), "wandb_id": tracker.wandb_id,
                    "d": d, "model_checkpoint": os.path.abspath(run.checkpoint_path), "model_step": run.step}

        # ---- the loop
        window = dict.fromkeys(("mse_sum", "l0_sum", *sae.logged, "rows"), 0.0)
        last_eval, interrupted = {}, 0
        with session.stop_signals():
            while step < cfg.max_steps:
                apply_lr([optimizer], schedule(step))
                x = source.batch(step).acts
                l1_weight = sae.penalty_weight(step, cfg)
                dead = rows_since_fired >= cfg.dead_rows
                parts, f = update(sae, optimizer, x, cfg, l1_weight, dead, forward=model)
                fired = (f > 0).any(0).long()
                if dist.enabled:
                    torch_dist.all_reduce(fired)
                rows_since_fired = torch.where(fired > 0, 0, rows_since_fired + cfg.batch_size)
                step += 1
                clock.tick()
                checkpointer.watch(step, parts["loss"])
                for key, value in parts.items():
                    if key in window:
                        window[key] += float(value)
                window["rows"] += len(x)

                log_due = step % cfg.log_every == 0 or step == 1 or step == cfg.max_steps
                eval_due = step % cfg.eval_every == 0 or step == cfg.max_steps
                save_due = cfg.save_every and step % cfg.save_every == 0
                if log_due or eval_due or save_due:
                    checkpointer.check(step)  # before anything is logged as good or saved
                record = {}
                if log_due:
                    sums = all_reduce_sum(window, device)
                    rows = max(sums["rows"], 1)
                    ms_per_step, rows_per_sec = clock.report(cfg.batch_size)
                    record = {"step": step, "train_mse": sums["mse_sum"] / rows, "train_l0": sums["l0_sum"] / rows,
                              "dead_frac": float((rows_since_fired >= cfg.dead_rows).float().mean()),
                              "lr": optimizer.param_groups[0]["lr"], "ms_per_step": ms_per_step,
                              "rows_per_sec": rows_per_sec}
                    record.update(sae.extra_record(sums, rows, l1_weight))
                    log.info(f"step {step:>6}/{cfg.max_steps} | mse {record['train_mse']:.4g} | "
                             f"L0 {record['train_l0']:.1f}"
                             + sae.extra_log(record)
                             + f" | dead {record['dead_frac']:.1%} | lr {record['lr']:.2e} | "
                             f"{ms_per_step:.1f} ms/step | {rows_per_sec:,.0f} rows/s | {clock.progress(step)}")
                    window = dict.fromkeys(window, 0.0)
                with clock.paused():  # evals and checkpoints stay out of ms/step and rows/s
                    if eval_due:
                        last_eval = evaluate()
                        record = {"step": step, **record, **last_eval}
                        log.info(f"eval {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                        if schedule.observe(last_eval["mse"]):
                            log.info(f"plateau: LR x {schedule.factor:.3g} of its schedule from step {step + 1}")
                    if record:
                        tracker.write({**record, "elapsed_seconds": round(clock.elapsed(), 3)})
                    # After this step's metrics: they describe the SAE as trained, not the moment after resampling.
                    count = sae.maintain(step, cfg, optimizer, x, rows_since_fired >= cfg.dead_rows, dist.enabled)
                    if count:
                        rows_since_fired = torch.where(rows_since_fired >= cfg.dead_rows, 0, rows_since_fired)
                        log.info(f"step {step}: resampled {count} dead features")
                    if save_due:
                        checkpointer.save("last.pt", step, state())
                signum = session.agreed_stop_signal()
                if signum and step < cfg.max_steps:
                    interrupted = signum
                    log.info(f"{signal.Signals(signum).name} received: stopping after step {step} to save a checkpoint")
                    break
            checkpointer.save("last.pt", step, state())
        del model  # the DDP wrapper goes before the process group does (see distributed.teardown_distributed)
        session.report_replicas(sae.parameters(), "SAE weights")  # resampling included
        if dist.is_main:
            plot_sae_curves(tracker.path, os.path.join(out_dir, "curves.png"), title=name)
            if density is not None:
                plot_feature_density(density, os.path.join(out_dir, "feature_density.png"))
        seconds = session.seconds()
        summary = {"sae_dir": out_dir, "steps": step, "seconds": seconds, "dict_size": dict_size,
                   "interrupted": signal.Signals(interrupted).name if interrupted else None, **last_eval}
        if interrupted:
            log.info(f"interrupted at step {step}; last.pt saved. Continue with the same command and --resume auto")
        else:
            log.info(f"done: {step} steps in {seconds:.1f}s | " + " | ".join(
                f"{k} {last_eval[k]:.4f}" for k in ("explained_variance", "l0", "ce_loss_score", "kl_div_score") if k in last_eval)
                + f" | report: python sae.py report {out_dir}")
        session.finish_tracking(128 + interrupted if interrupted else 0, preempted=bool(interrupted))
    return summary
# ---------------------------------------------------------------- pictures and the report


def plot_sae_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    from matplotlib.figure import Figure

    records = [modern_metrics(r) for r in read_metrics(metrics_path)]
    panels = [("train_mse", "mse (normalised)", "log"), ("explained_variance", "explained variance (val)", "linear"),
              ("train_l0", "L0", "log"), ("dead_frac", "dead fraction", "linear"),
              ("ce_loss_score", "CE-loss score (val)", "linear")]
    fig = Figure(figsize=(4 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    for ax, (key, label, yscale) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        if key == "train_mse":
            points = [(r["step"], r["mse"]) for r in records if "mse" in r]
            if points:
                ax.plot(*zip(*points), "o-", label="val")
                ax.legend()
        ax.set(xlabel="step", title=label, yscale=yscale)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return out_path
# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        usage = "usage: python sae.py report <run>/sae/<name>, or report <SAELens folder> --model <run or model>"
        if len(argv) not in (2, 4) or argv[1].startswith("-") or len(argv) == 4 and argv[2] != "--model":
            raise ConfigError(usage)
        path = report(argv[1], model=argv[3] if len(argv) == 4 else "", log=print)
        print(f"wrote {path}")
        return path
    if argv and argv[0] == "export":
        usage = "usage: python sae.py export <run>/sae/<name> --to saelens OUT"
        if len(argv) != 5 or argv[2] != "--to":
            raise ConfigError(usage)
        if argv[3] != "saelens":
            raise ConfigError(f"--to: {argv[3]!r} is not a format sae.py exports; the one is saelens ({usage})")
        path = export(argv[1], argv[4])
        print(f"wrote {path}: SAELens opens it with SAE.load_from_disk({path!r})")
        return path
    cfg, explicit = parse_flags(SAEConfig, argv, "sae.py", "Train a sparse autoencoder on a run's activations "
                                "(`python sae.py report DIR` writes feature views; `python sae.py export DIR --to "
                                "saelens OUT` a folder SAELens opens).", positional="run_dir")
    return train(cfg, explicit)


if __name__ == "__main__":
    run_command(main)
