"""Train a small transformer. `main` is the outline, top to bottom:

argv -> Config -> session (device, ranks, logging) -> resume? -> data -> model (-> compile -> DDP) ->
optimizers -> run directory -> loop { batch -> forward/backward (x accumulation) -> clip -> step ->
log / eval / save } -> final checkpoint -> plot.

    python train.py                                  # groks modular addition on a CPU
    python train.py --preset shakespeare_char --data_path data/tiny_shakespeare.txt
    torchrun --nproc_per_node=8 train.py --preset shakespeare_char
    python train.py --init_from gpt2 --data_path data/tiny_shakespeare.txt   # fine-tune a pretrained model
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import math
import os
import platform
import signal
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing.checkpoints import CheckpointError, find_checkpoint, load_checkpoint, newest_checkpoint, seed_everything, set_rng_state
from config import Config, ConfigError, format_config, parse_config, resumed_config
from data import IGNORE, build_data
from tasks import TASKS
from plumbing.distributed import (all_reduce_sum, broadcast_object, elastic_restart_count, gather_objects,
                         max_over_ranks, regroup_ddp_buckets)
from fourier import progress_measures
from plumbing.hardware import autocast, describe_environment, flops_per_token, no_mfu_reason, peak_flops
from model import ModelWithLoss, Transformer, head_width
from optimizer import EarlyStopping, GrokfastEMA, LRSchedule, apply_lr, build_optimizers, load_optimizer_states
from interop.huggingface import apply_init_from, load_weights, resolve
from plumbing.rundirs import forget_launch, launched_run, remember_launch, unique_run_name
from plumbing.session import Loop, Session, StepClock, run_command
from plumbing.sharding import full_value, load_sharded, set_gradient_sync, shard, state_for_saving
from plumbing.sharding import is_sharded as sharded
from plumbing.tracking import plot_training_curves, wandb_sweep_run
from utils import format_duration


def main(argv: list[str] | None = None) -> dict:
    """One training run; returns its summary. Bad input: ConfigError / CheckpointError before anything is
    written (exit 2). SIGTERM / SIGUSR1: a checkpoint after the step the ranks agree on (summary["interrupted"];
    exit 128 + the signal). A run that diverges raises TrainingDiverged (exit 1)."""
    cfg, explicit = parse_config(argv)
    with Session(cfg.device, cfg.dtype, cfg.step_timeout) as session:
        log, dist, device, dtype = session.log, session.dist, session.device, session.dtype
        cfg, explicit, sweep = join_wandb_sweep(cfg, explicit)
        resume = resolve_resume(cfg, explicit)
        if cfg.init_from and resume.checkpoint is None:  # a pretrained start: its task, tokenizer and shape
            resume.cfg = apply_init_from(resume.cfg, explicit)
        cfg = resume.cfg
        data = build_data(cfg, dist, device)  # before the run directory: a missing file leaves nothing behind
        max_steps = plan_steps(cfg, data, dist.world_size)
        raw_model, model = build_model(cfg, data, session, resume)
        training = Training.build(cfg, raw_model, session, resume, max_steps)
        if isinstance(model, DDP) and resume.checkpoint is not None:  # bit-exact resume on 3+ ranks (see there)
            regroup_ddp_buckets(model, functools.partial(first_loss, model, data, training.step, device, dtype), device)
        run_dir = claim_run_dir(cfg, explicit, session, resume)
        if session.is_main:  # a text run's tokenizer beside config.json: the run opens without its corpus
            data.save_to_run(run_dir)
        speed = describe_run(cfg, raw_model, data, session, resume, training.step, max_steps)
        loop = session.loop(run_dir, cfg, max_steps, training.step, raw_model.parameters, name=cfg.run_name,
                            last=resume.last_good, wandb_id=resume.wandb_id, elapsed=training.elapsed_before,
                            wandb_entity=cfg.wandb_entity, save=cfg.save_model, sharded=cfg.fsdp)

        # ---- the loop; SIGTERM / SIGUSR1 (preemption) end it after a step all ranks agree on, with a checkpoint
        step, stop, last = training.step, False, {}
        with loop.running():
            while step < max_steps and not stop:
                apply_lr(training.optimizers, training.schedule(step))
                batches, num_targets = data.train_batches(step)
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
                with memory_advice(cfg, session, run_dir, batches[0][0], first=step == training.step):
                    for micro, (x, y) in enumerate(batches):
                        # Gradients are all-reduced only on the last micro-step (DDP's no_sync on the others).
                        with gradient_sync(model, raw_model, dist, micro == len(batches) - 1):
                            with autocast(device, dtype):
                                loss, micro_correct = model(x, y)  # summed cross-entropy (fp32), correct predictions
                            # This micro-batch's share of the global mean; DDP averages over ranks, so x world size.
                            training.scaler.scale(loss * (dist.world_size / num_targets)).backward()
                        loss_sum += loss.detach()
                        correct += micro_correct
                    grad_norm = training.finish_step(cfg.grad_clip)  # unscale, Grokfast, clip, step
                step += 1
                # Under fp16 an inf gradient is the scaler's business (it skips the step); a bad loss never is.
                # metrics.jsonl gets step 1, every log_every-th step and the last; the console also
                # gets the first step after a resume, to show the run is moving (due.show).
                due = loop.after_step(step, loss_sum if training.scaler.is_enabled() else loss_sum + grad_norm)
                signum = loop.agreed_stop_signal()
                record = {}
                if due.show:
                    train = train_metrics(step, loss_sum, correct, num_targets, grad_norm, training, loop.clock, speed,
                                          session)
                    at_most = training.early_stopping.active  # early stopping may end it sooner than the ETA says
                    log.info(train_line(train, max_steps) + f" | {loop.clock.progress(step, at_most)}")
                    last, record = {**last, **train}, (train if due.record else {})
                with loop.clock.paused():  # evals and checkpoints stay out of ms/step and tokens/s
                    if due.evaluate:
                        val = evaluate(model, raw_model, data, cfg, session)
                        record, last = {"step": step, **record, **val}, {**last, **val}
                        stop = training.early_stopping.update(val["val_loss"], val.get("val_acc"))
                        log.info(f"eval {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()))
                        if training.schedule.observe(val["val_loss"]):
                            log.info(f"plateau: LR x {training.schedule.factor:.3g} of its schedule from step "
                                     f"{step + 1}")
                        if data.generates_text and cfg.sample_tokens and (session.is_main or sharded(raw_model)):
                            print_samples(raw_model, data, cfg, step, session)
                        if val["val_loss"] < training.best_val_loss:
                            training.best_val_loss = val["val_loss"]
                            loop.save(step, training.state(step, loop), "best.pt")
                    loop.write(record)
                    if due.save:
                        loop.save(step, training.state(step, loop))
                    if due.evaluate and cfg.rclone_every and step // cfg.eval_every % cfg.rclone_every == 0:
                        loop.tracker.copy()  # in the background; a copy still running is left to finish
                    if not stop:  # an early stop at this step is not a preemption
                        stop = loop.stop_requested(step, signum)

            # ---- the end: checkpoint, picture, summary (a second signal here changes nothing)
            loop.save(step, training.state(step, loop))
        del model  # the DDP wrapper goes before the process group does (see distributed.teardown_distributed)
        if not sharded(raw_model):
            session.report_replicas(raw_model.parameters())
        summary = finish_run(cfg, session, loop, run_dir, step, stop, training, last, sweep)
    return summary


# ---------------------------------------------------------------- the run, before the loop


def join_wandb_sweep(cfg: Config, explicit: set[str]):
    """Started by `wandb agent` (sweeps/): log to the sweep's run, in a run directory named after it,
    which continues from its checkpoint when W&B hands a preempted run out again. Returns
    (cfg, explicit, whether this is a sweep's run)."""
    sweep_run = wandb_sweep_run()
    if sweep_run is not None:
        cfg.wandb_enabled = True
        if "run_name" not in explicit:
            cfg.run_name, explicit = f"sweep-{sweep_run[0]}-{sweep_run[1]}", explicit | {"run_name"}
            cfg.resume = cfg.resume or "auto"
    return cfg, explicit, sweep_run is not None


@dataclass
class Resume:
    """What --resume means for this run. `continuing`: the checkpoint is this run's own (a resume in
    place), or `--resume auto` found a run that saved nothing yet, which restarts it from step 0.
    `own_dir`: the run directory may already hold files of this run (when continuing, and when
    torchrun restarted us)."""
    cfg: Config
    checkpoint: dict | None = None
    path: str | None = None
    continuing: bool = False
    own_dir: bool = False

    @property
    def last_good(self) -> tuple[str, int] | None:
        """This run's newest checkpoint and its step: where to go back to if training diverges."""
        return (self.path, self.checkpoint["step"]) if self.checkpoint is not None and self.continuing else None

    @property
    def wandb_id(self) -> str | None:
        return self.checkpoint["wandb_id"] if self.checkpoint is not None and self.continuing else None


def resolve_resume(cfg: Config, explicit: set[str]) -> Resume:
    """The checkpoint's config with the flags typed now on top (e.g. a longer max_steps). A checkpoint
    with --run_name naming a different run starts that new run from the checkpoint's state. Every
    rank must find the same checkpoint."""
    restarted = elastic_restart_count() > 0
    if restarted:
        # `torchrun --max-restarts` restarted this worker after a failure: carry on with the run the
        # first attempt trained (named by --run_name, by the checkpoint resumed in place, or noted by
        # rank 0 when it generated the name), from that run's newest checkpoint.
        run = cfg.run_name or launched_run(cfg.runs_dir)
        if not run and cfg.resume not in ("", "auto"):
            in_place = cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(os.path.abspath(cfg.resume))
            cfg.resume = in_place  # its newest checkpoint, which may be newer than the file named
        elif run:
            cfg.run_name, explicit = run, explicit | {"run_name"}
            if newest_checkpoint(os.path.join(cfg.runs_dir, run)):
                cfg.resume = "auto"
            # else nothing saved yet: start over as launched, in the same directory
    resume = _resolve_resume(cfg, explicit)
    resume.own_dir = resume.continuing or restarted
    # Every rank read --resume for itself; on several nodes they agree only if the run directory
    # is on a file system they all share.
    steps = gather_objects(resume.checkpoint["step"] if resume.checkpoint is not None else 0)
    if len(set(steps)) > 1:
        raise ConfigError(f"--runs_dir: the ranks found different checkpoints (steps by rank: {steps}); "
                          f"on several nodes it must be a directory every node shares")
    return resume


def _resolve_resume(cfg: Config, explicit: set[str]) -> Resume:
    if not cfg.resume:
        return Resume(cfg)
    if cfg.resume == "auto":
        if not cfg.run_name:
            raise ConfigError("--resume: auto continues the run named by --run_name (or --run); name one")
        path = newest_checkpoint(os.path.join(cfg.runs_dir, cfg.run_name))
        if path is None:
            return Resume(cfg, continuing=True)
    else:
        path = find_checkpoint(cfg.resume)
    checkpoint = load_checkpoint(path, weights=False)  # a sharded one's weights are read into the shards later
    resumed = resumed_config(cfg, checkpoint["config"], explicit)
    source_dir = os.path.dirname(os.path.abspath(path))
    resumed.runs_dir = cfg.runs_dir if "runs_dir" in explicit else os.path.dirname(source_dir)
    if "run_name" not in explicit:
        resumed.run_name = os.path.basename(source_dir)
    continuing = os.path.abspath(os.path.join(resumed.runs_dir, resumed.run_name)) == source_dir
    return Resume(resumed, checkpoint, path, continuing)


def plan_steps(cfg: Config, data, world_size: int) -> int:
    """max_steps (or --epochs of the training set), once the batch is known to split over the ranks."""
    global_batch = data.global_batch_size()
    if global_batch % (cfg.accumulation_steps * world_size) and global_batch < data.train_size:
        raise ConfigError(f"--batch_size: {global_batch} does not split into accumulation_steps "
                          f"({cfg.accumulation_steps}) x world size ({world_size}) equal parts")
    return cfg.max_steps or math.ceil(cfg.epochs * data.steps_per_epoch())


def build_model(cfg: Config, data, session: Session, resume: Resume):
    """(the model, what the loop calls: model and loss in one module, compiled and DDP-wrapped or
    sharded (--fsdp) as asked). The same initialisation on every rank (DDP also broadcasts rank 0's
    weights), then each rank its own dropout streams. A sharded checkpoint's weights are read later,
    with the optimizers' state (Training.build)."""
    seed_everything(cfg.seed)
    raw_model = Transformer(cfg, data.vocab_size).to(session.device)
    raw_model.checkpoint_blocks = cfg.activation_checkpointing
    if session.dist.rank:
        seed_everything(cfg.seed + session.dist.rank)
    shard_it = cfg.fsdp and session.dist.enabled
    if resume.checkpoint is not None and not resume.checkpoint.get("sharded"):  # (a sharded one: Training.build)
        if shard_it:
            raise CheckpointError(f"{resume.path} was saved by a run without --fsdp, whose optimizer state is not "
                                  f"sharded; continue it without --fsdp")
        try:
            raw_model.load_state_dict(resume.checkpoint["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{resume.path} does not fit this model ({str(e).splitlines()[0]})") from None
    elif cfg.init_from:
        load_weights(raw_model, resolve(cfg.init_from, "init_from"), "init_from", cfg.init_from)
    if shard_it:  # each block, then the root: 1/N of the weights, gradients and moments per rank
        shard(raw_model, session.device, session.dtype)
    # Forward and loss in one module, so that compile fuses the loss too.
    model = ModelWithLoss(raw_model, data.loss_positions, IGNORE)
    if cfg.torch_compile:
        model = torch.compile(model)
    if session.dist.enabled and not shard_it:
        # The only buffers are rotary tables, a function of the config on every rank: DDP's default
        # would broadcast them from rank 0 before every forward. (torch 2.13 deprecates the flag in
        # favour of forward_sync_buffers; we keep the one every torch we admit has, and silence the
        # warning, which every rank printed.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            model = DDP(model, device_ids=[session.dist.local_rank] if session.device.type == "cuda" else None,
                        broadcast_buffers=False)
    return raw_model, model.train()


def first_loss(model, data, step: int, device, dtype) -> torch.Tensor:
    """The loss of this rank's first micro-batch of `step`, as the loop computes it."""
    x, y = data.train_batches(step)[0][0]
    with autocast(device, dtype):
        return model(x, y)[0]


@dataclass
class Training:
    """What the loop updates besides the weights (optimizers, precision scaler, early stopping,
    Grokfast, the LR schedule, the best val_loss), where it starts, and its checkpoint entries."""
    raw_model: Transformer
    cfg: Config
    optimizers: list
    scaler: torch.amp.GradScaler
    early_stopping: EarlyStopping
    grokfast: GrokfastEMA | None
    schedule: LRSchedule
    step: int = 0
    best_val_loss: float = math.inf
    elapsed_before: float = 0.0  # wall seconds of training before this process (a resumed run's earlier part)

    @classmethod
    def build(cls, cfg: Config, raw_model: Transformer, session: Session, resume: Resume, max_steps: int) -> "Training":
        training = cls(raw_model, cfg, build_optimizers(raw_model, cfg),
                torch.amp.GradScaler(session.device.type, enabled=session.dtype == torch.float16),
                EarlyStopping(cfg.patience, cfg.min_delta, cfg.target_val_acc),
                GrokfastEMA(raw_model.parameters(), cfg.grokfast_alpha, cfg.grokfast_lamb) if cfg.grokfast_lamb else None,
                LRSchedule(cfg, max_steps))
        checkpoint = resume.checkpoint
        if checkpoint is None:
            return training
        if checkpoint.get("sharded"):  # each rank reads the pieces of its own shards, whatever the world size was
            load_sharded(checkpoint["sharded"], raw_model, training.optimizers)
        else:
            try:
                load_optimizer_states(training.optimizers, checkpoint["optimizers"])  # keeps today's LRs
            except ValueError as e:
                raise CheckpointError(f"{resume.path}: its optimizer state does not fit ({e})") from None
        if training.scaler.is_enabled() and checkpoint["scaler"]:  # fp16 then and now
            training.scaler.load_state_dict(checkpoint["scaler"])
        training.early_stopping.load_state_dict(checkpoint["early_stopping"])
        if training.grokfast is not None and checkpoint.get("grokfast"):
            training.grokfast.load_state_dict(checkpoint["grokfast"])
        training.schedule.load_state_dict(checkpoint.get("lr_schedule"))  # absent before the plateau schedule
        training.step, training.best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
        training.elapsed_before = checkpoint.get("elapsed_seconds", 0.0)  # absent from checkpoints before it existed
        dist = session.dist
        if len(checkpoint["rng"]) == dist.world_size:
            set_rng_state(checkpoint["rng"][dist.rank])  # each rank its own streams
        else:  # a different number of processes: dropout streams cannot continue, so reseed
            seed_everything(cfg.seed + 1_000_003 * training.step + dist.rank)
        return training

    def finish_step(self, grad_clip: float) -> torch.Tensor:
        """After the backward passes: unscale (fp16), Grokfast, clip, step, zero; the gradient norm."""
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        if self.grokfast is not None:
            self.grokfast.apply()
        # the norm over every rank's shards when sharded (a DTensor: its whole value)
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), grad_clip or math.inf))
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def state(self, step: int, loop: Loop) -> dict:
        """The checkpoint's entries (the run layer adds every rank's RNG streams). --fsdp: the weights and
        moments as each rank holds them, keyed by parameter name, for a sharded checkpoint."""
        tensors = (state_for_saving(self.raw_model, self.optimizers) if self.cfg.fsdp else
                   {"model": self.raw_model.state_dict(),  # clean keys: never the compiled or DDP wrapper's
                    "optimizers": [optimizer.state_dict() for optimizer in self.optimizers]})
        return {
            **tensors,
            "scaler": self.scaler.state_dict(),
            "step": step,
            "data_position": {"step": step},  # batches are a function of (seed, step)
            "early_stopping": self.early_stopping.state_dict(),
            "grokfast": self.grokfast.state_dict() if self.grokfast is not None else None,
            "lr_schedule": self.schedule.state_dict(),
            "best_val_loss": self.best_val_loss,
            "elapsed_seconds": loop.clock.elapsed(),
            "config": self.cfg.to_dict(),
            "wandb_id": loop.tracker.wandb_id,
        }


