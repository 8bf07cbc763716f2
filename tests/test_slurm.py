"""train.slurm under a real Slurm: a private one-node cluster (tests/slurm_cluster.py) runs the script
as users do, `sbatch train.slurm --flags`, on CPU with torchrun and gloo.

Skipped, with the reason, where Slurm is not installed or we are not root; DEVELOPERS.md says how to
set it up. The cluster starts once for the module (about a second).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import assert_same_run, process_argv, run_metrics
from harness.slurm_cluster import SlurmCluster, free_port, slurm_missing_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train.slurm")
MISSING = slurm_missing_reason()
requires_slurm = pytest.mark.skipif(MISSING is not None, reason=f"no local Slurm: {MISSING}")

# A tiny modular run: a few seconds of CPU, checkpoints every 10 steps, no early stop.
TINY = ["--save_model_dir", "runs", "--modulus", "17", "--eval_every", "10", "--log_every", "5",
        "--target_val_acc", "0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit(cluster: SlurmCluster, work_dir, job_name: str, train_args: list[str], processes: int = 1,
           program: str = "train.py", extra_env: dict | None = None, sbatch: tuple[str, ...] = ()) -> str:
    """`sbatch [SBATCH] train.slurm ARGS` from work_dir, the way a user would, on CPU with this venv's
    python."""
    (work_dir / "logs").mkdir(exist_ok=True)  # Slurm does not create the --output directory
    env = {
        "TINYLAB_PYTHON": sys.executable,  # python -m torch.distributed.run, not whatever torchrun is on PATH
        "TINYLAB_DIR": ROOT,               # train.py lives here; runs/ and logs/ land in work_dir
        "NPROC_PER_NODE": str(processes),
        "TINYLAB_PROGRAM": program,
        "OMP_NUM_THREADS": "1",            # two jobs share two cores
        # The script's default port comes from the job id, and another test session's cluster numbers
        # its jobs from 1 too.
        "RDZV_PORT": str(free_port()),
        **(extra_env or {}),
    }
    return cluster.sbatch(["--job-name", job_name, "--gpus-per-node=0", "--cpus-per-task=1", "--time=30", *sbatch, SCRIPT,
                           *train_args],
                          cwd=work_dir, env=env)


def job_log(work_dir, job_name: str, job_id: str) -> str:
    """The job's output file, logs/<job name>-<job id>.out ('' until Slurm creates it)."""
    path = work_dir / "logs" / f"{job_name}-{job_id}.out"
    return path.read_text() if path.exists() else ""


def checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_slurm_is_valid_bash():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.slow
@requires_slurm
def test_sbatch_runs_a_short_run_to_completion(slurm, tmp_path):
    # --run (not --run_name) on purpose: the script hands it to train.py as --run_name, which torchrun
    # leaves alone.
    job = submit(slurm, tmp_path, "smoke", [*TINY, "--max_steps", "30", "--save_every", "10", "--run", "smoke"])
    state = slurm.wait(job, timeout=240)
    log = job_log(tmp_path, "smoke", job)
    assert state == "COMPLETED", log + slurm.logs(job)
    assert slurm.restart_count(job) == 0
    assert checkpoint(tmp_path / "runs" / "smoke" / "last.pt")["step"] == 30
    assert "tinylab run smoke (new)" in log and "done: 30 steps" in log
    assert "training finished (restart 0)" in log


