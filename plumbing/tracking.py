"""What a run leaves for people to read: the console and train.log, metrics.jsonl and its W&B
mirror, copies of the run directory with rclone, and the training-curves picture. Rank 0 writes;
the other ranks' calls do nothing. Standard library only (W&B, python-dotenv and matplotlib are
imported when used)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# ---------------------------------------------------------------- the console and train.log


def setup_logging(is_main: bool) -> logging.Logger:
    """A logger that prints on rank 0 and buffers until `attach_log_file` names train.log.

    Other ranks log nothing, so their stdout stays quiet under torchrun.
    """
    logger = logging.getLogger("tinylab")
    close_logging(logger)
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.CRITICAL + 1)
    if is_main:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        # Lines logged before the run directory exists reach train.log once it does.
        logger.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    return logger


def attach_log_file(logger: logging.Logger, path: str) -> None:
    file_handler = logging.FileHandler(path, mode="a")
    file_handler.setFormatter(logging.Formatter("%(message)s"))
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.setTarget(file_handler)
            handler.flush()
            logger.removeHandler(handler)
            handler.close()
    logger.addHandler(file_handler)


def close_logging(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def load_env_files() -> None:
    """Settings that stay out of config.json and the logs (WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE,
    RCLONE_DEST, ...) may live in a .env file, in the working directory or beside the code.
    Variables already set in the environment win."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))
    load_dotenv(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env"))


# ---------------------------------------------------------------- metrics.jsonl, W&B, rclone


def wandb_sweep_run() -> tuple[str, str] | None:
    """(sweep id, run id) when `wandb agent` started this process (it sets both variables)."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return (sweep_id, run_id) if sweep_id and run_id else None


def wandb_settings(project: str, name: str, directory: str, config: dict, entity: str = "") -> dict:
    """wandb.init's keyword arguments for a run. The API key stays in the environment: it is never
    part of the config, config.json or the logs. Under `wandb agent` the agent's environment names
    the project; "tinylab" is only our default."""
    project = project or os.environ.get("WANDB_PROJECT") or (None if wandb_sweep_run() else "tinylab")
    return {"project": project, "entity": entity or None, "name": name, "dir": directory, "config": config}


def trim_metrics(path: str, last_step: int) -> None:
    """Drops records past `last_step` from a metrics.jsonl: a resumed run logs those steps again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (one JSON object per logged step or eval)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


class Tracker:
    """A run's metrics.jsonl (rank 0 writes it), mirrored to W&B when `wandb` (keyword arguments
    of wandb.init, from `wandb_settings`) is given, and the run directory copied to
    `$RCLONE_DEST/<run>` when that is set. The records logged after `step` (a resumed run's
    checkpoint) are dropped first: the run logs them again.

    `wandb_id` continues a checkpoint's W&B run; `.wandb_id` is the one to checkpoint, kept even if
    W&B fails later (under Slurm the stop signal reaches W&B's service process too). W&B trouble
    never stops training and never strands the other ranks: it is a warning, and W&B is dropped."""

    def __init__(self, directory: str, is_main: bool, log: logging.Logger, step: int = 0,
                 wandb: dict | None = None, wandb_id: str | None = None):
        self.path, self.is_main, self.log = os.path.join(directory, "metrics.jsonl"), is_main, log
        self.run, self.wandb_id, self.rclone = None, wandb_id, None
        if not is_main:
            return
        trim_metrics(self.path, step)
        if wandb is not None:
            import wandb as wandb_module

            self.run = wandb_module.init(resume="allow", id=wandb_id, **wandb)
            self.wandb_id = self.run.id
        if os.environ.get("RCLONE_DEST"):
            self.rclone = RcloneSync(directory, os.environ["RCLONE_DEST"], log)

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as e:
                self.log.warning(f"warning: W&B logging failed ({type(e).__name__}: {e}); going on without W&B")
                self.run = None

    def copy(self) -> None:
        """Starts a copy of the run directory in the background (rclone; nothing without RCLONE_DEST)."""
        if self.rclone is not None:
            self.rclone.start()

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Closes W&B (0: finished; preempted: shown as preempted, not failed, until it resumes) and
        makes the last copy: a short one after a signal, whose grace time is running out."""
        if self.run is not None:
            run, self.run = self.run, None
            try:
                if preempted:
                    run.mark_preempting()
                run.finish(exit_code=exit_code)
            except Exception as e:
                self.log.warning(f"warning: closing the W&B run failed ({type(e).__name__}: {e})")
        if self.rclone is not None:
            rclone, self.rclone = self.rclone, None
            rclone.finish(timeout=20 if exit_code > 128 else 600)


class RcloneSync:
    """Copies the run directory to `$RCLONE_DEST/<run>` with rclone, in the background.

    `rclone copy`, not `rclone sync`: a requeued job on a node with an empty local disk must never
    delete what was already copied. Half-written checkpoints (`.last.pt.tmp-*`) and the writer's
    claim (`.claim`) are never copied, and `wandb/` (whose files change while W&B runs) only in the
    last copy. A copy that fails is logged and training goes on; a copy still running when the
    next is due is left to finish and the next one is skipped. rclone's output goes to a temporary
    file, never a pipe it could fill.
    """

    def __init__(self, run_dir: str, dest: str, log: logging.Logger):
        self.run_dir, self.log = run_dir, log
        self.target = f"{dest.rstrip('/')}/{os.path.basename(os.path.normpath(run_dir))}"
        self.process: subprocess.Popen | None = None
        self.output = None
        self.disabled = shutil.which("rclone") is None
        if self.disabled:
            log.warning(f"warning: RCLONE_DEST is set but rclone is not installed; the run directory "
                        f"will not be copied to {self.target}")

    def start(self, final: bool = False) -> None:
        if self.disabled or self._running():
            return
        excludes = ["--exclude", ".*.tmp-*", "--exclude", ".claim"] + ([] if final else ["--exclude", "wandb/**"])
        self.output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(["rclone", "copy", self.run_dir, self.target, *excludes],
                                        stdout=self.output, stderr=subprocess.STDOUT, text=True)

    def _running(self) -> bool:
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        self._report()
        return False

    def _report(self) -> None:
        process, self.process = self.process, None
        self.output.seek(0)
        lines = [line for line in self.output.read().splitlines() if line.strip()]
        self.output.close()
        if process.returncode:
            last = lines[-1] if lines else "no output"
            self.log.warning(f"rclone copy to {self.target} failed (exit {process.returncode}): {last}")

    def finish(self, timeout: float = 600) -> bool:
        """Waits for a running copy, then copies once more; True when the last copy succeeded."""
        if self.process is not None:
            self._wait(timeout)
        self.start(final=True)
        if self.process is None:
            return False
        succeeded = self._wait(timeout)
        if succeeded:
            self.log.info(f"copied the run directory to {self.target}")
        return succeeded

    def _wait(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.log.warning(f"rclone copy to {self.target} took over {timeout:.0f}s; stopped it")
        succeeded = self.process.returncode == 0
        self._report()
        return succeeded


# ---------------------------------------------------------------- the picture


@dataclass
class Panel:
    """One plot of metrics against steps: `lines` are (metric, label, style[, colour]); `twin`, more
    lines on a right-hand axis labelled `twin_label`. A log x axis leaves out step 0."""
    title: str
    lines: list
    yscale: str = "linear"
    xscale: str = "linear"
    ylabel: str = ""
    ylim: tuple | None = None
    twin: list = field(default_factory=list)
    twin_label: str = ""


def plot_curves(records: list[dict], out_path: str, panels: list[Panel], title: str = "", width: float = 4.0,
                dpi: int = 110) -> str:
    """Every trainer's training curves: one row of panels from metrics.jsonl records."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state to disturb

    fig = Figure(figsize=(width * len(panels), 3.4 if width < 5 else 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]

    def draw(ax, lines, xscale):
        for key, label, style, *colour in lines:
            points = [(r["step"], r[key]) for r in records if key in r and (xscale != "log" or r["step"] > 0)]
            if points:
                few = {"marker": "."} if style == "-" and len(points) < 30 else {}  # dots where points are few
                ax.plot(*zip(*points), style, label=label, color=colour[0] if colour else None, markersize=3, **few)

    for ax, panel in zip(axes, panels):
        draw(ax, panel.lines, panel.xscale)
        ax.set(xlabel="step", title=panel.title, yscale=panel.yscale, xscale=panel.xscale, ylabel=panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.grid(True, which="both", alpha=0.3)
        if len(panel.lines) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        if panel.twin:
            right = ax.twinx()
            draw(right, panel.twin, panel.xscale)
            right.set(ylabel=panel.twin_label)
            right.legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=dpi)
    return out_path


def plot_training_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    """train.py's picture: train/val loss and accuracy against optimizer steps on a log axis (the
    grokking picture), and with --track_progress Nanda et al.'s progress measures: the restricted
    loss falls before the validation loss does while the excluded loss rises, and the embedding
    concentrates on a few frequencies (gini up) as weight decay cleans up the memorising solution
    (weight norm down)."""
    records = read_metrics(metrics_path)
    panels = [Panel("loss", [("train_loss", "train_loss", "-"), ("val_loss", "val_loss", "-")], "log", "log", "loss")]
    if any("val_acc" in r or "train_acc" in r for r in records):
        panels.append(Panel("accuracy", [("train_acc", "train_acc", "-"), ("val_acc", "val_acc", "-")],
                            xscale="log", ylabel="accuracy", ylim=(-0.02, 1.02)))
    if any("restricted_loss" in r for r in records):  # --track_progress
        panels.append(Panel("progress measures", [("train_loss", "train_loss", "--"), ("val_loss", "val_loss", "--"),
                                                  ("restricted_loss", "restricted_loss", "-"),
                                                  ("excluded_loss", "excluded_loss", "-")],
                            "log", "log", "loss (training pairs)"))
        panels.append(Panel("sparsity and size", [("fourier_gini", "fourier_gini", "-", "tab:purple")], xscale="log",
                            ylabel="gini of embedding frequency norms", ylim=(0, 1),
                            twin=[("weight_norm", "weight_norm", "-", "tab:gray")],
                            twin_label="weight norm (L2, all parameters)"))
    return plot_curves(records, out_path, panels, title, width=5.5, dpi=120)