def generate_run_name(cfg: Config) -> str:
    return f"{TASKS[cfg.task].run_name(cfg)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def claim_run_dir(cfg: Config, explicit: set[str], session: Session, resume: Resume) -> str:
    """<runs_dir>/<run_name>/, named (rank 0's generated name if none was given), made and
    claimed for this launch, with train.log and config.json."""
    cfg.run_name = broadcast_object(cfg.run_name or unique_run_name(cfg.runs_dir, generate_run_name(cfg)))
    run_dir = os.path.join(cfg.runs_dir, cfg.run_name)
    session.claim_directory(run_dir, resume.own_dir, f"--run_name: {run_dir} already holds a run; pick another "
                            f"--run_name or pass --resume auto to continue it", cfg.to_dict(), cfg.claim_timeout)
    if session.is_main and "run_name" not in explicit:  # a generated name: note it for workers torchrun restarts
        remember_launch(cfg.runs_dir, cfg.run_name)
    return run_dir


@dataclass
class Speed:
    """What tok/s and MFU are computed from."""
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # the GPU's, or None: no MFU


def describe_run(cfg: Config, raw_model: Transformer, data, session: Session, resume: Resume, step: int,
                 max_steps: int) -> Speed:
    """The run describes itself (config, versions, hardware, sizes) at the top of its log."""
    log, device = session.log, session.device
    origin = "new" if resume.checkpoint is None else (f"resumed at step {step}" if resume.continuing
                                                       else f"started from {resume.path} at step {step}")
    log.info(f"tinylab run {cfg.run_name} ({origin}) -> {os.path.join(cfg.runs_dir, cfg.run_name)}")
    log.info(format_config(cfg))
    log.info(describe_environment(device, session.dist.world_size, gather_objects(platform.node()), session.math))
    global_batch = data.global_batch_size()
    tokens_per_step = global_batch * data.seq_len
    flops_token = flops_per_token(raw_model.num_params(exclude_embeddings=True), cfg.num_blocks,
                                  cfg.num_heads, head_width(cfg), data.seq_len)
    peak = peak_flops(device)
    log.info(f"model {raw_model.num_params():,} parameters · vocab {data.vocab_size} · "
             f"dtype {str(session.dtype).replace('torch.', '')} · compile {cfg.torch_compile}")
    log.info(f"data {cfg.task}: {data.train_size:,} train examples · global batch {global_batch} "
             f"({tokens_per_step:,} tokens/step) · {max_steps:,} steps"
             + ("" if peak else f" · MFU: unknown, {no_mfu_reason(device)}"))
    if data.generates_text:
        log.info(f"corpus: {data.description} · train {len(data.train_tokens):,} tokens in "
                 f"{len(data.train_tokens.parts)} shard{'s' if len(data.train_tokens.parts) != 1 else ''} · "
                 f"val {len(data.val_tokens):,} tokens")
    if step >= max_steps:
        log.info(f"nothing to do: step {step} >= max_steps {max_steps}")
    return Speed(tokens_per_step, flops_token, peak)


