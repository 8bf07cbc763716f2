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
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from config import RESUME_FIXED, ConfigError, config_from_dict, format_config, parse_config
from data import IGNORE, build_data
from model import Transformer
from optimizer import (EarlyStopping, GrokfastEMA, apply_lr, build_optimizers, load_optimizer_states,
                       lr_multiplier)
from utils import (CheckpointError, all_reduce_sum, attach_log_file, autocast, broadcast_object,
                   close_logging, create_run_dir, describe_environment, find_checkpoint,
                   flops_per_token, gather_objects, generate_run_name, load_checkpoint, newest_checkpoint, peak_flops,
                   pick_device, pick_dtype, plot_training_curves, rng_state, save_checkpoint,
                   seed_everything, set_rng_state, setup_distributed, setup_logging,
                   teardown_distributed, trim_metrics, unique_run_name)


def main(argv: list[str] | None = None) -> dict:
    """Runs one training run; returns a summary (steps, seconds, final and best metrics, run dir).

    Bad input raises ConfigError / CheckpointError before anything is written; `python train.py`
    turns those into one line on stderr and exit status 2.
    """
    started = time.perf_counter()
    cfg, explicit = parse_config(argv)

    # ---- resume: the checkpoint's config, with the flags typed now on top (e.g. a longer max_steps)
    cfg, checkpoint, checkpoint_path, continuing = resolve_resume(cfg, explicit)

    # ---- processes, device, precision
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    dist = setup_distributed(device.type)
    is_main = dist.is_main
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    log = setup_logging(is_main)

    try:
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
        model = torch.compile(raw_model) if cfg.torch_compile else raw_model
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
                create_run_dir(cfg.save_model_dir, run_name, resuming=continuing)
                trim_metrics(metrics_path, step)  # a resumed run logs the steps after its checkpoint again
                attach_log_file(log, os.path.join(run_dir, "train.log"))
                cfg.save(os.path.join(run_dir, "config.json"))
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
             + ("" if peak else " · MFU: not shown (no peak-FLOPs figure for this device)"))

    wandb_run = None
    if cfg.wandb_enabled and is_main:
        from dotenv import load_dotenv

        load_dotenv()  # WANDB_API_KEY, WANDB_MODE, ... from .env
        import wandb

        wandb_run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=run_name,
                               dir=run_dir, config=cfg.to_dict(), id=wandb_id, resume="allow")
        wandb_id = wandb_run.id

    def write_metrics(record: dict) -> None:
        if not is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def save(name: str) -> None:
        if not cfg.save_model:
            return
        rng = gather_objects(rng_state())  # every rank's own RNG streams; all ranks take part
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
            "config": cfg.to_dict(),
            "wandb_id": wandb_id,
        }, os.path.join(run_dir, name))

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

    # ---- the loop
    if step >= max_steps:
        log.info(f"nothing to do: step {step} >= max_steps {max_steps}")
    model.train()
    stop = False
    train_started = time.perf_counter()
    window_start, window_steps, start_step = time.perf_counter(), 0, step
    last = {}
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
                    logits = model(x, data.loss_positions)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
                # Sum over this micro-batch / targets in the whole global batch = this micro-batch's
                # share of the global mean; DDP averages over ranks, so scale by world size.
                scaler.scale(loss * (dist.world_size / num_targets)).backward()
            loss_sum += loss.detach()
            correct += ((logits.argmax(-1) == y) & (y != IGNORE)).sum()
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        if grokfast is not None:
            grokfast.apply()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        record = {}
        if step % cfg.log_every == 0 or step == max_steps or step == start_step + 1:
            sums = all_reduce_sum({"loss_sum": loss_sum.item(), "correct": correct.item()}, device)
            elapsed = time.perf_counter() - window_start
            ms_per_step = 1000 * elapsed / window_steps
            tokens_per_sec = tokens_per_step * window_steps / elapsed
            record = {"step": step, "train_loss": sums["loss_sum"] / num_targets,
                      "train_acc": sums["correct"] / num_targets,
                      "lr": optimizers[0].param_groups[0]["lr"], "grad_norm": grad_norm.item(),
                      "ms_per_step": ms_per_step, "tokens_per_sec": tokens_per_sec}
            if peak:
                record["mfu"] = flops_token * tokens_per_sec / dist.world_size / peak
            # ETA to max_steps; "<=" when early stopping may end the run sooner.
            eta = ("<=" if early_stopping.active else "") + _duration((max_steps - step) * ms_per_step / 1000)
            log.info(f"step {step:>6}/{max_steps} | train_loss {record['train_loss']:.4f} | "
                     f"train_acc {record['train_acc']:.4f} | lr {record['lr']:.2e} | "
                     f"grad_norm {record['grad_norm']:.3f} | {ms_per_step:.1f} ms/step | "
                     f"{tokens_per_sec:,.0f} tok/s" + (f" | mfu {record['mfu']:.1%}" if peak else "")
                     + f" | {_duration(time.perf_counter() - train_started)}, ETA {eta}")
            window_start, window_steps = time.perf_counter(), 0

        paused = time.perf_counter()  # eval and checkpoints are kept out of ms/step and tokens/s
        if step % cfg.eval_every == 0 or step == max_steps:
            val = evaluate()
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
            last = {**last, **record}
            write_metrics(record)
        if cfg.save_every and step % cfg.save_every == 0:
            save("last.pt")
        window_start += time.perf_counter() - paused

    # ---- the end: checkpoint, picture, summary
    save("last.pt")
    seconds = time.perf_counter() - started
    if stop:
        log.info(f"early stop: {early_stopping.reason}")
    if is_main and os.path.isfile(metrics_path):
        plot_training_curves(metrics_path, os.path.join(run_dir, "training_curves.png"), title=run_name)
    summary = {"run_dir": run_dir, "steps": step, "seconds": seconds,
               "train_seconds": time.perf_counter() - train_started, "best_val_loss": best_val_loss,
               **{k: v for k, v in last.items() if k != "step"}}
    log.info(f"done: {step} steps in {_duration(seconds)} (training {_duration(summary['train_seconds'])})"
             + "".join(f" | {k} {last[k]:.4f}" for k in ("val_loss", "val_acc") if k in last)
             + f" | {run_dir}")
    if wandb_run is not None:
        wandb_run.summary.update({"steps": step, "seconds": seconds})
        wandb_run.finish()
    close_logging(log)
    teardown_distributed()
    return summary


def resolve_resume(cfg, explicit: set[str]):
    """What --resume means for this run: (config, checkpoint, its path, continuing).

    `continuing` says the run directory already belongs to this run (a resume in place, or
    `--resume auto` of a run that saved nothing yet, which restarts it from step 0). A checkpoint
    with `--run` naming a different run starts that new run from the checkpoint's state.
    """
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


def _duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h13m."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one says so
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
