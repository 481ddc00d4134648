"""`supervisor init`: write a first, commented supervisor.toml for the clone it runs in, from
what git and the tree already say. It only reads the clone and creates one new file: it never
overwrites a config, and never fetches, builds or starts anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

EXIT_USAGE = 2
USAGE = "supervisor init [-c PATH] -- COMMAND [ARG...]"
MAKEFILES = ("GNUmakefile", "makefile", "Makefile")  # the names make itself looks for


class InitError(Exception):
    """One line for the user: what is missing and how to fix it."""


def _git(repo: str, *args: str) -> str | None:
    """git's answer, or None when it has none (not a repository, no upstream). Local only:
    nothing here may wait on a remote or a person."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    try:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              env=env, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _toml(text: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, except that TOML also wants DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _command(argv: list[str]) -> str:
    """A list runs as is, so the server keeps the pid (LISTEN_PID names it); one argument with
    spaces is taken as a shell command line, as the user typed it."""
    if len(argv) == 1 and any(char.isspace() for char in argv[0]):
        return _toml(argv[0])
    return "[" + ", ".join(_toml(arg) for arg in argv) + "]"


def upstream_of(repo: str) -> tuple[str, str]:
    """(remote, branch) that the checked-out branch follows; the supervisor deploys that."""
    branch = _git(repo, "symbolic-ref", "--quiet", "--short", "HEAD")
    if branch is None:
        raise InitError("git: HEAD is detached; check out the branch to deploy "
                        "(git switch main)")
    remote = _git(repo, "config", f"branch.{branch}.remote")
    merge = _git(repo, "config", f"branch.{branch}.merge")
    if not remote or not merge or not merge.startswith("refs/heads/"):
        raise InitError(f"git: branch {branch} has no upstream; set one with "
                        f"git branch -u origin/{branch}")
    return remote, merge.removeprefix("refs/heads/")


def render(config_dir: str, top: str, command: list[str]) -> str:
    """The config's text: what was found is set, the rest is commented out with its default."""
    remote, branch = upstream_of(top)
    name = os.path.basename(top) or "app"
    inside = os.path.commonpath([top, config_dir]) == top
    repo = os.path.relpath(top, config_dir) if inside else top  # /etc/... names /srv/... whole
    makefile = next((m for m in MAKEFILES if os.path.isfile(os.path.join(top, m))), None)
    return "\n".join([*_app_lines(name, command), *_git_lines(repo, remote, branch),
                      *_build_lines(makefile), *_optional_lines()])


def _app_lines(name: str, command: list[str]) -> list[str]:
    return [
        f"# supervisor.toml for {name}, written by `supervisor init`. Check it with",
        "# `supervisor check` (it prints every default), run it with `supervisor run`.",
        "# Every key is described in docs/configuration.md. Relative paths are relative to",
        "# this file; durations are seconds or \"500ms\", \"30s\", \"5m\", \"1h\".",
        "",
        "[app]",
        f"name = {_toml(name)}",
        "# The server. A list runs as is; a string runs with /bin/sh -c (then write",
        "# \"exec ./server\", so that the server itself keeps the pid).",
        f"command = {_command(command)}",
        "# env = { PORT = \"8080\" }        # added to the supervisor's environment",
        "# stop_timeout = \"10s\"            # after app.stop_signal (SIGTERM), then SIGKILL",
        "# state_dir: default $STATE_DIRECTORY under systemd, else",
        f"# ~/.local/state/supervisor/{name}",
        "",
    ]


def _git_lines(repo: str, remote: str, branch: str) -> list[str]:
    """`repo` only where the clone is not the config's directory, so a config beside the code
    stays movable with it."""
    lines = ["[git]"]
    if repo != ".":
        lines.append(f"repo = {_toml(repo)}")
    lines += [
        f"# The upstream of the branch checked out here ({remote}/{branch}).",
        f"remote = {_toml(remote)}",
        f"branch = {_toml(branch)}",
        "poll_interval = \"5m\"            # `supervisor deploy` fetches at once",
        "",
    ]
    return lines


def _build_lines(makefile: str | None) -> list[str]:
    """A build step only where a Makefile says there is one to run."""
    if makefile is not None:
        return ["[build]",
                f"# Run in the clone after each update, before the restart ({makefile} found).",
                "# A failed build leaves the running version alone.",
                "command = \"make\"",
                "timeout = \"10m\""]
    return ["# [build]                        # no Makefile here: no build step",
            "# command = \"make\""]


def _optional_lines() -> list[str]:
    """The sections a first config leaves out, commented, with where to read more."""
    return [
        "",
        "# Wait for clients to leave before a restart. The server writes KEY=value lines",
        "# (n_clients=\"2\") to the stats file; see docs/configuration.md#the-stats-file.",
        "# [drain]",
        "# stats_file = \"/run/myapp/stats\"",
        "# until = \"n_clients == 0\"",
        "# timeout = \"30m\"                # restart anyway after this; 0 waits forever",
        "",
        "# Zero downtime: the supervisor holds the listening socket across restarts and hands",
        "# it to the server as fd 3 (LISTEN_FDS=1, as systemd does); see docs/zero-downtime.md.",
        "# [[socket]]",
        "# listen = \"127.0.0.1:8080\"",
        "# name = \"http\"",
        "",
        "# Build each commit beside the live one and roll back an unhealthy release:",
        "# see docs/release-mode.md ([deploy] mode = \"releases\", [health]).",
        "",
    ]


def write_config(path: str, command: list[str]) -> str:
    """Write a new config at `path` for the clone around it; return the text written."""
    if not command:
        raise InitError("init: name the app's command after --, e.g. "
                        "supervisor init -- ./server --port 8080")
    config_dir = os.path.dirname(os.path.abspath(path))
    top = _git(os.getcwd(), "rev-parse", "--show-toplevel")
    if top is None:
        raise InitError(f"git: {os.getcwd()} is not in a git working tree; run init in the "
                        "clone the supervisor should keep up to date")
    text = render(config_dir, top, command)
    _validate(text, path)
    try:
        # O_EXCL: an existing config, even one created a moment ago, is never replaced.
        with open(path, "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise InitError(f"{path}: exists; init never overwrites a config "
                        "(use -c to write another file)") from None
    except OSError as error:
        raise InitError(f"{path}: cannot write: {error.strerror}") from None
    return text


def _validate(text: str, path: str) -> None:
    """What init writes must be what `supervisor check` accepts; refuse rather than write
    a config that would fail at its first use."""
    import tomllib

    from supervisor.core.config import ConfigError, parse_config

    try:
        parse_config(tomllib.loads(text), os.path.abspath(path))
    except ConfigError as error:
        raise InitError(f"init: the config would be refused: {error.problems[0]}") from None


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="supervisor init", usage=USAGE,
        description="Write a commented supervisor.toml for the git clone in this directory.")
    parser.add_argument("-c", "--config", default="supervisor.toml", metavar="PATH",
                        help="the file to create (default: ./supervisor.toml); never replaced")
    parser.add_argument("command", nargs="*", metavar="COMMAND",
                        help="the server and its arguments, after --")
    args = parser.parse_args(argv)
    try:
        write_config(args.config, list(args.command))
    except InitError as error:
        print(f"supervisor: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.config}; check it with `supervisor check -c {args.config}`, "
          f"then `supervisor run -c {args.config}`")
    return 0