@pytest.mark.slow
@requires_slurm
def test_warning_signal_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit): the run saves,
    the job requeues itself, resumes under the same run name, finishes, and ends with the very weights
    of an uninterrupted run. About a minute on two cores."""
    flags = [*TINY, "--max_steps", "300", "--save_every", "100"]
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference_dir.mkdir()
    preempted_dir.mkdir()
    # Two ranks each (DDP over gloo): every rank must stop after the same step. The reference runs
    # alongside, under the same script and launcher, so both see the same arithmetic.
    reference = submit(slurm, reference_dir, "reference", flags, processes=2)
    job = submit(slurm, preempted_dir, "preempted", flags, processes=2)
    run_dir = preempted_dir / "runs" / f"preempted-{job}"

    # Signal once training is under way (past step 5, far from step 300 and from a periodic save).
    slurm.wait_until(lambda: any(r["step"] >= 5 for r in run_metrics(run_dir)), timeout=180,
                     what="the job to log step 5", job_id=job)
    slurm.signal(job, "USR1", batch_only=True)
    slurm.wait_until(lambda: slurm.restart_count(job) >= 1, timeout=120, what="the job to requeue", job_id=job)

    assert slurm.wait(job, timeout=240) == "COMPLETED", job_log(preempted_dir, "preempted", job) + slurm.logs(job)
    assert slurm.wait(reference, timeout=240) == "COMPLETED", slurm.logs(reference)
    assert slurm.restart_count(job) == 1 and slurm.restart_count(reference) == 0

    # One log for both attempts (--open-mode=append); the second resumed where the first stopped.
    log = job_log(preempted_dir, "preempted", job)
    assert "got SIGUSR1" in log and "requeueing job" in log
    assert "restart 0:" in log and "restart 1:" in log and "training finished (restart 1)" in log
    resumed_at = [int(step) for step in re.findall(r"resumed at step (\d+)", log)]
    assert len(resumed_at) == 1 and 5 <= resumed_at[0] < 100, log  # from the signal's last.pt, not a periodic one

    # Bit for bit the uninterrupted run: weights, and every loss both logged.
    reference_run = reference_dir / "runs" / f"reference-{reference}"
    assert checkpoint(run_dir / "last.pt")["step"] == checkpoint(reference_run / "last.pt")["step"] == 300
    assert_same_run(run_dir, reference_run)
    steps = [r["step"] for r in run_metrics(run_dir)]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats or reorders steps"
    reference_evals = {r["step"]: r["val_loss"] for r in run_metrics(reference_run) if "val_loss" in r}
    evals = {r["step"]: r["val_loss"] for r in run_metrics(run_dir) if "val_loss" in r}
    assert evals == reference_evals


@pytest.mark.slow
@requires_slurm
def test_a_killed_launcher_is_started_again_in_the_same_job_and_resumes(slurm, tmp_path):
    """kill -9 of torchrun (what the OOM killer does): srun exits 137, and train.slurm starts the
    step again in the same allocation, which resumes the run from its newest checkpoint. (Two nodes,
    one of them losing all its processes: tests/test_two_nodes.py, extended.)"""
    job = submit(slurm, tmp_path, "killed", [*TINY, "--max_steps", "400", "--save_every", "10"], processes=1)
    run_dir = tmp_path / "runs" / f"killed-{job}"
    slurm.wait_until(lambda: (run_dir / "last.pt").exists(), timeout=180, what="the first checkpoint", job_id=job)
    launchers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))  # python -m torch.distributed.run
                 if f"--run_name\0killed-{job}" in "\0".join(process_argv(pid))
                 and process_argv(pid)[1:3] == ["-m", "torch.distributed.run"]]
    assert len(launchers) == 1, launchers
    os.kill(launchers[0], signal.SIGKILL)
    assert slurm.wait(job, timeout=240) == "COMPLETED", job_log(tmp_path, "killed", job) + slurm.logs(job)
    log = job_log(tmp_path, "killed", job)
    assert slurm.restart_count(job) == 0 and "a task was killed (srun status 137, signal 9)" in log, log
    assert len(re.findall(r"resumed at step \d+", log)) == 1 and "training finished (restart 0)" in log, log
    assert checkpoint(run_dir / "last.pt")["step"] == 400


@pytest.mark.slow
@requires_slurm
def test_failed_or_cancelled_jobs_are_not_requeued(slurm, tmp_path):
    # A run that fails (here: a misspelt flag) ends the job as FAILED, once.
    failing = submit(slurm, tmp_path, "failing", [*TINY, "--max_steps", "5", "--learning_rate", "1e-3"])
    assert slurm.wait(failing, timeout=120) == "FAILED"
    log = job_log(tmp_path, "failing", failing)
    # torchrun exits 1 when its worker exits 2 (bad input); a status above 128 would have been retried
    assert "unknown flag --learning_rate" in log and "training failed with status 1" in log
    assert "starting the step again" not in log

    # scancel is not preemption: Slurm's SIGTERM must not make the script requeue the job.
    cancelled = submit(slurm, tmp_path, "cancelled", [*TINY, "--max_steps", "300"])
    # Cancel once training is under way, as a user would: cancelled in the very second the script
    # started, before torchrun was up, the script once missed its "got SIGTERM" line in CI.
    slurm.wait_until(lambda: "tinylab run cancelled" in job_log(tmp_path, "cancelled", cancelled), timeout=120,
                     what="training to start", job_id=cancelled)
    slurm.cancel(cancelled)
    assert slurm.wait(cancelled, timeout=60) == "CANCELLED"  # and its batch script is gone
    assert "got SIGTERM" in job_log(tmp_path, "cancelled", cancelled)
    assert slurm.restart_count(failing) == 0 and slurm.restart_count(cancelled) == 0
    assert slurm.state(failing) == "FAILED" and slurm.state(cancelled) == "CANCELLED"


@pytest.mark.extended  # tests/test_lens.py stops and resumes lens.py with train.slurm's flags, without Slurm
@requires_slurm
def test_a_consistency_lens_is_requeued_and_resumes_under_train_slurm(slurm, tmp_path, trained_runs):
    """TINYLAB_PROGRAM=lens.py: the warning signal makes the lens save, the job requeues, and the
    second attempt continues the same lens directory, and the same W&B run, to the end. About half
    a minute."""
    run_dir = trained_runs["text"]
    args = [run_dir, "--decoder_prompt", "of <A>:", "--encoder_prompt", "<T> is", "--t_text", "4",
            "--batch_size", "16", "--eval_rows", "64", "--max_steps", "400", "--eval_every", "200",
            "--log_every", "1", "--save_every", "0", "--wandb_enabled"]
    job = submit(slurm, tmp_path, "lens", args, program="lens.py",
                 extra_env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    lens_dir = os.path.join(run_dir, "lens", f"lens-{job}")
    slurm.wait_until(lambda: any(r["step"] >= 3 for r in run_metrics(lens_dir)), timeout=180,
                     what="the lens to log step 3", job_id=job)
    slurm.signal(job, "USR1", batch_only=True)
    assert slurm.wait(job, timeout=240) == "COMPLETED", job_log(tmp_path, "lens", job) + slurm.logs(job)
    log = job_log(tmp_path, "lens", job)
    assert slurm.restart_count(job) == 1 and "restart 1:" in log and "training finished (restart 1)" in log
    resumed_at = [int(step) for step in re.findall(r"resumed at step (\d+)", log)]
    assert len(resumed_at) == 1 and 3 <= resumed_at[0] < 400, log
    assert checkpoint(os.path.join(lens_dir, "last.pt"))["step"] == 400
    assert [r["step"] for r in run_metrics(lens_dir)] == list(range(1, 401))
    wandb_id = checkpoint(os.path.join(lens_dir, "last.pt"))["wandb_id"]
    attempts = [d for d in os.listdir(os.path.join(lens_dir, "wandb")) if d.startswith("offline-run-")]
    assert len(attempts) == 2 and all(d.endswith(f"-{wandb_id}") for d in attempts)


def rank_of(pid: int) -> int | None:
    """A process's RANK from its environment (torchrun's workers), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.slow
