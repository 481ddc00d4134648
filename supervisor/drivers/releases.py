"""Release mode on disk: `releases/<commit>`, each a detached `git worktree` of its commit (with
its submodules), `current`, a symlink replaced in one rename, and `failed/` for releases set aside
to inspect. Only directories this module created are ever removed, and never the live one.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from supervisor.core.events import Event, TreeUpdated, TreeUpdateFailed
from supervisor.drivers import proc
from supervisor.drivers.gitrepo import GitError, GitRepo

_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


class Releases:
    def __init__(self, root: str, repo: GitRepo, keep_failed: int,
                 log: Callable[[str, dict[str, Any]], None]) -> None:
        self.root, self.repo, self.keep_failed, self.log = root, repo, keep_failed, log
        self.releases = os.path.join(root, "releases")
        self.failed = os.path.join(root, "failed")
        self.current = os.path.join(root, "current")
        # Checkouts are made here, then renamed into releases/: whole or absent. The name of
        # each is its commit, which is also the name of its entry in .git/worktrees. It is at
        # the depth of releases/ and failed/: a submodule's .git file names its repository by
        # a relative path, which then holds in all three places.
        self.incoming = os.path.join(root, ".incoming")
        self.chores: set[asyncio.Task[None]] = set()
        self.last_stamp = 0  # the time given to the newest set-aside release (ns)

    def setup(self) -> None:
        """Create the directories; what a killed supervisor left half-made is cleared away
        (a link never renamed into place, a checkout never renamed into releases/)."""
        os.makedirs(self.releases, exist_ok=True)
        os.makedirs(self.failed, exist_ok=True)
        try:
            os.unlink(self.current + ".tmp")
        except FileNotFoundError:
            pass
        for name in os.listdir(self.releases):
            if name.startswith("."):
                self._later(self._remove(os.path.join(self.releases, name)))
        if os.path.isdir(self.incoming) and not os.path.islink(self.incoming):
            for name in os.listdir(self.incoming):
                self._later(self._remove(os.path.join(self.incoming, name)))

    def live(self) -> str | None:
        """The commit `current` points to: the file system, not the state file, is the truth
        about what runs, so a kill between the switch and a save cannot mislead us."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        if not _COMMIT.match(name) or not os.path.isdir(self.path(name)):
            return None
        return name

    def path(self, commit: str) -> str:
        return os.path.join(self.releases, commit)

    async def prepare(self, commit: str, keep: Iterable[str]) -> Event:
        """Check `commit` out into releases/<commit>, complete or not at all (it is made under
        `.incoming/` and renamed). A release in `keep` (live or proven) is reused as is;
        any other leftover of that commit (a build cut short) is made again from scratch."""
        final = self.path(commit)
        if os.path.isdir(final) and not os.path.islink(final):
            if commit in set(keep):
                return TreeUpdated(commit=commit)
            await self._remove(final)
        temporary = os.path.join(self.incoming, commit)
        await self._remove(temporary)
        try:
            os.makedirs(self.incoming, exist_ok=True)
            await self.repo.add_worktree(commit, temporary)
            os.rename(temporary, final)
            await self.repo.moved_worktree(final)
        except (GitError, OSError) as error:
            await self._remove(temporary)
            await self._remove(final)
            return TreeUpdateFailed(commit=commit, error=str(error))
        finally:
            try:
                os.rmdir(self.incoming)
            except OSError:
                pass  # another checkout is under way in there, or it is gone
        return TreeUpdated(commit=commit)

    def switch(self, commit: str) -> None:
        """Point `current` at the release: a new link renamed over the old one, so `current`
        is never missing; fsync'd, so a power cut leaves one or the other. Raises OSError."""
        if self.live() == commit:
            return
        link = self.current + ".tmp"
        try:
            os.unlink(link)
        except FileNotFoundError:
            pass
        os.symlink(os.path.join("releases", commit), link)
        os.replace(link, self.current)
        directory = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def set_aside(self, commit: str) -> None:
        """Move a failed release to failed/ for inspection; only the newest few are kept."""
        if not _COMMIT.match(commit) or self.live() == commit:
            return
        source, destination = self.path(commit), os.path.join(self.failed, commit)
        if not os.path.isdir(source):
            return
        try:
            if os.path.lexists(destination):
                old = os.path.join(self.failed, f".{commit}.old")
                os.rename(destination, old)
                self._later(self._remove(old))
            os.rename(source, destination)
            stamp = self._stamp()
            os.utime(destination, ns=(stamp, stamp))  # its age in failed/ counts from now
        except OSError as error:
            self.log("release.set_aside_failed", {"commit": commit, "error": error.strerror})
            return
        self._later(self._repair(destination, stamp))  # git keeps working in there
        self.log("release.set_aside", {"commit": commit, "path": destination})
        failed = sorted((entry for entry in os.scandir(self.failed)
                         if _COMMIT.match(entry.name)),
                        key=lambda entry: entry.stat(follow_symlinks=False).st_mtime)
        for entry in failed[:-self.keep_failed]:
            self._later(self._remove(entry.path))

    def prune(self, keep: Iterable[str]) -> None:
        """Remove releases not in `keep` (the live one, the one being deployed, the newest
        good ones). Runs in the background: a big tree takes a while to delete."""
        keep = set(keep) | {self.live()}
        for name in os.listdir(self.releases):
            if _COMMIT.match(name) and name not in keep \
                    and not os.path.islink(self.path(name)):  # we never make links there
                self.log("release.removed", {"commit": name})
                self._later(self._remove(self.path(name)))

    def _later(self, chore: Any) -> None:
        task = asyncio.get_running_loop().create_task(chore)
        self.chores.add(task)
        task.add_done_callback(self.chores.discard)

    def _stamp(self) -> int:
        """A time for a set-aside release that no earlier one shares: the file system's clock
        ticks in milliseconds, and the newest few are told apart by it."""
        self.last_stamp = max(time.time_ns(), self.last_stamp + 1)
        return self.last_stamp

    async def _repair(self, path: str, stamp: int) -> None:
        try:
            await self.repo.moved_worktree(path)
        except GitError:
            pass  # a release of an older version (no .git), or one already gone
        try:
            os.utime(path, ns=(stamp, stamp))  # the repair wrote in it: its age is unchanged
        except OSError:
            pass

    async def _remove(self, path: str) -> None:
        """rm -rf inside the root only, then git's entry for the checkout that was there."""
        if not os.path.lexists(path):
            return
        if not os.path.realpath(path).startswith(os.path.realpath(self.root) + os.sep):
            return  # never outside the releases root, whatever a name resolved to
        result = await proc.run(("rm", "-rf", "--one-file-system", "--", path), cwd=self.root,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                timeout=600)
        if not result.ok:
            self.log("release.remove_failed", {"path": path, "error": result.output.strip()})
        self.repo.forget_worktrees(self.root)
