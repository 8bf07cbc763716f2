"""Shared fixtures: the repo on sys.path, a small corpus we write ourselves, a local HTTP server,
and a way to run train.py as a real process."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


@pytest.fixture
def corpus(tmp_path):
    """A few kilobytes of play-like text in a file of its own."""
    path = tmp_path / "corpus" / "tiny.txt"
    path.parent.mkdir()
    path.write_text(SMALL_CORPUS * 40)
    return str(path)


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


def run_train(args: list[str], cwd: str, env: dict | None = None, timeout: int = 300):
    """`python train.py ARGS` as a process; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def tiny_args(tmp_path, *extra: str) -> list[str]:
    """Flags for a quick modular run inside tmp_path."""
    return ["--save_model_dir", str(tmp_path / "runs"), "--modulus", "17", "--max_steps", "20",
            "--eval_every", "10", "--log_every", "5", *extra]
