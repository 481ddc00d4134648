"""Real git repositories in a temporary directory for driver tests: a bare remote, a `dev` clone
that commits and pushes, and a `work` clone that the supervisor owns. Identity comes from the
GIT_AUTHOR_*/GIT_COMMITTER_* variables and global/system config is ignored, so the tests behave
the same on any machine.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_ASKPASS", "SSH_ASKPASS")


def git_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update(
        GIT_AUTHOR_NAME="Test Author", GIT_AUTHOR_EMAIL="author@example.invalid",
        GIT_COMMITTER_NAME="Test Committer", GIT_COMMITTER_EMAIL="committer@example.invalid",
        GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0",
    )
    env.update(extra)
    return env


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=env or git_env(), capture_output=True, text=True,
        timeout=30, check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout.strip()


def commit(clone: Path, name: str, content: str, message: str | None = None) -> str:
    (clone / name).write_text(content)
    git(clone, "add", name)
    git(clone, "commit", "-q", "-m", message or f"write {name}")
    return git(clone, "rev-parse", "HEAD")


def head(clone: Path) -> str:
    return git(clone, "rev-parse", "HEAD")


@dataclass
class Repos:
    remote: Path  # bare
    dev: Path  # where "developers" commit and push
    work: Path  # the supervisor's working tree
    first: str  # the commit every clone starts at

    def push(self, *args: str) -> None:
        git(self.dev, "push", "-q", *args, "origin", "main")


def make_repos(tmp_path: Path) -> Repos:
    remote, dev, work = tmp_path / "remote.git", tmp_path / "dev", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    git(tmp_path, "clone", "-q", str(remote), str(dev))
    git(dev, "checkout", "-q", "-b", "main")
    first = commit(dev, "app.txt", "version 1\n", "first")
    git(dev, "push", "-q", "-u", "origin", "main")
    git(tmp_path, "clone", "-q", str(remote), str(work))
    return Repos(remote, dev, work, first)
