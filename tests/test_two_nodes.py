"""Two nodes for real: `sbatch --nodes=2 train.slurm` on a private Slurm cluster of two hosts made of
Linux namespaces (tests/slurm_cluster.py with nodes=2, tests/virtual_hosts.py), two processes per
node, DDP over gloo across the hosts' addresses. As users run it: the rendezvous on the first node,
the run directory on the shared file system, the warning signal before the time limit, a node's
processes killed, an array of sweep agents.

Extended tier (`pytest tests/test_two_nodes.py`, about 1.5 minutes on two cores: four
ranks and two torchrun agents per job share them). Skipped, saying why, where Slurm is missing or
namespaces cannot be made (not root, no veth).
"""
from __future__ import annotations

import os
import re
import signal
import sys

import optuna
import pytest

import train
from conftest import assert_same_run, process_argv, run_metrics
from harness.slurm_cluster import SlurmCluster, slurm_missing_reason
from test_slurm import checkpoint, job_log, submit
from test_sweep import STAND_IN, study_of, write_sweep
from plumbing.tracking import read_metrics
from harness.virtual_hosts import hosts_missing_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = slurm_missing_reason() or hosts_missing_reason()
pytestmark = [pytest.mark.extended, pytest.mark.slow,
              pytest.mark.skipif(MISSING is not None, reason=f"no two-node cluster here: {MISSING}")]

TWO_BY_TWO = ("--nodes=2",)  # with NPROC_PER_NODE=2: 4 ranks, 2 on each host
# A modular run long enough to interrupt, at a gentle learning rate, checkpoints every 25 steps.
FLAGS = ["--save_model_dir", "runs", "--modulus", "17", "--batch_size", "64", "--lr", "1e-3", "--max_steps", "400",
         "--target_val_acc", "0", "--dropout", "0.1", "--log_every", "5", "--eval_every", "50", "--save_every", "25"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("two-nodes"), nodes=2) as two_nodes:
        yield two_nodes


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The 2 x 2 run that the interrupted ones must end bit-identical to (submitted once, awaited on use)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    job = submit(cluster, work, "straight", FLAGS, processes=2, sbatch=TWO_BY_TWO)
    assert cluster.wait(job, timeout=300) == "COMPLETED", job_log(work, "straight", job) + cluster.logs(job)
    return work / "runs" / f"straight-{job}"


def killable(cluster: SlurmCluster, node: str) -> list[int]:
    """The job's processes on `node`: torchrun's agent and its workers (not Slurm's own)."""
    found = []
    for pid in cluster.hosts.pids(node):
        argv = process_argv(pid)
        if "torch.distributed.run" in argv:
            found.insert(0, pid)  # the agent first
        elif any(part.endswith("train.py") for part in argv):
            found.append(pid)
    return found


def test_four_ranks_on_two_hosts_equal_one_process(cluster, tmp_path):
    """The same global batch of 64: one process, or 2 nodes x 2 ranks x 16 through gloo over the link
    (no dropout: each rank draws its own masks)."""
    flags = [*FLAGS, "--max_steps", "40", "--log_every", "1", "--eval_every", "20", "--dropout", "0"]
    job = submit(cluster, tmp_path, "equal", flags, processes=2, sbatch=TWO_BY_TWO)
    train.main([*flags, "--save_model_dir", str(tmp_path / "one"), "--run_name", "one"])
    assert cluster.wait(job, timeout=240) == "COMPLETED", job_log(tmp_path, "equal", job) + cluster.logs(job)
    log = job_log(tmp_path, "equal", job)
    assert re.search(r"2 node\(s\) node\[1-2\], 2 process\(es\) per node, rendezvous node1:\d+", log), log
    assert "world size 4 on 2 hosts: node1 (ranks 0-1), node2 (ranks 2-3)" in log, log
    assert "weights identical on all 4 ranks" in log and "training finished (restart 0)" in log

    one = {r["step"]: r for r in read_metrics(tmp_path / "one" / "one" / "metrics.jsonl")}
    four = {r["step"]: r for r in run_metrics(tmp_path / "runs" / f"equal-{job}")}
    assert sorted(one) == sorted(four) == list(range(1, 41))
    for step in one:
        for key in ("train_loss", "val_loss"):
            if key in one[step]:
                assert four[step][key] == pytest.approx(one[step][key], rel=1e-6), (step, key)


