"""The working tree and its upstream: fetch (never pull), compare, fast-forward or reset, and put
back a tree an update left half-written. Git runs with a timeout, no prompt and no hooks; it
refuses rather than discards local changes. It reports facts; whether to deploy is the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.core.config import GitConfig
from supervisor.core.events import Event, FetchFailed, FetchSucceeded, TreeUpdated, TreeUpdateFailed
from supervisor.drivers import proc, procfs

# No repository hook runs in any git the supervisor starts: a post-merge or post-checkout hook
# that hangs would be killed at the timeout after moving HEAD, and one that writes files would
# change the tree behind the build. (`-c` reaches the gits that git itself starts.)
NO_HOOKS = ("-c", "core.hooksPath=/dev/null")
# Written in the git directory before the supervisor's git changes the tree, removed once the
# tree is whole at the new commit: its presence means an update was cut short (git killed at
# the timeout, or the supervisor killed), and which git it was.
JOURNAL = "supervisor-update"
# Locks git takes while it changes the tree or refs; a git killed by SIGKILL leaves them behind.
_LOCKS = ("index.lock", "HEAD.lock", "ORIG_HEAD.lock", "packed-refs.lock", "shallow.lock",
          "config.lock")
# The kernel's file times come from a coarse clock that can lag time.time() by a tick.
_CLOCK_SLACK = 0.05


class GitError(Exception):
    """A git command failed; the message is git's own last words."""


