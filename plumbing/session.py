"""The run layer: what surrounds every training loop, written once for train.py, sae.py, lens.py and
any later trainer. Each program keeps its own loop; around it:

    with Session(cfg.device, cfg.dtype) as session:           # .env, device, ranks, precision, logging
        ...                                                   # bad input: ConfigError, nothing written
        session.claim_directory(run_dir, resuming, ...)       # one live writer; train.log, config.json
        loop = session.loop(run_dir, cfg, max_steps, step, model.parameters, checkpoint)
        with loop.running():                                  # SIGTERM / SIGUSR1 end the loop, not the process
            while step < max_steps:
                ...
                due = loop.after_step(step, loss)             # clock, NaN guard, what is due (Loop below)
                ...
                if loop.stop_requested(step): break           # every rank stops after the same step
            loop.save(step, state())
        del ddp_model                                         # DDP holds the process group: drop it first
        loop.finish(step, "...")                              # the closing line, W&B closed
    # leaving the block, however it is left: W&B closed, the claim released, logging closed, the
    # process group torn down (after a barrier only when the run ended normally)

`run_command(main)` is every program's `if __name__ == "__main__"` ending: exit 2 for bad input,
1 for a run that diverged, 128 + the signal for one that a signal stopped, 0 on every rank for
one that finished.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from config import ConfigError, resumed_config
from plumbing.checkpoints import CheckpointError, load_checkpoint, rng_state, save_checkpoint, temporary_path
from plumbing.distributed import (StopAgreement, broadcast_object, gather_objects, gloo_threads, min_over_ranks,
                         same_on_all_ranks, setup_distributed, shared_store, stop_with_launcher,
                         teardown_distributed)
from plumbing.hardware import fast_math, pick_device, pick_dtype
from plumbing.rundirs import Claim, create_run_dir
from plumbing import sharding
from plumbing.sharding import SUFFIX, full_value, save_sharded
from plumbing.watchdog import Watchdog, collective_timeout
from plumbing.tracking import Tracker, attach_log_file, close_logging, load_env_files, setup_logging, wandb_settings
from utils import format_duration


DEFAULT_STEP_TIMEOUT = 900.0  # seconds: longer than a first compile or a long evaluation (train.py's --step_timeout)


class TrainingDiverged(Exception):
    """The loss, gradient norm or weights stopped being finite; the message names the step and the
    checkpoint to go back to."""


class StopSignals:
    """SIGTERM and SIGUSR1 ask the loop to stop after a step instead of killing it (the current one
    in a single process; under torchrun the one the ranks agree on, see Session.agreed_stop_signal).

    Slurm sends one of them before preemption or at the time limit (`--signal`), torchrun forwards
    SIGTERM (and whatever TORCHELASTIC_SIGNALS_TO_HANDLE lists) to its workers, and `kill` sends
    SIGTERM. The handler only records the first signal, so a second one, even in the middle of
    saving a checkpoint, changes nothing. Use as a context manager: the previous handlers return on
    exit. Outside the main thread (where Python cannot install handlers) it records nothing.
    """

    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received = 0  # signal number, 0 for none
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):  # Windows has no SIGUSR1
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set from C
        self._previous.clear()


class Session:
    """Device, precision, process group and logging for one run, opened and torn down in one place.

    Entering reads .env files, ties a torchrun worker to its launcher (it stops when the launcher
    dies), picks the device and the autocast dtype, joins the process group (collectives time out
    `step_timeout` + 60 s), starts the logger (rank 0 prints; lines reach train.log once the directory
    is claimed) and, with several ranks, the hang watchdog (watchdog.py). Leaving, whether the
    block ended, raised or was stopped: closes the tracker if the program did not (a failed W&B run),
    releases the directory's claim, closes the log and tears the process group down.
    """

    def __init__(self, device: str = "auto", dtype: str = "auto", step_timeout: float = DEFAULT_STEP_TIMEOUT):
        self.started = time.perf_counter()
        self.requested = (device, dtype)
        self.step_timeout = step_timeout
        self.watchdog = Watchdog(0, 1, 0)  # a real one once the ranks are known
        self.claim: Claim | None = None
        self._tracker: Tracker | None = None
        self._signals: StopSignals | None = None
        self._stop_agreement: StopAgreement | None = None
        self._claim_lost_said = False

    def __enter__(self) -> "Session":
        load_env_files()  # WANDB_API_KEY, WANDB_MODE, RCLONE_DEST, ... from .env files
        stop_with_launcher()
        self.device = pick_device(self.requested[0], int(os.environ.get("LOCAL_RANK", 0)))
        self.dist = setup_distributed(self.device.type, collective_timeout(self.step_timeout))
        self.dtype = pick_dtype(self.requested[1], self.device)
        self.math = fast_math(self.device)  # how subnormals are handled, for the log
        self.log = setup_logging(self.dist.is_main)
        if self.dist.enabled and self.step_timeout:
            self.watchdog = Watchdog(self.dist.rank, self.dist.world_size, self.step_timeout,
                                     self.log).start(shared_store())
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.watchdog.stop()
        if self._signals is not None:
            self._signals.__exit__()
        if self._tracker is not None:
            self._tracker.finish(exit_code=1)  # only still open if the run failed
        if self.claim is not None:
            self.claim.release()
        close_logging(self.log)
        if self._stop_agreement is not None:
            if kind is None:
                self._stop_agreement.finish()
            self._stop_agreement = None  # its reduction in flight holds the control group
        teardown_distributed(barrier=kind is None, info=self.dist)
        left = gloo_threads() if self.dist.enabled else []
        if left and sharding.USED:
            # FSDP2 and DTensor keep the group alive from C++ after every Python reference is gone
            # (torch 2.13), so its threads would run into the interpreter's shutdown, where they can
            # abort the process (see distributed.teardown_distributed). run_command ends such a
            # process without finalizing the interpreter instead, once everything is written.
            global _FINALIZE
            _FINALIZE = False
        elif left and kind is None:  # something still holds the process group: say so, it may abort at exit
            print(f"warning: rank {self.dist.rank}: gloo threads outlived the process group ({', '.join(left)}); "
                  f"a DDP wrapper still referenced?", file=sys.stderr)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def seconds(self) -> float:
        """Since the session opened."""
        return time.perf_counter() - self.started

    # ------------------------------------------------------------ the output directory

    def claim_directory(self, path: str, resuming: bool, taken: str, config: dict,
                        claim_timeout: float = 300, flag: str = "run_name") -> str:
        """Makes and claims `path` for this launch (rank 0 decides, every rank learns the outcome):
        a directory that already holds files raises ConfigError(`taken`) unless `resuming`; one that
        a live process of another launch writes is refused with its process and host named (see
        rundirs.Claim). Then train.log gets the lines logged so far and config.json the config."""
        failure = None
        if self.is_main:
            try:
                create_run_dir(path, resuming, taken)
                self.claim, took_over = Claim.take(path, claim_timeout, flag)
                attach_log_file(self.log, os.path.join(path, "train.log"))
                if took_over:
                    self.log.info(took_over)
                with open(os.path.join(path, "config.json"), "w") as f:
                    json.dump(config, f, indent=2)
                    f.write("\n")
            except ConfigError as e:
                failure = str(e)
        failure = broadcast_object(failure)
        if failure:
            raise ConfigError(failure)
        return path

    def tracker(self, directory: str, step: int, wandb: dict | None = None, wandb_id: str | None = None) -> Tracker:
        """metrics.jsonl (and W&B, and rclone copies) for the run in `directory`, from `step` on."""
        self._tracker = Tracker(directory, self.is_main, self.log, step, wandb, wandb_id)
        return self._tracker

    def finish_tracking(self, exit_code: int = 0, preempted: bool = False) -> None:
        if self._tracker is not None:
            self._tracker.finish(exit_code, preempted)

    def checkpointer(self, directory: str, params, max_steps: int, enabled: bool = True,
                     last: tuple[str, int] | None = None, advice: str = "") -> "Checkpointer":
        return Checkpointer(self, directory, params, max_steps, enabled, last, advice)

    def loop(self, directory: str, cfg, max_steps: int, step: int, params, checkpoint: dict | None = None,
             name: str = "", advice: str = "", last: tuple[str, int] | None = None, wandb_id: str | None = None,
             elapsed: float = 0.0, wandb_entity: str = "", save: bool = True, sharded: bool = False) -> "Loop":
        """What surrounds a training loop writing to `directory` (see Loop), from `step` on. `cfg`
        has the cadence and W&B fields every trainer's settings share (log_every, eval_every,
        save_every, wandb_enabled, wandb_project). A trainer that continues its own directory passes
        its `checkpoint` (its W&B id, its wall time so far, and <directory>/last.pt as the last good
        checkpoint); train.py, whose start may be another run's checkpoint, passes those three itself."""
        if checkpoint is not None:
            last = last or (os.path.join(directory, "last.pt"), step)
            wandb_id = wandb_id or checkpoint.get("wandb_id")
        name = name or os.path.basename(os.path.normpath(directory))
        wandb = (wandb_settings(cfg.wandb_project, name, directory, cfg.to_dict(), wandb_entity)
                 if cfg.wandb_enabled else None)
        tracker = self.tracker(directory, step, wandb, wandb_id)
        checkpointer = self.checkpointer(directory, params, max_steps, save, last, advice)
        checkpointer.sharded = sharded
        if checkpoint is not None:
            elapsed = checkpoint.get("elapsed_seconds", 0.0)
        return Loop(self, cfg, max_steps, step, tracker, checkpointer, StepClock(max_steps, elapsed))

    # ------------------------------------------------------------ stopping

    @contextlib.contextmanager
    def stop_signals(self):
        """SIGTERM and SIGUSR1 are recorded, not fatal, from the start of the block (the training
        loop) to the end of the session: a second signal while the run saves and finishes changes
        nothing."""
        if self._signals is None:
            self._signals = StopSignals().__enter__()
        yield self._signals

    def agreed_stop_signal(self) -> int:
        """The stop signal any rank has received (0: none). Signals reach ranks at different moments;
        asking after every step makes them all stop after the same one (distributed.StopAgreement: the
        question travels between steps, so a request takes effect within about 0.2 s of steps, or
        two steps when steps are slower). A claim that another launch took over (we were silent past
        its timeout) stops the run the same way, as SIGTERM."""
        received = self._signals.received if self._signals is not None else 0
        if self.claim is not None and self.claim.lost and not received:
            if not self._claim_lost_said:
                self.log.warning(f"warning: {self.claim.path} now names another writer; stopping")
                self._claim_lost_said = True
            received = signal.SIGTERM
        if self._stop_agreement is None:
            self._stop_agreement = StopAgreement(self.dist)
        return self._stop_agreement(received)

    def report_replicas(self, params, what: str = "weights") -> None:
        """DDP keeps replicas identical; say so, or say loudly that they drifted apart."""
        if not self.dist.enabled:
            return
        if same_on_all_ranks([p.detach() for p in params]):
            self.log.info(f"{what} identical on all {self.dist.world_size} ranks")
        else:
            self.log.warning(f"warning: the {what} differ between ranks; the checkpoint holds rank 0's")


