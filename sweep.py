"""Hyperparameter sweeps from W&B sweep files, run without W&B on Optuna.

    python sweep.py sweeps/grok_lr.yaml                  # one agent: trials until the study is done
    python sweep.py sweeps/grok_lr.yaml --agents 4       # four agents here (one GPU each, if any)
    python sweep.py sweeps/shakespeare_bayes.yaml --storage /shared/sb.journal   # agents anywhere
    sbatch --array=0-7 sweeps/slurm_agent.sh sweeps/grok_lr.yaml                 # Slurm array tasks
    python sweep.py report runs/sweep-grok_lr            # best trials, plots

The same file works with W&B (`wandb sweep FILE`, then `wandb agent ID`). Here its `method` picks an
Optuna sampler (grid: GridSampler, random: RandomSampler, bayes: TPE) and `early_terminate:
hyperband` a HyperbandPruner (min_iter, max_iter, eta as min_resource, max_resource,
reduction_factor). The pruner is fed the metric each time the program logs it (train.py's evals),
counted 1, 2, 3, ... as W&B counts hyperband iterations. Optuna's hyperband splits trials among
brackets that start pruning at different rungs, where W&B checks every run at every band: the same
knobs, not the same decisions.

A sweep lives in one directory, `runs/sweep-<name>/` unless --dir says otherwise: the study
(`study.journal`, an Optuna journal file that agents on several nodes can share over NFS; or SQLite
with --storage x.db), one ordinary run directory per trial (`trial-0007/`: config.json,
metrics.jsonl, last.pt, ...), the trials' console output (`logs/`) and the report's plots.

Agents coordinate only through the study: each takes the next trial under a lock file next to the
storage, so no trial runs twice. Grid points are queued in the file's order when the study is
created. A trial's value is the metric's last logged value (what a W&B run's summary holds).

An agent that is told to stop (SIGTERM, SIGUSR1 from Slurm's warning, Ctrl-C) asks its trial to
save a checkpoint, marks the trial failed and queues it again to resume from that checkpoint, then
exits with 128 + the signal. An agent that dies outright (kill -9, a lost node) stops sending its
heartbeat; another agent fails the trial after --stale_after seconds and queues it the same way.
A trial whose program fails on its own (a crash, a diverged loss) stays failed.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from config import Config, ConfigError, _field_types, _suggest, need, parse_config, parse_flags, section
from plumbing.rundirs import process_alive
from utils import format_duration

_where = section("where the study lives")
_agents = section("agents")

METHODS = ("grid", "random", "bayes")
# Top-level keys of a W&B sweep file: the ones sweep.py uses, and those it reads past (they concern
# W&B's server only). Anything else is an error naming the key.
USED_KEYS = ("program", "method", "metric", "parameters", "early_terminate", "run_cap", "name", "command")
W_AND_B_ONLY_KEYS = ("entity", "project", "description", "controller", "apiVersion", "kind")
# Distributions with an Optuna equivalent; W&B's others (normal, log_normal, beta, inv_log_uniform,
# q_log_uniform, categorical_w_probabilities, ...) are refused by name.
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values")
# Flags sweep.py sets on every trial; a sweep file must leave them alone.
RESERVED = ("run", "run_name", "resume", "save_model_dir", "runs_dir", "config")
COMMAND_MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}")
HEARTBEAT_SECONDS = 30
MAX_ATTEMPTS = 3  # a trial interrupted this often (preempted, or its agent died) is left failed


@dataclass
class SweepConfig:
    file: str = _where("", "the W&B sweep file (YAML)")
    dir: str = _where("", "the sweep's directory: study, trial runs, logs, plots (empty: runs/sweep-<name>)")
    storage: str = _where("", "the study: a journal file (default <dir>/study.journal; shared file systems "
                              "work) or an SQLite file (*.db, *.sqlite)")
    study: str = _where("", "the study's name in the storage (empty: the file's name: key, else its file name)")
    agents: int = _agents(1, "agents to start on this machine; with GPUs, each gets its own (round robin)")
    count: int = _agents(0, "trials each agent runs before it exits (0: until the study is done)")
    trials: int = _agents(0, "random/bayes: trials in the study (0: the file's run_cap)")
    seed: int = _agents(0, "seed of the samplers: trial n's parameters depend on (seed, n, the trials before)")
    gpus: str = _agents("", "GPUs to hand out to agents, e.g. 0,1,2,3 (empty: all visible; none on a CPU box)")
    stale_after: int = _agents(600, "a running trial with no heartbeat for this many seconds is failed and queued again")
    poll_seconds: float = _agents(1.0, "how often an agent reads its trial's metrics.jsonl")
    agent_name: str = _agents("", "label for this agent's lines (set by --agents for the agents it starts)")

    def validate(self) -> "SweepConfig":
        need(bool(self.file), "file", "name the sweep file: python sweep.py sweeps/grok_lr.yaml")
        need(self.agents >= 1, "agents", f"must be at least 1, got {self.agents}")
        need(self.stale_after >= 3 * HEARTBEAT_SECONDS, "stale_after", f"must be at least "
             f"{3 * HEARTBEAT_SECONDS} (agents send a heartbeat every {HEARTBEAT_SECONDS}s), got {self.stale_after}")
        for name in ("count", "trials"):
            need(getattr(self, name) >= 0, name, f"must be 0 or more, got {getattr(self, name)}")
        need(self.poll_seconds > 0, "poll_seconds", f"must be positive, got {self.poll_seconds}")
        need(all(g.strip().isdigit() for g in self.gpus.split(",")) if self.gpus else True, "gpus",
             f"{self.gpus!r}: give GPU indices separated by commas, e.g. 0,1")
        return self


# ---------------------------------------------------------------- the sweep file


@dataclass
class Param:
    """One entry of `parameters`, as Optuna will draw it."""
    name: str
    kind: str                  # constant | categorical | int | float
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list | None:
        """The values a grid takes, or None for a continuous range."""
        if self.kind in ("constant", "categorical"):
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return None


@dataclass
class Sweep:
    path: str
    name: str
    program: str
    method: str
    metric: str
    goal: str                  # minimize | maximize
    target: float | None
    run_cap: int
    params: dict               # name -> Param
    hyperband: dict | None     # min_resource, max_resource, reduction_factor
    command: list
    spec: dict                 # the file as loaded, kept in the study to recognise it later

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params.values() if p.kind != "constant"]

    @property
    def constants(self) -> dict:
        return {p.name: p.choices[0] for p in self.params.values() if p.kind == "constant"}

    def grid_points(self) -> list[dict]:
        names = [p.name for p in self.searched]
        return [dict(zip(names, values)) for values in itertools.product(*(p.grid() for p in self.searched))]

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b


class SweepError(ConfigError):
    """A sweep file, storage or study that cannot work; the message names the file and the key."""


def _number(value, where: str):
    """Numbers, also YAML 1.1's strings such as '1e-3' (PyYAML reads exponents without a dot as text)."""
    if isinstance(value, bool):
        raise SweepError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: expected a number, got {value!r}") from None
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value).lower() else number