class GitTimedOut(GitError):
    """We killed git at git.timeout: it may have left the tree half-written."""


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
                 compare: bool = True,
                 log: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.config = config
        # Release mode never moves this tree: what upstream is relative to its HEAD (and
        # whether it is dirty) decides nothing, so two git processes a poll are saved.
        self.compare = compare
        self.path = config.repo
        self.env = git_environment(os.environ if environ is None else environ, config.timeout)
        self.remote = config.remote
        self.branch = config.branch
        self.log = log or (lambda name, facts: None)
        self.git_dir: str | None = None  # known after prepare()
        self._lock = asyncio.Lock()  # one git command at a time: index.lock would make them race
        self._wake = asyncio.Event()
        # Many apps in one process: a cap on fetches at once across them (an async context
        # manager), and this app's place in the poll interval, so their fetches spread out.
        self.gate: Any = contextlib.nullcontext()
        self.offset = 0.0

    async def _git(self, *args: str, timeout: float | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None,
                   on_spawn: Callable[[int], None] | None = None) -> str:
        started = time.time()
        result = await proc.run(("git", *NO_HOOKS, *args), cwd=cwd or self.path,
                                env=env or self.env, timeout=timeout or self.config.timeout,
                                on_spawn=on_spawn)
        if result.timed_out:
            # Killed by us: whatever lock it took since it started is ours to clear, or every
            # later git in this tree would fail on it ("index.lock: File exists") for good.
            # A fetch takes only ref locks: an index.lock then is someone else's.
            self._clear_locks(started - _CLOCK_SLACK, refs_only=args[0] == "fetch")
            raise GitTimedOut(f"git {args[0]} timed out after "
                              f"{timeout or self.config.timeout:g}s")
        if not result.ok:
            raise GitError(f"git {args[0]}: {_first_complaint(result.output, result.returncode)}")
        return result.output.strip()

    async def _config_value(self, key: str) -> str | None:
        try:
            return await self._git("config", "--get", key) or None
        except GitError:
            return None

    async def prepare(self, built: str | None = None) -> str:
        """Check the repository and settle remote and branch; returns HEAD. Raises GitError.
        A tree an earlier run left half-updated is put back first (to `built` if given, else
        to where that update started), never run."""
        if not os.path.isdir(self.path):
            raise GitError(f"git.repo: {self.path} is not a directory")
        try:
            top = await self._git("rev-parse", "--show-toplevel")
        except GitError as error:
            if "dubious ownership" in str(error):
                raise GitError(
                    f"git.repo: {self.path} belongs to another user and git refuses it "
                    "(\"dubious ownership\"): run the supervisor as the tree's owner, or name "
                    "the tree in git's safe.directory") from None
            raise GitError(f"git.repo: {self.path} is not a git working tree") from None
        if os.path.realpath(top) != os.path.realpath(self.path):
            raise GitError(f"git.repo: {self.path} is inside {top}; name the top of the tree")
        self.git_dir = await self._git("rev-parse", "--absolute-git-dir")
        await self._recover(built)
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

    async def remote_url(self) -> str | None:
        """The address fetched from, for matching a webhook's push to this repository."""
        try:
            return await self._git("config", "--get", f"remote.{self.remote or 'origin'}.url")
        except GitError:
            return None

    async def is_dirty(self) -> bool:
        """Changes to tracked files; untracked files are left alone by both update paths."""
        status = await self._git("status", "--porcelain", "--untracked-files=no")
        return bool(status)

    async def _relation(self, head: str, upstream: str) -> str:
        if head == upstream:
            return "same"
        for relation, older, newer in (("behind", head, upstream), ("ahead", upstream, head)):
            result = await proc.run(("git", *NO_HOOKS, "merge-base", "--is-ancestor", older,
                                     newer),
                                    cwd=self.path, env=self.env, timeout=self.config.timeout)
            if result.ok:
                return relation
            if result.returncode != 1:
                raise GitError(f"git merge-base: {result.output.strip() or 'failed'}")
        return "diverged"

    async def fetch(self) -> Event:
        """Fetch the branch and compare it with HEAD; any failure is a FetchFailed, never raised."""
        async with self._lock, self.gate:
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
        than overwrite local changes), then its submodules. A clean tree is checked first
        either way. An update that fails or is cut short is rolled back to where it started
        before this returns, so the tree is never left half-written."""
        async with self._lock:
            start = None
            try:
                if await self.is_dirty():
                    return TreeUpdateFailed(commit=commit,
                                            error="local changes in the working tree")
                start = await self.head()
                self._write_journal({"from": start, "to": commit, "started": time.time()})
                try:
                    if reset:
                        await self._git("reset", "--quiet", "--keep", commit,
                                        on_spawn=self._journal_git)
                    else:
                        await self._git("merge", "--ff-only", "--quiet", commit,
                                        on_spawn=self._journal_git)
                except GitTimedOut:
                    raise
                except GitError:
                    # git refused (an untracked file in the way, not a fast-forward): it checks
                    # everything before it writes anything, so the tree is as it was.
                    self._remove_journal()
                    raise
                await self._update_submodules(self.path)
                head = await self.head()
                if head != commit:
                    raise GitError(f"HEAD is {head} after the update")
            except (GitError, OSError) as error:
                if start is not None and self._read_journal() is not None:
                    error = GitError(f"{error}{await self._roll_back(start)}")
                return TreeUpdateFailed(commit=commit, error=str(error))
            self._remove_journal()
            return TreeUpdated(commit=commit)

    async def _roll_back(self, start: str) -> str:
        """Put the tree back where a failed update started; the words to add to its error."""
        try:
            await self._restore(start, reason="update failed")
        except (GitError, OSError) as error:
            return f"; not rolled back: {error}"
        return f"; rolled back to {start[:12]}"

    async def _update_submodules(self, tree: str | os.PathLike[str]) -> None:
        """Submodules follow their superproject, or a build sees stale content and the tree
        looks modified after it (`git.dirty` for good). Skipped without a .gitmodules."""
        if os.path.exists(os.path.join(tree, ".gitmodules")):
            await self._git("submodule", "--quiet", "update", "--init", "--recursive",
                            "--checkout", cwd=os.fspath(tree),
                            on_spawn=self._journal_git
                            if os.fspath(tree) == os.fspath(self.path) else None)

    # a tree left half-written ----------------------------------------------------------------

    def tree_problem(self, built: str) -> str | None:
        """Why the tree must not be started as the build of `built`, or None when it may.

        Cheap and synchronous (it reads files in the git directory and starts no git), for the
        loop to call just before every start of the app: an update cut short (our journal),
        git's index.lock (a git at work, or one that was killed) or a HEAD that is not the
        built commit."""
        git_dir = self.git_dir
        if git_dir is None:
            return "the repository was not prepared"
        journal = self._read_journal()
        if journal is not None:
            return f"an update to {str(journal.get('to'))[:12]} was cut short"
        if os.path.lexists(os.path.join(git_dir, "index.lock")):
            return "git's index.lock is there: a git is at work, or was killed"
        head = read_head(git_dir)
        if head != built:
            return f"HEAD is {head[:12] if head else 'unreadable'}, not the built {built[:12]}"
        return None

    async def restore(self, commit: str) -> None:
        """Put the tree back at `commit` (the last built one), submodules included. Raises
        GitError, and leaves the tree alone, when a lock is not ours or when changes that no
        update of ours made are in the way: those are never discarded."""
        async with self._lock:
            await self._restore(commit, reason="not the built commit")

    async def _restore(self, commit: str, reason: str) -> None:
        journal = self._read_journal()
        try:
            if journal is not None:
                await self._undo_interrupted(journal, commit)
            else:
                await self._reset_clean(commit)
            await self._update_submodules(self.path)
            head = await self.head()
            if head != commit:
                raise GitError(f"HEAD is {head} after putting the tree back")
        except (GitError, OSError) as error:
            self.log("git.restore_failed", {"commit": commit, "error": str(error)})
            raise GitError(str(error)) from None
        self._remove_journal()
        self.log("git.tree_restored", {"commit": commit, "reason": reason,
                                       "interrupted": journal is not None})

    async def _undo_interrupted(self, journal: dict[str, Any], commit: str) -> None:
        """Back to `commit` from an update of ours that was cut short."""
        await self._end_earlier_git(journal)
        started = journal.get("started")
        self._clear_locks(started - _CLOCK_SLACK
                          if isinstance(started, (int, float)) else None)
        # The tree was clean when that update began, so every change in it since is
        # the cut-short git's own work: reset it all, and delete the files it added.
        await self._remove_written(
            [journal.get("to"), journal.get("from")], commit,
            started - _CLOCK_SLACK if isinstance(started, (int, float)) else None)
        if self._index_written_since(started):
            # The cut-short git got as far as writing the index: it lists the new
            # commit's files, which a reset would delete whoever wrote them. Start the
            # index from `commit` instead, with the stat data of the files that match
            # it, so the reset rewrites only what differs (a smudge filter, git-lfs,
            # runs for those alone).
            await self._git("read-tree", commit)
            try:
                await self._git("update-index", "-q", "--refresh")
            except GitTimedOut:
                raise
            except GitError:
                pass  # it exits 1 when files differ: those the reset rewrites
        await self._git("reset", "--quiet", "--hard", commit, on_spawn=self._journal_git)

    async def _reset_clean(self, commit: str) -> None:
        """Back to `commit` from a tree no update of ours touched: only if nothing is in the
        way, journaled like an update."""
        self._clear_locks(None)  # none of them ours: each is reported, none removed
        if await self.is_dirty():
            raise GitError("local changes in the working tree (not discarded)")
        head = await self.head()
        self._write_journal({"from": head, "to": commit, "started": time.time()})
        try:
            await self._git("reset", "--quiet", "--keep", commit,
                            on_spawn=self._journal_git)
        except GitTimedOut:
            raise
        except GitError:
            self._remove_journal()  # git refused before changing anything
            raise

    def _index_written_since(self, started: Any) -> bool:
        """Whether git replaced the index after the update began (else it is the old one, whose
        stat data says which files the cut-short git wrote)."""
        if not isinstance(started, (int, float)):
            return True  # unknown: assume the worst
        try:
            return os.stat(os.path.join(self.git_dir or "", "index")).st_mtime >= \
                started - _CLOCK_SLACK
        except OSError:
            return True

    async def _recover(self, built: str | None) -> None:
        journal = self._read_journal()
        if journal is None:
            git_dir = self.git_dir or ""
            if os.path.lexists(os.path.join(git_dir, "index.lock")):
                self._clear_locks(None)  # reports it; another git's lock stays
            return
        target = built or str(journal.get("from", ""))
        self.log("git.update_interrupted", {"from": journal.get("from"), "to": journal.get("to"),
                                            "restore": target})
        async with self._lock:
            await self._restore(target, reason="update cut short")

    async def _remove_written(self, sides: list[Any], commit: str, since: float | None) -> None:
        """Delete the files the cut-short git wrote of `sides` (where it came from, where it
        went) that `commit` lacks: those written since the update began (`since`; a file git
        was killed writing is one of them), and older ones that hold exactly a side's content
        (the tracked files of where it came from). A file there from before, with other content,
        is someone's, and stays."""
        for side in dict.fromkeys(sides):
            if not isinstance(side, str) or not side or side == commit:
                continue
            try:
                raw = await self._git_output("diff", "--raw", "-z", "--no-renames", "--no-abbrev",
                                             "--diff-filter=A", commit, side)
            except GitTimedOut:
                raise
            except GitError:
                continue  # that commit is gone: nothing of it to find
            blobs = self._remove_recent(raw, since)
            if blobs:
                await self._remove_unchanged(blobs)

    def _remove_recent(self, raw: bytes, since: float | None) -> dict[str, str]:
        """Delete the added files of a `diff --raw -z` written since `since`; the older
        regular files are returned with the blob each would hold if git wrote it."""
        fields = raw.split(b"\0")
        blobs = {}
        for meta, name in zip(fields[0::2], fields[1::2], strict=False):
            path = os.path.join(self.path, os.fsdecode(name))
            try:
                status = os.lstat(path)
            except OSError:
                continue
            if not meta.startswith(b":") or stat.S_ISDIR(status.st_mode):
                continue
            if since is not None and status.st_mtime >= since:
                self._unlink(path)
            elif stat.S_ISREG(status.st_mode) and "\n" not in path:
                blobs[path] = meta.split()[3].decode()
        return blobs

    async def _remove_unchanged(self, blobs: dict[str, str]) -> None:
        """Delete the files whose content is exactly the blob git would have written."""
        paths = list(blobs)
        hashes = (await self._git_output("hash-object", "--no-filters", "--stdin-paths",
                                         stdin="\n".join(paths) + "\n")).split()
        for path, digest in zip(paths, hashes, strict=True):
            if blobs[path] == digest.decode():
                self._unlink(path)

    def _unlink(self, path: str) -> None:
        """Remove a file git wrote, and the directories it made for it that are empty now."""
        os.unlink(path)
        top = os.path.realpath(self.path)
        parent = os.path.dirname(path)
        while os.path.realpath(parent).startswith(top + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                return
            parent = os.path.dirname(parent)

    async def _git_output(self, *args: str, stdin: str = "", cwd: str | None = None) -> bytes:
        """Git's whole stdout (proc.run keeps a tail of lines, fine for messages but not for a
        listing of a big tree); stdin from a string. Raises GitError, GitTimedOut."""
        import tempfile  # only a rollback or a release with submodules pays for it (~0.3 MB)

        with tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as output:
            source.write(stdin.encode())
            source.seek(0)
            popen = subprocess.Popen(
                ("git", *NO_HOOKS, *args), cwd=cwd or self.path, env=self.env, stdin=source,
                stdout=output, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            process = proc.Process(popen)
            try:
                async with asyncio.timeout(self.config.timeout):
                    code = await asyncio.shield(process.exited)
            except TimeoutError:
                process.signal_group(signal.SIGKILL)
                await process.exited
                raise GitTimedOut(f"git {args[0]} timed out after "
                                  f"{self.config.timeout:g}s") from None
            if code != 0:
                raise GitError(f"git {args[0]}: exit code {code}")
            output.seek(0)
            return output.read()

    def _clear_locks(self, since: float | None, refs_only: bool = False) -> None:
        """Remove the locks our killed git left (taken at `since` or later); report any other
        (`git.lock_foreign`): a person's git, or one we cannot prove was ours, keeps its lock."""
        git_dir = self.git_dir
        if git_dir is None:
            return
        for path in _lock_files(git_dir):
            if refs_only and not path.startswith(os.path.join(git_dir, "refs") + os.sep) and \
                    os.path.basename(path) not in ("packed-refs.lock", "shallow.lock"):
                continue
            try:
                taken = os.lstat(path).st_mtime
            except OSError:
                continue
            if since is not None and taken >= since:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                self.log("git.lock_cleared", {"path": path})
            else:
                self.log("git.lock_foreign", {"path": path,
                                              "age": round(time.time() - taken, 1)})

    async def _end_earlier_git(self, journal: dict[str, Any]) -> None:
        """A git of an earlier run may still write the tree (the supervisor was killed, not it):
        wait for it up to git.timeout, then kill it. It is that git, proven by its start time,
        or it is left alone."""
        pid, ticks = journal.get("pid"), journal.get("ticks")
        if not isinstance(pid, int) or not isinstance(ticks, int) or \
                procfs.start_ticks(pid) != ticks:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if procfs.start_ticks(pid) != ticks:  # the pid was reused before the pidfd
                return
            if not await _exited(fd, self.config.timeout):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                await _exited(fd, 5.0)
            self.log("git.earlier_git_ended", {"pid": pid})
        finally:
            os.close(fd)

    # the journal -----------------------------------------------------------------------------

    def _journal_path(self) -> str:
        return os.path.join(self.git_dir or os.path.join(self.path, ".git"), JOURNAL)

    def _write_journal(self, facts: dict[str, Any]) -> None:
        """Durably, before git touches the tree: a power cut mid-update must find it."""
        path = self._journal_path()
        temporary = path + ".tmp"
        with open(temporary, "w") as file:
            json.dump(facts, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)

    def _journal_git(self, pid: int) -> None:
        """Which git is changing the tree, for a later run that finds it still at work."""
        journal = self._read_journal()
        if journal:
            journal.update(pid=pid, ticks=procfs.start_ticks(pid))
            try:
                self._write_journal(journal)
            except OSError:
                pass

    def _read_journal(self) -> dict[str, Any] | None:
        try:
            with open(self._journal_path()) as file:
                facts = json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable, but there: an update was under way
        return facts if isinstance(facts, dict) else {}

    def _remove_journal(self) -> None:
        try:
            os.unlink(self._journal_path())
        except FileNotFoundError:
            pass

    async def add_worktree(self, commit: str, directory: str) -> None:
        """Check `commit` out at `directory` (new) as a detached `git worktree`, submodules
        included: a real checkout sharing this repository's objects, so `git describe` and
        `git rev-parse HEAD` work in a build there. This tree, its index and HEAD are never
        touched. Raises GitError."""
        async with self._lock:
            await self._git("worktree", "add", "--detach", "--force", "--quiet", directory,
                            commit)
            await self._update_submodules(directory)

    async def moved_worktree(self, directory: str) -> None:
        """A worktree was renamed to `directory`: point its entry in .git at the new place
        (else a `git worktree prune` would drop it and break git in there), and each of its
        submodules' repositories at the submodule's new place. Raises GitError."""
        async with self._lock:
            await self._git("worktree", "repair", directory)
            await self._point_submodules_at(directory)

    async def _point_submodules_at(self, tree: str) -> None:
        """A submodule's repository names its checkout in core.worktree, by a path relative to
        itself that a rename of the superproject's checkout breaks ("cannot chdir")."""
        gitmodules = os.path.join(tree, ".gitmodules")
        if not os.path.isfile(gitmodules):
            return
        try:
            listing = await self._git_output("config", "--file", gitmodules, "--null",
                                             "--get-regexp", r"^submodule\..*\.path$")
        except GitTimedOut:
            raise
        except GitError:
            return  # no submodule paths in it
        for record in listing.split(b"\0"):
            _key, _, name = record.partition(b"\n")
            checkout = os.path.join(tree, os.fsdecode(name))
            if not name or not os.path.isfile(os.path.join(checkout, ".git")):
                continue  # not checked out
            with open(os.path.join(checkout, ".git")) as file:
                text = file.read().strip()
            if not text.startswith("gitdir: "):
                continue
            git_dir = os.path.normpath(os.path.join(checkout, text[8:]))
            await self._git("config", "--file", os.path.join(git_dir, "config"),
                            "core.worktree", os.path.relpath(checkout, git_dir))
            await self._point_submodules_at(checkout)

    def forget_worktrees(self, under: str) -> list[str]:
        """Drop git's entries for worktrees that were under `under` and are gone (a release
        deleted): git's own `worktree prune` would also drop other worktrees of the repository
        that merely are not there now (an unmounted disk), which are not ours to forget."""
        import shutil  # release mode only

        admin = os.path.join(_common_dir(self.git_dir or os.path.join(self.path, ".git")),
                             "worktrees")
        root = os.path.realpath(under) + os.sep
        forgotten = []
        try:
            entries = list(os.scandir(admin))
        except OSError:
            return forgotten
        for entry in entries:
            try:
                with open(os.path.join(entry.path, "gitdir")) as file:
                    pointer = file.read().strip()
            except OSError:
                continue
            checkout = os.path.dirname(pointer)  # it names the checkout's .git file
            if not os.path.realpath(checkout).startswith(root) or os.path.lexists(pointer):
                continue
            if entry.is_symlink() or not entry.is_dir():
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            forgotten.append(entry.name)
        return forgotten

    def check_now(self) -> None:
        self._wake.set()

    async def poll(self, post: Callable[[Event], None]) -> None:
        """Fetch now, then every poll_interval (the first wait longer by `offset`) or as soon
        as check_now() is called."""
        offset = self.offset
        while True:
            self._wake.clear()
            post(await self.fetch())
            try:
                async with asyncio.timeout(self.config.poll_interval + offset):
                    await self._wake.wait()
            except TimeoutError:
                pass
            offset = 0.0


async def _exited(pidfd: int, limit: float) -> bool:
    """Whether the process of `pidfd` ends within `limit` seconds. Not our child, so its exit
    is a pidfd turning readable; on some kernels epoll hears of that only once its parent reaps
    it, so the pidfd is also asked directly every 50 ms."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(pidfd, lambda: ended.done() or ended.set_result(None))
    try:
        async with asyncio.timeout(limit):
            while not select.select([pidfd], [], [], 0)[0]:
                try:
                    async with asyncio.timeout(0.05):
                        await asyncio.shield(ended)
                except TimeoutError:
                    pass
                if ended.done():
                    break
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def _common_dir(git_dir: str) -> str:
    """The repository's own git directory, also when `git_dir` is a worktree's or a .git file."""
    if os.path.isfile(git_dir):
        try:
            with open(git_dir) as file:
                text = file.read().strip()
        except OSError:
            return git_dir
        if text.startswith("gitdir: "):
            git_dir = os.path.join(os.path.dirname(git_dir), text[8:])
    try:
        with open(os.path.join(git_dir, "commondir")) as file:
            return os.path.normpath(os.path.join(git_dir, file.read().strip()))
    except OSError:
        return git_dir


def read_head(git_dir: str) -> str | None:
    """The commit HEAD names, from the files alone (HEAD, a loose ref, packed-refs)."""
    try:
        with open(os.path.join(git_dir, "HEAD")) as file:
            head = file.read().strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head or None
    ref = head[5:].strip()
    common = git_dir
    try:  # a linked worktree keeps its branches in the main repository
        with open(os.path.join(git_dir, "commondir")) as file:
            common = os.path.normpath(os.path.join(git_dir, file.read().strip()))
    except OSError:
        pass
    for directory in (git_dir, common):
        try:
            with open(os.path.join(directory, ref)) as file:
                return file.read().strip() or None
        except OSError:
            pass
    try:
        with open(os.path.join(common, "packed-refs")) as file:
            for line in file:
                sha, _, name = line.strip().partition(" ")
                if name == ref:
                    return sha
    except OSError:
        pass
    return None


def _lock_files(git_dir: str) -> list[str]:
    """The lock files git may have left in this git directory and its refs."""
    found = [os.path.join(git_dir, name) for name in _LOCKS
             if os.path.lexists(os.path.join(git_dir, name))]
    for top, _directories, files in os.walk(os.path.join(git_dir, "refs")):
        found.extend(os.path.join(top, name) for name in files if name.endswith(".lock"))
    return found
