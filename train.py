"""Train a small transformer. One loop, top to bottom:

argv -> Config -> (resume?) -> data -> model (-> compile -> DDP) -> optimizers -> run directory ->
loop { batch -> forward/backward (x accumulation) -> clip -> step -> schedule -> log / eval / save }
-> final checkpoint -> plot.

    python train.py                                  # groks modular addition on a CPU
    python train.py --preset shakespeare_char --data_path data/tiny_shakespeare.txt
    torchrun --nproc_per_node=8 train.py --preset shakespeare_char
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from config import RESUME_FIXED, ConfigError, config_from_dict, format_config, parse_config
from data import IGNORE, build_data
from fourier import progress_measures
from model import ModelWithLoss, Transformer
from optimizer import (EarlyStopping, GrokfastEMA, apply_lr, build_optimizers, load_optimizer_states,
                       lr_multiplier)
from utils import (CheckpointError, RcloneSync, StopSignals, all_reduce_sum, attach_log_file, autocast,
                   broadcast_object, close_logging, create_run_dir, describe_environment,
                   elastic_restart_count, find_checkpoint, flops_per_token, forget_launch, format_duration,
                   gather_objects, generate_run_name, launched_run, load_checkpoint, load_env_files,
                   max_over_ranks, min_over_ranks, newest_checkpoint, peak_flops, pick_device, pick_dtype,
                   plot_training_curves, remember_launch, rng_state, same_on_all_ranks, save_checkpoint,
                   seed_everything, set_rng_state, setup_distributed, setup_logging, teardown_distributed,
                   trim_metrics, unique_run_name, wandb_sweep_run)


class TrainingDiverged(Exception):
    """The loss, gradient norm or weights stopped being finite; the message names the step and the
    checkpoint to go back to."""


def main(argv: list[str] | None = None) -> dict:
    """Runs one training run; returns a summary (steps, seconds, final and best metrics, run dir).

    Bad input raises ConfigError / CheckpointError before anything is written; `python train.py`
    turns those into one line on stderr and exit status 2. SIGTERM or SIGUSR1 ends the run after
    the current step with a checkpoint (summary["interrupted"] names the signal; exit 128 + its
    number). A diverging run raises TrainingDiverged (exit 1).
    """
    started = time.perf_counter()
    cfg, explicit = parse_config(argv)
    load_env_files()  # WANDB_API_KEY, WANDB_MODE, RCLONE_DEST, ... from .env files
    # Started by `wandb agent` (sweeps/): log to the sweep's run, in a run directory named after it,
    # which continues from its checkpoint when W&B hands a preempted run out again.
    sweep_run = wandb_sweep_run()
    if sweep_run is not None:
        cfg.wandb_enabled = True
        if "run" not in explicit:
            cfg.run, explicit = f"sweep-{sweep_run[0]}-{sweep_run[1]}", explicit | {"run"}
            cfg.resume = cfg.resume or "auto"

    # ---- resume: the checkpoint's config, with the flags typed now on top (e.g. a longer max_steps)
    cfg, checkpoint, checkpoint_path, continuing, own_dir = resolve_resume(cfg, explicit)

    # ---- processes, device, precision
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    dist = setup_distributed(device.type)
    is_main = dist.is_main
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    # Adam's second moments of tiny gradients go subnormal (below 1e-38), which x86 CPUs handle
    # about 100x slower; flushing them to zero took the default run from 118 to 96 ms/step.
    torch.set_flush_denormal(True)
    log = setup_logging(is_main)

    try:
        # Every rank read --resume for itself; on several nodes they agree only if the run
        # directory is on a file system they all share.
        resumed_steps = gather_objects(checkpoint["step"] if checkpoint is not None else 0)
        if len(set(resumed_steps)) > 1:
            raise ConfigError(f"--save_model_dir: the ranks found different checkpoints (steps by rank: "
                              f"{resumed_steps}); on several nodes it must be a directory every node shares")

        # ---- data (before the run directory, so a missing file leaves nothing behind)
        data = build_data(cfg, dist, device)
        global_batch = data.global_batch_size()
        if global_batch % (cfg.accumulation_steps * dist.world_size) and global_batch < data.train_size:
            raise ConfigError(f"--batch_size: {global_batch} does not split into accumulation_steps "
                              f"({cfg.accumulation_steps}) x world size ({dist.world_size}) equal parts")
        max_steps = cfg.max_steps or math.ceil(cfg.epochs * data.steps_per_epoch())

        # ---- model (the same initialisation on every rank; DDP also broadcasts rank 0's weights)
        seed_everything(cfg.seed)
        raw_model = Transformer(cfg, data.vocab_size).to(device)
        if dist.rank:
            seed_everything(cfg.seed + dist.rank)  # but each rank its own dropout masks
        if checkpoint is not None:
            try:
                raw_model.load_state_dict(checkpoint["model"])
            except RuntimeError as e:
                reason = str(e).splitlines()[0]
                raise CheckpointError(f"{checkpoint_path} does not fit this model ({reason})") from None
        # What the loop calls: forward and loss in one module, so that compile fuses the loss too.
        model = ModelWithLoss(raw_model, data.loss_positions, IGNORE)
        if cfg.torch_compile:
            model = torch.compile(model)
        if dist.enabled:
            model = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

        # ---- optimizers, precision scaler, early stopping
        optimizers = build_optimizers(raw_model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        early_stopping = EarlyStopping(cfg.patience, cfg.min_delta, cfg.target_val_acc)
        grokfast = None
        if cfg.grokfast_lamb:
            grokfast = GrokfastEMA(raw_model.parameters(), cfg.grokfast_alpha, cfg.grokfast_lamb)
        step, best_val_loss, wandb_id = 0, math.inf, None
        elapsed_before = 0.0  # wall seconds of training before this process (a resumed run's earlier part)
        if checkpoint is not None:
            try:
                load_optimizer_states(optimizers, checkpoint["optimizers"])  # keeps today's LRs
            except ValueError as e:
                raise CheckpointError(f"{checkpoint_path}: its optimizer state does not fit ({e})") from None
            if scaler.is_enabled() and checkpoint["scaler"]:  # fp16 then and now
                scaler.load_state_dict(checkpoint["scaler"])
            early_stopping.load_state_dict(checkpoint["early_stopping"])
            if grokfast is not None and checkpoint.get("grokfast"):
                grokfast.load_state_dict(checkpoint["grokfast"])
            step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
            elapsed_before = checkpoint.get("elapsed_seconds", 0.0)  # absent from checkpoints before it existed
            wandb_id = checkpoint["wandb_id"] if continuing else None
            if len(checkpoint["rng"]) == dist.world_size:
                set_rng_state(checkpoint["rng"][dist.rank])  # each rank its own streams
            else:  # a different number of processes: dropout streams cannot continue, so reseed
                seed_everything(cfg.seed + 1_000_003 * step + dist.rank)

        # ---- run directory: <save_model_dir>/<run>/ (rank 0 writes; every rank learns if it failed)
        run_name = broadcast_object(cfg.run or unique_run_name(cfg.save_model_dir, generate_run_name(cfg)))
        cfg.run = run_name
        run_dir = os.path.join(cfg.save_model_dir, run_name)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        failure = None
        if is_main:
            try:
                create_run_dir(cfg.save_model_dir, run_name, resuming=own_dir)
                trim_metrics(metrics_path, step)  # a resumed run logs the steps after its checkpoint again
                attach_log_file(log, os.path.join(run_dir, "train.log"))
                cfg.save(os.path.join(run_dir, "config.json"))
                if "run" not in explicit:  # a generated name: note it for workers torchrun restarts
                    remember_launch(cfg.save_model_dir, run_name)
            except ConfigError as e:
                failure = str(e)
        failure = broadcast_object(failure)
        if failure:
            raise ConfigError(failure)
    except (ConfigError, CheckpointError):
        close_logging(log)
        teardown_distributed()
        raise

    # ---- the run describes itself: config, versions, hardware, sizes
    origin = "new" if checkpoint is None else (f"resumed at step {step}" if continuing
                                                else f"started from {checkpoint_path} at step {step}")
    log.info(f"tinylab run {run_name} ({origin}) -> {run_dir}")
    log.info(format_config(cfg))
    log.info(describe_environment(device, dist.world_size))
    tokens_per_step = global_batch * data.seq_len
    flops_token = flops_per_token(raw_model.num_params(exclude_embeddings=True), cfg.num_blocks,
                                  cfg.num_heads, cfg.embedding_dim // cfg.num_heads, data.seq_len)
    peak = peak_flops(device)
    log.info(f"model {raw_model.num_params():,} parameters · vocab {data.vocab_size} · "
             f"dtype {str(dtype).replace('torch.', '')} · compile {cfg.torch_compile}")
    log.info(f"data {cfg.task}: {data.train_size:,} train examples · global batch {global_batch} "
             f"({tokens_per_step:,} tokens/step) · {max_steps:,} steps"
             + ("" if peak else " · MFU: unknown, " + (f"{torch.cuda.get_device_name(device)} is not in "
                                                        f"utils.PEAK_FLOPS" if device.type == "cuda"
                                                        else f"no peak-FLOPs figure for {device.type}")))

    wandb_run = None
    if cfg.wandb_enabled and is_main:
        import wandb

        # The key stays in the environment: it is never part of the config, config.json or the logs.
        # Under a sweep the agent's environment names the project; "tinylab" is only our default.
        project = cfg.wandb_project or os.environ.get("WANDB_PROJECT") or (None if sweep_run else "tinylab")
        wandb_run = wandb.init(project=project,
                               entity=cfg.wandb_entity or None, name=run_name, dir=run_dir,
                               config=cfg.to_dict(), id=wandb_id, resume="allow")
        wandb_id = wandb_run.id  # checkpointed, so a resumed or requeued run continues this W&B run
    rclone = None  # copies of the run directory to $RCLONE_DEST, rank 0 only
    if os.environ.get("RCLONE_DEST") and is_main:
        rclone = RcloneSync(run_dir, os.environ["RCLONE_DEST"], log)

    def write_metrics(record: dict) -> None:
        nonlocal wandb_run
        if not is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            try:
                wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as e:  # W&B trouble (its service killed, say) never stops training
                log.warning(f"warning: W&B logging failed ({type(e).__name__}: {e}); going on without W&B")
                wandb_run = None

    def finish_tracking(exit_code: int) -> None:
        """Closes W&B (0: finished; otherwise failed, or preempted after mark_preempting) and makes
        the last rclone copy: short after a preemption, whose grace time is running out."""
        if wandb_run is not None:
            try:
                wandb_run.finish(exit_code=exit_code)
            except Exception as e:
                log.warning(f"warning: closing the W&B run failed ({type(e).__name__}: {e})")
        if rclone is not None:
            rclone.finish(timeout=20 if exit_code > 128 else 600)

    # The newest checkpoint of this run and its step: where to go back to if training diverges.
    saved = (checkpoint_path, checkpoint["step"]) if checkpoint is not None and continuing else None

    def save(name: str) -> None:
        nonlocal saved
        if not cfg.save_model:
            return
        rng = gather_objects(rng_state())  # every rank's own RNG streams; all ranks take part
        saved = (os.path.join(run_dir, name), step)
        if not is_main:
            return
        save_checkpoint({
            "model": raw_model.state_dict(),  # clean keys: never the compiled or DDP wrapper's
            "optimizers": [optimizer.state_dict() for optimizer in optimizers],
            "scaler": scaler.state_dict(),
            "step": step,
            "rng": rng,
            "data_position": {"step": step},  # batches are a function of (seed, step)
            "early_stopping": early_stopping.state_dict(),
            "grokfast": grokfast.state_dict() if grokfast is not None else None,
            "best_val_loss": best_val_loss,
            "elapsed_seconds": elapsed_before + time.perf_counter() - train_started,
            "config": cfg.to_dict(),
            "wandb_id": wandb_id,
        }, os.path.join(run_dir, name))

    # The first step whose loss or gradient norm was not finite (0: none yet). It stays on the
    # device, so watching for it costs no synchronisation; it is read where the loop syncs anyway.
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)

    def check_finite() -> None:
        """Stops the run, before anything else is logged or saved, if any rank saw a nan/inf loss or
        gradient norm, or if an update has made the weights themselves overflow."""
        bad = int(first_bad_step)
        if not bad and not torch.isfinite(torch.nn.utils.get_total_norm(list(raw_model.parameters()))):
            bad = step
        bad = min_over_ranks(bad or max_steps + 1, dist)  # the earliest step any rank saw
        if bad > max_steps:
            return
        kept = f"{saved[0]} (step {saved[1]}) is the last good checkpoint" if saved else "nothing was saved"
        message = (f"training diverged at step {bad}: the loss, gradient norm or weights became nan or inf; "
                   f"stopped before saving, so "
                   f"{kept}. Lower --lr, lengthen --warmup_steps or set --grad_clip, then start again"
                   + (" or --resume from it" if saved else ""))
        log.error(f"error: {message}")
        finish_tracking(exit_code=1)
        close_logging(log)
        teardown_distributed()
        raise TrainingDiverged(message)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        sums = dict.fromkeys(data.EVAL_KEYS, 0.0)  # the same keys on every rank, batches or not
        for x, y, extras in data.val_batches():
            with autocast(device, dtype):
                logits = raw_model(x, data.loss_positions)  # no DDP wrapper: eval needs no gradient sync
            for key, value in data.eval_sums(logits, y, extras).items():
                sums[key] += value
        model.train()
        return data.eval_metrics(all_reduce_sum(sums, device))

    def print_samples() -> None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed + step)
        raw_model.eval()
        for prompt in data.SAMPLE_PROMPTS:
            tokens = torch.tensor([data.encode(prompt) or [0]], device=device)  # unknown characters drop out
            with autocast(device, dtype):
                out = raw_model.generate(tokens, cfg.sample_tokens, cfg.temperature, cfg.top_k or None, generator)
            log.info(f"--- sample from {prompt!r}:\n{data.decode(out[0].tolist())}")
        raw_model.train()

    # ---- the loop; SIGTERM / SIGUSR1 (preemption) end it after the current step, with a checkpoint
    if step >= max_steps:
        log.info(f"nothing to do: step {step} >= max_steps {max_steps}")
    model.train()
    stop, preempted, evals_done = False, 0, 0
    train_started = time.perf_counter()
    window_start, window_steps, start_step = time.perf_counter(), 0, step
    last = {}
    with StopSignals() as signals:
        while step < max_steps and not stop:
            apply_lr(optimizers, lr_multiplier(step, cfg, max_steps))
            batches, num_targets = data.train_batches(step)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for micro, (x, y) in enumerate(batches):
                # Gradients are all-reduced only on the last micro-step (DDP's no_sync on the others).
                sync = micro == len(batches) - 1
                with (model.no_sync() if dist.enabled and not sync else contextlib.nullcontext()):
                    with autocast(device, dtype):
                        loss, micro_correct = model(x, y)  # summed cross-entropy (fp32), correct predictions
                    # Sum over this micro-batch / targets in the whole global batch = this micro-batch's
                    # share of the global mean; DDP averages over ranks, so scale by world size.
                    scaler.scale(loss * (dist.world_size / num_targets)).backward()
                loss_sum += loss.detach()
                correct += micro_correct
            for optimizer in optimizers:
                scaler.unscale_(optimizer)
            if grokfast is not None:
                grokfast.apply()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            # Under fp16 an inf gradient is the scaler's business (it skips the step); a bad loss never is.
            bad = ~torch.isfinite(loss_sum) if scaler.is_enabled() else ~torch.isfinite(loss_sum + grad_norm)
            first_bad_step = torch.where(bad & (first_bad_step == 0), step + 1, first_bad_step)
            for optimizer in optimizers:
                scaler.step(optimizer)
            scaler.update()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            # A stop signal (preemption, torchrun shutting down, kill) reaches ranks at different
            # moments; agreeing after every step makes them all stop after the same one.
            signum = max_over_ranks(signals.received, dist)

            # metrics.jsonl gets step 1, every log_every-th step and the last; the console also
            # gets the first step after a resume, to show the run is moving.
            record_due = step == 1 or step % cfg.log_every == 0 or step == max_steps
            print_due = record_due or step == start_step + 1
            eval_due = step % cfg.eval_every == 0 or step == max_steps
            save_due = cfg.save_every and step % cfg.save_every == 0
            if print_due or eval_due or save_due:
                check_finite()  # before anything is logged as good or saved

            record = {}
            if print_due:
                sums = all_reduce_sum({"loss_sum": loss_sum.item(), "correct": correct.item()}, device)
                elapsed = time.perf_counter() - window_start
                ms_per_step = 1000 * elapsed / window_steps
                tokens_per_sec = tokens_per_step * window_steps / elapsed
                train = {"step": step, "train_loss": sums["loss_sum"] / num_targets,
                         "train_acc": sums["correct"] / num_targets,
                         "lr": optimizers[0].param_groups[0]["lr"], "grad_norm": grad_norm.item(),
                         "ms_per_step": ms_per_step, "tokens_per_sec": tokens_per_sec}
                if peak:
                    train["mfu"] = flops_token * tokens_per_sec / dist.world_size / peak
                # ETA to max_steps; "<=" when early stopping may end the run sooner.
                eta = ("<=" if early_stopping.active else "") + format_duration((max_steps - step) * ms_per_step / 1000)
                log.info(f"step {step:>6}/{max_steps} | train_loss {train['train_loss']:.4f} | "
                         f"train_acc {train['train_acc']:.4f} | lr {train['lr']:.2e} | "
                         f"grad_norm {train['grad_norm']:.3f} | {ms_per_step:.1f} ms/step | "
                         f"{tokens_per_sec:,.0f} tok/s" + (f" | mfu {train['mfu']:.1%}" if peak else "")
                         + f" | {format_duration(time.perf_counter() - train_started)}, ETA {eta}")
                window_start, window_steps = time.perf_counter(), 0
                last = {**last, **train}
                record = train if record_due else {}

            paused = time.perf_counter()  # eval and checkpoints are kept out of ms/step and tokens/s
            if eval_due:
                val = evaluate()
                if cfg.track_progress:  # every rank computes the same numbers on the same full table
                    val.update(progress_measures(raw_model, data, cfg.modulus))
                record = {"step": step, **record, **val}
                stop = early_stopping.update(val["val_loss"], val.get("val_acc"))
                log.info(f"eval {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()))
                if cfg.task == "text" and cfg.sample_tokens and is_main:
                    print_samples()
                if val["val_loss"] < best_val_loss:
                    best_val_loss = val["val_loss"]
                    save("best.pt")
                last = {**last, **val}
            if record:
                # Wall time since training began (compilation, evals and earlier parts of a resumed
                # run included): the x axis for "which recipe reaches a loss first".
                record["elapsed_seconds"] = round(elapsed_before + time.perf_counter() - train_started, 3)
                write_metrics(record)
            if save_due:
                save("last.pt")
            if eval_due and rclone is not None and cfg.rclone_every:
                evals_done += 1
                if evals_done % cfg.rclone_every == 0:
                    rclone.start()  # in the background; a copy still running is left to finish
            if signum and not stop and step < max_steps:  # a run that just ended is not preempted
                preempted, stop = signum, True
                log.info(f"{signal.Signals(signum).name} received: stopping after step {step} to save a checkpoint")
            window_start += time.perf_counter() - paused

        # ---- the end: checkpoint, picture, summary (a second signal here changes nothing)
        check_finite()
        save("last.pt")
    # W&B shows a preempted run as such, not failed, and a sweep hands it out again to be resumed.
    # Under a sweep only SIGUSR1 (slurm_agent.sh's warning) means that: SIGTERM is the agent
    # stopping the run (hyperband, or a user), which must not come back.
    if preempted and wandb_run is not None and not (sweep_run and preempted == signal.SIGTERM):
        wandb_run.mark_preempting()
    if dist.enabled:  # DDP keeps replicas identical; say so, or say loudly that they drifted apart
        if same_on_all_ranks(list(raw_model.parameters())):
            log.info(f"weights identical on all {dist.world_size} ranks")
        else:
            log.warning("warning: the weights differ between ranks; last.pt holds rank 0's")
    seconds = time.perf_counter() - started
    if preempted:
        log.info(f"interrupted at step {step}; "
                 + (f"last.pt saved. Continue with --resume auto --run_name {run_name}"
                    + (f" --save_model_dir {cfg.save_model_dir}" if cfg.save_model_dir != "runs" else "")
                    if cfg.save_model else "nothing saved (--save_model false)"))
    elif stop:
        log.info(f"early stop: {early_stopping.reason}")
    if is_main and os.path.isfile(metrics_path):
        plot_training_curves(metrics_path, os.path.join(run_dir, "training_curves.png"), title=run_name)
    summary = {"run_dir": run_dir, "steps": step, "seconds": seconds,
               "train_seconds": time.perf_counter() - train_started, "best_val_loss": best_val_loss,
               "interrupted": signal.Signals(preempted).name if preempted else None,
               **{k: v for k, v in last.items() if k != "step"}}
    log.info(f"done: {step} steps in {format_duration(seconds)} (training {format_duration(summary['train_seconds'])})"
             + "".join(f" | {k} {last[k]:.4f}" for k in ("val_loss", "val_acc") if k in last)
             + f" | {run_dir}")
    if wandb_run is not None:
        wandb_run.summary.update({"steps": step, "seconds": seconds})
    finish_tracking(exit_code=128 + preempted if preempted else 0)
    if is_main and not preempted:
        forget_launch(cfg.save_model_dir)
    close_logging(log)
    teardown_distributed(barrier=True)
    return summary


def resolve_resume(cfg, explicit: set[str]):
    """What --resume means for this run: (config, checkpoint, its path, continuing, own_dir).

    `continuing` says the checkpoint is this run's own (a resume in place) or that `--resume auto`
    found a run that saved nothing yet, which restarts it from step 0. A checkpoint with `--run`
    naming a different run starts that new run from the checkpoint's state. `own_dir` says the run
    directory may already hold files of this run: when continuing, and when torchrun restarted us.
    """
    restarted = elastic_restart_count() > 0
    if restarted:
        # `torchrun --max-restarts` restarted this worker after a failure: carry on with the run the
        # first attempt trained (named by --run, by the checkpoint resumed in place, or noted by
        # rank 0 when it generated the name), from that run's newest checkpoint.
        run = cfg.run or launched_run(cfg.save_model_dir)
        if not run and cfg.resume not in ("", "auto"):
            in_place = cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(os.path.abspath(cfg.resume))
            cfg.resume = in_place  # its newest checkpoint, which may be newer than the file named
        elif run and newest_checkpoint(os.path.join(cfg.save_model_dir, run)):
            cfg.run, cfg.resume = run, "auto"
            explicit = explicit | {"run"}
        elif run:  # nothing saved yet: start over as launched, in the same directory
            cfg.run = run
            explicit = explicit | {"run"}
    cfg, checkpoint, path, continuing = _resolve_resume(cfg, explicit)
    return cfg, checkpoint, path, continuing, continuing or restarted


def _resolve_resume(cfg, explicit: set[str]):
    if not cfg.resume:
        return cfg, None, None, False
    if cfg.resume == "auto":
        if not cfg.run:
            raise ConfigError("--resume: auto continues the run named by --run (or --run_name); name one")
        path = newest_checkpoint(os.path.join(cfg.save_model_dir, cfg.run))
        if path is None:
            return cfg, None, None, True
    else:
        path = find_checkpoint(cfg.resume)
    checkpoint = load_checkpoint(path)
    saved = checkpoint["config"]
    for key in sorted(explicit & set(RESUME_FIXED)):
        if key in saved and getattr(cfg, key) != saved[key]:
            raise ConfigError(f"--{key}: a resumed run keeps its checkpoint's {key} ({saved[key]!r}); "
                              f"start a new run to change it")
    resumed = config_from_dict(saved, {k: getattr(cfg, k) for k in explicit})
    source_dir = os.path.dirname(os.path.abspath(path))
    resumed.save_model_dir = cfg.save_model_dir if "save_model_dir" in explicit else os.path.dirname(source_dir)
    if "run" not in explicit:
        resumed.run = os.path.basename(source_dir)
    continuing = os.path.abspath(os.path.join(resumed.save_model_dir, resumed.run)) == source_dir
    return resumed, checkpoint, path, continuing


if __name__ == "__main__":
    try:
        summary = main()
    except (ConfigError, CheckpointError) as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one says so
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged:  # already logged, with the step and the checkpoint to go back to
        sys.exit(1)
    if summary["interrupted"]:
        # Stopped by SIGTERM / SIGUSR1 with a checkpoint saved: exit as that signal would have
        # (128 + its number), so schedulers and shell scripts see a run that has not finished.
        sys.exit(128 + signal.Signals[summary["interrupted"]])
