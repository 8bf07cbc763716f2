"""The hang watchdog: a distributed run whose ranks stop meeting ends, loudly, so that it can resume.

A rank that waits in a collective for a peer that never comes (the peer's process stopped, its GPU
wedged, its file system stuck) waits for the collective's timeout: 30 minutes under gloo, 10 under
NCCL, printing nothing. Here every rank runs a thread that, once a second:

- judges whether its own rank is making progress: the training step moved on, the main thread's
  Python stack changed since the last look (a rank blocked in a collective or in a read shows the
  same stack every time; one that computes does not), or the checkpoint it is writing grew;
- publishes a heartbeat to the launcher's store (torchrun's agent holds it, so it outlives a
  worker that stopped): a counter, the step, where the main thread is and how long it has been
  idle;
- reads every other rank's heartbeat.

When this rank has made no progress for `timeout` seconds and no other rank has either (a rank that
is merely slow, in a long evaluation or writing a checkpoint, is progress: the others wait for it),
the run is hung. Every live rank writes its Python stacks to the store, the lowest live rank
prints them all with the ranks that did not arrive (no heartbeat: stopped or gone; or stuck
somewhere the others are not), and every live rank exits with HANG_EXIT. torchrun's --max-restarts
restarts the workers and train.slurm requeues the job; either way the run resumes from its last
checkpoint. The process groups' own timeouts are set to `timeout` + COLLECTIVE_MARGIN, a backstop
behind the watchdog.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

HANG_EXIT = 3  # the exit status of a rank that ended a hung run (train.slurm requeues on it)
COLLECTIVE_MARGIN = 60.0  # seconds the process groups wait beyond the watchdog before they raise
STALE_SECONDS = 4.0  # a heartbeat that has not moved for this long: the process is stopped or gone
INTERVAL = 1.0  # seconds between looks
STATUS_ENV = "TINYLAB_STATUS_FILE"  # where a launcher (train.slurm) asks to be told "hang"


def collective_timeout(step_timeout: float) -> datetime.timedelta | None:
    """The process groups' timeout for a watchdog of `step_timeout` seconds (None: torch's default)."""
    return datetime.timedelta(seconds=step_timeout + COLLECTIVE_MARGIN) if step_timeout else None


def main_thread_stack() -> list:
    """The main thread's frames, outermost first (an empty list if it has none)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    return traceback.extract_stack(frame) if frame is not None else []


def where(stack: list) -> str:
    """Where a stack is, in a few words: the innermost frame of this project, then the innermost."""
    if not stack:
        return "unknown"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = [f for f in stack if os.path.abspath(f.filename).startswith(root + os.sep) and "site-packages" not in f.filename]
    def say(f) -> str:
        name = os.path.relpath(f.filename, root) if f in ours else os.path.basename(f.filename)
        return f"{name}:{f.lineno} {f.name}"
    inner = stack[-1]
    if ours and ours[-1] is not inner:
        return f"{say(ours[-1])} -> {say(inner)}"
    return say(inner)


