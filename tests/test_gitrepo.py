"""The git driver against real repositories in tmp_path: a bare remote, a clone that pushes and
the clone the supervisor owns; unreliable remotes are a local HTTP server answering 401 and a
TCP listener that never answers.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.core.config import GitConfig
from supervisor.core.events import FetchFailed, FetchSucceeded, TreeUpdated, TreeUpdateFailed
from supervisor.drivers.gitrepo import GitError, GitRepo, git_environment
from tests.helpers_git import Repos, commit, git, git_env, head, make_repos
from tests.processes import run


def driver_env(**extra: str) -> dict[str, str]:
    """What the supervisor would inherit: identity and isolation, but no prompt settings, so
    that the driver's own environment is what keeps git from prompting."""
    env = git_env(**extra)
    env.pop("GIT_TERMINAL_PROMPT", None)
    return env




def repo_for(path: Path, *, timeout: float = 10, environ: dict[str, str] | None = None,
             **kwargs: str) -> GitRepo:
    return GitRepo(GitConfig(repo=path, timeout=timeout, **kwargs),  # type: ignore[arg-type]
                   environ=environ or driver_env())


async def prepared(path: Path, **kwargs) -> GitRepo:  # type: ignore[no-untyped-def]
    repo = repo_for(path, **kwargs)
    await repo.prepare()
    return repo


async def fetch(path: Path, **kwargs):  # type: ignore[no-untyped-def]
    return await (await prepared(path, **kwargs)).fetch()


@pytest.fixture
def repos(tmp_path: Path) -> Repos:
    return make_repos(tmp_path)


# ---------------------------------------------------------------------------------------------
# prepare()


def test_prepare_takes_remote_and_branch_from_the_upstream(repos: Repos) -> None:
    repo = repo_for(repos.work)
    assert run(repo.prepare()) == repos.first
    assert (repo.remote, repo.branch) == ("origin", "main")
    assert repo.tracking_ref == "refs/remotes/origin/main"


def test_prepare_follows_an_upstream_with_another_name(repos: Repos) -> None:
    git(repos.work, "remote", "rename", "origin", "upstream")
    git(repos.work, "checkout", "-q", "-b", "deploy", "--track", "upstream/main")
    repo = repo_for(repos.work)
    assert run(repo.prepare()) == repos.first
    assert (repo.remote, repo.branch) == ("upstream", "main")


def test_prepare_keeps_configured_remote_and_branch(repos: Repos) -> None:
    git(repos.work, "checkout", "-q", "--detach")
    repo = repo_for(repos.work, branch="main")
    assert run(repo.prepare()) == repos.first
    assert (repo.remote, repo.branch) == ("origin", "main")
    event = run(repo.fetch())
    assert event == FetchSucceeded(head=repos.first, upstream=repos.first, relation="same")


def _error(path: Path, **kwargs: str) -> str:
    with pytest.raises(GitError) as caught:
        run(repo_for(path, **kwargs).prepare())  # type: ignore[arg-type]
    return str(caught.value)


def test_prepare_rejects_a_missing_directory(tmp_path: Path) -> None:
    assert "not a directory" in _error(tmp_path / "nowhere")


