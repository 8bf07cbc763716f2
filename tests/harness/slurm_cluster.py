"""A private Slurm cluster for tests: munged, slurmctld and slurmd as child processes, on this host
or on two virtual hosts.

    reason = slurm_missing_reason()          # None when this machine can run one
    with SlurmCluster(tmp_dir) as cluster:   # writes a key and slurm.conf, starts the daemons
        job = cluster.sbatch(["/path/train.slurm", "--max_steps", "40"], cwd=work_dir)
        assert cluster.wait(job, timeout=120) == "COMPLETED"

    with SlurmCluster(tmp_dir, nodes=2) as cluster:   # two hosts, node1 and node2 (tests/virtual_hosts.py)
        job = cluster.sbatch(["--nodes=2", "/path/train.slurm", ...], cwd=work_dir)
        cluster.hosts.pids("node2")                    # every process running on node2

With nodes=2 each node is a host of its own made of Linux namespaces (its own address on a bridge,
10.77.0.1 and .2, host name, /etc/hosts, ports and /run-like folder): a munged on each with the same
key, a slurmd on each, slurmctld on node1, and the client commands run on node1 as on a login node.
The file system is shared, as a cluster's is. Run that way, a job crosses a real network boundary:
its rendezvous, gloo's connections and the stop signal all go over TCP between two addresses.

Everything the cluster owns lives in `tmp_dir`: the munge key and socket, slurm.conf, the state and
spool directories, the daemons' logs. Nothing in /etc, /run or /var is read or written, the ports are
picked free, and the daemons run in the foreground as children of this process (they also die with
it), so two test sessions on one machine do not see each other and nothing is left behind. There is
no accounting database: job states come from `scontrol show job`, which keeps a finished job for
MinJobAge (300 s here). Client commands need `SLURM_CONF`: run them with `cluster.env`.

Needs Debian's `slurm-wlm` (or slurmctld + slurmd + slurm-client) and `munge`, and root: slurmd
starts jobs as their user. No pytest in here; tests/test_slurm.py and tests/test_two_nodes.py wrap
it in fixtures.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from harness.virtual_hosts import Started, VirtualHosts

# States after which a job record no longer changes (a requeued job goes back to PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "OUT_OF_MEMORY"}
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")  # daemons live here, often off a user's PATH


class SlurmError(RuntimeError):
    """The cluster did not start, or a Slurm command failed; the message carries the evidence."""


def find_program(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(name, path=path)


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def slurm_missing_reason() -> str | None:
    """Why a private Slurm cannot run here, or None when it can."""
    if not hasattr(os, "geteuid"):
        return "Slurm tests need Linux"
    missing = [name for name in DAEMONS + CLIENTS if find_program(name) is None]
    if missing:
        return (f"Slurm not installed ({', '.join(missing)} not found); "
                f"apt-get install slurm-wlm munge (see DEVELOPERS.md)")
    if os.geteuid() != 0:
        return "Slurm tests need root: slurmd must run as root to start jobs (see DEVELOPERS.md)"
    try:
        version = subprocess.run([find_program("slurmctld"), "-V"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"slurmctld -V failed: {error}"
    if version.returncode != 0:
        return f"slurmctld -V failed: {version.stderr.strip() or version.stdout.strip()}"
    try:
        socket.gethostbyname(short_hostname())
    except OSError:
        return f"this host's name {short_hostname()!r} does not resolve (Slurm and torchrun need it)"
    return None


def slurm_version() -> str:
    """'22.05.8' from `slurmctld -V` ('slurm-wlm 22.05.8' on Debian)."""
    out = subprocess.run([find_program("slurmctld"), "-V"], capture_output=True, text=True).stdout
    return out.split()[-1] if out.split() else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the forked child: get SIGTERM when the test process dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"--- {path.name}: (none)"
    return f"--- {path.name} (last {min(lines, len(text))} lines):\n" + "\n".join(text[-lines:])


class SlurmCluster(Started):
    """One partition of `nodes` nodes (this host, or virtual hosts node1, node2, ...), started by
    start() (or `with`), torn down by stop().

    `env` is the environment for Slurm client commands (and what sbatch hands to jobs): this
    process's environment without any SLURM_*/SBATCH_* variables of an outer Slurm job, plus SLURM_CONF.
    """

    def __init__(self, directory, start_timeout: float = 60.0, min_job_age: int = 300, nodes: int = 1):
        self.dir = Path(directory).absolute()
        self.start_timeout = start_timeout
        self.min_job_age = min_job_age
        self.hosts: VirtualHosts | None = None
        if nodes > 1:  # the run folder is private to each host, as /run/munge is
            self.hosts = VirtualHosts(self.dir / "hosts", [f"node{i + 1}" for i in range(nodes)],
                                      private=(str(self.dir / "run"),))
        self.nodes = self.hosts.names if self.hosts else [short_hostname()]
        self.node = self.nodes[0]  # where slurmctld runs, and the client commands
        self.conf = self.dir / "slurm.conf"
        self.env: dict[str, str] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._socket_dir: Path | None = None  # a short directory of our own when self.dir is too deep

    # ---------------------------------------------------------------- lifecycle (start(), stop(), `with`)

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.hosts is not None:
            self.hosts.start()
        munge_dir = self.dir / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # the socket's directory must be searchable by all, whatever the umask
        # Each virtual host has a munged of its own (the same key), its socket in the host's own run/.
        run_dir = munge_dir if self.hosts is None else self.dir / "run"
        socket_path = run_dir / "munge.socket"
        if len(str(socket_path)) > 100 and self.hosts is None:  # AF_UNIX paths stop at 108 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="tinylab-munge-"))
            self._socket_dir.chmod(0o755)
            socket_path = self._socket_dir / "munge.socket"
        key = munge_dir / "munge.key"
        if not key.exists():  # munged insists: owned by its user, readable by nobody else
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        for name in ("state", *(f"spool/{node}" for node in self.nodes)):
            (self.dir / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._slurm_conf(socket_path))

        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        self.env = env

        # --force: munged refuses a socket whose parent directories are not world-searchable, which
        # pytest's 0700 temporary directories are not. Only root (us, and the daemons) talks to it.
        for node in self.nodes:
            self._spawn("munged", node, [
                find_program("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                f"--pid-file={run_dir / 'munged.pid'}", f"--log-file={run_dir / 'munged.log'}",
                f"--seed-file={run_dir / 'munged.seed'}"])
            self._wait_for(lambda: self._on(node, ["test", "-S", str(socket_path)]), f"munged on {node} to start")
        self._spawn("slurmctld", self.node, [find_program("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn("slurmd", node, [find_program("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        for node in self.nodes:
            self._wait_for(lambda: self.node_state(node) == "IDLE", f"node {node} to become IDLE")

    def _on(self, node: str, argv: list[str]) -> bool:
        """True when `argv` succeeds on `node`."""
        command = argv if self.hosts is None else self.hosts.command(node, argv)
        return subprocess.run(command, capture_output=True).returncode == 0

    def _slurm_conf(self, socket_path: Path) -> str:
        d = self.dir
        cpus = os.cpu_count() or 1
        if self.hosts is None:
            nodes = [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN"]
            controller, ports = self.node, (free_port(), free_port())
        else:  # every host has its own ports: Slurm's usual ones
            nodes = [f"NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
                     for name, address in self.hosts.addresses.items()]
            controller, ports = f"{self.node}({self.hosts.addresses[self.node]})", (6817, 6818)
        return "\n".join([
            f"# written by tests/slurm_cluster.py: a private cluster of {len(self.nodes)} node(s)",
            "ClusterName=tinylab-test",
            f"SlurmctldHost={controller}",
            f"SlurmctldPort={ports[0]}",
            f"SlurmdPort={ports[1]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default
            # 120 s); 5 is the smallest value Slurm accepts.
            f"AuthInfo=socket={socket_path},cred_expire=5",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool' / '%n'}",  # %n: the node's name
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd-%n.log'}",  # slurmstepd (job launch errors) logs here too
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "JobRequeue=1",
            "KillWait=5",
            f"MinJobAge={self.min_job_age}",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # trust the CPU count below, whatever the hardware says
            # The main scheduler otherwise runs every 60 s: a requeued job would idle that long.
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            *nodes,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, daemon: str, node: str, argv: list[str]) -> None:
        name = daemon if daemon == "slurmctld" else f"{daemon}-{node}"
        out = open(self.dir / f"{name}.stderr", "ab")
        try:
            command = argv if self.hosts is None else self.hosts.command(node, argv, self.dir)
            self._processes[name] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                     cwd=self.dir, env=self.env, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with status {process.returncode} while waiting for {what}\n"
                                     + self.logs())
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n" + self.logs())

    def stop(self) -> None:
        """Cancels every job, then ends the daemons (SIGTERM, then SIGKILL). Safe to call twice."""
        if "slurmctld" in self._processes and self._processes["slurmctld"].poll() is None:
            try:
                self._cancel_all_jobs()
            except Exception:  # a half-started cluster: nothing to cancel
                pass
        for daemon in reversed(DAEMONS):
            for name in [n for n in self._processes if n.split("-")[0] == daemon]:
                process = self._processes.pop(name)
                if process.poll() is not None:
                    continue
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.hosts is not None:
            self.hosts.stop()  # and whatever still ran on them
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _cancel_all_jobs(self, timeout: float = 20.0) -> None:
        # slurmstepd and the job's processes outlive slurmd, so the jobs must end before it does.
        self.run(["scancel", "--partition=debug"], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = self.run(["squeue", "--noheader", "--states=all", "--format=%i %T"], check=False).stdout
            if not any(line.split()[1] in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")
                       for line in listing.splitlines() if len(line.split()) == 2):
                return
            time.sleep(0.5)

    # ---------------------------------------------------------------- commands and jobs

    def run(self, argv: list[str], cwd=None, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Runs a Slurm client command against this cluster; SlurmError (with its output) on failure."""
        command = [find_program(argv[0]) or argv[0], *argv[1:]]
        if self.hosts is not None:  # on node1, as on a cluster's login node
            command = self.hosts.command(self.node, command, cwd)
        result = subprocess.run(command, cwd=cwd, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed with status {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, args: list[str], cwd, env: dict[str, str] | None = None) -> str:
        """Submits a batch job; returns its id. `env` adds variables to the job's environment."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        text = self.run(["scontrol", "--oneliner", "show", "job", str(job_id)]).stdout
        fields: dict[str, str] = {}
        key = None
        for token in text.split():
            match = re.match(r"([A-Za-z:/_]+)=(.*)", token)
            if match:
                key = match.group(1)
                fields[key] = match.group(2)
            elif key is not None:  # a value with spaces in it
                fields[key] += " " + token
        return fields

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def restart_count(self, job_id: str) -> int:
        return int(self.job(job_id).get("Restarts", "0"))

    requeue_count = restart_count

    def completing(self, job_id: str) -> bool:
        """True while Slurm is still tearing the job down (its state may already read final)."""
        result = self.run(["squeue", "--noheader", f"--jobs={job_id}", "--states=COMPLETING", "--format=%i"],
                          check=False)
        return bool(result.stdout.strip())

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.5) -> str:
        """Waits until the job has reached a final state and finished completing (its batch script has
        exited), and returns the state; SlurmError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in FINAL_STATES and not self.completing(job_id):
                return info["JobState"]
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still {info['JobState']} (Reason={info.get('Reason')}) after "
                                 f"{timeout:.0f}s\n" + self.logs(job_id))
            time.sleep(poll)

    def wait_until(self, ready, timeout: float, what: str, job_id: str | None = None, poll: float = 0.2) -> None:
        """Polls `ready()` until it is true; SlurmError (with the logs) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.logs(job_id))
            if job_id is not None and self.state(job_id) in FINAL_STATES:
                raise SlurmError(f"job {job_id} ended ({self.state(job_id)}) before {what}\n" + self.logs(job_id))
            time.sleep(poll)

    def signal(self, job_id: str, sig: str = "USR1", batch_only: bool = True) -> None:
        """Sends `sig` to the batch shell only (--batch), or to it and every step (--full)."""
        self.run(["scancel", f"--signal={sig}", "--batch" if batch_only else "--full", str(job_id)])

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", str(job_id)])

    def node_state(self, node: str | None = None) -> str | None:
        result = self.run(["scontrol", "--oneliner", "show", "node", node or self.node], check=False, timeout=20)
        match = re.search(r"\bState=(\S+)", result.stdout)
        return match.group(1) if result.returncode == 0 and match else None

    def _names(self) -> list[str]:
        """The daemons' file names: slurmctld, and munged-NODE and slurmd-NODE per node."""
        return ["slurmctld", *[f"{daemon}-{node}" for node in self.nodes for daemon in ("munged", "slurmd")]]

    def logs(self, job_id: str | None = None) -> str:
        """The tails of the daemons' logs (and of the job's output file), for error messages."""
        parts = []
        if job_id is not None:
            try:
                stdout = self.job(job_id).get("StdOut")
                if stdout:
                    parts.append(_tail(Path(stdout), 60))
            except Exception:
                pass
        for name in self._names():  # the log file where there is one; munged (in the foreground) writes stderr
            log_file = self.dir / f"{name}.log"
            parts.append(_tail(log_file if log_file.is_file() and log_file.stat().st_size else
                               self.dir / f"{name}.stderr"))
        return "\n".join(parts)