class Checkpointer:
    """Saves a run's state into its directory and guards it: every rank's RNG streams are gathered,
    rank 0 writes atomically (checkpoints.save_checkpoint), and nothing is saved, or logged as good,
    once the loss, gradient norm or weights have stopped being finite. Then the run stops with
    TrainingDiverged naming the last good checkpoint.

    `params()` gives the weights to guard (a callable: a lens's grow as its bases unfreeze).
    `watch(step, value)` records the first step whose value was not finite without waiting for the
    device; `check(step)` (before a log line, an eval or a save) reads it, adds whether the weights
    themselves overflowed, and agrees on the earliest bad step over the ranks. With enabled=False
    (train.py's --save_model false) it guards but writes nothing."""

    def __init__(self, session: Session, directory: str, params, max_steps: int, enabled: bool = True,
                 last: tuple[str, int] | None = None, advice: str = ""):
        self.session, self.directory, self.params = session, directory, params
        self.max_steps, self.enabled = max_steps, enabled
        self.last = last  # (path, step) of the newest good checkpoint
        self.advice = advice or "Lower --lr, lengthen --warmup_steps or set --grad_clip, then start again"
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=session.device)
        self.sharded = False  # --fsdp: a folder per checkpoint, each rank writing its shard (sharding.py)

    def watch(self, step: int, value: torch.Tensor) -> None:
        """Step `step` (the step just taken, counted from 1) produced `value`, a scalar on the device
        that is finite when the step was (its loss, or loss + gradient norm)."""
        bad = ~torch.isfinite(value.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step == 0), step, self.first_bad_step)

    def check(self, step: int) -> None:
        """Raises TrainingDiverged, on every rank, if any rank saw a non-finite value or has
        non-finite weights."""
        bad = int(self.first_bad_step)
        if not bad and not math.isfinite(float(full_value(torch.nn.utils.get_total_norm(
                [p.detach() for p in self.params()])))):
            bad = step
        bad = min_over_ranks(bad or self.max_steps + 1, self.session.dist)  # the earliest step any rank saw
        if bad > self.max_steps:
            return
        kept = (f"{self.last[0]} (step {self.last[1]}) is the last good checkpoint" if self.last
                else "nothing was saved")
        message = (f"training diverged at step {bad}: the loss, gradient norm or weights became nan or inf; "
                   f"stopped before saving, so {kept}. {self.advice}" + (" or --resume from it" if self.last else ""))
        self.session.log.error(f"error: {message}")
        raise TrainingDiverged(message)

    def save(self, name: str, step: int, state: dict) -> str:
        """Checks the run (above), then writes `state` (the program's own entries; "rng" is added:
        every rank's streams, in rank order) to <directory>/<name>. Every rank calls it."""
        self.check(step)
        if self.sharded:
            name = os.path.splitext(name)[0] + SUFFIX
        path = os.path.join(self.directory, name)
        if not self.enabled:
            return path
        rng = gather_objects(rng_state())  # every rank takes part
        if self.sharded:
            tensors = {key: state[key] for key in ("model", "optimizers")}
            meta = {key: value for key, value in state.items() if key not in tensors}
            save_sharded(path, tensors, {**meta, "rng": rng}, self.session.is_main, self.session.watchdog)
        elif self.session.is_main:
            self.session.watchdog.writing(temporary_path(path))  # a long write is progress, not a hang
            try:
                save_checkpoint({**state, "rng": rng}, path)
            finally:
                self.session.watchdog.writing(None)
        self.last = (path, step)
        return path