def test_prepare_rejects_a_directory_outside_any_repository(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    message = _error(tmp_path / "plain")
    assert message.startswith("git.repo:") and "not a git working tree" in message


def test_prepare_rejects_a_subdirectory_of_a_repository(repos: Repos) -> None:
    (repos.work / "sub").mkdir()
    message = _error(repos.work / "sub")
    assert message.startswith("git.repo:") and "inside" in message


def test_prepare_rejects_a_bare_repository(repos: Repos) -> None:
    assert "not a git working tree" in _error(repos.remote)


def test_prepare_rejects_a_repository_without_commits(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "-b", "main", "empty")
    message = _error(tmp_path / "empty")
    assert message.startswith("git.repo:") and "no commit" in message


def test_prepare_rejects_a_detached_head_without_configured_branch(repos: Repos) -> None:
    git(repos.work, "checkout", "-q", "--detach")
    message = _error(repos.work)
    assert message.startswith("git.branch:") and "detached" in message


def test_prepare_rejects_a_branch_without_upstream(repos: Repos) -> None:
    git(repos.work, "checkout", "-q", "-b", "local-only")
    message = _error(repos.work)
    assert message.startswith("git.branch:") and "local-only" in message
    assert "no upstream" in message


# ---------------------------------------------------------------------------------------------
# fetch(): relation and dirtiness, never touching the tree


def test_fetch_same(repos: Repos) -> None:
    event = run(fetch(repos.work))
    assert event == FetchSucceeded(head=repos.first, upstream=repos.first, relation="same")


def test_fetch_behind_leaves_the_tree_alone(repos: Repos) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    event = run(fetch(repos.work))
    assert event == FetchSucceeded(head=repos.first, upstream=new, relation="behind", dirty=False)
    assert head(repos.work) == repos.first  # fetched, never pulled
    assert (repos.work / "app.txt").read_text() == "version 1\n"
    assert git(repos.work, "rev-parse", "refs/remotes/origin/main") == new


def test_fetch_ahead(repos: Repos) -> None:
    local = commit(repos.work, "local.txt", "mine\n")
    event = run(fetch(repos.work))
    assert event == FetchSucceeded(head=local, upstream=repos.first, relation="ahead")


def test_fetch_diverged(repos: Repos) -> None:
    local = commit(repos.work, "local.txt", "mine\n")
    upstream = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    event = run(fetch(repos.work))
    assert event == FetchSucceeded(head=local, upstream=upstream, relation="diverged")


def test_fetch_reports_a_modified_tracked_file_as_dirty(repos: Repos) -> None:
    upstream = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    (repos.work / "app.txt").write_text("edited on the server\n")
    event = run(fetch(repos.work))
    assert event == FetchSucceeded(head=repos.first, upstream=upstream, relation="behind",
                                   dirty=True)


def test_fetch_does_not_count_untracked_files_as_dirty(repos: Repos) -> None:
    upstream = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    (repos.work / "stats.txt").write_text("n_clients=0\n")
    event = run(fetch(repos.work))
    assert event == FetchSucceeded(head=repos.first, upstream=upstream, relation="behind",
                                   dirty=False)


def test_fetch_from_a_remote_that_moved_away_fails_with_the_head(repos: Repos) -> None:
    async def scenario() -> object:
        repo = await prepared(repos.work)
        repos.remote.rename(repos.remote.with_name("moved.git"))
        return await repo.fetch()

    event = run(scenario())
    assert isinstance(event, FetchFailed)
    assert event.head == repos.first
    assert event.error.startswith("git fetch")


def test_fetch_in_a_deleted_working_tree_fails_without_raising(repos: Repos) -> None:
    async def scenario() -> object:
        repo = await prepared(repos.work)
        shutil.rmtree(repos.work)
        return await repo.fetch()

    event = run(scenario())
    assert isinstance(event, FetchFailed)
    assert event.head is None


# ---------------------------------------------------------------------------------------------
# update(): fast-forward or reset, never over local changes


def fetch_then_update(repos: Repos, commit: str, reset: bool) -> object:
    """What the service does for a deploy: fetch, then move the tree to `commit`."""
    async def scenario() -> object:
        repo = await prepared(repos.work)
        await repo.fetch()
        return await repo.update(commit, reset=reset)

    return run(scenario())


def test_update_fast_forwards(repos: Repos) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()

    assert fetch_then_update(repos, new, reset=False) == TreeUpdated(commit=new)
    assert head(repos.work) == new
    assert (repos.work / "app.txt").read_text() == "version 2\n"


@pytest.mark.parametrize("reset", [False, True])
def test_update_refuses_over_local_changes_and_keeps_them(repos: Repos, reset: bool) -> None:
    new = commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    (repos.work / "app.txt").write_text("hotfix on the server\n")

    event = fetch_then_update(repos, new, reset=reset)
    assert isinstance(event, TreeUpdateFailed) and event.commit == new
    assert "local changes" in event.error
    assert head(repos.work) == repos.first
    assert (repos.work / "app.txt").read_text() == "hotfix on the server\n"


@pytest.mark.parametrize("reset", [False, True])
def test_update_never_overwrites_an_untracked_file(repos: Repos, reset: bool) -> None:
    new = commit(repos.dev, "config.ini", "from upstream\n")
    repos.push()
    (repos.work / "config.ini").write_text("written on the server\n")

    event = fetch_then_update(repos, new, reset=reset)
    assert isinstance(event, TreeUpdateFailed) and event.commit == new
    assert head(repos.work) == repos.first
    assert (repos.work / "config.ini").read_text() == "written on the server\n"


def test_reset_after_a_force_push_moves_a_clean_tree(repos: Repos) -> None:
    commit(repos.dev, "app.txt", "version 2\n")
    repos.push()
    git(repos.work, "pull", "-q", "--ff-only")  # the server deployed version 2 ...
    git(repos.dev, "reset", "-q", "--hard", repos.first)  # ... which upstream then rewrote
    rewritten = commit(repos.dev, "app.txt", "version 2, rewritten\n")
    repos.push("--force")

    async def scenario() -> tuple[object, object, object]:
        repo = await prepared(repos.work)
        fetched = await repo.fetch()
        refused = await repo.update(rewritten, reset=False)
        return fetched, refused, await repo.update(rewritten, reset=True)

    fetched, refused, reset = run(scenario())
    assert isinstance(fetched, FetchSucceeded) and fetched.relation == "diverged"
    assert isinstance(refused, TreeUpdateFailed)
    assert reset == TreeUpdated(commit=rewritten)
    assert head(repos.work) == rewritten
    assert (repos.work / "app.txt").read_text() == "version 2, rewritten\n"
    assert git(repos.work, "status", "--porcelain") == ""


def test_check_now_wakes_the_poller(repos: Repos) -> None:
    async def scenario() -> list[object]:
        repo = await prepared(repos.work)  # poll_interval stays at 300 s
        events: asyncio.Queue[object] = asyncio.Queue()
        poller = asyncio.create_task(repo.poll(events.put_nowait))
        try:
            first = await events.get()
            new = commit(repos.dev, "app.txt", "version 2\n")
            repos.push()
            repo.check_now()
            second = await events.get()
            return [first, second, new]
        finally:
            poller.cancel()

    first, second, new = run(scenario(), limit=10)
    assert isinstance(first, FetchSucceeded) and first.relation == "same"
    assert isinstance(second, FetchSucceeded) and second.upstream == new
    assert second.relation == "behind"


# ---------------------------------------------------------------------------------------------
# Git never waits on a person or on a dead remote.


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_401() -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Unauthorized,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/repo.git", handler.requests
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_asking_for_credentials_fails_promptly(
        repos: Repos, http_401: tuple[str, list[str]]) -> None:
    url, requests = http_401
    git(repos.work, "remote", "set-url", "origin", url)
    started = time.monotonic()
    event = run(fetch(repos.work, timeout=30))
    elapsed = time.monotonic() - started
    print(f"401 remote failed after {elapsed:.3f}s: {event}")
    assert requests, "git never contacted the server"
    assert isinstance(event, FetchFailed) and event.head == repos.first
    assert elapsed < 5


@pytest.mark.parametrize("how", ["SSH_ASKPASS", "core.askPass"])
def test_no_askpass_program_is_ever_run(
        repos: Repos, http_401: tuple[str, list[str]], tmp_path: Path, how: str) -> None:
    # A desktop session exports SSH_ASKPASS, and git uses it (or core.askPass) even with
    # GIT_TERMINAL_PROMPT=0: the poller would pop up a password dialog and block until timeout.
    marker = tmp_path / "askpass-was-run"
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\ntouch '{marker}'\necho secret\n")
    askpass.chmod(0o755)
    url, _requests = http_401
    git(repos.work, "remote", "set-url", "origin", url)
    if how == "SSH_ASKPASS":
        environ = driver_env(SSH_ASKPASS=str(askpass), DISPLAY=":0",
                             SSH_ASKPASS_REQUIRE="force")
    else:
        git(repos.work, "config", "core.askPass", str(askpass))
        environ = driver_env()
    event = run(fetch(repos.work, environ=environ))
    assert isinstance(event, FetchFailed)
    assert not marker.exists(), f"git ran the askpass program from {how}"


def test_environment_disables_every_prompt() -> None:
    env = git_environment({"GIT_ASKPASS": "/usr/bin/ksshaskpass", "PATH": "/usr/bin"}, 120)
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert "BatchMode=yes" in env["GIT_SSH_COMMAND"]
    assert env.get("GIT_ASKPASS", "") == ""
    kept = git_environment({"GIT_SSH_COMMAND": "ssh -i key"}, 120)
    assert kept["GIT_SSH_COMMAND"] == "ssh -i key"


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """Accepts connections and never says a word, like a wedged git daemon."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # the listening socket was shut down
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()


def _git_processes_in(path: Path) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone, or a zombie
            continue
        if cwd == str(path) and cmdline.startswith(b"git"):
            found.append(cmdline.replace(b"\0", b" ").decode())
    return found


def test_a_remote_that_never_answers_fails_at_the_timeout(
        repos: Repos, silent_listener: int) -> None:
    git(repos.work, "remote", "set-url", "origin", f"git://127.0.0.1:{silent_listener}/r.git")
    started = time.monotonic()
    event = run(fetch(repos.work, timeout=1))
    elapsed = time.monotonic() - started
    print(f"silent git:// remote gave up after {elapsed:.3f}s")
    assert isinstance(event, FetchFailed) and event.head == repos.first
    assert "timed out" in event.error
    assert 0.9 <= elapsed < 3.5
    assert _git_processes_in(repos.work) == []


def test_a_fetch_killed_at_the_timeout_leaves_another_gits_index_lock_alone(
        repos: Repos) -> None:
    """Killed by us, a fetch may leave ref locks, which are cleared; an index.lock that
    appears while it hangs is a person's `git pull` (a fetch takes none), and stays."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    git(repos.work, "remote", "set-url", "origin", f"git://127.0.0.1:{port}/r.git")
    lock = repos.work / ".git" / "index.lock"
    logged: list[tuple[str, dict[str, object]]] = []

    async def scenario() -> object:
        repo = repo_for(repos.work, timeout=1.5)
        repo.log = lambda name, facts: logged.append((name, facts))
        await repo.prepare()
        fetching = asyncio.ensure_future(repo.fetch())
        async with asyncio.timeout(5):
            connection, _ = await asyncio.get_running_loop().sock_accept(server)
        lock.write_bytes(b"")  # the fetch's git is connected, and waits for an answer
        try:
            return await fetching
        finally:
            connection.close()

    try:
        event = run(scenario())
    finally:
        server.close()
    assert isinstance(event, FetchFailed) and "timed out" in event.error
    assert lock.exists()
    assert "git.lock_cleared" not in [name for name, _ in logged]
