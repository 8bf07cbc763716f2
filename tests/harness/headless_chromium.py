"""Chromium, headless, for the feature browser's tests and bench/browser_speed.py: a page opened from
disk, left to settle (the panel files it loads on demand included), and what came of it."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import NamedTuple

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)
MISSING = None if CHROMIUM else "no Chromium (apt-get install chromium)"


class Page(NamedTuple):
    dom: str  # the document once it has settled
    console: list[str]  # every console message and uncaught error, a line each
    seconds: float  # wall time of the browser, start-up included


def open_page(path: str, fragment: str, profile) -> Page:
    """path#fragment in a headless Chromium with its own profile folder. --virtual-time-budget lets
    the scripts the page adds later run before the DOM is printed; --enable-logging puts console
    messages on stderr, in lines that hold ':CONSOLE'."""
    started = time.perf_counter()
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                           f"file://{os.path.abspath(path)}#{fragment}"], capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"Chromium failed on {path}: {done.stderr[-2000:]}")
    return Page(done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line],
                time.perf_counter() - started)
