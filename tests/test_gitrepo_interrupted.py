"""A tree git left half-written is never run (issue 12, section 3), against real repositories:
hooks that hang, a checkout cut short at git.timeout (a smudge filter that blocks on one file, so
git has written the files before it and not the rest), a supervisor killed while its git works,
and a lock some other git holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.core.config import GitConfig
from supervisor.core.events import TreeUpdated, TreeUpdateFailed
from supervisor.drivers.gitrepo import JOURNAL, GitError, GitRepo
from tests.helpers_git import Repos, commit, git, git_env, head, make_repos
from tests.processes import run

Log = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def repos(tmp_path: Path) -> Repos:
    return make_repos(tmp_path)


def driver(path: Path, log: Log, timeout: float = 10) -> GitRepo:
    env = git_env()
    env.pop("GIT_TERMINAL_PROMPT", None)
    return GitRepo(GitConfig(repo=path, timeout=timeout),  # type: ignore[arg-type]
                   environ=env, log=lambda name, facts: log.append((name, facts)))


def names(log: Log) -> list[str]:
    return [name for name, _ in log]


def status(tree: Path) -> str:
    return git(tree, "status", "--porcelain", "--untracked-files=all")


# ---------------------------------------------------------------------------------------------
# hooks never run


@pytest.mark.parametrize(("hook", "reset"), [("post-merge", False), ("post-checkout", True),
                                             ("reference-transaction", False)])
def test_no_repository_hook_runs(repos: Repos, hook: str, reset: bool) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    ran = repos.work.parent / "hook-ran"
    script = repos.work / ".git" / "hooks" / hook
    # It writes a file and hangs: on the old code the update timed out after moving HEAD.
    script.write_text(f"#!/bin/sh\ntouch {ran}\nexec sleep 60\n")
    script.chmod(0o755)
    log: Log = []

    async def scenario() -> object:
        repo = driver(repos.work, log, timeout=3)
        await repo.prepare()
        await repo.fetch()
        return await repo.update(new, reset=reset)

    started = time.monotonic()
    assert run(scenario()) == TreeUpdated(commit=new)
    assert time.monotonic() - started < 2.5
    assert not ran.exists()
    assert head(repos.work) == new


# ---------------------------------------------------------------------------------------------
# a checkout cut short at the timeout


def blocking_filter(repos: Repos, tmp_path: Path, files: int = 200) -> tuple[str, Path]:
    """A commit of `files` new files, then `zz-slow`, whose smudge filter (configured in the
    supervisor's tree, as git-lfs is) waits on a FIFO: a checkout writes every file before it,
    then hangs until the FIFO is opened for writing."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    git(repos.work, "config", "filter.gate.smudge", f"cat {fifo} >/dev/null; exec cat")
    git(repos.work, "config", "filter.gate.clean", "cat")
    (repos.dev / ".gitattributes").write_text("zz-slow filter=gate\n")
    (repos.dev / "app.txt").write_text("version 2\n")
    for index in range(files):
        (repos.dev / f"file-{index:04}.txt").write_text(f"new file {index}\n")
    (repos.dev / "zz-slow").write_text("slow\n")
    git(repos.dev, "add", "-A")
    git(repos.dev, "commit", "-q", "-m", "big")
    new = head(repos.dev)
    repos.push()
    return new, fifo


def open_gate(fifo: Path) -> None:
    """Let every filter blocked on the FIFO go on (then it finds its git gone, and exits)."""
    while True:
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader is left
            return
        os.close(descriptor)


@pytest.mark.parametrize("reset", [False, True])
def test_an_update_cut_short_is_rolled_back_before_anything_else_runs(
        repos: Repos, tmp_path: Path, reset: bool) -> None:
    new, fifo = blocking_filter(repos, tmp_path)
    log: Log = []

    async def scenario() -> tuple[object, str | None, object]:
        repo = driver(repos.work, log, timeout=1.5)
        await repo.prepare()
        await repo.fetch()
        try:
            failed = await repo.update(new, reset=reset)
        finally:
            open_gate(fifo)
        problem = repo.tree_problem(repos.first)
        fetched = await repo.fetch()
        return failed, problem, fetched

    failed, problem, fetched = run(scenario())
    assert isinstance(failed, TreeUpdateFailed)
    assert "timed out" in failed.error and f"rolled back to {repos.first[:12]}" in failed.error
    # The tree is whole at the old commit: no file of the new one, no lock, no journal, clean.
    assert head(repos.work) == repos.first
    assert (repos.work / "app.txt").read_text() == "version 1\n"
    assert not list(repos.work.glob("file-*")) and not (repos.work / "zz-slow").exists()
    assert not (repos.work / ".git" / "index.lock").exists()
    assert not (repos.work / ".git" / JOURNAL).exists()
    assert status(repos.work) == ""
    assert problem is None
    assert getattr(fetched, "dirty", None) is False  # no git.dirty forever
    assert "git.lock_cleared" in names(log) and "git.tree_restored" in names(log)


def test_without_the_rollback_the_cut_short_tree_is_half_written(
        repos: Repos, tmp_path: Path) -> None:
    """What the rollback undoes, shown with git alone: the half-written tree of the issue."""
    new, fifo = blocking_filter(repos, tmp_path)
    git(repos.work, "fetch", "-q")
    process = subprocess.Popen(["git", "merge", "--ff-only", "-q", new], cwd=repos.work,
                               env=git_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (repos.work / "file-0199.txt").exists():  # the last file before zz-slow
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        open_gate(fifo)
    assert head(repos.work) == repos.first
    assert (repos.work / ".git" / "index.lock").exists()
    assert (repos.work / "app.txt").read_text() == "version 2\n"  # new files, old name


def test_a_supervisor_killed_mid_update_leaves_a_tree_the_next_one_repairs(
        repos: Repos, tmp_path: Path) -> None:
    """The supervisor is SIGKILLed while its git is blocked mid-checkout; its git lives on.
    The next prepare() waits for that git (git.timeout), kills it (proven by its start time),
    clears its lock and puts the tree back at the built commit: never run half-written."""
    new, fifo = blocking_filter(repos, tmp_path)
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from tests.test_gitrepo_interrupted import driver
        async def main():
            repo = driver({str(repos.work)!r}, [], timeout=60)
            await repo.prepare()
            await repo.fetch()
            await repo.update({new!r}, reset=False)
        asyncio.run(main())
    """)
    supervisor = subprocess.Popen([sys.executable, "-c", script], env=git_env(),
                                  start_new_session=True)
    journal = repos.work / ".git" / JOURNAL
    try:
        deadline = time.monotonic() + 15
        while not (repos.work / "file-0199.txt").exists() or b"pid" not in (
                journal.read_bytes() if journal.exists() else b""):
            assert time.monotonic() < deadline and supervisor.poll() is None
            time.sleep(0.02)
        supervisor.kill()  # only the supervisor: its git (another session) keeps working
        supervisor.wait()
        assert (repos.work / ".git" / "index.lock").exists()
        log: Log = []

        async def restart() -> str:
            repo = driver(repos.work, log, timeout=1)
            return await repo.prepare(built=repos.first)

        started = time.monotonic()
        assert run(restart()) == repos.first
        took = time.monotonic() - started
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        open_gate(fifo)
    assert 0.9 < took < 5
    assert names(log)[:1] == ["git.update_interrupted"]
    assert {"git.earlier_git_ended", "git.lock_cleared", "git.tree_restored"} <= set(names(log))
    assert status(repos.work) == "" and not journal.exists()
    assert not (repos.work / ".git" / "index.lock").exists()


# ---------------------------------------------------------------------------------------------
# the check before a start, and the repair


def test_tree_problem_reads_files_only_and_restore_puts_back_the_built_commit(
        repos: Repos) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    log: Log = []

    async def scenario() -> list[str | None]:
        repo = driver(repos.work, log)
        await repo.prepare()
        seen = [repo.tree_problem(repos.first)]
        await repo.fetch()
        assert await repo.update(new, reset=False) == TreeUpdated(commit=new)
        # Its build failed: the tree holds a commit never built. No git may run to see it.
        os.environ["PATH"], path = "/nonexistent", os.environ["PATH"]
        try:
            seen.append(repo.tree_problem(repos.first))
            seen.append(repo.tree_problem(new))
        finally:
            os.environ["PATH"] = path
        await repo.restore(repos.first)
        seen.append(repo.tree_problem(repos.first))
        return seen

    seen = run(scenario())
    assert seen[0] is None
    assert seen[1] == f"HEAD is {new[:12]}, not the built {repos.first[:12]}"
    assert seen[2] is None
    assert seen[3] is None
    assert head(repos.work) == repos.first
    assert (repos.work / "app.txt").read_text() == "version 1\n"
    assert ("git.tree_restored", {"commit": repos.first, "reason": "not the built commit",
                                  "interrupted": False}) in log


def test_tree_problem_follows_packed_refs_and_a_detached_head(repos: Repos) -> None:
    log: Log = []

    async def scenario() -> list[str | None]:
        repo = driver(repos.work, log)
        await repo.prepare()
        git(repos.work, "pack-refs", "--all")
        packed = repo.tree_problem(repos.first)
        git(repos.work, "checkout", "-q", "--detach")
        return [packed, repo.tree_problem(repos.first), repo.tree_problem("0" * 40)]

    assert run(scenario()) == [None, None,
                               f"HEAD is {repos.first[:12]}, not the built 000000000000"]


def test_restore_never_discards_local_changes(repos: Repos) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    log: Log = []

    async def scenario() -> str:
        repo = driver(repos.work, log)
        await repo.prepare()
        await repo.fetch()
        await repo.update(new, reset=False)
        (repos.work / "app.txt").write_text("edited by hand\n")
        with pytest.raises(GitError) as caught:
            await repo.restore(repos.first)
        return str(caught.value)

    assert "local changes" in run(scenario())
    assert (repos.work / "app.txt").read_text() == "edited by hand\n"
    assert head(repos.work) == new
    assert not (repos.work / ".git" / JOURNAL).exists()


def test_a_lock_we_did_not_leave_is_reported_and_kept(repos: Repos) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    log: Log = []
    lock = repos.work / ".git" / "index.lock"

    async def scenario() -> tuple[str | None, str]:
        repo = driver(repos.work, log)
        await repo.prepare()
        await repo.fetch()
        await repo.update(new, reset=False)
        lock.write_bytes(b"")  # a person's `git pull` at work in the tree
        problem = repo.tree_problem(new)
        with pytest.raises(GitError) as caught:
            await repo.restore(repos.first)
        return problem, str(caught.value)

    problem, error = run(scenario())
    assert problem is not None and "index.lock" in problem
    assert "index.lock" in error
    assert lock.exists()
    assert head(repos.work) == new
    assert [facts["path"] for name, facts in log if name == "git.lock_foreign"] == [str(lock)]
    assert "git.lock_cleared" not in names(log)


def test_prepare_reports_a_lock_left_by_another_git_and_keeps_it(repos: Repos) -> None:
    lock = repos.work / ".git" / "index.lock"
    lock.write_bytes(b"")
    log: Log = []
    assert run(driver(repos.work, log).prepare()) == repos.first
    assert lock.exists() and names(log) == ["git.lock_foreign"]


def test_the_rollback_rewrites_only_what_the_cut_short_git_wrote(
        repos: Repos, tmp_path: Path) -> None:
    """Found by the soak: the tree already holds a file of the gated kind (checked out while
    the gate was open); the rollback of the next, cut-short update must not write it again, or
    its own checkout hangs on the same filter and times out too."""
    gate = tmp_path / "gate"
    quoted = str(gate)
    git(repos.work, "config", "filter.gate.smudge",
        f"test -p {quoted} && cat {quoted} >/dev/null; exec cat")
    git(repos.work, "config", "filter.gate.clean", "cat")
    (repos.dev / ".gitattributes").write_text("zz-slow-* filter=gate\n")
    (repos.dev / "zz-slow-a").write_text("a\n")
    git(repos.dev, "add", "-A")
    git(repos.dev, "commit", "-q", "-m", "first gated file")
    gated = head(repos.dev)
    for index in range(50):
        (repos.dev / f"many-{index}.txt").write_text(f"{index}\n")
    (repos.dev / "zz-slow-b").write_text("b\n")
    git(repos.dev, "add", "-A")
    git(repos.dev, "commit", "-q", "-m", "second gated file")
    stuck = head(repos.dev)
    repos.push()
    log: Log = []

    async def scenario() -> object:
        repo = driver(repos.work, log, timeout=1.5)
        await repo.prepare()
        await repo.fetch()
        assert await repo.update(gated, reset=False) == TreeUpdated(commit=gated)
        os.mkfifo(gate)
        try:
            return await repo.update(stuck, reset=False)
        finally:
            open_gate(fifo=gate)

    failed = run(scenario())
    assert isinstance(failed, TreeUpdateFailed)
    assert f"rolled back to {gated[:12]}" in failed.error, failed.error
    assert head(repos.work) == gated and status(repos.work) == ""
    assert (repos.work / "zz-slow-a").read_text() == "a\n"


def test_a_big_checkout_killed_at_the_timeout_leaves_the_old_tree_whole(
        repos: Repos, tmp_path: Path) -> None:
    """The issue's case, smaller: git killed by the clock itself half-way through writing
    thousands of files (one maybe half-written), in directories it made for them."""
    for index in range(4000):
        directory = repos.dev / f"d{index % 50}"
        directory.mkdir(exist_ok=True)
        (directory / f"f{index}.txt").write_text(f"file {index}\n" * 40)
    git(repos.dev, "add", "-A")
    git(repos.dev, "commit", "-q", "-m", "big")
    big = head(repos.dev)
    repos.push()
    log: Log = []

    async def scenario() -> object:
        repo = driver(repos.work, log, timeout=10)
        await repo.prepare()
        await repo.fetch()
        repo.config = GitConfig(repo=repos.work, timeout=0.15)  # type: ignore[arg-type]
        return await repo.update(big, reset=False)

    event = run(scenario())
    if isinstance(event, TreeUpdated):
        pytest.skip("git wrote 4,000 files within 0.15 s here: nothing was cut short")
    assert isinstance(event, TreeUpdateFailed) and "timed out" in event.error, event
    assert "rolled back" in event.error, event.error
    assert head(repos.work) == repos.first and status(repos.work) == ""
    assert sorted(p.name for p in repos.work.iterdir()) == [".git", "app.txt"]