# ---------------------------------------------------------------- inside the loop


def train_metrics(step: int, loss_sum: torch.Tensor, correct: torch.Tensor, num_targets: int, grad_norm: torch.Tensor,
                  training: Training, clock: StepClock, speed: Speed, session: Session) -> dict:
    """This step's training record: loss and accuracy over the global batch (all-reduced), LR,
    gradient norm, and the pace since the last one (ms/step, tok/s, MFU on known GPUs)."""
    sums = all_reduce_sum({"loss_sum": loss_sum.item(), "correct": correct.item()}, session.device)
    ms_per_step, tokens_per_sec = clock.report(speed.tokens_per_step)
    train = {"step": step, "train_loss": sums["loss_sum"] / num_targets, "train_acc": sums["correct"] / num_targets,
             "lr": training.optimizers[0].param_groups[0]["lr"], "grad_norm": grad_norm.item(), "ms_per_step": ms_per_step,
             "tokens_per_sec": tokens_per_sec}
    if speed.peak_flops:
        train["mfu"] = speed.flops_per_token * tokens_per_sec / session.dist.world_size / speed.peak_flops
    return train


def train_line(train: dict, max_steps: int) -> str:
    return (f"step {train['step']:>6}/{max_steps} | train_loss {train['train_loss']:.4f} | "
            f"train_acc {train['train_acc']:.4f} | lr {train['lr']:.2e} | grad_norm {train['grad_norm']:.3f} | "
            f"{train['ms_per_step']:.1f} ms/step | {train['tokens_per_sec']:,.0f} tok/s"
            + (f" | mfu {train['mfu']:.1%}" if "mfu" in train else ""))


