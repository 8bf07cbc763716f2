"""Small helpers with no better home: durations, atomic JSON files and folders, figures. Standard library
only (matplotlib is imported when a figure is drawn)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h13m."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def write_json(path: str, value) -> None:
    """`value` as JSON at `path`, through a temporary file and a rename: readers see all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def new_or_empty(path: str) -> bool:
    """True when `path` does not exist or is an empty folder: a folder a program may write."""
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def write_folder(out: str, write):
    """The folder `out` (new, or empty) written whole or not at all: `write(staging)` fills a temporary
    folder beside it, which becomes `out` once it returns; if it raises, nothing is left. Returns what
    `write` returned."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        result = write(staging)
        if os.path.isdir(out):
            os.rmdir(out)  # empty: the caller checked new_or_empty
        os.replace(staging, out)
        return result
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


def figure(*args, **kwargs):
    """plt.subplots: pyplot, so that a notebook shows the figure inline (headless, matplotlib falls
    back to Agg). matplotlib is imported here, when a figure is drawn, not when utils is."""
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def finish_figure(fig, path: str | None):
    """Lays the figure out, saves it when given a path, and returns it (a notebook shows it)."""
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
