"""Small helpers with no better home. Standard library only."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h13m."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