def all_stacks() -> str:
    """Every thread's Python stack in this process, the main thread first."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    parts = []
    for ident in sorted(frames, key=lambda i: (i != main, i)):
        if ident == threading.get_ident():
            continue  # the watchdog itself
        parts.append(f"  thread {names.get(ident, ident)}:\n"
                     + "".join("    " + line for line in traceback.format_stack(frames[ident])))
    return "".join(parts)


def path_size(path: str) -> int:
    """Bytes under `path` (a file, or a folder's files); 0 when it does not exist."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(directory, name))
            except OSError:
                pass
    return total


class Watchdog:
    """One rank's watchdog (see the module's text). `start()` after the process group exists;
    `step(n)` after each training step (cheap: an assignment); `writing(path)` while a checkpoint
    is written there; `stop()` at the end. `log` gets the report on the rank that prints it;
    `exit` ends the process (os._exit: the main thread is stuck, so nothing else could)."""

    def __init__(self, rank: int, world_size: int, timeout: float, log=None, exit=os._exit):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.log, self.exit = log, exit
        self.current_step = 0
        self.writing_path: str | None = None
        self._store = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------ the loop's side

    def step(self, step: int) -> None:
        self.current_step = step

    def writing(self, path: str | None) -> None:
        """A checkpoint is being written at `path` (None: no longer): bytes arriving there are progress."""
        self.writing_path = path

    def start(self, store) -> "Watchdog":
        """Starts watching, publishing heartbeats to `store` (a torch.distributed Store all ranks share)."""
        if not self.timeout or self.world_size < 2:
            return self
        self._store = store
        self._thread = threading.Thread(target=self._run, name="tinylab-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        beat = 0
        last_signature, last_step, last_size = None, -1, -1
        progressed = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}  # rank -> (its beat counter, when we saw it change)
        while not self._stopping.wait(INTERVAL):
            now = time.monotonic()
            stack = main_thread_stack()
            signature = tuple((f.filename, f.lineno, f.name) for f in stack)
            size = path_size(self.writing_path) if self.writing_path else -1
            if signature != last_signature or self.current_step != last_step or size != last_size:
                progressed = now
            last_signature, last_step, last_size = signature, self.current_step, size
            idle = now - progressed
            beat += 1
            mine = {"beat": beat, "step": self.current_step, "idle": round(idle, 1), "where": where(stack),
                    "writing": self.writing_path or "", "pid": os.getpid(), "host": socket.gethostname()}
            try:
                self._store.set(f"beat/{self.rank}", json.dumps(mine))
                if self._store.check(["hang"]):
                    idle = self.timeout  # another rank called it: answer with our stack now
                if idle < self.timeout:
                    continue
                beats = self._read_beats()
            except Exception as e:  # the store is gone (its host died): nothing to agree with
                if idle >= self.timeout:
                    self._fire({}, seen, f"the store that the ranks share is unreachable ({e})")
                continue
            for rank, other in beats.items():
                if rank not in seen or seen[rank][0] != other["beat"]:
                    seen[rank] = (other["beat"], now)
            alive = {r: b for r, b in beats.items() if now - seen[r][1] < STALE_SECONDS}
            busy = [r for r, b in alive.items() if r != self.rank and b["idle"] < self.timeout]
            if busy and not self._store.check(["hang"]):
                continue  # someone is still working (a long eval, a checkpoint write): we wait for them
            self._fire(beats, seen, "")
            return

    def _read_beats(self) -> dict[int, dict]:
        keys = [f"beat/{r}" for r in range(self.world_size)]
        present = [k for k in keys if self._store.check([k])]
        values = self._store.multi_get(present) if present else []
        return {int(k.split("/")[1]): json.loads(v) for k, v in zip(present, values)}

    def _fire(self, beats: dict[int, dict], seen: dict[int, tuple[int, float]], problem: str) -> None:
        """This rank's part of ending a hung run: its stacks to the store, the report if it is the
        lowest live rank, the status file, the exit."""
        now = time.monotonic()
        stacks = all_stacks()
        alive = sorted(r for r in beats if now - seen.get(r, (0, now))[1] < STALE_SECONDS) or [self.rank]
        try:
            self._store.set("hang", str(self.rank))
            self._store.set(f"stack/{self.rank}", stacks)
            deadline = time.monotonic() + 3 * INTERVAL  # the other live ranks' stacks, briefly
            while time.monotonic() < deadline and not self._store.check([f"stack/{r}" for r in alive]):
                time.sleep(0.1)
            collected = {r: self._store.get(f"stack/{r}").decode() for r in alive
                         if self._store.check([f"stack/{r}"])}
        except Exception:
            collected = {self.rank: stacks}
        stopped = stop_stopped_peers(beats, seen, now)
        if self.rank == min(alive):
            self._say(report(self.timeout, self.world_size, beats, seen, now, collected, problem, stopped))
        status = os.environ.get(STATUS_ENV)
        if status:
            try:
                with open(status, "w") as f:
                    f.write("hang\n")
            except OSError:
                pass
        sys.stderr.flush()
        self.exit(HANG_EXIT)

    def _say(self, text: str) -> None:
        if self.log is not None and self.rank == 0:
            self.log.error(text)
        else:
            print(text, file=sys.stderr, flush=True)


def process_state(pid: int) -> str:
    """A process's state letter on Linux (R, S, D, T for stopped, ...), or "" when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stop_stopped_peers(beats: dict[int, dict], seen: dict[int, tuple[int, float]], now: float) -> list[int]:
    """Ranks on this host whose heartbeat stopped because their process is stopped (SIGSTOP, a
    debugger): killed, so that the launcher need not wait out its grace period for a process that
    cannot answer its SIGTERM. Returns their ranks. (A process stuck in the kernel, state D, cannot
    be killed by anyone; it is left to the launcher.)"""
    killed = []
    host = socket.gethostname()
    for rank, beat in beats.items():
        if now - seen.get(rank, (0, now))[1] < STALE_SECONDS or beat.get("host") != host:
            continue
        if process_state(beat.get("pid", -1)) in ("T", "t"):
            try:
                os.kill(beat["pid"], signal.SIGKILL)
                killed.append(rank)
            except OSError:
                pass
    return killed


def report(timeout: float, world_size: int, beats: dict[int, dict], seen: dict[int, tuple[int, float]], now: float,
           stacks: dict[int, str], problem: str = "", killed: list[int] = ()) -> str:
    """The hang report: which ranks did not arrive and why we think so, where each rank was, and the
    live ranks' stacks."""
    stale = {r: now - seen[r][1] for r in beats if now - seen[r][1] >= STALE_SECONDS}
    absent = [r for r in range(world_size) if r not in beats]
    alive = {r: b for r, b in beats.items() if r not in stale}
    places = [b["where"] for b in alive.values()]
    common = max(set(places), key=places.count) if places else ""
    elsewhere = [r for r, b in alive.items() if b["where"] != common] if len(set(places)) > 1 else []
    missing = sorted(set(stale) | set(absent) | set(elsewhere))
    lines = [f"error: hang: no rank has made progress for {timeout:g} s (--step_timeout)"
             + (f"; {problem}" if problem else "")]
    if missing:
        lines.append(f"ranks that did not arrive: {', '.join(map(str, missing))}")
    else:
        lines.append("every rank is waiting in the same place: a collective that does not match across ranks, "
                     "or a stalled network")
    for r in range(world_size):
        if r in absent:
            lines.append(f"  rank {r}: never sent a heartbeat")
        elif r in stale:
            b = beats[r]
            lines.append(f"  rank {r}: no heartbeat for {stale[r]:.0f} s (its process is stopped or gone); "
                         f"last at step {b['step']}, {b['where']}"
                         + (f"; pid {b['pid']} on {b['host']} was stopped, and is killed" if r in killed else ""))
        else:
            b = beats[r]
            lines.append(f"  rank {r}: step {b['step']}, idle {b['idle']:.0f} s at {b['where']}"
                         + (f", writing {b['writing']}" if b.get("writing") else "")
                         + ("  <- not where the others are" if r in elsewhere else ""))
    for r in sorted(stacks):
        lines.append(f"rank {r} stacks:\n{stacks[r].rstrip()}")
    lines.append(f"exiting with status {HANG_EXIT}: torchrun --max-restarts or train.slurm's requeue resumes the "
                 f"run from its last checkpoint")
    return "\n".join(lines)
