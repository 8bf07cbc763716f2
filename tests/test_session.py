"""The run layer under every trainer: one live writer per run directory (claims), workers that stop
when their launcher dies, a nan guard that never saves bad weights, the step clock, and a process
group that takes gloo's threads with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import lens as lens_module
import sae as sae_module
from config import ConfigError
from conftest import ROOT, child_pids, logged_steps, run_torchrun, torchrun_command, wait_until
from plumbing.rundirs import CLAIM, Claim, launch_identity, process_alive, process_start_time
from plumbing.session import StepClock, TrainingDiverged

# ---------------------------------------------------------------- claims


def write_claim(directory, age: float = 0.0, **fields) -> None:
    """A claim file as another writer leaves it, its last heartbeat `age` seconds ago."""
    record = {"host": socket.gethostname(), "pid": 0, "started": None, "launch": "another launch",
              "claimed": time.time() - age, "token": "theirs", **fields}
    path = os.path.join(directory, CLAIM)
    with open(path, "w") as f:
        json.dump(record, f)
    os.utime(path, (time.time() - age, time.time() - age))


def test_a_free_directory_is_claimed_and_released(tmp_path):
    claim, took_over = Claim.take(str(tmp_path), timeout=300)
    record = json.loads((tmp_path / CLAIM).read_text())
    assert took_over == "" and claim.ours()
    assert (record["host"], record["pid"], record["launch"]) == (socket.gethostname(), os.getpid(), launch_identity())
    claim.release()
    assert not (tmp_path / CLAIM).exists()


def test_a_live_writer_on_this_host_is_refused_by_name(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_claim(tmp_path, pid=writer.pid, started=process_start_time(writer.pid), age=10_000)
        with pytest.raises(ConfigError) as error:  # however old its heartbeat: the process is alive
            Claim.take(str(tmp_path), timeout=300)
        message = str(error.value)
        assert message.startswith("--run_name:") and f"process {writer.pid} on host {socket.gethostname()}" in message
        assert json.loads((tmp_path / CLAIM).read_text())["token"] == "theirs"  # left as it was
    finally:
        writer.kill()
        writer.wait()


def test_a_writer_whose_process_ended_is_taken_over(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(ended.stdout)
    assert not process_alive(pid)
    write_claim(tmp_path, pid=pid)
    claim, took_over = Claim.take(str(tmp_path), timeout=300)
    assert "its process has ended" in took_over and f"process {pid}" in took_over
    claim.release()


def test_a_reused_pid_is_not_the_writer(tmp_path):
    # Our own pid, but a start time that is not ours: the writer that claimed it is gone.
    write_claim(tmp_path, pid=os.getpid(), started=process_start_time(os.getpid()) - 1000)
    claim, took_over = Claim.take(str(tmp_path), timeout=300)
    assert "its process has ended" in took_over
    claim.release()


def test_another_hosts_writer_holds_until_it_falls_silent(tmp_path):
    write_claim(tmp_path, host="node-b", pid=4242, age=5)
    with pytest.raises(ConfigError, match="process 4242 on host node-b"):
        Claim.take(str(tmp_path), timeout=300)
    write_claim(tmp_path, host="node-b", pid=4242, age=400)
    claim, took_over = Claim.take(str(tmp_path), timeout=300)
    assert "no heartbeat for 400s (--claim_timeout 300)" in took_over
    claim.release()


def test_an_earlier_attempt_of_this_launch_is_taken_over_at_once(tmp_path):
    # A requeued Slurm job or a torchrun restart on another node: fresh heartbeat, same launch.
    write_claim(tmp_path, host="node-b", pid=4242, age=1, launch=launch_identity())
    claim, took_over = Claim.take(str(tmp_path), timeout=300)
    assert "earlier attempt of this launch" in took_over
    claim.release()


def test_the_heartbeat_keeps_a_claim_fresh_and_a_lost_claim_is_noticed(tmp_path):
    claim, _ = Claim.take(str(tmp_path), timeout=0.4)  # a heartbeat every 0.1 s
    path = tmp_path / CLAIM
    os.utime(path, (time.time() - 100, time.time() - 100))
    wait_until(lambda: time.time() - path.stat().st_mtime < 5, 10, "a heartbeat")
    write_claim(tmp_path, host="node-b", pid=4242)  # another launch took the directory over
    wait_until(lambda: claim.lost, 10, "the claim to be noticed lost")
    claim.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # release leaves another's claim alone


@pytest.mark.slow
def test_of_launches_racing_for_a_stale_claim_exactly_one_wins(tmp_path):
    write_claim(tmp_path, host="node-b", pid=4242, age=10_000)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from plumbing.rundirs import Claim
        from config import ConfigError
        while time.time() < {time.time() + 1.5}:
            pass
        try:
            claim, _ = Claim.take({str(tmp_path)!r}, timeout=300)
        except ConfigError:
            print("refused")
        else:
            print("won")
            time.sleep(3)  # hold it while the others try
            claim.release()
    """)
    racers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert outcomes == ["refused", "refused", "refused", "won"]


# ---------------------------------------------------------------- the step clock


def test_the_clock_keeps_evals_out_of_the_step_time_and_carries_the_elapsed_time():
    clock = StepClock(max_steps=10, elapsed_before=100.0)
    for _ in range(2):
        time.sleep(0.05)
        clock.tick()
        with clock.paused():  # an eval
            time.sleep(0.3)
    ms_per_step, per_second = clock.report(items_per_step=64)
    assert 40 < ms_per_step < 250 and per_second == pytest.approx(64 * 1000 / ms_per_step)
    assert clock.eta(step=2).endswith("s") and clock.eta(2, at_most=True).startswith("<=")
    assert clock.elapsed() >= 100.7 and clock.training_seconds() < clock.elapsed() - 99


