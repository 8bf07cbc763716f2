"""Small helpers with no better home: durations, atomic JSON files. Standard library only."""

from __future__ import annotations

import json
import os


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