def _parse_param(name: str, spec, where: str, field_type) -> Param:
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{values: [...]}} or {{min: .., max: ..}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepError(f"{where}.parameters: nested parameters are not supported; train.py's flags are flat")
    distribution = spec.get("distribution")
    if distribution is not None and distribution not in DISTRIBUTIONS:
        raise SweepError(f"{where}.distribution: {distribution!r} has no Optuna equivalent in sweep.py; use one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    allowed = {"value", "values", "distribution", "min", "max", "q"}
    for key in spec:
        if key not in allowed:
            raise SweepError(f"{where}.{key}: not supported by sweep.py (keys: {', '.join(sorted(allowed))})")
    if distribution is None:  # W&B's inference
        if "value" in spec:
            distribution = "constant"
        elif "values" in spec:
            distribution = "categorical"
        elif "min" in spec and "max" in spec:
            low, high = _number(spec["min"], f"{where}.min"), _number(spec["max"], f"{where}.max")
            distribution = "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
        else:
            raise SweepError(f"{where}: give value, values, or min and max")
    if distribution == "constant":
        if "value" not in spec:
            raise SweepError(f"{where}.value: a constant needs value")
        return Param(name, "constant", choices=[spec["value"]])
    if distribution == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}.values: expected a non-empty list, got {values!r}")
        for value in values:
            if not (value is None or isinstance(value, (bool, int, float, str))):
                raise SweepError(f"{where}.values: {value!r} is not a number, string or boolean")
        if field_type is float:  # '1e-3' from YAML 1.1 becomes the number it means
            values = [_number(v, f"{where}.values") for v in values]
        return Param(name, "categorical", choices=values)
    for key in ("min", "max"):
        if key not in spec:
            raise SweepError(f"{where}.{key}: distribution {distribution} needs min and max")
    low, high = _number(spec["min"], f"{where}.min"), _number(spec["max"], f"{where}.max")
    if distribution == "log_uniform":  # W&B: min and max are natural logs of the bounds
        low, high = math.exp(low), math.exp(high)
    if not low < high:
        raise SweepError(f"{where}: min ({spec['min']}) must be below max ({spec['max']})")
    step = _number(spec["q"], f"{where}.q") if "q" in spec else None
    if step is not None and distribution not in ("q_uniform", "q_log_uniform_values"):
        raise SweepError(f"{where}.q: only q_uniform and q_log_uniform_values take q")
    if step is not None and step <= 0:
        raise SweepError(f"{where}.q: must be positive, got {step}")
    log = distribution in ("log_uniform", "log_uniform_values", "q_log_uniform_values")
    if log and low <= 0:
        raise SweepError(f"{where}.min: a log distribution needs min > 0, got {spec['min']}")
    if distribution == "q_log_uniform_values" and not (step in (None, 1) and field_type is int):
        raise SweepError(f"{where}: q_log_uniform_values works here only for integer flags with q 1 "
                         f"(Optuna cannot quantise a log range); use values: [...]")
    integer = field_type is int or (distribution == "int_uniform") or (
        distribution == "q_uniform" and all(isinstance(v, int) for v in (low, high, step or 1)) and field_type is not float)
    if integer:
        if distribution in ("uniform", "log_uniform") and field_type is int and not (float(low).is_integer() and float(high).is_integer()):
            raise SweepError(f"{where}: --{name} takes integers; give integer min and max")
        return Param(name, "int", low=int(math.ceil(low)), high=int(math.floor(high)), log=log,
                     step=int(step) if step and not log else None)
    return Param(name, "float", low=float(low), high=float(high), log=log, step=float(step) if step else None)


def load_sweep(path: str, trials: int = 0) -> Sweep:
    """Reads and checks a W&B sweep file; every problem is a SweepError naming the key."""
    import yaml

    if not os.path.isfile(path):
        raise SweepError(f"{path}: no such sweep file (examples in sweeps/)")
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping of sweep keys (program, method, metric, parameters)")
    for key in spec:
        if key not in USED_KEYS + W_AND_B_ONLY_KEYS:
            raise SweepError(f"{path}: {key}: not supported by sweep.py (it reads {', '.join(USED_KEYS)})")

    method = spec.get("method")
    if method not in METHODS:
        raise SweepError(f"{path}: method: {method!r} is not one of {', '.join(METHODS)}")
    program = spec.get("program")
    if not isinstance(program, str) or not program:
        raise SweepError(f"{path}: program: name the script the agent runs, e.g. program: train.py")
    if not os.path.isfile(program):
        raise SweepError(f"{path}: program: {program} not found in {os.getcwd()}; run sweep.py where "
                         f"`wandb agent` would run it (the repository root)")

    metric = spec.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SweepError(f"{path}: metric: sweep.py needs one, e.g. metric: {{name: val_loss, goal: minimize}}")
    for key in metric:
        if key not in ("name", "goal", "target", "impute", "impute_while_running"):
            raise SweepError(f"{path}: metric.{key}: not a metric key (name, goal, target)")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise SweepError(f"{path}: metric.goal: {goal!r} is not minimize or maximize")
    target = _number(metric["target"], f"{path}: metric.target") if "target" in metric else None

    run_cap = trials or spec.get("run_cap") or 0
    if not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 0:
        raise SweepError(f"{path}: run_cap: expected a positive integer, got {run_cap!r}")
    if method != "grid" and not run_cap:
        raise SweepError(f"{path}: run_cap: a {method} search needs a budget; add run_cap: N to the file "
                         f"or pass --trials N")

    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: parameters: expected a mapping of flag names to values or ranges")
    is_train = os.path.basename(program) == "train.py"
    types = _field_types(Config) if is_train else {}
    params = {}
    for name, param_spec in parameters.items():
        where = f"{path}: parameters.{name}"
        if name in RESERVED:
            raise SweepError(f"{where}: sweep.py sets --{name} for every trial; remove it from the file")
        if is_train and name not in types:
            raise SweepError(f"{where}: train.py has no flag --{name}{_suggest(name)}")
        params[name] = _parse_param(name, param_spec, where, types.get(name))
    sweep_name = str(spec.get("name") or os.path.splitext(os.path.basename(path))[0])

    if method == "grid":
        for param in params.values():
            if param.grid() is None:
                raise SweepError(f"{path}: parameters.{param.name}: a grid needs values: [...] (or an "
                                 f"int_uniform range), not a continuous distribution")

    hyperband = None
    early = spec.get("early_terminate")
    if early is not None:
        if not isinstance(early, dict) or early.get("type") != "hyperband":
            raise SweepError(f"{path}: early_terminate.type: only hyperband is supported")
        for key in early:
            if key not in ("type", "min_iter", "max_iter", "s", "eta", "strict"):
                raise SweepError(f"{path}: early_terminate.{key}: not a hyperband key (min_iter, max_iter, s, eta)")
        eta = _number(early.get("eta", 3), f"{path}: early_terminate.eta")
        if not (isinstance(eta, int) and eta >= 2):
            raise SweepError(f"{path}: early_terminate.eta: Optuna's hyperband needs an integer of 2 or more, got {eta}")
        iters = {}
        for key in ("min_iter", "max_iter", "s"):
            if key in early:
                iters[key] = _number(early[key], f"{path}: early_terminate.{key}")
                if not (isinstance(iters[key], int) and iters[key] >= (0 if key == "s" else 1)):
                    raise SweepError(f"{path}: early_terminate.{key}: expected a positive integer, got {early[key]!r}")
        if "max_iter" in iters and "s" in iters:  # W&B: s brackets below max_iter; it prefers these
            min_resource = max(1, iters["max_iter"] // eta ** iters["s"])
        elif "min_iter" in iters:
            min_resource = iters["min_iter"]
        else:
            raise SweepError(f"{path}: early_terminate: hyperband needs min_iter, or max_iter and s")
        if iters.get("max_iter", min_resource) < min_resource:
            raise SweepError(f"{path}: early_terminate.max_iter: {iters['max_iter']} is below min_iter ({min_resource})")
        # Without max_iter, Optuna takes the longest finished trial's count of evals as the maximum.
        hyperband = dict(min_resource=min_resource, max_resource=iters.get("max_iter", "auto"),
                         reduction_factor=eta)

    command = spec.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    if not isinstance(command, list):
        raise SweepError(f"{path}: command: expected a list such as [${{env}}, ${{interpreter}}, ${{program}}, ${{args}}]")
    for part in command:
        if str(part).startswith("${") and str(part) not in COMMAND_MACROS:
            raise SweepError(f"{path}: command: {part} is not supported here (use {', '.join(COMMAND_MACROS)})")

    sweep = Sweep(path, sweep_name, program, method, metric["name"], goal, target, run_cap, params, hyperband,
                  command, json.loads(json.dumps(spec, default=str)))
    if is_train:
        _check_flags(sweep)
    return sweep


def _check_flags(sweep: Sweep) -> None:
    """Parses each grid point (or each range's ends) the way train.py will, so that a value it
    refuses is an error now, naming the parameter, and not a failed trial later."""
    if sweep.method == "grid":
        points = sweep.grid_points()
    else:
        points = [{}]
        for param in sweep.searched:
            ends = param.choices if param.kind == "categorical" else [param.low, param.high]
            points += [{param.name: value} for value in ends]
    for point in points:
        values = {**sweep.constants, **point}
        try:
            parse_config(wandb_args(values))
        except ConfigError as e:
            raise SweepError(f"{sweep.path}: parameters: {values} does not make a valid run ({e})") from None


def wandb_args(values: dict) -> list[str]:
    """`--name=value` for each parameter: what W&B's agent puts in ${args}."""
    return [f"--{name}={value}" for name, value in values.items()]


# ---------------------------------------------------------------- the study


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(storage: str):
    optuna = _quiet_optuna()
    if storage.endswith((".db", ".sqlite", ".sqlite3")):
        return optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(storage)}")
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return optuna.storages.JournalStorage(JournalFileBackend(storage, lock_obj=JournalFileOpenLock(storage)))


class StudyLock:
    """The agents' lock around "which trial next": a file next to the storage, made with O_EXCL
    (Optuna's own lock for journal files; NFS v3 and later). One left by a killed agent is broken
    after five minutes (making a big grid's queue over NFS can hold it for a while)."""

    def __init__(self, storage: str):
        from optuna.storages.journal import JournalFileOpenLock

        self._lock = JournalFileOpenLock(storage + ".agents", grace_period=300)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def make_sampler(sweep: Sweep, seed: int):
    optuna = _quiet_optuna()

    class QueuedGridSampler(optuna.samplers.GridSampler):
        """The grid's points are queued in the file's order when the study is made, and an agent
        stops when the queue is empty. GridSampler.after_trial only calls study.stop() (which
        matters to study.optimize, not to ask and tell) and fails on queued trials, which carry no
        grid_id of its own: skip it."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    if sweep.method == "grid":
        return QueuedGridSampler({p.name: p.grid() for p in sweep.searched}, seed=seed)
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(sweep: Sweep):
    optuna = _quiet_optuna()
    if sweep.hyperband is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.HyperbandPruner(**sweep.hyperband)


def open_study(sweep: Sweep, storage: str, study_name: str, seed: int):
    """Loads the study, or creates it (queueing a grid's points in the file's order). A study made
    from a different file is refused: its trials would not mean what the file says."""
    optuna = _quiet_optuna()
    backend = open_storage(storage)
    existing = [s.study_name for s in backend.get_all_studies()]
    if study_name not in existing:
        study = optuna.create_study(storage=backend, study_name=study_name,
                                    direction="minimize" if sweep.goal == "minimize" else "maximize",
                                    sampler=make_sampler(sweep, seed), pruner=make_pruner(sweep))
        study.set_user_attr("sweep", sweep.spec)
        study.set_user_attr("sweep_file", os.path.abspath(sweep.path))
        if sweep.method == "grid":
            for point in sweep.grid_points():
                study.enqueue_trial(point, user_attrs={"attempt": 1})
        return study
    study = optuna.load_study(storage=backend, study_name=study_name, sampler=make_sampler(sweep, seed),
                              pruner=make_pruner(sweep))
    saved = study.user_attrs.get("sweep")
    if saved != sweep.spec:
        changed = sorted(k for k in set(saved or {}) | set(sweep.spec) if (saved or {}).get(k) != sweep.spec.get(k))
        raise SweepError(f"{storage}: study {study_name!r} was made from a different version of {sweep.path} "
                         f"(changed: {', '.join(changed)}); start a new study with --dir, --storage or --study")
    return study


# ---------------------------------------------------------------- one agent


def _die_with_agent() -> None:
    """In the trial's process, before exec: SIGTERM when the agent dies (Linux), so a killed agent
    leaves no orphan training; the trial checkpoints and stops."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Agent:
    def __init__(self, sweep: Sweep, settings: SweepConfig, sweep_dir: str, storage: str, study):
        self.sweep, self.settings, self.dir, self.study = sweep, settings, sweep_dir, study
        self.lock = StudyLock(storage)
        self.host = socket.gethostname()
        self.label = settings.agent_name or f"{self.host}:{os.getpid()}"
        self.stop_signal = 0
        self.child: subprocess.Popen | None = None

    def say(self, message: str) -> None:
        print(f"[{self.label}] {message}", flush=True)

    # ---- signals: stop the trial with a checkpoint, queue it again, exit 128 + signal
    def _on_signal(self, signum, frame) -> None:
        """Only flags and a signal to the trial here: the loops say what happened (a print inside a
        handler can interrupt another print)."""
        self.stop_signal = self.stop_signal or signum
        if self.child is not None and self.child.poll() is None:
            # SIGUSR1 stays SIGUSR1 (train.py: preempted, resume me); the rest become SIGTERM.
            self.child.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        done = 0
        while not self.stop_signal and (not self.settings.count or done < self.settings.count):
            with self.lock:
                self._fail_stale_trials()
                next_trial = self._next_trial()
            if next_trial is None:
                # Nothing to take, but a trial whose agent missed its heartbeats may be about to go
                # stale (a lost node); wait to take it up rather than leave it running forever.
                silent = self._silent_trials()
                if not silent:
                    break
                self.say(f"waiting for trial {silent[0].number}: its agent has sent no heartbeat for "
                         f"{time.time() - silent[0].user_attrs['heartbeat']:.0f}s (stale after {self.settings.stale_after}s)")
                time.sleep(HEARTBEAT_SECONDS)
                continue
            self._run_trial(*next_trial)
            done += 1
        if self.stop_signal:
            self.say(f"stopped by {signal.Signals(self.stop_signal).name}")
        self.say(f"agent done after {done} trial(s); study: {self.counts()}")
        return 128 + self.stop_signal if self.stop_signal else 0

    def counts(self) -> str:
        """The study's trials by state and, while trials remain, the time they should take at the
        mean pace of the finished ones, shared among as many agents as have a trial running."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        text = _state_counts(trials)
        left = sum(t.state == TrialState.WAITING for t in trials)
        if self.sweep.method != "grid":
            left += max(0, self.sweep.run_cap - sum(not t.user_attrs.get("retried") for t in trials))
        seconds = [t.user_attrs["seconds"] for t in trials
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "seconds" in t.user_attrs]
        if left and seconds:
            agents = 1 + sum(t.state == TrialState.RUNNING for t in trials)
            text += f", ETA {format_duration(sum(seconds) / len(seconds) * left / agents)}"
        return text

    def _next_trial(self):
        """Under the lock: a queued trial (grid point or retry), else a new one while the budget
        and the target allow; None when there is nothing left for this agent."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if self.sweep.target is not None:
            reached = [t for t in trials if t.state == TrialState.COMPLETE
                       and not self.sweep.better(self.sweep.target, t.value)]
            if reached:
                self.say(f"trial {reached[0].number} reached the target {self.sweep.metric} {self.sweep.target}")
                return None
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting:
            if self.sweep.method == "grid":
                return None
            counted = [t for t in trials if not t.user_attrs.get("retried")]
            if len(counted) >= self.sweep.run_cap:
                return None
        # Trial n's sampler is seeded by (seed, n): which agent draws it does not matter, and two
        # agents never draw the same random sequence.
        self.study.sampler = make_sampler(self.sweep, self.settings.seed * 1_000_003 + len(trials))
        trial = self.study.ask()
        params = {p.name: p.suggest(trial) for p in self.sweep.searched}
        # Absolute, so that agents started from other directories resume it where it is
        run_dir = trial.user_attrs.get("resume_dir") or os.path.abspath(os.path.join(self.dir, f"trial-{trial.number:04d}"))
        for key, value in (("run_dir", run_dir), ("agent", self.label), ("host", self.host),
                           ("agent_pid", os.getpid()), ("heartbeat", time.time())):
            trial.set_user_attr(key, value)
        if "attempt" not in trial.user_attrs:
            trial.set_user_attr("attempt", 1)
        return trial, params

    def _fail_stale_trials(self) -> None:
        """Under the lock: trials whose agent is gone (a dead process on this host, or no heartbeat
        for --stale_after seconds) are failed and queued again to resume from their checkpoint."""
        from optuna.trial import TrialState

        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = t.user_attrs
            same_host_dead = (attrs.get("host") == self.host and not process_alive(attrs.get("agent_pid", 0))
                              and not process_alive(attrs.get("child_pid", 0)))
            silent = now - attrs.get("heartbeat", now)
            if same_host_dead or silent > self.settings.stale_after:
                why = "its agent is gone" if same_host_dead else f"no heartbeat for {silent:.0f}s"
                self.say(f"trial {t.number}: {why}; marking it failed")
                self._finish_interrupted(t, why, count_attempt=True)

    def _silent_trials(self) -> list:
        """Running trials that missed two heartbeats but are not stale yet."""
        from optuna.trial import TrialState

        now = time.time()
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if now - t.user_attrs.get("heartbeat", now) > 2 * HEARTBEAT_SECONDS]

    def _finish_interrupted(self, trial, reason: str, count_attempt: bool) -> None:
        """Under the lock: fails the trial and queues its parameters again, to continue its run
        directory. A stop by signal is a routine preemption; only a lost agent counts as an attempt,
        and after MAX_ATTEMPTS of those the trial is left failed."""
        from optuna.trial import TrialState

        storage = self.study._storage  # another agent's trial: Trial objects only exist for our own
        attempt = trial.user_attrs.get("attempt", 1) + (1 if count_attempt else 0)
        again = attempt <= MAX_ATTEMPTS and not trial.user_attrs.get("retried")  # retried: already queued
        storage.set_trial_user_attr(trial._trial_id, "failed_because", reason)
        if again:
            storage.set_trial_user_attr(trial._trial_id, "retried", True)
            self.study.enqueue_trial(dict(trial.params), user_attrs={
                "resume_dir": trial.user_attrs.get("run_dir"), "retry_of": trial.number, "attempt": attempt})
        elif not trial.user_attrs.get("retried"):
            self.say(f"trial {trial.number} was lost {MAX_ATTEMPTS} times; leaving it failed")
        self.study.tell(trial.number, state=TrialState.FAIL)

    def _command(self, params: dict, run_dir: str, resume: bool) -> list[str]:
        values = {**self.sweep.constants, **params}
        ours = {"save_model_dir": os.path.dirname(run_dir), "run_name": os.path.basename(run_dir)}
        if resume:
            ours["resume"] = "auto"
        args = wandb_args(values) + wandb_args(ours)
        macros = {"${env}": [], "${interpreter}": [sys.executable], "${program}": [self.sweep.program],
                  "${args}": args, "${args_no_hyphens}": [a[2:] for a in args]}
        command = []
        for part in self.sweep.command:
            command += macros.get(str(part), [str(part)])
        return command

    def _run_trial(self, trial, params: dict) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        run_dir = trial.user_attrs["run_dir"]
        resume = "resume_dir" in trial.user_attrs
        if self.stop_signal:  # a signal while we took the trial: queue it again untouched
            with self.lock:
                self._finish_interrupted(trial, f"agent stopped by {signal.Signals(self.stop_signal).name}", False)
            return
        command = self._command(params, run_dir, resume)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        console = os.path.join(self.dir, "logs", f"trial-{trial.number:04d}.out")
        shown = " ".join(f"{k}={_short(v)}" for k, v in params.items())
        self.say(f"trial {trial.number} {'resumes' if resume else 'starts'}: {shown} -> {run_dir}")
        started = time.time()
        with open(console, "a") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            self.child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_agent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if self.stop_signal:  # a signal between the check above and here
                self._on_signal(self.stop_signal, None)
            try:
                trial.set_user_attr("child_pid", self.child.pid)
                values, pruned = self._follow(trial, run_dir)
                lost = False
            except UpdateFinishedTrialError:  # another agent failed it as stale and queued it again
                values, pruned, lost = [], False, True
            if pruned or lost:
                self.child.send_signal(signal.SIGTERM)
            rc = self.child.wait()
            self.child = None
        seconds, took = time.time() - started, format_duration(time.time() - started)
        if lost:
            self.say(f"trial {trial.number} was failed by another agent (no heartbeat seen); its queued "
                     f"copy continues {run_dir}")
            return
        finite = bool(values) and math.isfinite(values[-1])
        with self.lock:  # so that no agent fails it as stale in the middle
            trial.set_user_attr("seconds", seconds)
            trial.set_user_attr("evals", len(values))
            if pruned:
                self.study.tell(trial, state=TrialState.PRUNED)
                message = f"pruned at eval {len(values)}: {self.sweep.metric} {values[-1]:.4g} ({took})"
            elif rc == 0 and finite:  # a trial that ended as the stop signal came is done, all the same
                self.study.tell(trial, values[-1])
                best = self.study.best_trial
                message = (f"complete: {self.sweep.metric} {values[-1]:.4g} ({took}, {len(values)} evals) | "
                           f"best: trial {best.number} {best.value:.4g} | {self.counts()}")
            elif self.stop_signal:
                self._finish_interrupted(trial, f"agent stopped by {signal.Signals(self.stop_signal).name}", False)
                message = f"stopped (status {rc}); queued to resume from {run_dir}"
            else:
                reason = (f"{self.sweep.program} exited with status {rc}" if rc != 0 else
                          f"{self.sweep.metric} was never logged" if not values else
                          f"{self.sweep.metric} is {values[-1]}")
                trial.set_user_attr("failed_because", reason)
                self.study.tell(trial, state=TrialState.FAIL)
                message = f"failed: {reason} after {took}; see {console}"
        self.say(f"trial {trial.number} {message}")
        if rc == 0 and not values:
            raise SweepError(f"{self.sweep.path}: metric.name: {self.sweep.program} never logged "
                             f"{self.sweep.metric!r} (trial {trial.number}; its keys: {_logged_keys(run_dir)})")

    def _follow(self, trial, run_dir: str):
        """Reads the trial's metrics.jsonl while it runs: each new value of the metric is reported to
        the pruner (step = how many times it was logged). Heartbeats go to the study meanwhile.
        Returns the values and whether the pruner stopped the trial. A resumed trial's file is read
        from the start; train.py rewrites it (a new file) when it drops the records past its
        checkpoint, and those it logs again are the same values (resume is exact)."""
        path = os.path.join(run_dir, "metrics.jsonl")
        values, offset, inode, pruned, last_beat, said = [], 0, None, False, time.time(), False
        reported = set()
        while True:
            finished = self.child.poll() is not None
            if self.stop_signal and not said:
                said = True
                self.say(f"{signal.Signals(self.stop_signal).name}: asking trial {trial.number} to save a "
                         f"checkpoint and stop")
            try:
                with open(path) as f:
                    status = os.fstat(f.fileno())
                    if status.st_ino != inode or status.st_size < offset:
                        inode, offset, values = status.st_ino, 0, []  # a new file: from the top
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = ""
            complete = chunk[:chunk.rfind("\n") + 1]  # whole lines only; the rest is still being written
            offset += len(complete.encode())
            for line in complete.splitlines():
                if pruned:  # what the trial logged after the pruner stopped it does not count
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if self.sweep.metric in record:
                    values.append(float(record[self.sweep.metric]))
                    step = len(values)
                    if step not in reported and math.isfinite(values[-1]):
                        trial.report(values[-1], step)
                        reported.add(step)
                        if not self.stop_signal and trial.should_prune():
                            pruned = True
            if finished or pruned:
                return values, pruned
            if time.time() - last_beat > HEARTBEAT_SECONDS:
                last_beat = time.time()
                trial.set_user_attr("heartbeat", last_beat)
            time.sleep(self.settings.poll_seconds)


