"""Shared fixtures: the repo on sys.path, a small corpus we write ourselves, a local HTTP server,
and a way to run train.py as a real process."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from harness.slurm_cluster import free_port  # one helper for torchrun's and Slurm's ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Subnormals flushed on every thread of the test process, as each program's session flushes them in a
# fresh process (hardware.fast_math): set before the first parallel operation starts torch's threads,
# so that runs the tests start in-process compute exactly what the same command computes.
torch.set_flush_denormal(True)

# Token caches of the tests' corpora go to a folder of this session (runs started as processes
# inherit it), never to the checkout's data/cache. Set before config is imported: it is the default.
os.environ["TINYLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="tinylab-test-cache-")

# The real BPE files live beside the checkout on our machines and in CI (../shared/data); tests
# that need a tiktoken encoding skip when they are absent rather than reach for the network.
TIKTOKEN_CACHE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tiktoken_cache")

SMALL_CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n"
)


# Under CI a skipped test fails (tests/ci_skips.py).
pytest_plugins = ["ci_skips"]


def pytest_collection_modifyitems(config, items):
    for item in items:  # an extended test is a slow one: the fast tier (-m "not slow") leaves it out
        if "extended" in item.keywords and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)


TIER_SECONDS: dict[str, list] = {}  # tier -> [tests, seconds], for the summary CI prints


def tier(keywords) -> str:
    return "extended" if "extended" in keywords else "slow" if "slow" in keywords else "fast"


def pytest_runtest_logreport(report):
    counted = TIER_SECONDS.setdefault(tier(report.keywords), [0, 0.0])
    counted[0] += report.when == "call"
    counted[1] += report.duration


def pytest_terminal_summary(terminalreporter):
    if TIER_SECONDS:
        terminalreporter.write_line("time per tier (setup, call and teardown): " + ", ".join(
            f"{name} {TIER_SECONDS[name][0]} tests {TIER_SECONDS[name][1]:.0f} s"
            for name in ("fast", "slow", "extended") if name in TIER_SECONDS))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["TINYLAB_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def corpus(tmp_path):
    """A few kilobytes of play-like text in a file of its own."""
    return write_corpus(tmp_path)


def write_corpus(directory) -> str:
    path = os.path.join(str(directory), "corpus", "tiny.txt")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(SMALL_CORPUS * 40)
    return path


def write_documents(directory, count: int = 40) -> str:
    """The same play-like text as `write_corpus`, as a folder of `count` .txt documents (so
    corpus.py prepares shards, with end-of-text tokens and held-out documents)."""
    folder = os.path.join(str(directory), "documents")
    os.makedirs(folder)
    for i in range(count):
        with open(os.path.join(folder, f"scene_{i:02d}.txt"), "w") as f:
            f.write(SMALL_CORPUS)
    return folder


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www over http://127.0.0.1:<port>/; yields (directory, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_program(script: str, args: list[str], cwd, env: dict | None = None, timeout: int = 300, unset=()):
    """`python SCRIPT ARGS` from the checkout as a user runs it (a process, text mode), with `env`
    added to and `unset` removed from our environment; returns the CompletedProcess."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env=environment)


def run_train(args: list[str], cwd: str, env: dict | None = None, timeout: int = 300, unset=()):
    return run_program("train.py", args, cwd, env, timeout, unset)


def assert_bad_input(result, *fragments: str) -> str:
    """What bad input must give, from any program: exit status 2, no traceback, one line on stderr that
    starts with 'error: ' and holds every fragment (the flag or file and what to do). Returns the line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_bad_input(script: str, args: list[str], cwd, *fragments: str, watch=(), env: dict | None = None):
    """`python SCRIPT ARGS` given bad input, checked as a user meets it: assert_bad_input's one line
    (holding every fragment), and nothing written, changed or removed under `cwd`, the token cache or
    the folders in `watch` (a run directory, a model folder). Returns the CompletedProcess; its
    stderr is that one line."""
    roots = (cwd, os.environ["TINYLAB_CACHE_DIR"], *watch)
    before = disk_state(*roots)
    result = run_program(script, args, cwd, env)
    assert_bad_input(result, *fragments)
    assert disk_state(*roots) == before, f"{script} {' '.join(map(str, args))} changed what was on disk"
    return result


def disk_state(*roots) -> dict:
    """Every file and folder under `roots`: its size, modification time and bytes' digest (folders:
    None), so that `disk_state(...) == before` says nothing was written, changed or removed there."""
    import hashlib

    state = {}
    for root in map(str, roots):
        for folder, dirs, files in os.walk(root):
            state[folder] = None
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
                stat = os.stat(path)
                state[path] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


def tiny_args(tmp_path, *extra: str) -> list[str]:
    """Flags for a quick modular run inside tmp_path."""
    return ["--save_model_dir", str(tmp_path / "runs"), "--modulus", "17", "--max_steps", "20",
            "--eval_every", "10", "--log_every", "5", *extra]


def torchrun_command(args: list[str], nproc: int = 2, launcher: list[str] = (), script: str = "train.py") -> list[str]:
    """`torchrun --nproc_per_node N [launcher flags] train.py ARGS`, on a port of its own."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *launcher, os.path.join(ROOT, script), *args]