# ---------------------------------------------------------------- the nan guard in every trainer


@pytest.mark.slow
def test_a_diverging_sae_stops_and_keeps_its_last_good_checkpoint(trained_runs):
    args = [trained_runs["modular"], "--hook", "blocks.0.mlp.hook_post", "--dict_size", "32", "--batch_size", "32",
            "--eval_every", "100", "--log_every", "2", "--buffer_rows", "256", "--eval_tokens", "200",
            "--run_name", "diverging", "--save_every", "0", "--warmup_steps", "0", "--grad_clip", "0"]
    sae_module.main(args + ["--max_steps", "4"])
    last = os.path.join(trained_runs["modular"], "sae", "diverging", "last.pt")
    before = open(last, "rb").read()
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: .*last.pt \(step 4\) is the last good"):
        sae_module.main(args + ["--max_steps", "20", "--resume", "auto", "--lr", "1e12"])
    assert open(last, "rb").read() == before


def test_a_diverging_lens_stops_and_saves_nothing(trained_runs, tmp_path):
    args = [trained_runs["text"], "--layer", "0", "--t_text", "2", "--batch_size", "8", "--max_steps", "30",
            "--eval_every", "100", "--eval_rows", "16", "--log_every", "2", "--save_model_dir", str(tmp_path),
            "--run_name", "diverging", "--lr", "1e30", "--muon_lr", "1e30", "--warmup_steps", "0", "--grad_clip", "0",
            "--save_every", "3", "--decoder_prompt", "<A>", "--encoder_prompt", "<T>", "--fluency_prefix", "a"]
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: .*nothing was saved"):
        lens_module.main(args)
    for name in os.listdir(tmp_path / "diverging"):
        assert not name.endswith(".pt"), name


# ---------------------------------------------------------------- one writer, no orphans, in every trainer


def program_args(program: str, trained_runs, tmp_path) -> list[str]:
    """A run of `program` long enough to be interrupted, in tmp_path/runs/long."""
    where = ["--save_model_dir", str(tmp_path / "runs"), "--run_name", "long", "--log_every", "1"]
    if program == "train.py":
        return where + ["--modulus", "17", "--max_steps", "100000", "--eval_every", "1000", "--target_val_acc", "0"]
    if program == "sae.py":
        return [trained_runs["modular"], *where, "--hook", "blocks.0.mlp.hook_post", "--dict_size", "32",
                "--batch_size", "32", "--max_steps", "100000", "--eval_every", "100000", "--buffer_rows", "256",
                "--eval_tokens", "200", "--save_every", "0"]
    return [trained_runs["text"], *where, "--layer", "0", "--t_text", "2", "--batch_size", "8", "--max_steps",
            "100000", "--eval_every", "100000", "--eval_rows", "16", "--save_every", "0", "--decoder_prompt", "<A>",
            "--encoder_prompt", "<T>", "--fluency_prefix", "a"]


@pytest.mark.slow
@pytest.mark.parametrize("program", ["train.py", "sae.py", "lens.py"])
def test_one_writer_per_run_and_workers_stop_with_their_launcher(program, trained_runs, tmp_path):
    """(Resuming from what the stopped worker saved is each program's own resume test.)"""
    args = program_args(program, trained_runs, tmp_path)
    run_dir = tmp_path / "runs" / "long"
    launcher = subprocess.Popen(torchrun_command(args, nproc=1, script=program), cwd=str(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        wait_until(lambda: logged_steps(run_dir), 120, "the first logged step", launcher)
        (worker,) = child_pids(launcher.pid)

        # A second launch of the same run is refused while the first still writes it.
        second = subprocess.run([sys.executable, os.path.join(ROOT, program), *args, "--resume", "auto"],
                                cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"is being written by process {worker} on host {socket.gethostname()}" in lines[0]

        # The launcher dies outright; its worker stops at once, saving, instead of training on.
        launcher.kill()
        launcher.wait()
        wait_until(lambda: not process_alive(worker), 60, "the orphaned worker to stop")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        if worker and process_alive(worker):  # a failed test leaves no orphan of its own
            os.kill(worker, signal.SIGKILL)
    saved = torch.load(run_dir / "last.pt", weights_only=True)["step"]
    assert saved >= 1 and not (run_dir / CLAIM).exists()
    assert f"interrupted at step {saved}" in (run_dir / "train.log").read_text()  # it finished its shutdown


# ---------------------------------------------------------------- the process group goes, and gloo's threads with it


@pytest.mark.slow
def test_a_ddp_wrapper_kept_past_the_end_is_reported(tmp_path):
    """The session checks that gloo's threads went with the process group: a program that still
    holds its DDP wrapper at the end is warned (the trainers, which drop theirs, are not:
    tests/test_distributed.py). Up to torch 2.9 destroy_process_group joined gloo's threads whatever
    still held the group; from 2.13 it does not, and there the warning must come."""
    script = tmp_path / "keeps_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import torch
        from plumbing.distributed import gloo_threads
        from plumbing.session import Session
        with Session("cpu", "float32") as session:
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
            model(torch.ones(2, 3)).sum().backward()
        print(f"rank {{os.environ['RANK']}} gloo threads left: {{len(gloo_threads())}}")
    """))
    result = run_torchrun([], cwd=str(tmp_path), script=str(script))
    assert result.returncode == 0, result.stderr[-2000:]
    left = [int(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if "gloo threads left" in line]
    assert len(left) == 2
    assert result.stderr.count("gloo threads outlived the process group") == sum(n > 0 for n in left)
    if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        assert all(left), "torch 2.13 and later keep a group that is still referenced, and its threads"
