"""A second virtualenv beside the checkout for libraries that cannot share the main environment
(SAELens and TransformerLens 3 need TransformerLens < 4; the main environment has 4). It is built on
first use: a virtualenv whose .pth file adds the main environment's site-packages (torch,
transformers and the rest are shared, nothing is downloaded twice), with the few packages only it
needs installed `--no-deps` into its own site-packages, which come first. No pytest in here."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def overlay_python(name: str, packages: list[str]) -> tuple[str | None, str]:
    """(the python of <checkout>/<name>/, built if it is not there yet, or None; why not)."""
    venv = os.path.join(ROOT, name)
    python = os.path.join(venv, "bin", "python")
    ready = os.path.join(venv, "ready")  # holds the package list it was built with: another list rebuilds it
    if os.path.isfile(ready) and open(ready).read() == "\n".join(packages):
        return python, ""
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(own, "tinylab-main-environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *packages],
                               capture_output=True, text=True)
    if installed.returncode:
        return None, f"could not install {' '.join(packages)} into {venv}: {installed.stderr.strip()[-300:]}"
    with open(ready, "w") as f:
        f.write("\n".join(packages))
    return python, ""
