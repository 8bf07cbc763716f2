"""Run directories: making one, naming one, the pointer that lets torchrun's restarted workers
find the run their first attempt named, and the claim that gives a run directory one live writer.
Standard library only."""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
import time
import uuid

from config import ConfigError

# ---------------------------------------------------------------- processes


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux /proc; None elsewhere or when it
    is gone). With the pid it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether process `pid` runs on this host (a zombie, exited but not yet reaped, does not); with
    `started`, whether it is still the process that started then (not a later one with its pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return True  # no /proc: os.kill said it exists
    now = process_start_time(pid)
    return started is None or now is None or abs(now - started) < 2


# ---------------------------------------------------------------- making and naming


def holds_files(path: str) -> bool:
    """Whether a directory holds anything but a writer's claim."""
    return os.path.isdir(path) and any(not name.startswith(CLAIM) for name in os.listdir(path))


def create_run_dir(path: str, resuming: bool, taken: str) -> str:
    """Makes `path` (<runs_dir>/<run>/). A fresh run never reuses another run's directory:
    one that already holds files raises ConfigError(`taken`) unless `resuming`."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConfigError(f"--runs_dir (--save_model_dir): {parent} is a file, not a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(taken)
    if holds_files(path) and not resuming:
        raise ConfigError(taken)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--runs_dir (--save_model_dir): cannot create {path} ({e.strerror})") from None
    return path


def unique_run_name(runs_dir: str, base: str) -> str:
    name, n = base, 1
    while os.path.exists(os.path.join(runs_dir, name)):
        n += 1
        name = f"{base}-{n}"
    return name


# ---------------------------------------------------------------- torchrun restarts


def _launch_pointer(runs_dir: str) -> str | None:
    """A file in runs_dir naming the run this torchrun launch created (None outside torchrun).

    Restarted workers must find the run their first attempt named, and every node must compute
    the same file name. torchrun's run id is the same for every attempt and node of one launch;
    with the default static rendezvous it is "none", and the master's address and port stand in
    (plus the host name when the master is this machine's loopback address, so that single-node
    launches on hosts that share a file system keep apart).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    key = os.environ["TORCHELASTIC_RUN_ID"]
    if key in ("", "none"):
        address = os.environ.get("MASTER_ADDR", "")
        key = f"{address}-{os.environ.get('MASTER_PORT', '')}"
        if address.startswith("127.") or address in ("localhost", "::1"):
            key = f"{platform.node()}-{key}"
    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return os.path.join(runs_dir, f".torchrun-{key}")


def remember_launch(runs_dir: str, run: str) -> None:
    """Rank 0, first attempt: note which run this torchrun launch is training."""
    path = _launch_pointer(runs_dir)
    if path is not None:
        with open(path, "w") as f:
            f.write(run)


def launched_run(runs_dir: str) -> str | None:
    """The run this torchrun launch named on its first attempt, if it got that far.

    A pointer older than our torchrun agent was left by an earlier launch that crashed for good
    (the first attempt of a launch always rewrites it), so it is ignored. The minute of slack
    allows for clocks that differ between nodes and a network file system.
    """
    path = _launch_pointer(runs_dir)
    if path is None or not os.path.isfile(path):
        return None
    started = process_start_time(os.getppid())
    if started is not None and os.path.getmtime(path) < started - 60:
        return None
    with open(path) as f:
        return f.read().strip() or None


def forget_launch(runs_dir: str) -> None:
    path = _launch_pointer(runs_dir)
    if path is not None and os.path.isfile(path):
        os.remove(path)


# ---------------------------------------------------------------- one live writer per directory

CLAIM = ".claim"


def launch_identity() -> str:
    """This launch, the same for every attempt of it: a Slurm job (its requeues keep the job id),
    else the torchrun agent (its restarts keep the agent), else this process."""
    host = socket.gethostname()
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm job {os.environ['SLURM_JOB_ID']} on {os.environ.get('SLURM_CLUSTER_NAME', 'its cluster')}"
    pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
    started = process_start_time(pid)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "unknown"
    return f"{'torchrun' if pid != os.getpid() else 'process'} {pid} on {host}, started {since}"


class Claim:
    """The live writer of a run directory: `<dir>/.claim`, a small JSON file naming the host, the
    process, the launch and when it claimed, whose modification time is a heartbeat refreshed every
    `timeout / 4` seconds (at most 30) by a thread.

    `Claim.take(directory, timeout)` creates it, or takes it over when its owner is gone: the
    same launch (a torchrun restart, a Slurm requeue) takes it at once; on this host, an owner
    whose process has ended; on another host, one whose heartbeat is older than `timeout`.
    Otherwise it raises ConfigError naming the owner. Creation is atomic (a complete file linked
    into place), and so is a takeover (the stale file renamed away), so of two launches racing for
    one directory exactly one wins."""

    def __init__(self, path: str, record: dict, timeout: float):
        self.path, self.record, self.timeout = path, record, timeout
        self.lost = False  # someone else holds the directory now (we were silent past the timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tinylab-claim", daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, directory: str, timeout: float, flag: str = "run_name") -> tuple["Claim", str]:
        """(the claim, what was taken over: "" for a free directory, else a sentence)."""
        claim, said = cls.try_take(directory, timeout)
        if claim is None:
            raise ConfigError(f"--{flag}: {directory} is being written by {said}; stop that run "
                              f"first, or if it is gone for good wait until its claim is {timeout:.0f}s old "
                              f"(--claim_timeout), then launch again")
        return claim, said

    @classmethod
    def try_take(cls, directory: str, timeout: float, own_launch: bool = True) -> tuple["Claim | None", str]:
        """`take` for a caller that waits instead of failing: (the claim, what was taken over) when
        it is ours, (None, who holds it) while a live writer does. `own_launch=False`: an earlier
        attempt of this launch is no exception (a token cache is built by one process of a
        multi-node job while the job's other nodes wait, all of them one launch)."""
        path = os.path.join(directory, CLAIM)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start_time(os.getpid()),
                  "launch": launch_identity(), "claimed": time.time(), "token": uuid.uuid4().hex}
        taken_over = ""
        for _ in range(5):
            if _link_new(path, record):
                return cls(path, record, timeout), taken_over
            owner, age = _read_claim(path)
            if owner is None and age is None:  # it vanished between the two calls: try again
                continue
            reason = _stale_because(owner, age, record if own_launch else {**record, "launch": None}, timeout)
            if reason is None:
                return None, _describe(owner, age)
            if _move_aside(path, owner):
                taken_over = f"took over {directory} from {_describe(owner, age)}: {reason}"
        return None, "other launches that keep claiming it"

    def _beat(self) -> None:
        interval = max(0.05, min(30.0, self.timeout / 4))
        while not self._stop.wait(interval):
            if not self.ours():
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def ours(self) -> bool:
        owner, _ = _read_claim(self.path)
        return owner is not None and owner.get("token") == self.record["token"]

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.ours():
            os.remove(self.path)


