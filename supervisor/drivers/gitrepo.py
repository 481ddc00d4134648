"""The working tree and its upstream: fetch (never pull), compare, fast-forward or reset. Git runs
with a timeout, no terminal and no prompt; it refuses rather than discards local changes.
It reports facts; whether to deploy them is the machine's call.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

from supervisor.core.config import GitConfig
from supervisor.core.events import Event, FetchFailed, FetchSucceeded, TreeUpdated, TreeUpdateFailed
from supervisor.drivers import proc


class GitError(Exception):
    """A git command failed; the message is git's own last words."""


def git_environment(base: Mapping[str, str], timeout: float) -> dict[str, str]:
    """Never wait on a person: no terminal prompt, ssh in batch mode, stalled HTTP aborted."""
    env = dict(base)
    env.update(GIT_TERMINAL_PROMPT="0", GCM_INTERACTIVE="never", SSH_ASKPASS_REQUIRE="never",
               LC_ALL="C", LANGUAGE="C",
               GIT_HTTP_LOW_SPEED_LIMIT="1000", GIT_HTTP_LOW_SPEED_TIME=str(int(min(timeout, 30))))
    # git runs GIT_ASKPASS, else core.askPass, else SSH_ASKPASS (a desktop's password dialog)
    # even with GIT_TERMINAL_PROMPT=0; set but empty, it makes git skip all three.
    env["GIT_ASKPASS"] = ""
    if "GIT_SSH_COMMAND" not in env and "GIT_SSH" not in env:
        connect = int(max(1, min(timeout, 30)))
        env["GIT_SSH_COMMAND"] = (f"ssh -o BatchMode=yes -o ConnectTimeout={connect} "
                                  "-o ServerAliveInterval=15 -o ServerAliveCountMax=2")
    return env