@requires_slurm
def test_a_hung_rank_is_named_the_job_requeues_and_ends_as_an_uninterrupted_run(slurm, tmp_path):
    """Rank 1 SIGSTOPped mid-run (a wedged GPU): the watchdog (--step_timeout 5) prints the stacks and
    names rank 1, the ranks exit 3, train.slurm requeues the job, and it resumes from its last
    checkpoint and ends with the very weights of an uninterrupted run."""
    flags = [*TINY, "--max_steps", "300", "--save_every", "50", "--step_timeout", "5"]
    reference_dir, hung_dir = tmp_path / "reference", tmp_path / "hung"
    reference_dir.mkdir()
    hung_dir.mkdir()
    reference = submit(slurm, reference_dir, "reference", flags, processes=2)
    job = submit(slurm, hung_dir, "hung", flags, processes=2)
    run_dir = hung_dir / "runs" / f"hung-{job}"
    slurm.wait_until(lambda: any(r["step"] >= 60 for r in run_metrics(run_dir)), timeout=180,
                     what="the job to pass its first checkpoint", job_id=job)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and f"hung-{job}" in " ".join(process_argv(int(p)))
               and "train.py" in " ".join(process_argv(int(p))) and rank_of(int(p)) == 1]
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGSTOP)
    slurm.wait_until(lambda: slurm.restart_count(job) >= 1, timeout=120, what="the job to requeue", job_id=job)
    assert slurm.wait(job, timeout=240) == "COMPLETED", job_log(hung_dir, "hung", job) + slurm.logs(job)
    assert slurm.wait(reference, timeout=240) == "COMPLETED", slurm.logs(reference)

    log = job_log(hung_dir, "hung", job)
    assert "error: hang: no rank has made progress for 5 s (--step_timeout)" in log
    assert "ranks that did not arrive: 1" in log and "rank 0 stacks:" in log
    assert "the run hung" in log and "requeueing job" in log and "training finished (restart 1)" in log
    resumed_at = [int(step) for step in re.findall(r"resumed at step (\d+)", log)]
    assert resumed_at and resumed_at[0] % 50 == 0, log  # from the periodic checkpoint before the hang
    reference_run = reference_dir / "runs" / f"reference-{reference}"
    assert_same_run(run_dir, reference_run)