def _state_counts(trials) -> str:
    """'2 running, 5 complete, 1 waiting': the states that occur, in Optuna's order."""
    from optuna.trial import TrialState

    counts = [(sum(t.state == state for t in trials), state.name.lower()) for state in TrialState]
    return ", ".join(f"{n} {name}" for n, name in counts if n)


def _last_reported(trial) -> float | None:
    """The last value a trial reported to the pruner (a pruned or interrupted trial's standing)."""
    return list(trial.intermediate_values.values())[-1] if trial.intermediate_values else None


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)




def _logged_keys(run_dir: str) -> str:
    keys = set()
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    keys |= set(json.loads(line))
    return ", ".join(sorted(keys - {"step"})) or "none"


# ---------------------------------------------------------------- starting agents


def _visible_gpus(requested: str) -> list[str]:
    if requested:
        return [g.strip() for g in requested.split(",")]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def locate(settings: SweepConfig, sweep: Sweep) -> tuple[str, str, str]:
    """(sweep directory, storage, study name) from the flags and the file."""
    sweep_dir = settings.dir or os.path.join("runs", f"sweep-{sweep.name}")
    storage = settings.storage or os.path.join(sweep_dir, "study.journal")
    if os.path.isdir(storage):
        raise SweepError(f"--storage: {storage} is a directory; name a file (x.journal, or x.db for SQLite)")
    return sweep_dir, storage, settings.study or sweep.name