def _link_new(path: str, record: dict) -> bool:
    """Creates `path` holding `record`, complete or not at all; False when it exists."""
    tmp = f"{path}.tmp-{record['token']}"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _read_claim(path: str) -> tuple[dict | None, float | None]:
    """(its record, seconds since its last heartbeat); (None, None) if there is none; ({}, age)
    if it is unreadable (written by hand, or by a version that wrote something else)."""
    try:
        age = time.time() - os.path.getmtime(path)
        with open(path) as f:
            record = json.load(f)
        return (record if isinstance(record, dict) else {}), age
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return {}, 0.0


def _stale_because(owner: dict, age: float, mine: dict, timeout: float) -> str | None:
    """Why `owner`'s claim may be taken over, or None while it holds."""
    if not owner:
        return "its claim file is unreadable"
    same_host = owner.get("host") == mine["host"]
    if same_host and process_alive(int(owner.get("pid", 0)), owner.get("started")):
        return None  # a live process here: not even its own launch may write beside it
    if owner.get("launch") == mine["launch"]:
        return "it is an earlier attempt of this launch"
    if same_host:
        return "its process has ended"
    if age > timeout:
        return f"no heartbeat for {age:.0f}s (--claim_timeout {timeout:.0f})"
    return None


def _move_aside(path: str, owner: dict) -> bool:
    """Removes the stale claim `owner` from `path`; False when another launch got there first (the
    file there is no longer `owner`'s: it is put back)."""
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved, _ = _read_claim(aside)
    if moved != owner:  # a fresh claim landed between our read and the rename: it stays
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        os.remove(aside)
        return False
    os.remove(aside)
    return True


def _describe(owner: dict, age: float) -> str:
    if not owner:
        return "an unknown writer (unreadable claim)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("claimed", 0)))
    return (f"process {owner.get('pid')} on host {owner.get('host')} ({owner.get('launch')}; claimed {since}, "
            f"last heartbeat {age:.0f}s ago)")
