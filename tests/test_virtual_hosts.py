"""tests/virtual_hosts.py, the hosts that the two-node tests and bench/stop_check.py stand on: each
has its own name and address and reaches the other by name, with or without an added latency."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from harness.virtual_hosts import VirtualHosts, hosts_missing_reason

MISSING = hosts_missing_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=f"no virtual hosts here: {MISSING}")]

# node1 answers 20 one-byte messages; node2 connects to it *by name* and reports the mean round trip.
SERVER = ("import socket; s = socket.create_server(('0.0.0.0', 5555)); c, _ = s.accept()\n"
          "for _ in range(20): c.sendall(c.recv(1))")
CLIENT = ("import socket, time; c = socket.create_connection(('node1', 5555), timeout=10)\n"
          "c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); t = time.perf_counter()\n"
          "for _ in range(20): c.sendall(b'x'); c.recv(1)\n"
          "print(socket.gethostname(), c.getpeername()[0], (time.perf_counter() - t) / 20 * 1000)")


def round_trip(hosts: VirtualHosts) -> tuple[str, str, float]:
    server = hosts.popen("node1", [sys.executable, "-c", SERVER])
    try:
        for _ in range(100):  # until node1 listens
            result = hosts.run("node2", [sys.executable, "-c", CLIENT], check=False)
            if result.returncode == 0:
                name, peer, ms = result.stdout.split()
                return name, peer, float(ms)
            time.sleep(0.05)
        raise AssertionError(result.stderr)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


@pytest.mark.parametrize("delay_ms", [0, 5])
def test_two_hosts_reach_each_other_by_name_over_their_link(tmp_path, delay_ms):
    with VirtualHosts(tmp_path, ["node1", "node2"], delay_ms=delay_ms) as hosts:
        assert hosts.run("node1", ["hostname"]).stdout.strip() == "node1"
        name, peer, ms = round_trip(hosts)
        assert (name, peer) == ("node2", "10.77.0.1")
        if delay_ms:  # the delay line holds each packet 5 ms each way
            assert 2 * delay_ms <= ms < 2 * delay_ms + 5, ms
        else:  # the bridge adds nothing measurable
            assert ms < 2, ms
        assert hosts.pids("node2") == []  # the client has exited; nothing else runs there
    # Gone with the hosts: nothing runs in their namespaces, and this host's name is untouched.
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() not in ("node1", "node2")