def _first_complaint(output: str, returncode: int | None) -> str:
    """git's own words: its `fatal:`/`error:` lines say what went wrong; the last line is
    often advice ("...and the repository exists.")."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    complaints = [line for line in lines if line.startswith(("fatal:", "error:"))]
    chosen = complaints[:2] or lines[-1:]
    return "; ".join(chosen) or f"exit code {returncode}"


class GitRepo:
    def __init__(self, config: GitConfig, environ: Mapping[str, str] | None = None,
                 compare: bool = True) -> None:
        self.config = config
        # Release mode never moves this tree: what upstream is relative to its HEAD (and
        # whether it is dirty) decides nothing, so two git processes a poll are saved.
        self.compare = compare
        self.path = config.repo
        self.env = git_environment(os.environ if environ is None else environ, config.timeout)
        self.remote = config.remote
        self.branch = config.branch
        self._lock = asyncio.Lock()  # one git command at a time: index.lock would make them race
        self._wake = asyncio.Event()

    async def _git(self, *args: str, timeout: float | None = None,
                   env: Mapping[str, str] | None = None) -> str:
        result = await proc.run(("git", *args), cwd=self.path, env=env or self.env,
                                timeout=timeout or self.config.timeout)
        if result.timed_out:
            raise GitError(f"git {args[0]} timed out after {self.config.timeout:g}s")
        if not result.ok:
            raise GitError(f"git {args[0]}: {_first_complaint(result.output, result.returncode)}")
        return result.output.strip()

    async def _config_value(self, key: str) -> str | None:
        try:
            return await self._git("config", "--get", key) or None
        except GitError:
            return None

    async def prepare(self) -> str:
        """Check the repository and settle remote and branch; returns HEAD. Raises GitError."""
        if not os.path.isdir(self.path):
            raise GitError(f"git.repo: {self.path} is not a directory")
        try:
            top = await self._git("rev-parse", "--show-toplevel")
        except GitError:
            raise GitError(f"git.repo: {self.path} is not a git working tree") from None
        if os.path.realpath(top) != os.path.realpath(self.path):
            raise GitError(f"git.repo: {self.path} is inside {top}; name the top of the tree")
        try:
            head = await self._git("rev-parse", "--verify", "HEAD^{commit}")
        except GitError:
            raise GitError(f"git.repo: {self.path} has no commit checked out") from None
        current = None
        try:
            current = await self._git("symbolic-ref", "--short", "-q", "HEAD")
        except GitError:
            pass
        branch = self.branch or current
        if branch is None:
            raise GitError("git.branch: HEAD is detached and no branch is configured")
        if self.branch is None:
            merge = await self._config_value(f"branch.{branch}.merge")
            if merge is None:
                raise GitError(f"git.branch: branch {branch} has no upstream; "
                               "set git.remote and git.branch")
            branch = merge.removeprefix("refs/heads/")
        remote = self.remote or await self._config_value(f"branch.{current}.remote") or "origin"
        if remote == ".":
            raise GitError(f"git.remote: {current} tracks a local branch; set git.remote")
        self.remote, self.branch = remote, branch
        return head

    @property
    def tracking_ref(self) -> str:
        return f"refs/remotes/{self.remote}/{self.branch}"

    async def head(self) -> str:
        return await self._git("rev-parse", "--verify", "HEAD^{commit}")

    async def is_dirty(self) -> bool:
        """Changes to tracked files; untracked files are left alone by both update paths."""
        status = await self._git("status", "--porcelain", "--untracked-files=no")
        return bool(status)

    async def _relation(self, head: str, upstream: str) -> str:
        if head == upstream:
            return "same"
        for relation, older, newer in (("behind", head, upstream), ("ahead", upstream, head)):
            result = await proc.run(("git", "merge-base", "--is-ancestor", older, newer),
                                    cwd=self.path, env=self.env, timeout=self.config.timeout)
            if result.ok:
                return relation
            if result.returncode != 1:
                raise GitError(f"git merge-base: {result.output.strip() or 'failed'}")
        return "diverged"

    async def fetch(self) -> Event:
        """Fetch the branch and compare it with HEAD; any failure is a FetchFailed, never raised."""
        async with self._lock:
            head = None
            try:
                head = await self.head()
                await self._git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                                "--", self.remote or "origin",
                                f"+refs/heads/{self.branch}:{self.tracking_ref}")
                upstream = await self._git("rev-parse", "--verify", self.tracking_ref + "^{commit}")
                if not self.compare:
                    return FetchSucceeded(head=head, upstream=upstream, relation="unknown")
                relation = await self._relation(head, upstream)
                dirty = relation != "same" and await self.is_dirty()
            except (GitError, OSError) as error:
                return FetchFailed(error=str(error), head=head)
            return FetchSucceeded(head=head, upstream=upstream, relation=relation,  # type: ignore[arg-type]
                                  dirty=dirty)

    async def update(self, commit: str, reset: bool) -> Event:
        """Move the tree to `commit`: fast-forward only, or `reset --keep` (which refuses rather
        than overwrite local changes). A clean tree is checked first either way."""
        async with self._lock:
            try:
                if await self.is_dirty():
                    return TreeUpdateFailed(commit=commit,
                                            error="local changes in the working tree")
                if reset:
                    await self._git("reset", "--quiet", "--keep", commit)
                else:
                    await self._git("merge", "--ff-only", "--quiet", commit)
                head = await self.head()
            except (GitError, OSError) as error:
                return TreeUpdateFailed(commit=commit, error=str(error))
            if head != commit:
                return TreeUpdateFailed(commit=commit, error=f"HEAD is {head} after the update")
            return TreeUpdated(commit=commit)

    async def export(self, commit: str, directory: str) -> None:
        """Write the files of `commit` into a new plain directory (no .git inside), through a
        throwaway index: this tree, its index and its HEAD are never touched. Raises GitError."""
        index = directory + ".index"
        env = {**self.env, "GIT_INDEX_FILE": index}
        async with self._lock:
            try:
                await self._git("read-tree", commit + "^{tree}", env=env)
                await self._git("checkout-index", "--all", "--force",
                                "--prefix=" + directory.rstrip("/") + "/", env=env)
            finally:
                try:
                    os.unlink(index)
                except FileNotFoundError:
                    pass

    def check_now(self) -> None:
        self._wake.set()

    async def poll(self, post: Callable[[Event], None]) -> None:
        """Fetch now, then every poll_interval or as soon as check_now() is called."""
        while True:
            self._wake.clear()
            post(await self.fetch())
            try:
                async with asyncio.timeout(self.config.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