@dataclass
class Due:
    """What is due after a step: a metrics record (and its log line), an evaluation, a checkpoint.
    `show`: a console line without a record (the first step of a launch, to show it is moving)."""
    record: bool
    evaluate: bool
    save: bool
    show: bool

    def __bool__(self) -> bool:
        return self.record or self.evaluate or self.save or self.show


class Loop:
    """The ceremony around every training loop, written once: metrics.jsonl and W&B (`tracker`),
    the NaN guard and the checkpoints (`checkpointer`), the pace and ETA (`clock`), the cadence,
    the agreed stop and the closing lines. A trainer's loop reads

        loop = session.loop(out_dir, cfg, max_steps, step, model.parameters, checkpoint)
        with loop.running():                        # SIGTERM / SIGUSR1 are recorded, not fatal
            while step < max_steps:
                ...one step...
                step += 1
                due = loop.after_step(step, loss)   # guards, and checks the guard when something is due
                if due.record: ...log line...
                with loop.clock.paused():           # evals and saves stay out of ms/step
                    if due.evaluate: ...
                    loop.write(record)
                    if due.save: loop.save(step, state())
                if loop.stop_requested(step): break
            loop.save(step, state())
        seconds = loop.finish(step, "done line")
    """

    def __init__(self, session: Session, cfg, max_steps: int, step: int, tracker: Tracker,
                 checkpointer: "Checkpointer", clock: "StepClock"):
        self.session, self.cfg, self.max_steps = session, cfg, max_steps
        self.start_step, self.tracker, self.checkpointer, self.clock = step, tracker, checkpointer, clock
        self.interrupted = 0  # the stop signal that ended the loop early

    def running(self):
        """The loop's block (and the save after it): stop signals recorded, not fatal, from here to
        the session's end."""
        return self.session.stop_signals()

    def after_step(self, step: int, watched: torch.Tensor) -> Due:
        """Step `step` (counted from 1) is done and gave `watched` (finite when the step was): the
        clock ticks, the guard records it, and when anything is due the guard is checked first, on
        every rank, so that nothing non-finite is logged as good or saved."""
        self.clock.tick()
        self.session.watchdog.step(step)
        self.checkpointer.watch(step, watched)
        cfg = self.cfg
        record = step == 1 or step % cfg.log_every == 0 or step == self.max_steps
        due = Due(record=record, evaluate=step % cfg.eval_every == 0 or step == self.max_steps,
                  save=bool(cfg.save_every) and step % cfg.save_every == 0,
                  show=record or step == self.start_step + 1)
        if due:
            self.checkpointer.check(step)
        return due

    def write(self, record: dict) -> None:
        """A metrics record (if any), with the wall time of training so far (the x axis of "first to
        a loss"), to metrics.jsonl and W&B."""
        if record:
            self.tracker.write({**record, "elapsed_seconds": round(self.clock.elapsed(), 3)})

    def save(self, step: int, state: dict, name: str = "last.pt") -> str:
        return self.checkpointer.save(name, step, state)

    def agreed_stop_signal(self) -> int:
        """Once after every step on every rank: the stop signal the ranks agree on (0: none)."""
        return self.session.agreed_stop_signal()

    def stop_requested(self, step: int, signum: int | None = None) -> bool:
        """After a step's work: whether a stop signal ends the loop here (a run that just reached its
        last step is not interrupted). Asks the ranks (agreed_stop_signal) unless `signum` is the answer."""
        signum = self.agreed_stop_signal() if signum is None else signum
        if signum and step < self.max_steps:
            self.interrupted = signum
            self.session.log.info(f"{signal.Signals(signum).name} received: stopping after step {step} to save a "
                                  f"checkpoint")
            return True
        return False

    def interrupted_name(self) -> str | None:
        return signal.Signals(self.interrupted).name if self.interrupted else None

    def finish(self, step: int, done: str, interrupted: str = "", preempted: bool | None = None) -> float:
        """The closing line ("done: N steps in 1m02s " + `done`, or for a run a signal stopped
        `interrupted`, by default how to continue it), W&B closed (a stopped run as preempted, not
        failed), and the session's seconds."""
        seconds = self.session.seconds()
        if self.interrupted:
            self.session.log.info(f"interrupted at step {step}; " + (
                interrupted or "last.pt saved. Continue with the same command and --resume auto"))
        else:
            self.session.log.info(f"done: {step} steps in {format_duration(seconds)} {done}".rstrip())
        self.tracker.summary({"steps": step, "seconds": seconds})
        self.session.finish_tracking(128 + self.interrupted if self.interrupted else 0,
                                     preempted=bool(self.interrupted) if preempted is None else preempted)
        return seconds


