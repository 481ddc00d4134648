"""What a SIGHUP can change in a running supervisor. A reloaded config is merged into the one in
use: keys the drivers read afresh at their next step are taken; keys bound at start-up (where
the state lives, which repository, which sockets) keep their old value and are reported.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from supervisor.config import Config

# Everything not listed here is taken from the new config.
FIXED = {
    "app": ("name", "state_dir"),
    "git": ("repo", "remote", "branch"),
    "drain": ("stats_file",),
    "log": ("file", "child", "child_file", "max_bytes", "keep"),
}
WHOLE_SECTIONS = ("build", "drain", "trigger")  # adding or removing these needs a restart


def _changed(old: Any, new: Any, section: str) -> list[str]:
    return [f"{section}.{f.name}" for f in fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def merge(old: Config, new: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    """(config to use, keys applied, keys that need a restart of the supervisor)."""
    applied: list[str] = []
    kept: list[str] = []
    merged: dict[str, Any] = {}
    for section in ("app", "git", "build", "drain", "restart", "log", "trigger"):
        before, after = getattr(old, section), getattr(new, section)
        if before is None or after is None:
            if (before is None) != (after is None):
                kept.append(f"[{section}]")
            merged[section] = before
            continue
        if section == "trigger" and before != after:
            kept.append("[trigger]")
            merged[section] = before
            continue
        keep = {name: getattr(before, name) for name in FIXED.get(section, ())}
        for key in _changed(before, after, section):
            (kept if key.split(".", 1)[1] in keep else applied).append(key)
        merged[section] = replace(after, **keep)
    return replace(old, **merged), tuple(applied), tuple(kept)
