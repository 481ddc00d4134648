"""Repositories as real projects have them (issue 12, section 4), for real: submodules in place
and in releases, releases that are real checkouts (a build may run `git describe`), whose git
entries go with them, and a tree owned by another user (a real second user).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor.core.config import GitConfig
from supervisor.core.events import FetchSucceeded, TreeUpdated
from supervisor.drivers.gitrepo import GitError, GitRepo
from supervisor.drivers.releases import Releases
from tests.helpers_git import Repos, commit, git, git_env, head, make_repos
from tests.processes import run

# Submodules by path: git refuses the file transport to submodules unless told (CVE-2022-39253);
# a real project's are https or ssh URLs, which need no such setting.
FILE_ALLOWED = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "protocol.file.allow",
                "GIT_CONFIG_VALUE_0": "always"}


def driver(path: Path, **environ: str) -> GitRepo:
    env = git_env(**environ)
    env.pop("GIT_TERMINAL_PROMPT", None)
    return GitRepo(GitConfig(repo=path, timeout=10), environ=env)  # type: ignore[arg-type]


def with_submodule(tmp_path: Path) -> tuple[Repos, Path, Path]:
    """The usual three repositories, and a library `lib.git` that dev has as submodule lib/."""
    repos = make_repos(tmp_path)
    lib, lib_dev = tmp_path / "lib.git", tmp_path / "lib-dev"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(lib))
    git(tmp_path, "clone", "-q", str(lib), str(lib_dev))
    git(lib_dev, "checkout", "-q", "-b", "main")
    commit(lib_dev, "lib.txt", "lib 1\n")
    git(lib_dev, "push", "-q", "-u", "origin", "main")
    git(repos.dev, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "lib")
    git(repos.dev, "commit", "-q", "-m", "add lib")
    repos.push()
    return repos, lib, lib_dev


def bump_library(repos: Repos, lib_dev: Path, content: str) -> str:
    """A new library commit, and a superproject commit that points at it."""
    commit(lib_dev, "lib.txt", content)
    git(lib_dev, "push", "-q", "origin", "main")
    sub = repos.dev / "lib"
    git(sub, "-c", "protocol.file.allow=always", "pull", "-q", "origin", "main")
    git(repos.dev, "add", "lib")
    git(repos.dev, "commit", "-q", "-m", "bump lib")
    repos.push()
    return head(repos.dev)


# ---------------------------------------------------------------------------------------------
# submodules in place


def test_an_update_in_place_brings_its_submodules_along(tmp_path: Path) -> None:
    repos, _lib, lib_dev = with_submodule(tmp_path)
    with_lib = head(repos.dev)
    bumped = bump_library(repos, lib_dev, "lib 2\n")

    async def scenario() -> list[object]:
        repo = driver(repos.work, **FILE_ALLOWED)
        await repo.prepare()
        events: list[object] = [await repo.fetch()]
        events.append(await repo.update(with_lib, reset=False))
        events.append(await repo.fetch())  # nothing dirty: the next deploy can go on
        events.append(await repo.update(bumped, reset=False))
        events.append(await repo.fetch())
        return events

    events = run(scenario())
    assert events[1] == TreeUpdated(commit=with_lib)
    assert events[3] == TreeUpdated(commit=bumped)
    for fetched in (events[2], events[4]):
        assert isinstance(fetched, FetchSucceeded) and fetched.dirty is False
    assert (repos.work / "lib" / "lib.txt").read_text() == "lib 2\n"
    assert git(repos.work, "status", "--porcelain") == ""


def test_a_submodule_that_cannot_be_fetched_fails_the_update_and_rolls_it_back(
        tmp_path: Path) -> None:
    repos, lib, _lib_dev = with_submodule(tmp_path)
    with_lib = head(repos.dev)
    shutil.rmtree(lib)  # the library's host is gone

    async def scenario() -> object:
        repo = driver(repos.work, **FILE_ALLOWED)
        await repo.prepare()
        await repo.fetch()
        return await repo.update(with_lib, reset=False)

    event = run(scenario())
    assert not isinstance(event, TreeUpdated)
    assert "git submodule" in event.error and "rolled back" in event.error  # type: ignore[attr-defined]
    assert head(repos.work) == repos.first
    assert git(repos.work, "status", "--porcelain", "--untracked-files=all") == ""


# ---------------------------------------------------------------------------------------------
# releases: real checkouts, with submodules, pruned with their git entries


def releases_of(repos: Repos, tmp_path: Path, **environ: str) -> tuple[Releases, list]:
    logged: list = []
    releases = Releases(str(tmp_path / "deploy"), driver(repos.work, **environ), 2,
                        lambda name, facts: logged.append((name, facts)))
    return releases, logged


async def settle(releases: Releases) -> None:
    while releases.chores:
        await asyncio.gather(*releases.chores)


def test_a_release_has_its_submodules_and_a_build_can_ask_git(tmp_path: Path) -> None:
    repos, _lib, lib_dev = with_submodule(tmp_path)
    bumped = bump_library(repos, lib_dev, "lib 2\n")
    git(repos.work, "fetch", "-q")
    releases, _ = releases_of(repos, tmp_path, **FILE_ALLOWED)

    async def scenario() -> object:
        await releases.repo.prepare()
        releases.setup()
        return await releases.prepare(bumped, ())

    assert run(scenario()) == TreeUpdated(commit=bumped)
    release = Path(releases.path(bumped))
    assert (release / "lib" / "lib.txt").read_text() == "lib 2\n"
    # What a C project's Makefile does to embed its version:
    build = subprocess.run("echo \"$(git describe --always --abbrev=12 --dirty 2>&1)\" > VERSION",
                           shell=True, cwd=release, env=git_env(), timeout=30, check=False)
    assert build.returncode == 0
    assert (release / "VERSION").read_text().strip() == bumped[:12]
    assert git(release, "rev-parse", "HEAD") == bumped
    assert head(repos.work) == repos.first  # the tree release mode reads is never moved
    assert git(repos.work, "status", "--porcelain") == ""


def worktree_paths(repos: Repos) -> list[str]:
    listing = git(repos.work, "worktree", "list", "--porcelain")
    return [line[len("worktree "):] for line in listing.splitlines()
            if line.startswith("worktree ")]


def test_a_release_survives_its_rename_into_place_and_goes_with_its_git_entry(
        tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    second = commit(repos.dev, "VERSION", "2\n")
    third = commit(repos.dev, "VERSION", "3\n")
    repos.push()
    git(repos.work, "fetch", "-q")
    releases, logged = releases_of(repos, tmp_path)
    elsewhere = tmp_path / "own-worktree"  # the owner's own worktree, on a disk now unmounted
    git(repos.work, "worktree", "add", "-q", "--detach", str(elsewhere), repos.first)
    shutil.rmtree(elsewhere)

    async def scenario() -> list[str]:
        await releases.repo.prepare()
        releases.setup()
        for each in (repos.first, second, third):
            assert await releases.prepare(each, ()) == TreeUpdated(commit=each)
        listed = worktree_paths(repos)
        releases.switch(third)
        releases.prune([third])
        await settle(releases)
        return listed

    listed = run(scenario())
    assert {releases.path(c) for c in (repos.first, second, third)} <= set(listed)
    assert not any(".incoming" in path for path in listed)
    # The renamed checkouts are whole for git: nothing for `git worktree prune` to drop.
    would_prune = subprocess.run(["git", "worktree", "prune", "--dry-run", "-v"],
                                 cwd=repos.work, env=git_env(), capture_output=True, text=True,
                                 timeout=30, check=True)
    assert "own-worktree" in would_prune.stderr + would_prune.stdout
    assert not any(c in would_prune.stderr + would_prune.stdout
                   for c in (repos.first, second, third))
    assert git(Path(releases.path(third)), "rev-parse", "HEAD") == third
    # Pruned: the directories and git's entries for them; the owner's entry is not ours.
    assert sorted(os.listdir(releases.releases)) == [third]
    admin = repos.work / ".git" / "worktrees"
    entries = sorted(p.name for p in admin.iterdir())
    assert entries == sorted([third, "own-worktree"])
    assert sorted(f["commit"] for e, f in logged if e == "release.removed") == sorted(
        [repos.first, second])


def test_a_release_set_aside_is_still_a_checkout(tmp_path: Path) -> None:
    repos, _lib, _lib_dev = with_submodule(tmp_path)
    second = head(repos.dev)
    git(repos.work, "fetch", "-q")
    releases, _ = releases_of(repos, tmp_path, **FILE_ALLOWED)

    async def scenario() -> None:
        await releases.repo.prepare()
        releases.setup()
        await releases.prepare(second, ())
        releases.set_aside(second)
        await settle(releases)

    run(scenario())
    aside = Path(releases.failed) / second
    assert git(aside, "rev-parse", "HEAD") == second
    assert git(aside, "status", "--porcelain") == ""  # the submodule too, once moved
    assert (aside / "lib" / "lib.txt").read_text() == "lib 1\n"
    assert str(aside) in worktree_paths(repos)


def test_a_checkout_cut_short_is_cleared_with_its_git_entry(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    second = commit(repos.dev, "VERSION", "2\n")
    repos.push()
    git(repos.work, "fetch", "-q")
    releases, _ = releases_of(repos, tmp_path)
    # What a supervisor killed before the rename leaves: a worktree under .incoming/.
    incoming = Path(releases.incoming) / second
    incoming.parent.mkdir(parents=True)
    git(repos.work, "worktree", "add", "-q", "--detach", str(incoming), second)

    async def scenario() -> object:
        await releases.repo.prepare()
        releases.setup()
        await settle(releases)
        return await releases.prepare(second, ())

    assert run(scenario()) == TreeUpdated(commit=second)
    assert sorted(os.listdir(releases.releases)) == [second]
    assert worktree_paths(repos)[1:] == [releases.path(second)]


# ---------------------------------------------------------------------------------------------
# a tree owned by another user


@pytest.fixture
def other_user() -> object:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a second user")
    name = f"svtest{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, timeout=30, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, timeout=30, capture_output=True)


def test_a_tree_owned_by_another_user_says_so(tmp_path: Path,
                                              other_user: pwd.struct_passwd) -> None:
    repos = make_repos(tmp_path)
    for top, directories, files in os.walk(repos.work):
        for name in (*directories, *files):
            os.lchown(os.path.join(top, name), other_user.pw_uid, other_user.pw_gid)
    os.chown(repos.work, other_user.pw_uid, other_user.pw_gid)
    with pytest.raises(GitError) as caught:
        run(driver(repos.work).prepare())
    message = str(caught.value)
    assert message.startswith("git.repo:") and "dubious ownership" in message
    assert "another user" in message and "not a git working tree" not in message