def resume_checkpoint(directory: str, cfg, explicit: set[str], what: str, model_step: int, model_path: str,
                      check=None):
    """(the checkpoint to continue, the settings to continue with) for a trainer of something on a
    model (an SAE, a lens) under --resume auto: <directory>/last.pt if it exists, refused if it was
    trained on another step of the model, `check(checkpoint)` for anything else the trainer needs;
    the settings are the checkpoint's where they shape what is trained (config.resumed_config).
    (None, cfg) when there is nothing to continue."""
    path = os.path.join(directory, "last.pt")
    if cfg.resume != "auto" or not os.path.isfile(path):
        return None, cfg
    checkpoint = load_checkpoint(path)
    if check is not None:
        check(checkpoint)
    if checkpoint.get("model_step", model_step) != model_step:
        raise ConfigError(f"--resume: this {what} was trained on the model at step {checkpoint['model_step']}, but "
                          f"{model_path} now holds step {model_step}; start a new {what} (--run_name)")
    return checkpoint, resumed_config(cfg, checkpoint["config"], explicit, what)


class StepClock:
    """Training time for the log: ms/step and items/s over the steps since the last report, with
    evaluations and checkpoints kept out of them (`with clock.paused():`), the ETA to max_steps,
    and the wall time of the whole run, carried over from the checkpoint when it resumed."""

    def __init__(self, max_steps: int, elapsed_before: float = 0.0):
        self.max_steps, self.elapsed_before = max_steps, elapsed_before
        self.started = self.window_start = time.perf_counter()
        self.window_steps, self.ms_per_step = 0, 0.0

    def tick(self) -> None:
        self.window_steps += 1

    @contextlib.contextmanager
    def paused(self):
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - paused

    def report(self, items_per_step: float) -> tuple[float, float]:
        """(ms per step, items per second) since the last report; starts the next window."""
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        steps = max(self.window_steps, 1)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.ms_per_step = 1000 * seconds / steps
        return self.ms_per_step, items_per_step * steps / seconds

    def eta(self, step: int, at_most: bool = False) -> str:
        """Time from `step` to max_steps at the last reported pace; "<=" when something else (early
        stopping) may end the run sooner."""
        return ("<=" if at_most else "") + format_duration((self.max_steps - step) * self.ms_per_step / 1000)

    def training_seconds(self) -> float:
        """Seconds since this process started training."""
        return time.perf_counter() - self.started

    def elapsed(self) -> float:
        """Wall seconds of training over the whole run, earlier attempts included."""
        return self.elapsed_before + self.training_seconds()

    def progress(self, step: int, at_most: bool = False) -> str:
        """'12.3s, ETA 4m05s': the tail of a log line."""
        return f"{format_duration(self.training_seconds())}, ETA {self.eta(step, at_most)}"


def run_command(main) -> None:
    """A program's `if __name__ == "__main__"`: bad input (ConfigError, CheckpointError) is one line
    on stderr, from rank 0 only, and exit status 2; a run that diverged (already logged, with the
    checkpoint to go back to) exits 1; a run stopped by a signal with its checkpoint saved (a
    summary whose "interrupted" names the signal) exits 128 + that signal, as schedulers expect of
    an unfinished job; a run that finished exits 0."""
    try:
        summary = main()
    except (ConfigError, CheckpointError) as error:
        if os.environ.get("RANK", "0") == "0" or getattr(error, "every_rank", False):  # ranks fail alike: one says so
            print(f"error: {error}", file=sys.stderr)
        _exit(2)
    except TrainingDiverged:
        _exit(1)
    if isinstance(summary, dict) and summary.get("interrupted"):
        _exit(128 + signal.Signals[summary["interrupted"]])
    _exit(0)


_FINALIZE = True  # False: the process group's threads outlived it (FSDP), so exit without finalizing


def _exit(status: int) -> None:
    """sys.exit, or, where gloo threads outlived the process group (Session.__exit__), os._exit once
    stdout and stderr are flushed: the interpreter's finalization is where those threads abort."""
    if _FINALIZE:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