def run_torchrun(args: list[str], cwd: str, nproc: int = 2, launcher: list[str] = (), timeout: int = 300,
                 script: str = "train.py"):
    return subprocess.run(torchrun_command(args, nproc, launcher, script), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Polls `condition()` until it holds; fails naming `what` after `timeout` seconds, or at once
    if `process` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc), e.g. torchrun's workers."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return sorted(children)


def process_argv(pid: int) -> list[str]:
    """A process's command line as its argv (Linux /proc); [] when it has ended."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().split("\0")[:-1]
    except OSError:
        return []


def run_metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl records so far ([] before it exists; a line still being written is
    left out), for polling a run that is still going."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def logged_steps(run_dir) -> list[int]:
    return [record["step"] for record in run_metrics(run_dir)]


def model_weights(path) -> dict:
    """A checkpoint's weights: a last.pt file, or a sharded run's last.dcp folder, whole."""
    from plumbing.checkpoints import load_checkpoint

    return load_checkpoint(str(path))["model"]


def assert_same_run(run_dir, reference) -> None:
    """run_dir (stopped and resumed) continued `reference` (never stopped) exactly: no step logged
    twice, the same losses at every step the reference logged, the same final weights bit for bit."""
    import torch

    mine = {r["step"]: r for r in run_metrics(run_dir)}
    steps = logged_steps(run_dir)
    assert len(steps) == len(set(steps)), "a step was logged twice"
    for record in run_metrics(reference):
        for key in ("train_loss", "val_loss", "val_acc"):
            if key in record:
                assert mine[record["step"]][key] == record[key], (record["step"], key)
    a, b = model_weights(os.path.join(run_dir, "last.pt")), model_weights(os.path.join(reference, "last.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """Three small trained runs, one per task, shared by the activation and SAE tests: {"modular":
    run dir, "text": ..., "dyck": ...}. Tests never change them; they may add SAEs (<run>/sae/<name>)
    under names of their own, and dumps go to their own tmp_path."""
    import train

    root = tmp_path_factory.mktemp("trained")
    small = ["--save_model_dir", str(root), "--num_blocks", "1", "--embedding_dim", "32", "--num_heads", "2",
             "--mlp_dim", "64", "--log_every", "10"]
    runs = {
        "modular": ["--modulus", "17", "--max_steps", "60", "--eval_every", "60", "--target_val_acc", "0"],
        # Documents, not one file: the analysis tests then run on a model trained from prepared shards.
        # The 2026 architecture (rotary, QK-norm, ReLU², untied, soft cap) with multi-query attention
        # and SwiGLU: the SAE, lens and dump tests on text are tests of those pieces too. Outputs start
        # random, not at zero: 30 steps would leave the MLPs' too small for the SAE tests to measure.
        "text": ["--preset", "shakespeare_char_modern", "--data_path", write_documents(root), "--context_len", "16",
                 "--batch_size", "16", "--max_steps", "30", "--eval_every", "30", "--use_muon", "false",
                 "--num_kv_heads", "1", "--activation", "swiglu", "--zero_init_outputs", "false"],
        "dyck": ["--preset", "dyck", "--dyck_num_train", "300", "--dyck_num_val", "60", "--dyck_max_len", "10",
                 "--context_len", "11", "--batch_size", "32", "--max_steps", "30", "--eval_every", "30"],
    }
    for task, args in runs.items():
        train.main(small + args + ["--run", task])
    return {task: str(root / task) for task in runs}