@torch.no_grad()
def evaluate(model, raw_model: Transformer, data, cfg: Config, session: Session) -> dict:
    """Validation metrics over the whole val split (each rank its share), all-reduced; with
    --track_progress also Nanda et al.'s progress measures (every rank computes the same numbers)."""
    model.eval()
    sums = dict.fromkeys(data.EVAL_KEYS, 0.0)  # the same keys on every rank, batches or not
    for x, y, extras in lockstep(data.val_batches(), sharded(raw_model), session.dist):
        with autocast(session.device, session.dtype):
            logits = raw_model(x, data.loss_positions)  # no DDP wrapper: eval needs no gradient sync
        if y is None:
            continue  # a sharded forward this rank joins with nothing of its own to evaluate
        for key, value in data.eval_sums(logits, y, extras).items():
            sums[key] += value
    model.train()
    metrics = data.eval_metrics(all_reduce_sum(sums, session.device))
    if cfg.track_progress:
        metrics.update(progress_measures(raw_model, data, cfg.modulus))
    return metrics


def lockstep(batches, together: bool, dist_info):
    """`batches`, or under FSDP (`together`), as many batches on every rank: a sharded forward is a
    collective, so a rank whose share has run out joins the others' forwards with its last batch
    again (targets None: not counted) until every rank's has."""
    if not together:
        yield from batches
        return
    last = None
    for batch in itertools.chain(batches, itertools.repeat(None)):
        if not max_over_ranks(int(batch is not None), dist_info):
            return
        if batch is None:
            if last is None:
                raise RuntimeError("a rank has no validation batch at all under --fsdp")
            yield last[0], None, None
        else:
            last = batch
            yield batch


