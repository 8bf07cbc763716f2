"""sweep.py: W&B sweep files run on Optuna, by one agent, several, or a Slurm array; and train.py as
W&B's agent runs it. Trials are tiny train.py runs (a few seconds each, most of it start-up)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

import sweep as sweep_module
from config import Config, _field_types, _parse, parse_config
from conftest import ROOT, run_metrics, run_train, wait_until, write_corpus
from plumbing.rundirs import process_alive
from harness.slurm_cluster import SlurmCluster, slurm_missing_reason

TRAIN = os.path.join(ROOT, "train.py")
SWEEP = os.path.join(ROOT, "sweep.py")
# For the tests about agents rather than training: train.py's flags and stop/resume behaviour, no torch
STAND_IN = os.path.join(ROOT, "tests", "harness", "sweep_program.py")
# A tiny modular run: ~1 s of training after ~3 s of start-up.
TINY = {"modulus": {"value": 17}, "max_steps": {"value": 30}, "eval_every": {"value": 10},
        "log_every": {"value": 10}, "target_val_acc": {"value": 0}}


def write_sweep(directory, name: str, **spec) -> str:
    spec.setdefault("program", TRAIN)
    spec.setdefault("metric", {"name": "val_loss", "goal": "minimize"})
    path = os.path.join(str(directory), f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(spec, f)  # JSON is YAML
    return path


def run_sweep(args: list[str], cwd, timeout: int = 300, env: dict | None = None):
    return subprocess.run([sys.executable, SWEEP, *args, "--poll_seconds", "0.2"], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def study_of(sweep_dir):
    storage = sweep_module.open_storage(os.path.join(str(sweep_dir), "study.journal"))
    name = storage.get_all_studies()[0].study_name
    return optuna.load_study(storage=storage, study_name=name)


def last_logged(run_dir, key: str) -> float:
    return [r[key] for r in run_metrics(run_dir) if key in r][-1]


@pytest.mark.slow
def test_a_2x2_grid_runs_four_trials_as_run_directories_and_finds_the_best(tmp_path):
    path = write_sweep(tmp_path, "grid", method="grid",
                       parameters={**TINY, "lr": {"values": [0.001, 0.01]}, "weight_decay": {"values": [0.1, 1.0]}})
    result = run_sweep([path, "--dir", "sw", "--agents", "2"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = study_of(tmp_path / "sw")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert {t.user_attrs["agent"] for t in trials} == {"agent 0", "agent 1"}  # --agents 2 started two
    # The file's order, each point once, each trial an ordinary run directory with its flags applied
    assert [(t.params["lr"], t.params["weight_decay"]) for t in trials] == [
        (0.001, 0.1), (0.001, 1.0), (0.01, 0.1), (0.01, 1.0)]
    for t in trials:
        run_dir = tmp_path / "sw" / f"trial-{t.number:04d}"
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["lr"], config["weight_decay"], config["modulus"]) == (t.params["lr"], t.params["weight_decay"], 17)
        assert t.value == last_logged(run_dir, "val_loss")  # the metric's last value, as a W&B summary
        assert sorted(t.intermediate_values) == [1, 2, 3]   # reported at each of the 3 evals
        assert (run_dir / "last.pt").exists()
    expected = min(trials, key=lambda t: last_logged(tmp_path / "sw" / f"trial-{t.number:04d}", "val_loss"))
    assert study.best_trial.number == expected.number

    report = subprocess.run([sys.executable, SWEEP, "report", "sw"], cwd=str(tmp_path), capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "4 trials: 4 complete" in report.stdout
    assert f"best: trial {expected.number}" in report.stdout
    assert f"--config {os.path.join('sw', f'trial-{expected.number:04d}', 'config.json')}" in report.stdout
    for picture in ("params.png", "history.png", "curves.png"):
        assert (tmp_path / "sw" / picture).stat().st_size > 10_000

    # Running the file again finds the study done and runs nothing
    again = run_sweep([path, "--dir", "sw"], tmp_path)
    assert again.returncode == 0 and "agent done after 0 trial(s)" in again.stdout
    assert len(study_of(tmp_path / "sw").get_trials()) == 4


def test_distributions_map_to_optuna_and_respect_their_bounds(tmp_path):
    path = write_sweep(tmp_path, "dists", method="random", run_cap=1, parameters={
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "weight_decay": {"distribution": "log_uniform", "min": math.log(0.01), "max": math.log(1.0)},
        "init_std": {"min": 0.01, "max": 0.1},
        "embedding_dim": {"distribution": "q_uniform", "min": 32, "max": 128, "q": 32},
        "mlp_dim": {"distribution": "q_log_uniform_values", "min": 64, "max": 1024},
        "num_heads": {"min": 1, "max": 4},
        "seed": {"values": [0, 1, 2]},
    })
    sweep = sweep_module.load_sweep(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = []
    for _ in range(2000):
        trial = study.ask()
        draws.append({p.name: p.suggest(trial) for p in sweep.searched})
        study.tell(trial, 0.0)

    def column(name):
        return [d[name] for d in draws]

    assert all(1e-4 <= v <= 1e-2 for v in column("lr"))
    assert all(0.01 <= v <= 1.0 for v in column("weight_decay"))
    # log-uniform: half the draws below the geometric mean (a uniform draw would put ~9 % there)
    for name, middle in (("lr", 1e-3), ("weight_decay", 0.1)):
        assert 0.45 < sum(v < middle for v in column(name)) / len(draws) < 0.55
    assert all(0.01 <= v <= 0.1 for v in column("init_std"))
    assert 0.45 < sum(v < 0.055 for v in column("init_std")) / len(draws) < 0.55  # plain uniform
    assert set(column("embedding_dim")) == {32, 64, 96, 128}
    assert all(isinstance(v, int) and 64 <= v <= 1024 for v in column("mlp_dim"))
    assert 0.4 < sum(v < 256 for v in column("mlp_dim")) / len(draws) < 0.6
    assert set(column("num_heads")) == {1, 2, 3, 4} and set(column("seed")) == {0, 1, 2}


@pytest.mark.slow
def test_bayes_runs_its_budget_within_bounds(tmp_path):
    """(random runs end to end in the --agents test; both samplers draw from the same Params)"""
    path = write_sweep(tmp_path, "bayes", method="bayes", run_cap=4, program=STAND_IN, parameters={
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 1.0}})
    result = run_sweep([path, "--dir", "sw"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study_of(tmp_path / "sw").get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.params["lr"] for t in trials}) == 4
    for t in trials:
        assert 1e-4 <= t.params["lr"] <= 1e-2 and 0 <= t.params["weight_decay"] <= 1
        assert t.value == last_logged(t.user_attrs["run_dir"], "val_loss")
    assert isinstance(sweep_module.make_sampler(sweep_module.load_sweep(path), 0), optuna.samplers.TPESampler)


@pytest.mark.slow
def test_hyperband_prunes_a_trial_whose_val_loss_is_clearly_worse(tmp_path):
    corpus = write_corpus(tmp_path)
    text = {"task": {"value": "text"}, "data_path": {"value": corpus}, "num_blocks": {"value": 1},
            "embedding_dim": {"value": 32}, "num_heads": {"value": 2}, "mlp_dim": {"value": 64},
            "context_len": {"value": 16}, "batch_size": {"value": 8}, "max_steps": {"value": 400},
            "eval_every": {"value": 10}, "eval_max_batches": {"value": 2}, "target_val_acc": {"value": 0},
            "warmup_steps": {"value": 0}}
    # One bracket (max_iter 2 < eta): the second trial meets the first at its first eval
    path = write_sweep(tmp_path, "hb", method="grid", parameters={**text, "lr": {"values": [0.01, 1e-7]}},
                       early_terminate={"type": "hyperband", "min_iter": 1, "max_iter": 2, "eta": 3})
    result = run_sweep([path, "--dir", "sw"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    good, bad = study_of(tmp_path / "sw").get_trials()
    assert good.state == optuna.trial.TrialState.COMPLETE and sorted(good.intermediate_values) == list(range(1, 41))
    assert bad.state == optuna.trial.TrialState.PRUNED and list(bad.intermediate_values) == [1]
    assert bad.intermediate_values[1] > good.intermediate_values[1] + 0.2
    assert "trial 1 pruned at eval 1" in result.stdout
    # The pruned run was stopped early, with a checkpoint, not run to the end
    assert torch.load(tmp_path / "sw" / "trial-0001" / "last.pt", weights_only=True)["step"] < 400


@pytest.mark.slow
def test_two_agents_started_separately_never_run_a_trial_twice(tmp_path):
    path = write_sweep(tmp_path, "pair", method="grid", program=STAND_IN, parameters={
        "lr": {"values": [0.001, 0.002, 0.003, 0.004]}, "seed": {"values": [0, 1]},
        "seconds_per_eval": {"value": 0.1}})
    command = [sys.executable, SWEEP, path, "--dir", "sw", "--poll_seconds", "0.05"]
    agents = [subprocess.Popen(command + ["--agent_name", f"a{i}"], cwd=str(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    trials = study_of(tmp_path / "sw").get_trials()
    assert len(trials) == 8 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({(t.params["lr"], t.params["seed"]) for t in trials}) == 8
    runs_by = [sum(f"trial {t.number} starts" in out for t in trials) for out in outputs]
    assert sum(runs_by) == 8 and min(runs_by) >= 1, outputs  # both worked, and nothing twice


@pytest.mark.slow
def test_agents_flag_starts_local_agents_on_a_random_budget(tmp_path):
    path = write_sweep(tmp_path, "rand", method="random", run_cap=6, program=STAND_IN, parameters={
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, "seconds_per_eval": {"value": 0.2}})
    result = run_sweep([path, "--dir", "sw", "--agents", "2", "--gpus", "3,5", "--storage", "sw/study.db"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 agents on GPUs 3,5" in result.stdout
    storage = sweep_module.open_storage(str(tmp_path / "sw" / "study.db"))  # SQLite this time
    trials = optuna.load_study(storage=storage, study_name="rand").get_trials()
    assert len(trials) == 6 and len({t.params["lr"] for t in trials}) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["agent"] for t in trials} == {"agent 0", "agent 1"}
    for t in trials:  # one GPU per agent, through CUDA_VISIBLE_DEVICES
        seen = json.loads((tmp_path / "sw" / f"trial-{t.number:04d}" / "state.json").read_text())["cuda_visible_devices"]
        assert seen == {"agent 0": "3", "agent 1": "5"}[t.user_attrs["agent"]]
    report = subprocess.run([sys.executable, SWEEP, "report", "sw/study.db"], cwd=str(tmp_path), capture_output=True,
                            text=True)
    assert report.returncode == 0 and "6 trials: 6 complete" in report.stdout, report.stderr
    assert all(isinstance(sweep_module.make_sampler(sweep_module.load_sweep(path), n), optuna.samplers.RandomSampler)
               for n in (0, 1))


@pytest.mark.slow
def test_a_stopped_agent_queues_its_trial_which_resumes_from_its_checkpoint(tmp_path):
    path = write_sweep(tmp_path, "stop", method="grid", parameters={
        **TINY, "max_steps": {"value": 300}, "eval_every": {"value": 20}, "save_every": {"value": 10},
        "lr": {"values": [0.001]}})
    command = [sys.executable, SWEEP, path, "--dir", "sw", "--poll_seconds", "0.2"]
    agent = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "sw" / "trial-0000"
    wait_until(lambda: (run_dir / "last.pt").exists(), 120, "the trial's first checkpoint", agent)
    agent.send_signal(signal.SIGUSR1)  # Slurm's warning, passed on by slurm_agent.sh
    output = agent.communicate(timeout=120)[0]
    assert agent.returncode == 128 + signal.SIGUSR1, output
    assert "trial 0 stopped" in output and "queued to resume from" in output
    stopped_at = torch.load(run_dir / "last.pt", weights_only=True)["step"]
    assert stopped_at < 300
    trials = study_of(tmp_path / "sw").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["retried"] and "SIGUSR1" in trials[0].user_attrs["failed_because"]

    # The next agent takes the queued trial and continues the same run directory to the end
    result = run_sweep([path, "--dir", "sw"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"trial 1 resumes: lr=0.001 -> {run_dir}" in result.stdout
    assert f"resumed at step {stopped_at}" in (run_dir / "train.log").read_text()
    trials = study_of(tmp_path / "sw").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].value == last_logged(run_dir, "val_loss")
    assert sorted(trials[1].intermediate_values) == list(range(1, 16))  # every eval, before and after the stop


def test_a_trial_whose_agent_fell_silent_on_another_machine_is_failed_and_resumed(tmp_path):
    path = write_sweep(tmp_path, "silent", method="grid", program=STAND_IN, parameters={"lr": {"values": [0.001]}})
    storage = str(tmp_path / "sw" / "study.journal")
    os.makedirs(tmp_path / "sw")
    study = sweep_module.open_study(sweep_module.load_sweep(path), storage, "silent", 0)
    trial = study.ask()  # taken, as by an agent on a node that then died: no heartbeat for 1,000 s
    trial.suggest_categorical("lr", [0.001])
    run_dir = str(tmp_path / "sw" / "trial-0000")
    for key, value in {"run_dir": run_dir, "host": "node-gone", "agent_pid": 1, "attempt": 1,
                       "heartbeat": time.time() - 1000}.items():
        trial.set_user_attr(key, value)
    result = run_sweep([path, "--dir", "sw", "--stale_after", "90"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial 0: no heartbeat for 10" in result.stdout  # 1000 s and a bit
    trials = study_of(tmp_path / "sw").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].user_attrs["resume_dir"] == run_dir and trials[1].user_attrs["attempt"] == 2
    assert trials[0].user_attrs["failed_because"].startswith("no heartbeat for")


@pytest.mark.slow
def test_a_killed_agent_leaves_its_trial_failed_and_the_study_usable(tmp_path):
    path = write_sweep(tmp_path, "kill", method="grid", program=STAND_IN, parameters={
        "lr": {"values": [0.001]}, "evals": {"value": 20}, "seconds_per_eval": {"value": 0.1}})
    command = [sys.executable, SWEEP, path, "--dir", "sw", "--poll_seconds", "0.05"]
    agent = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "sw" / "trial-0000"
    wait_until(lambda: (run_dir / "state.json").exists(), 60, "the trial's first eval", agent)
    child = study_of(tmp_path / "sw").get_trials()[0].user_attrs["child_pid"]
    agent.kill()  # no chance to clean up: the trial stays RUNNING in the study
    agent.communicate(timeout=30)
    # The trial's process is told (SIGTERM on its parent's death), saves its state and stops
    wait_until(lambda: not process_alive(child), 30, "the orphaned trial to stop")
    stopped_at = json.loads((run_dir / "state.json").read_text())["evals"]
    assert stopped_at < 20 and study_of(tmp_path / "sw").get_trials()[0].state.name == "RUNNING"

    result = run_sweep([path, "--dir", "sw"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial 0: its agent is gone; marking it failed" in result.stdout
    trials = study_of(tmp_path / "sw").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["run_dir"] == str(run_dir)
    assert f"resumed at eval {stopped_at}" in (tmp_path / "sw" / "logs" / "trial-0001.out").read_text()
    assert [r["step"] for r in run_metrics(run_dir)] == list(range(1, 21))
    assert sorted(trials[1].intermediate_values) == list(range(1, 21))


BAD_FILES = [
    ({"method": "grd"}, "method: 'grd' is not one of grid, random, bayes"),
    ({"metric": None}, "metric: sweep.py needs one"),
    ({"metric": {"name": "val_loss", "goal": "lower"}}, "metric.goal: 'lower'"),
    ({"parameters": {"learning_rate": {"values": [0.1]}}}, "parameters.learning_rate: train.py has no flag "
                                                           "--learning_rate; did you mean --lr?"),
    ({"parameters": {"lr": {"distribution": "normal", "mu": 0, "sigma": 1}}}, "parameters.lr.distribution: 'normal'"),
    ({"parameters": {"lr": {"min": 0.1, "max": 0.01}}}, "parameters.lr: min (0.1) must be below max (0.01)"),
    ({"parameters": {"lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}}}, "parameters.lr.min: a log"),
    ({"parameters": {"lr": {"min": 0.001, "max": 0.01}}}, "parameters.lr: a grid needs values"),
    ({"parameters": {"lr": {"values": []}}}, "parameters.lr.values: expected a non-empty list"),
    ({"parameters": {"lr": {"values": [0.1], "step": 2}}}, "parameters.lr.step: not supported"),
    ({"parameters": {"run_name": {"value": "x"}}}, "parameters.run_name: sweep.py sets --run_name"),
    ({"parameters": {"num_heads": {"values": [3]}}}, "does not make a valid run (--num_heads"),
    ({"method": "random"}, "run_cap: a random search needs a budget"),
    ({"early_terminate": {"type": "hyperband"}}, "early_terminate: hyperband needs min_iter"),
    ({"early_terminate": {"type": "median"}}, "early_terminate.type: only hyperband"),
    ({"scheduler": {"engine": "optuna"}}, "scheduler: not supported by sweep.py"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 3, "eta": 2.5}}, "early_terminate.eta: Optuna's"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 9, "max_iter": 3}}, "early_terminate.max_iter: 3 is below"),
    ({"program": "no_such.py"}, "program: no_such.py not found"),
]


@pytest.mark.parametrize("change,message", BAD_FILES, ids=[m.split(":")[0][:40] for _, m in BAD_FILES])
def test_a_malformed_sweep_file_is_one_error_naming_the_key(tmp_path, change, message):
    spec = {"method": "grid", "parameters": {"lr": {"values": [0.01]}}, **change}
    path = write_sweep(tmp_path, "bad", **spec)
    with pytest.raises(sweep_module.SweepError) as error:
        sweep_module.run_sweep(sweep_module.SweepConfig(file=path, dir=str(tmp_path / "sw")).validate())
    assert message in str(error.value) and str(error.value).startswith(path)
    assert not (tmp_path / "sw").exists()  # nothing made


def test_the_command_line_says_what_is_wrong_with_status_2(tmp_path):
    (tmp_path / "broken.yaml").write_text("program: train.py\nmethod: [grid\n")
    for args, message in (([str(tmp_path / "broken.yaml")], "not readable YAML"),
                          ([str(tmp_path / "none.yaml")], "no such sweep file"),
                          (["x.yaml", "--agent", "2"], "unknown flag --agent; did you mean --agents?"),
                          (["x.yaml", "--stale_after", "10"], "--stale_after: must be at least 90"),
                          (["report", str(tmp_path)], "no study here")):
        result = subprocess.run([sys.executable, SWEEP, *args], cwd=str(tmp_path), capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_every_config_field_takes_the_arguments_a_wandb_agent_passes():
    """`wandb agent` runs `python train.py --name=value ...` with str(value); each field parses back."""
    changes = {bool: lambda v: not v, int: lambda v: v + 3, float: lambda v: v * 0.5 + 1e-5,
               str: lambda v: f"{v}-x y"}
    values = {name: changes[kind](getattr(Config(), name)) for name, kind in _field_types().items()}
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    parsed, _ = _parse(Config, args)
    assert {name: getattr(parsed, name) for name in values} == values
    # and a typical sweep point makes a valid run
    point = {"lr": 0.0031622776601683794, "weight_decay": 1.0, "use_muon": True, "num_heads": 8, "preset": "grokking"}
    cfg, _ = parse_config(create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args"])
    assert (cfg.lr, cfg.weight_decay, cfg.use_muon, cfg.num_heads) == (point["lr"], 1.0, True, 8)


@pytest.mark.slow
def test_train_py_under_a_wandb_agent_logs_the_metric_and_resumes_a_preempted_run(tmp_path):
    """What `wandb agent` does, minus the server: it sets WANDB_SWEEP_ID and WANDB_RUN_ID and runs
    `python train.py --name=value`. train.py turns W&B on, names its run directory after the run and,
    when W&B hands the preempted run out again, continues it."""
    args = create_sweep_command_args({"args": {"modulus": {"value": 17}, "max_steps": {"value": 100000},
                                               "eval_every": {"value": 10}, "save_every": {"value": 20},
                                               "lr": {"value": 0.003}}})["args"]
    env = {**os.environ, "WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "run1abc", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    process = subprocess.Popen([sys.executable, TRAIN, *args], cwd=str(tmp_path), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "sweep-sw1-run1abc"
    wait_until(lambda: (run_dir / "last.pt").exists(), 120, "the first checkpoint", process)
    process.send_signal(signal.SIGUSR1)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1
    stopped_at = torch.load(run_dir / "last.pt", weights_only=True)["step"]
    resumed = run_train([a for a in args if not a.startswith("--max_steps")] + [f"--max_steps={stopped_at + 20}"],
                        cwd=str(tmp_path), env={"WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "run1abc",
                                                "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {stopped_at}" in (run_dir / "train.log").read_text()
    wandb_runs = sorted(d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-"))
    assert len(wandb_runs) == 2 and all(d.endswith("-run1abc") for d in wandb_runs)
    assert b"val_loss" in (run_dir / "wandb" / wandb_runs[-1] / "run-run1abc.wandb").read_bytes()


def test_slurm_agent_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", os.path.join(ROOT, "sweeps", "slurm_agent.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "sweeps")) if f.endswith(".yaml")))
def test_the_example_sweep_files_load(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # program: train.py, from the repository root as `wandb agent` would run it
    sweep = sweep_module.load_sweep(os.path.join("sweeps", name))
    assert sweep.program in ("train.py", "lens.py") and sweep.searched


MISSING = slurm_missing_reason()


@pytest.mark.slow
@pytest.mark.skipif(MISSING is not None, reason=f"no local Slurm: {MISSING}")
def test_a_slurm_array_of_two_agents_completes_a_study(tmp_path):
    path = write_sweep(tmp_path, "array", method="grid", program=STAND_IN, parameters={
        "lr": {"values": [0.001, 0.01]}, "weight_decay": {"values": [0.1, 1.0]}, "seconds_per_eval": {"value": 0.5}})
    (tmp_path / "logs").mkdir()
    env = {"TINYLAB_PYTHON": sys.executable, "TINYLAB_DIR": ROOT, "OMP_NUM_THREADS": "1"}
    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(["--array=0-1", "--job-name", "agents", "--gpus-per-node=0", "--cpus-per-task=1",
                              "--time=30", os.path.join(ROOT, "sweeps", "slurm_agent.sh"), path, "--dir", "sw",
                              "--poll_seconds", "0.2"], cwd=tmp_path, env=env)
        states = [cluster.wait(f"{job}_{task}", timeout=240) for task in (0, 1)]
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").iterdir()))
    assert states == ["COMPLETED", "COMPLETED"], logs
    trials = study_of(tmp_path / "sw").get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), logs
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in trials}) == 4
    assert len({t.user_attrs["agent"] for t in trials}) == 2, logs  # both array tasks ran trials


@pytest.mark.slow
@pytest.mark.skipif(MISSING is not None, reason=f"no local Slurm: {MISSING}")
def test_slurms_warning_checkpoints_the_trial_requeues_the_agent_and_the_trial_resumes(tmp_path):
    path = write_sweep(tmp_path, "warned", method="grid", program=STAND_IN, parameters={
        "lr": {"values": [0.001]}, "evals": {"value": 40}, "seconds_per_eval": {"value": 0.1}})
    (tmp_path / "logs").mkdir()
    env = {"TINYLAB_PYTHON": sys.executable, "TINYLAB_DIR": ROOT}
    run_dir = tmp_path / "sw" / "trial-0000"
    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(["--job-name", "warned", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30",
                              os.path.join(ROOT, "sweeps", "slurm_agent.sh"), path, "--dir", "sw", "--poll_seconds",
                              "0.05"], cwd=tmp_path, env=env)
        cluster.wait_until(lambda: (run_dir / "state.json").exists(), 120, "the trial's first eval", job)
        cluster.signal(job, "USR1", batch_only=True)  # what --signal=B:USR1@120 sends
        cluster.wait_until(lambda: cluster.restart_count(job) >= 1, 120, "the job to requeue", job)
        state = cluster.wait(job, timeout=240)
        log = (tmp_path / "logs" / f"warned-{job}.out").read_text()
        assert state == "COMPLETED" and cluster.restart_count(job) == 1, log
    assert "got SIGUSR1" in log and "requeueing job" in log and "agent finished (restart 1)" in log
    trials = study_of(tmp_path / "sw").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], log
    assert "SIGUSR1" in trials[0].user_attrs["failed_because"]
    assert "resumed at eval" in (tmp_path / "sw" / "logs" / "trial-0001.out").read_text()
    assert [r["step"] for r in run_metrics(run_dir)] == list(range(1, 41))
