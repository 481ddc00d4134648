"""The release-mode driver on a real repository and real directories: checkouts that are whole
or absent, the `current` link, what is reused, set aside, removed, and what never is."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from supervisor.core.config import GitConfig
from supervisor.core.events import TreeUpdated, TreeUpdateFailed
from supervisor.drivers.gitrepo import GitRepo
from supervisor.drivers.releases import Releases
from tests.helpers_git import commit, git, git_env, make_repos
from tests.processes import run


def releases_for(tmp_path: Path, keep_failed: int = 2) -> tuple[Releases, list, object]:
    repos = make_repos(tmp_path)
    repo = GitRepo(GitConfig(repo=str(repos.work), timeout=10), environ=git_env())
    logged: list = []
    root = tmp_path / "deploy"
    return Releases(str(root), repo, keep_failed, lambda e, f: logged.append((e, f))), logged, \
        repos


async def settle(releases: Releases) -> None:
    """Let the background removals finish."""
    while releases.chores:
        await asyncio.gather(*releases.chores)


def test_a_release_is_a_checkout_of_its_commit_and_the_tree_is_untouched(tmp_path):
    releases, _, repos = releases_for(tmp_path)
    second = commit(repos.dev, "VERSION", "2\n")
    repos.push()
    git(repos.work, "fetch", "-q")

    async def main() -> None:
        await releases.repo.prepare()
        releases.setup()
        assert await releases.prepare(second, ()) == TreeUpdated(commit=second)

    run(main())
    path = Path(releases.path(second))
    assert (path / "VERSION").read_text() == "2\n"
    # A real checkout (a detached worktree): a build may ask git what it is building.
    assert git(path, "rev-parse", "HEAD") == second
    assert git(path, "describe", "--always", "--abbrev=40") == second
    assert git(path, "status", "--porcelain") == ""
    assert str(path) in git(repos.work, "worktree", "list", "--porcelain")
    assert not list(Path(releases.releases).glob(".*")), "a temporary left behind"
    assert git(repos.work, "rev-parse", "HEAD") == repos.first
    assert git(repos.work, "status", "--porcelain") == ""


def test_an_unknown_commit_fails_and_leaves_nothing(tmp_path):
    releases, _, _ = releases_for(tmp_path)

    async def main() -> object:
        await releases.repo.prepare()
        releases.setup()
        return await releases.prepare("f" * 40, ())

    event = run(main())
    assert isinstance(event, TreeUpdateFailed) and "git worktree" in event.error
    assert os.listdir(releases.releases) == []


def test_a_kept_release_is_reused_and_any_other_leftover_checked_out_again(tmp_path):
    releases, _, repos = releases_for(tmp_path)

    async def main() -> None:
        await releases.repo.prepare()
        releases.setup()
        await releases.prepare(repos.first, ())
        marker = Path(releases.path(repos.first)) / "built-output"
        marker.write_text("from the build")
        await releases.prepare(repos.first, (repos.first,))
        assert marker.exists(), "a kept (good or live) release was checked out again"
        await releases.prepare(repos.first, ())
        assert not marker.exists(), "a leftover that is not kept was reused unbuilt"

    run(main())


def test_switching_current_and_what_counts_as_live(tmp_path):
    releases, _, repos = releases_for(tmp_path)

    async def main() -> None:
        await releases.repo.prepare()
        releases.setup()
        assert releases.live() is None
        await releases.prepare(repos.first, ())
        releases.switch(repos.first)

    run(main())
    assert os.readlink(releases.current) == f"releases/{repos.first}"
    assert releases.live() == repos.first
    os.unlink(releases.current)
    os.symlink("/etc", releases.current)  # not one of ours: nothing is live
    assert releases.live() is None


def test_setup_clears_what_a_killed_supervisor_left_half_made(tmp_path):
    releases, _, _ = releases_for(tmp_path)
    os.makedirs(Path(releases.releases) / ("." + "a" * 40 + ".tmp") / "src")
    os.makedirs(releases.failed)
    os.symlink("releases/x", releases.current + ".tmp")

    async def main() -> None:
        releases.setup()
        await settle(releases)

    run(main())
    assert os.listdir(releases.releases) == []
    assert not os.path.lexists(releases.current + ".tmp")


def test_set_aside_keeps_the_newest_failed_and_never_the_live_release(tmp_path):
    releases, logged, repos = releases_for(tmp_path, keep_failed=2)
    commits = [repos.first]
    for version in "234":
        commits.append(commit(repos.dev, "VERSION", version))
    repos.push()
    git(repos.work, "fetch", "-q")

    async def main() -> None:
        await releases.repo.prepare()
        releases.setup()
        for each in commits:
            await releases.prepare(each, ())
        releases.switch(commits[0])
        releases.set_aside(commits[0])  # live: refused
        for each in commits[1:]:
            releases.set_aside(each)
        await settle(releases)

    run(main())
    assert os.path.isdir(releases.path(commits[0]))
    assert sorted(os.listdir(releases.failed)) == sorted(commits[2:])
    assert [f["commit"] for e, f in logged if e == "release.set_aside"] == commits[1:]


def test_prune_keeps_what_it_is_told_and_the_live_release(tmp_path):
    releases, logged, repos = releases_for(tmp_path)
    second = commit(repos.dev, "VERSION", "2")
    third = commit(repos.dev, "VERSION", "3")
    repos.push()
    git(repos.work, "fetch", "-q")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("not ours")

    async def main() -> None:
        await releases.repo.prepare()
        releases.setup()
        for each in (repos.first, second, third):
            await releases.prepare(each, ())
        releases.switch(repos.first)
        # A name that looks like a release but leads outside the root is never followed.
        os.symlink(outside, os.path.join(releases.releases, "e" * 40))
        releases.prune([third])
        await settle(releases)

    run(main())
    assert sorted(os.listdir(releases.releases)) == sorted([repos.first, third, "e" * 40])
    assert [f["commit"] for e, f in logged if e == "release.removed"] == [second]
    assert (outside / "precious").read_text() == "not ours"