def test_the_warning_signal_stops_every_rank_after_the_same_step_and_the_requeue_resumes_exactly(
        cluster, tmp_path, uninterrupted):
    job = submit(cluster, tmp_path, "warned", FLAGS, processes=2, sbatch=TWO_BY_TWO)
    run_dir = tmp_path / "runs" / f"warned-{job}"
    cluster.wait_until(lambda: any(r["step"] >= 5 for r in run_metrics(run_dir)), timeout=180,
                       what="the job to log step 5", job_id=job)
    cluster.signal(job, "USR1", batch_only=True)  # what --signal=B:USR1@120 sends before the time limit
    cluster.wait_until(lambda: cluster.restart_count(job) >= 1, timeout=120, what="the job to requeue", job_id=job)
    assert cluster.wait(job, timeout=300) == "COMPLETED", job_log(tmp_path, "warned", job) + cluster.logs(job)
    log = job_log(tmp_path, "warned", job)
    assert cluster.restart_count(job) == 1 and "training finished (restart 1)" in log, log

    # One stop, after one step, on every rank: rank 0 logged it once, saved last.pt at that step with
    # the RNG streams of all four ranks (gathered from both hosts), and the second attempt resumed there.
    stops = [int(s) for s in re.findall(r"SIGTERM received: stopping after step (\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", log)]
    assert len(stops) == 1 and resumed == stops and 5 <= stops[0] < 400, log
    assert f"interrupted at step {stops[0]}; last.pt saved" in log
    # After the stop the four ranks still met in collectives (ranks a step apart would hang or fail there).
    assert log.count("weights identical on all 4 ranks") == 2, log
    assert len(checkpoint(run_dir / "last.pt")["rng"]) == 4
    assert_same_run(run_dir, uninterrupted)


def test_a_node_whose_processes_are_killed_is_recovered_and_the_run_ends_exactly(cluster, tmp_path, uninterrupted):
    """kill -9 of torchrun and both workers on node2, mid-run: srun reports the killed task, node1's
    side is torn down, train.slurm starts the step again in the same allocation, and it resumes from
    the newest periodic checkpoint (the claim passes to the same job at once)."""
    job = submit(cluster, tmp_path, "killed", FLAGS, processes=2, sbatch=TWO_BY_TWO)
    run_dir = tmp_path / "runs" / f"killed-{job}"
    cluster.wait_until(lambda: any(r["step"] >= 30 for r in run_metrics(run_dir)), timeout=180,
                       what="the job to pass its first checkpoint", job_id=job)
    victims = killable(cluster, "node2")
    assert len(victims) == 3, victims  # the agent and two workers
    for pid in victims:  # the agent first: a worker that died before it would make it exit 1 (not retried)
        os.kill(pid, signal.SIGKILL)
    assert cluster.wait(job, timeout=300) == "COMPLETED", job_log(tmp_path, "killed", job) + cluster.logs(job)
    log = job_log(tmp_path, "killed", job)
    assert cluster.restart_count(job) == 0  # recovered inside the job, not requeued
    assert re.search(r"a task was killed \(srun status 137, signal 9\); starting the step again, attempt 2", log), log
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", log)]
    assert len(resumed) == 1 and resumed[0] >= 25 and resumed[0] % 25 == 0, log  # the periodic last.pt
    assert "now names another writer" not in log and "claimed by" not in log
    assert_same_run(run_dir, uninterrupted)


def test_an_array_of_sweep_agents_spreads_over_both_nodes_and_runs_no_trial_twice(cluster, tmp_path):
    path = write_sweep(tmp_path, "spread", method="grid", program=STAND_IN, parameters={
        "lr": {"values": [0.001, 0.01, 0.1]}, "weight_decay": {"values": [0.1, 1.0]}, "seconds_per_eval": {"value": 0.3}})
    (tmp_path / "logs").mkdir()
    env = {"TINYLAB_PYTHON": sys.executable, "TINYLAB_DIR": ROOT, "OMP_NUM_THREADS": "1"}
    # --exclusive: one agent per node, so the two agents must take the two nodes.
    job = cluster.sbatch(["--array=0-1", "--exclusive", "--job-name", "agents", "--gpus-per-node=0", "--cpus-per-task=1",
                          "--time=30", os.path.join(ROOT, "sweeps", "slurm_agent.sh"), path, "--dir", "sw", "--poll_seconds", "0.2"],
                         cwd=tmp_path, env=env)
    nodes = []
    for task in (0, 1):
        cluster.wait_until(lambda: cluster.job(f"{job}_{task}").get("NodeList") not in (None, "", "(null)"),
                           timeout=60, what=f"array task {task} to start")
        nodes.append(cluster.job(f"{job}_{task}")["NodeList"])
    states = [cluster.wait(f"{job}_{task}", timeout=240) for task in (0, 1)]
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").iterdir()))
    assert states == ["COMPLETED", "COMPLETED"], logs
    assert sorted(nodes) == ["node1", "node2"], nodes
    trials = study_of(tmp_path / "sw").get_trials()
    assert len(trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), logs
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in trials}) == 6  # each grid point once
    assert len({t.user_attrs["agent"] for t in trials}) == 2, logs  # both agents ran trials
    # Each trial's directory was trained once, by one process: every eval logged once, in order.
    for trial in range(6):
        assert [r["step"] for r in run_metrics(tmp_path / "sw" / f"trial-{trial:04d}")] == [1, 2, 3], trial