def gradient_sync(model, raw_model, dist_info, sync: bool):
    """Whether this micro-step's backward reduces the gradients over the ranks (the last one does):
    DDP's no_sync on the others, FSDP's reduce-scatter skipped on them (whole gradients kept here)."""
    if sharded(raw_model):
        set_gradient_sync(raw_model, sync)
        return contextlib.nullcontext()
    return model.no_sync() if dist_info.enabled and not sync else contextlib.nullcontext()


@contextlib.contextmanager
def memory_advice(cfg: Config, session: Session, run_dir: str, micro_batch: torch.Tensor, first: bool):
    """Out of memory in the run's first step (forward, backward, optimizer step) is bad input: the micro
    batch does not fit the device. One line names it and what to try (ConfigError: exit 2). Later, the
    same micro batch has fitted, so the error is something else's (a leak, fragmentation) and stays as
    it is. Out of memory: CUDA's torch.OutOfMemoryError, or the CPU allocator's error (under a ulimit)."""
    try:
        yield
        return
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not first or not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)):
            raise
        message = out_of_memory_message(cfg, session, run_dir, tuple(micro_batch.shape), cfg.task == "text")
    error = ConfigError(message)
    error.every_rank = True
    raise error from None


def out_of_memory_message(cfg: Config, session: Session, run_dir: str, shape: tuple, text: bool) -> str:
    device, dist = session.device, session.dist
    where = f"{device}" + (f" (rank {dist.rank})" if dist.enabled else "")
    if device.type == "cuda":
        used, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
        where += f", {used / 2**30:.1f} of {total / 2**30:.1f} GiB allocated at the peak"
    sequences = shape[0]
    size = f"{sequences} sequences of {shape[1]} tokens" if len(shape) > 1 else f"{sequences} examples"
    tries = []
    if sequences > 1:
        tries.append(f"--accumulation_steps {2 * cfg.accumulation_steps} (micro batches half as large, the same "
                     f"global batch) or a smaller --batch_size")
    if not cfg.activation_checkpointing:
        tries.append("--activation_checkpointing (each block's activations recomputed in the backward pass)")
    tries.append("--fsdp (weights, gradients and optimizer state sharded over the ranks)" if not cfg.fsdp
                 else "--fsdp on more GPUs")
    if text:
        tries.append("a shorter --context_len")
    per_rank = " per rank" if dist.enabled else ""
    return (f"out of memory in the first step on {where}: a micro batch of {size}{per_rank} is too large. "
            f"Try {'; '.join(tries)}. Nothing was trained or saved ({run_dir} holds this attempt's log).")