def run_sweep(settings: SweepConfig) -> int:
    sweep = load_sweep(settings.file, settings.trials)
    sweep_dir, storage, study_name = locate(settings, sweep)
    try:
        os.makedirs(sweep_dir, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(storage)), exist_ok=True)
    except OSError as e:
        raise SweepError(f"--dir: cannot create {sweep_dir} ({e.strerror})") from None
    with StudyLock(storage):
        study = open_study(sweep, storage, study_name, settings.seed)  # made once, before any agent
    size = f"{len(sweep.grid_points())} points" if sweep.method == "grid" else f"{sweep.run_cap} trials"
    heading = f"sweep {study_name}: {sweep.method}, {size}, {sweep.metric} ({sweep.goal}) | study {storage}"
    if settings.agents == 1:
        if not settings.agent_name:
            print(f"{heading} | trials in {sweep_dir}", flush=True)
        return Agent(sweep, settings, sweep_dir, storage, study).run()

    # Several agents on this machine: the same command, one process each, one GPU each if there are
    # GPUs. They coordinate through the study, as agents on other machines would.
    gpus = _visible_gpus(settings.gpus)
    print(f"{heading} | {settings.agents} agents" + (f" on GPUs {','.join(gpus)}" if gpus else ""), flush=True)
    children = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, forward)
    for index in range(settings.agents):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        elif "OMP_NUM_THREADS" not in env:  # CPU trials side by side: share the cores, not oversubscribe them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.agents))
        argv = [sys.executable, os.path.abspath(__file__), settings.file, "--agents", "1", "--dir", sweep_dir,
                "--storage", storage, "--study", study_name, "--agent_name", f"agent {index}"]
        for name in ("count", "trials", "seed", "stale_after", "poll_seconds"):
            argv += [f"--{name}", str(getattr(settings, name))]
        children.append(subprocess.Popen(argv, env=env))
    codes = [child.wait() for child in children]
    codes = [128 - code if code < 0 else code for code in codes]  # killed by signal N: 128 + N, as a shell says
    print(f"all {len(children)} agents done (exit statuses {codes}); python sweep.py report {sweep_dir}", flush=True)
    return max(codes, key=lambda c: (c != 0, c))


