"""Several hosts on one machine, for tests and benchmarks: each host is a process holding Linux
network, UTS and mount namespaces of its own, so it has its own address, host name, /etc/hosts and
ports; programs run on a host through `nsenter`.

    with VirtualHosts(tmp_dir, ["node1", "node2"]) as hosts:       # a bridge, 10.77.0.1 and .2
        hosts.run("node2", ["ping", "-c1", "node1"])                 # by name, through its /etc/hosts
        process = subprocess.Popen(hosts.command("node1", argv))    # a program on node1

    VirtualHosts(tmp_dir, ["node1", "node2"], delay_ms=5)           # a point-to-point link adding
                                                                    # 5 ms each way (see below)

The links: by default one Linux bridge, in a namespace of its own (the "switch"), with a veth pair
from each host to it: kernel forwarding, no added latency. With `delay_ms` (two hosts only) the hosts
are joined instead by a TUN device each and a small forwarding process that holds every packet for
`delay_ms` before passing it on: `tc qdisc ... netem delay` does that on a veth, but kernels built
without sch_netem (this project's CI machines, for one) do not have it.

Only namespaces made here are touched: the root namespace gets no interface, route or address, and
nothing in /etc is written (each host bind-mounts its own hosts file over /etc/hosts in its private
mount namespace). Each host can also have private folders (`private=`): a path that is the same on
every host but a different folder on each, as /run/munge is on real machines. Every process started
here gets SIGTERM when the process that started it dies, and stop() kills whatever else runs on
the hosts; only a test process killed outright (SIGKILL) can leave behind what other programs
started there (a Slurm job's processes, which slurmstepd started), and with them the namespaces.

Needs root and util-linux's unshare/nsenter, iproute2's ip. No pytest in here.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

PROGRAMS = ("unshare", "nsenter", "ip")
_SBIN = ("/usr/sbin", "/sbin")


class HostsError(RuntimeError):
    """The namespaces or links could not be made; the message says which command failed and why."""


def _find(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN))


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def hosts_missing_reason() -> str | None:
    """Why virtual hosts cannot be made on this machine, or None when they can (tries it)."""
    if not sys.platform.startswith("linux"):
        return "virtual hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "virtual hosts need root (network namespaces, veth pairs, a bridge)"
    missing = [name for name in PROGRAMS if _find(name) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install util-linux iproute2)"
    probe = subprocess.run([_find("unshare"), "--net", "--uts", "--mount", _find("ip"), "link", "add", "tlprobe0",
                            "type", "veth", "peer", "name", "tlprobe1"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace with a veth pair here: {probe.stderr.strip()}"
    return None


class Started:
    """A thing with start() and stop(): start() runs _start() and, if that fails, stop() (so a half
    start leaves nothing behind) before raising; `with` starts it and stops it."""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class VirtualHosts(Started):
    """Hosts `names` on subnet `subnet`.0/24 (addresses .1, .2, ... in order), started by start() or
    `with`, torn down by stop(). `private`: folders (absolute paths) that each host sees as a folder
    of its own, <directory>/<host>/<basename> bind-mounted over the path."""

    def __init__(self, directory, names=("node1", "node2"), subnet: str = "10.77.0", delay_ms: float = 0.0,
                 private: tuple[str, ...] = ()):
        self.dir = Path(directory).absolute()
        self.names = list(names)
        self.addresses = {name: f"{subnet}.{i + 1}" for i, name in enumerate(self.names)}
        self.delay_ms = delay_ms
        self.private = [Path(p).absolute() for p in private]
        if delay_ms and len(self.names) != 2:
            raise ValueError("a delayed link joins exactly two hosts")
        self._holders: dict[str, subprocess.Popen] = {}
        self._others: list[subprocess.Popen] = []

    # ---------------------------------------------------------------- running things on a host

    def pid(self, name: str) -> int:
        """A process inside the host's namespaces (its holder)."""
        return self._holders[name].pid

    def command(self, name: str, argv: list[str], cwd=None) -> list[str]:
        """`argv` as a command that runs on host `name` (in its network, UTS and mount namespaces), in
        folder `cwd` (default: the caller's; entering a mount namespace would otherwise start in /)."""
        return [_find("nsenter"), f"--target={self.pid(name)}", "--net", "--uts", "--mount",
                f"--wd={os.path.abspath(cwd or os.getcwd())}", "--", *argv]

    def run(self, name: str, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(name, argv, kwargs.get("cwd")), capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise HostsError(f"on {name}: {' '.join(argv)} failed with status {result.returncode}: "
                             f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A program on host `name` that dies with this process (SIGTERM)."""
        return subprocess.Popen(self.command(name, argv, kwargs.get("cwd")), preexec_fn=_die_with_parent, **kwargs)

    def pids(self, name: str) -> list[int]:
        """Every process whose network namespace is host `name`'s (the holder excluded)."""
        mine = os.readlink(f"/proc/{self.pid(name)}/ns/net")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid(name):
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == mine:
                    found.append(int(entry))
            except OSError:  # gone, or a kernel thread
                continue
        return found

    # ---------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        hosts_file = self.dir / "hosts"
        hosts_file.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                              + "".join(f"{address}\t{name}\n" for name, address in self.addresses.items())
                              # as a dual-stack listener (torch's TCPStore) sees its peers; there is no DNS
                              # to ask, so without these lines the reverse lookups fail (c10d warns).
                              + "".join(f"::ffff:{address}\t{name}\n" for name, address in self.addresses.items()))
        for name in self.names:
            mounts = [f"mount --bind {hosts_file} /etc/hosts"]
            for path in self.private:
                own = self.dir / name / path.name
                own.mkdir(parents=True, exist_ok=True)
                path.mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount --bind {own} {path}")
            ready = self.dir / f"{name}.ready"
            ready.unlink(missing_ok=True)
            script = f"hostname {name} && {' && '.join(mounts)} && touch {ready} && exec sleep infinity"
            with open(self.dir / f"{name}.err", "wb") as err:
                self._holders[name] = subprocess.Popen(
                    [_find("unshare"), "--net", "--uts", "--mount", "--propagation", "private", "sh", "-c", script],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent)
            self._wait(lambda: ready.exists(), name)
            self.run(name, ["ip", "link", "set", "lo", "up"])
        if self.delay_ms:
            self._delayed_link()
        else:
            self._bridge()

    def _bridge(self) -> None:
        switch = subprocess.Popen([_find("unshare"), "--net", "sleep", "infinity"], stdin=subprocess.DEVNULL,
                                  preexec_fn=_die_with_parent)
        self._others.append(switch)
        in_switch = [_find("nsenter"), f"--target={switch.pid}", "--net", "--"]
        self._wait(lambda: os.readlink(f"/proc/{switch.pid}/ns/net") != os.readlink("/proc/self/ns/net"), "switch")

        def sw(*argv: str) -> None:
            result = subprocess.run([*in_switch, _find("ip"), *argv], capture_output=True, text=True)
            if result.returncode != 0:
                raise HostsError(f"in the switch: ip {' '.join(argv)}: {result.stderr.strip()}")

        sw("link", "add", "br0", "type", "bridge")
        sw("link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            port = f"port{i}"
            sw("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid(name)))
            sw("link", "set", port, "master", "br0")
            sw("link", "set", port, "up")
            self.run(name, ["ip", "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0"])
            self.run(name, ["ip", "link", "set", "eth0", "up"])

    def _delayed_link(self) -> None:
        a, b = self.names
        line = subprocess.Popen([sys.executable, os.path.abspath(__file__), "delay-line", str(self.pid(a)),
                                 str(self.pid(b)), str(self.delay_ms)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, preexec_fn=_die_with_parent)
        self._others.append(line)
        if line.stdout.readline().strip() != b"ready":
            raise HostsError(f"the delay line did not start (status {line.wait()})")
        for name, peer in ((a, b), (b, a)):
            self.run(name, ["ip", "addr", "add", self.addresses[name], "peer", self.addresses[peer], "dev", "tun0"])
            self.run(name, ["ip", "link", "set", "tun0", "mtu", "65000", "up"])

    def _wait(self, ready, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            holder = self._holders.get(what)
            if holder is not None and holder.poll() is not None:
                raise HostsError(f"host {what} did not start: " + (self.dir / f"{what}.err").read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise HostsError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Ends every process on the hosts, then the hosts (their namespaces go with them). Safe on a
        half-started set and on holders that already died."""
        for _ in range(5):  # again while something is left: a process may fork between listing and killing
            left = []
            for name, holder in self._holders.items():
                try:
                    left += [] if holder.poll() is not None else self.pids(name)
                except OSError:  # the holder went in the meantime
                    continue
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left:
                break
            time.sleep(0.05)
        for process in [*self._others, *self._holders.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
        self._holders.clear()
        self._others.clear()


# ---------------------------------------------------------------- the delay line (its own process)

def _delay_line(pid_a: int, pid_b: int, delay_ms: float) -> None:
    """Makes tun0 in the network namespaces of processes pid_a and pid_b and passes every packet
    from one to the other `delay_ms` after it arrived, in order."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    tunsetiff, iff_tun, iff_no_pi, clone_newnet = 0x400454CA, 0x0001, 0x1000, 0x40000000
    fds = []
    home = open("/proc/self/ns/net")
    for pid in (pid_a, pid_b, None):  # a tun0 in each host's namespace, then back home (not a process of theirs)
        with open(f"/proc/{pid}/ns/net") if pid else home as ns:
            if libc.setns(ns.fileno(), clone_newnet) != 0:
                raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid or 'this process'}")
        if pid is None:
            break
        fd = os.open("/dev/net/tun", os.O_RDWR)  # the device is made in the namespace we are in, and stays there
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", b"tun0", iff_tun | iff_no_pi))
        os.set_blocking(fd, False)
        fds.append(fd)
    delay = delay_ms / 1000.0
    queues = {fds[0]: deque(), fds[1]: deque()}  # packets read from that fd, waiting to go to the other
    other = {fds[0]: fds[1], fds[1]: fds[0]}
    print("ready", flush=True)
    while True:
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                queues[fd].append((now + delay, packet))
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                try:
                    os.write(other[fd], queue.popleft()[1])
                except OSError:  # the interface is down or gone: the packet is lost, as on a wire
                    pass


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "delay-line":
        _delay_line(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit("usage: python tests/virtual_hosts.py delay-line PID_A PID_B DELAY_MS")