def print_samples(raw_model: Transformer, data, cfg: Config, step: int, session: Session) -> None:
    device = session.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed + step)
    raw_model.eval()
    for prompt in data.SAMPLE_PROMPTS:
        tokens = torch.tensor([data.encode(prompt) or [0]], device=device)  # unknown characters drop out
        with autocast(device, session.dtype):
            out = raw_model.generate(tokens, cfg.sample_tokens, cfg.temperature, cfg.top_k or None, generator)
        session.log.info(f"--- sample from {prompt!r}:\n{data.decode(out[0].tolist())}")
    raw_model.train()


# ---------------------------------------------------------------- the end


def finish_run(cfg: Config, session: Session, loop: Loop, run_dir: str, step: int, stop: bool, training: Training,
               last: dict, sweep: bool) -> dict:
    """The closing lines, the training-curves picture, W&B closed (a preempted run shown as such, not
    failed, so that a sweep hands it out again; under `wandb agent` only SIGUSR1, slurm_agent.sh's
    warning, means that: SIGTERM is the agent stopping the run), the summary."""
    preempted = loop.interrupted
    if stop and not preempted:
        session.log.info(f"early stop: {training.early_stopping.reason}")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if session.is_main and os.path.isfile(metrics_path):
        plot_training_curves(metrics_path, os.path.join(run_dir, "training_curves.png"), title=cfg.run_name)
    train_seconds = loop.clock.training_seconds()
    seconds = loop.finish(
        step, f"(training {format_duration(train_seconds)})"
        + "".join(f" | {k} {last[k]:.4f}" for k in ("val_loss", "val_acc") if k in last) + f" | {run_dir}",
        interrupted=(f"{'last.dcp' if cfg.fsdp else 'last.pt'} saved. Continue with --resume auto --run_name {cfg.run_name}"
                     + (f" --runs_dir {cfg.runs_dir}" if cfg.runs_dir != "runs" else "")
                     if cfg.save_model else "nothing saved (--save_model false)"),
        preempted=bool(preempted) and not (sweep and preempted == signal.SIGTERM))
    if session.is_main and not preempted:
        forget_launch(cfg.runs_dir)
    return {"run_dir": run_dir, "steps": step, "seconds": seconds, "train_seconds": train_seconds,
            "best_val_loss": training.best_val_loss, "interrupted": loop.interrupted_name(),
            **{k: v for k, v in last.items() if k != "step"}}


if __name__ == "__main__":
    run_command(main)