# ---------------------------------------------------------------- the report


def load_for_report(where: str, study_name: str = ""):
    """(study, sweep directory) from a sweep directory or a storage file."""
    if os.path.isdir(where):
        sweep_dir, storage = where, os.path.join(where, "study.journal")
    else:
        sweep_dir, storage = os.path.dirname(os.path.abspath(where)), where
    if not os.path.isfile(storage):
        raise SweepError(f"{where}: no study here (expected a sweep directory holding study.journal, "
                         f"or a .journal / .db file)")
    optuna = _quiet_optuna()
    backend = open_storage(storage)
    names = [s.study_name for s in backend.get_all_studies()]
    if not names:
        raise SweepError(f"{storage}: holds no study")
    if not study_name:
        if len(names) > 1:
            raise SweepError(f"{storage}: holds several studies ({', '.join(names)}); pick one with --study")
        study_name = names[0]
    if study_name not in names:
        raise SweepError(f"--study: {study_name!r} is not in {storage} ({', '.join(names)})")
    return optuna.load_study(storage=backend, study_name=study_name), sweep_dir


def report(where: str, study_name: str = "", top: int = 10) -> str:
    """Prints the best trials as a table and writes params.png, history.png and curves.png beside the
    study. Returns the text it printed."""
    from optuna.trial import TrialState

    study, sweep_dir = load_for_report(where, study_name)
    spec = study.user_attrs.get("sweep", {})
    metric = spec.get("metric", {}).get("name", "value")
    maximize = study.direction.name == "MAXIMIZE"
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    params = lambda t: t.params or t.system_attrs.get("fixed_params", {})  # noqa: E731  (queued: not drawn yet)

    def score(t):  # complete first, by value; then pruned by their last reported value; then the rest
        value = t.value if t.state == TrialState.COMPLETE else _last_reported(t)
        rank = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}.get(t.state, 2)
        key = math.inf if value is None else (-value if maximize else value)
        return (rank, key), value

    ordered = sorted(trials, key=lambda t: score(t)[0])
    lines = [f"study {study.study_name} ({spec.get('method', '?')}, {metric} {'max' if maximize else 'min'}imized): "
             f"{len(trials)} trials: {_state_counts(trials)}", ""]
    header = ["#", "trial", "state", metric] + names + ["evals", "time", "run"]
    rows = []
    for rank, t in enumerate(ordered[:top], 1):
        value = score(t)[1]
        rows.append([str(rank), str(t.number), t.state.name.lower(), "-" if value is None else f"{value:.4g}"]
                    + [_short(params(t)[n]) if n in params(t) else "-" for n in names]
                    + [str(t.user_attrs.get("evals", len(t.intermediate_values))),
                       format_duration(t.user_attrs["seconds"]) if "seconds" in t.user_attrs else "-",
                       os.path.relpath(t.user_attrs.get("run_dir", "-"))])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        lines += ["", f"best: trial {best.number}, {metric} {best.value:.4g}: "
                  + " ".join(f"--{k}={_short(v)}" for k, v in best.params.items()),
                  f"      rerun: python train.py --config "
                  f"{os.path.relpath(os.path.join(best.user_attrs.get('run_dir', '?'), 'config.json'))}"]
    paths = _plot_study(study, trials, names, metric, maximize, sweep_dir)
    lines += ["", "plots: " + ", ".join(paths)]
    text = "\n".join(lines)
    print(text)
    return text


