"""How durations and commits read for people, in every place that shows one (`supervisor status`,
systemd's STATUS line, the log viewer). Pure formatting: no IO, no clock.
"""

from __future__ import annotations

SHORT_COMMIT = 12  # enough to stay unique in large repositories; git's 7 often is not


def short_commit(commit: object, missing: str = "-") -> str:
    """A commit as people compare them: its first 12 characters."""
    return str(commit)[:SHORT_COMMIT] if commit else missing


def duration(seconds: float) -> str:
    """0.5s, 8s, 45s, 12m, 2h, 2h5m, 3d4h: whole units rounded down past a minute, tenths below
    ten seconds (a drain or a backoff that short is watched by the second)."""
    seconds = max(float(seconds), 0.0)
    if seconds < 10:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        hours, minutes = int(seconds // 3600), int(seconds % 3600 // 60)
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = int(seconds // 86400), int(seconds % 86400 // 3600)
    return f"{days}d{hours}h" if hours else f"{days}d"
