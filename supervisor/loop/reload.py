"""What a SIGHUP can change in a running supervisor. A reloaded config is merged into the one in
use: keys the drivers read afresh at their next step are taken; keys bound at start-up (where
the state lives, which repository, which sockets) keep their old value and are reported.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from typing import Any

from supervisor.core.config import AppConfig, Config

# Everything not listed here is taken from the new config.
FIXED = {
    "app": ("name", "state_dir"),
    "git": ("repo", "remote", "branch"),
    "drain": ("stats_file",),
    "log": ("file", "child", "child_file", "max_bytes", "keep", "child_rate_limit_burst",
            "child_rate_limit_interval"),
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
    if old.sockets != new.sockets:
        kept.append("[[socket]]")
    for section in ("deploy", "health"):  # where releases live, and the probe's sockets
        if getattr(old, section) != getattr(new, section):
            kept.append(f"[{section}]")
    _merge_fleet(old, new, merged, applied, kept)
    merged["app"] = _cwd_in_repo_in_use(old, new, merged["app"])
    if merged["app"].cwd == old.app.cwd and "app.cwd" in applied:
        applied.remove("app.cwd")
    return replace(old, **merged), tuple(applied), tuple(kept)


def _merge_fleet(old: Config, new: Config, merged: dict[str, Any], applied: list[str],
                 kept: list[str]) -> None:
    """A policy change (max_parallel, canary) counts from the next deploy on; joining or leaving
    a fleet, or another group, needs a restart (the app's records live under its group)."""
    before, after = old.fleet, new.fleet
    if (before is None) != (after is None):
        kept.append("[fleet]")
        return
    if before is None or after is None:
        return
    for key in _changed(before, after, "fleet"):
        (kept if key == "fleet.group" else applied).append(key)
    merged["fleet"] = replace(after, group=before.group)


def _cwd_in_repo_in_use(old: Config, new: Config, app: AppConfig) -> AppConfig:
    """app.cwd is usually inside git.repo (by default it is the repo). The repo only changes
    with a restart, so a cwd inside the new repo is taken at the same place inside the repo in
    use: else the app would run from a tree that the supervisor does not update."""
    if old.git.repo == new.git.repo:
        return app
    inside = os.path.relpath(new.app.cwd, new.git.repo)
    if inside == os.pardir or inside.startswith(os.pardir + os.sep):
        return app
    return replace(app, cwd=os.path.normpath(os.path.join(old.git.repo, inside)))