def _plot_study(study, trials, names, metric, maximize, out_dir) -> list[str]:
    from matplotlib.figure import Figure
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    best = study.best_trial if complete else None
    last = _last_reported
    shown = [t.value for t in complete] + [last(t) for t in pruned]
    # Losses that span orders of magnitude (a grokked run's 1e-4 beside a memorising one's 27) on a log axis
    yscale = "log" if shown and min(shown) > 0 and max(shown) > 100 * min(shown) else "linear"
    paths = []

    # metric against each parameter: complete trials, pruned ones at their last value, the best in red
    fig = Figure(figsize=(4.2 * max(len(names), 1), 3.6))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names):
        distribution = next((t.distributions[name] for t in trials if name in t.distributions), None)
        categorical = isinstance(distribution, CategoricalDistribution)
        choices = [str(c) for c in distribution.choices] if categorical else []
        x = lambda t: choices.index(str(t.params[name])) if categorical else t.params[name]  # noqa: E731
        ax.scatter([x(t) for t in complete if name in t.params], [t.value for t in complete if name in t.params],
                   label="complete", color="tab:blue")
        if pruned:
            ax.scatter([x(t) for t in pruned if name in t.params], [last(t) for t in pruned if name in t.params],
                       label="pruned (last value)", color="tab:gray", marker="x")
        if best is not None and name in best.params:
            ax.scatter([x(best)], [best.value], color="tab:red", marker="*", s=160, label="best", zorder=3)
        if categorical:
            ax.set_xticks(range(len(choices)), choices)
        elif isinstance(distribution, (FloatDistribution, IntDistribution)) and distribution.log:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel=metric, yscale=yscale)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{study.study_name}: {metric} by parameter")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "params.png"))
    fig.savefig(paths[-1], dpi=110)

    # the optimisation history: each finished trial's value and the best so far
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    ax.scatter([t.number for t in complete], [t.value for t in complete], color="tab:blue", label="complete")
    if pruned:
        ax.scatter([t.number for t in pruned], [last(t) for t in pruned], color="tab:gray", marker="x",
                   label="pruned (last value)")
    if complete:
        running, xs, ys = None, [], []
        for t in sorted(complete, key=lambda t: t.number):
            if running is None or (t.value > running if maximize else t.value < running):
                running = t.value
            xs.append(t.number)
            ys.append(running)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, yscale=yscale, title=f"{study.study_name}: optimisation history")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "history.png"))
    fig.savefig(paths[-1], dpi=110)

    # the metric as each trial logged it: where hyperband cut the pruned ones
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for t in trials:
        if not t.intermediate_values:
            continue
        steps, values = zip(*sorted(t.intermediate_values.items()))
        style = dict(color="tab:gray", alpha=0.6) if t.state == TrialState.PRUNED else {}
        ax.plot(steps, values, label=f"trial {t.number}" if len(trials) <= 12 else None, **style)
    ax.set(xlabel=f"times {metric} was logged (hyperband's iterations)", ylabel=metric, yscale=yscale,
           title=f"{study.study_name}: {metric} during each trial (pruned in grey)")
    ax.grid(True, alpha=0.3)
    if len(trials) <= 12 and any(t.intermediate_values for t in trials):
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "curves.png"))
    fig.savefig(paths[-1], dpi=110)
    return paths


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        rest = argv[1:]
        study_name, top = "", 10
        positional = []
        while rest:
            flag = rest.pop(0)
            if flag in ("--study", "--top") and rest:
                value = rest.pop(0)
                if flag == "--study":
                    study_name = value
                else:
                    need(value.isdigit() and int(value) >= 1, "top", f"expected a positive integer, got {value!r}")
                    top = int(value)
            elif flag.startswith("-"):
                raise ConfigError(f"unknown flag {flag} for report; usage: python sweep.py report DIR [--study NAME] [--top N]")
            else:
                positional.append(flag)
        if len(positional) != 1:
            raise ConfigError("usage: python sweep.py report DIR [--study NAME] [--top N] (DIR: runs/sweep-<name>, "
                              "or the study's .journal / .db file)")
        report(positional[0], study_name, top)
        return 0
    settings, _ = parse_flags(SweepConfig, argv, "sweep.py", "Run a W&B sweep file locally with Optuna "
                              "(`python sweep.py report DIR` prints the best trials and draws plots).",
                              positional="file")
    return run_sweep(settings)


if __name__ == "__main__":
    try:
        status = main()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)
