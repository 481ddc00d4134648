"""Command line: `run`, `check` and `demo`. Imports are lazy so that each command loads only
what it uses; exit code 2 with one line per problem for anything the user must fix.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from supervisor import __version__

if TYPE_CHECKING:
    from supervisor.core.config import Config
    from supervisor.core.hostconfig import FleetConfig, HostConfig
    from supervisor.drivers.childlog import RotatingFile
    from supervisor.drivers.eventlog import EventLog
    from supervisor.loop.startup import Claim

EXIT_USAGE = 2


def _formatter(prog: str) -> object:
    """argparse's own formatter, told the terminal's width the way shutil.get_terminal_size()
    would: argparse makes one per add_argument() and, left to itself, imports shutil for it,
    which imports bz2 and lzma, whose C libraries stay mapped for good (about 0.5 MB)."""
    import argparse

    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return argparse.HelpFormatter(prog, width=(columns or 80) - 2)


def _parse(argv: list[str] | None) -> dict[str, object]:
    """The arguments as plain values: no argparse object may outlive parsing (see below)."""
    import argparse

    def parser_class(**kwargs: object) -> argparse.ArgumentParser:
        return argparse.ArgumentParser(formatter_class=_formatter, **kwargs)  # type: ignore[arg-type]

    parser = parser_class(
        prog="supervisor",
        description="Keep one server program running and up to date with its git branch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=parser_class)
    run = commands.add_parser("run", help="supervise the app described by the config")
    check = commands.add_parser("check", help="validate the config and print it with defaults")
    status = commands.add_parser("status", help="what the running supervisor is doing")
    status.add_argument("--json", action="store_true", help="print the status file as JSON")
    asks = [commands.add_parser(name, help=text) for name, text in CONTROL_HELP.items()]
    for command in (status, *asks):
        command.add_argument("app", nargs="?", metavar="APP",
                             help="the app, when the config runs several")
    commands.add_parser("events", help="print the event log for people (see: events --help)",
                        add_help=False)
    commands.add_parser("init", help="write a commented supervisor.toml for this clone "
                        "(see: init --help)", add_help=False)
    for command in (run, check, status, *asks):
        command.add_argument("-c", "--config", default="supervisor.toml",
                             metavar="PATH", help="config file (default: ./supervisor.toml)")
    run.add_argument("--log-format", choices=("json", "text"),
                     help="event log format (overrides log.format)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="with the text format, show each step's actions too")
    fleet = commands.add_parser("fleet", help="fleet mode: every box of every group in etcd")
    fleet.add_argument("action", choices=("status",), help="status: boxes, slots, holds")
    fleet.add_argument("--json", action="store_true", help="print it as JSON")
    fleet.add_argument("-c", "--config", default="supervisor.toml", metavar="PATH",
                       help="config file (default: ./supervisor.toml)")
    demo = commands.add_parser("demo", help="show a whole deploy cycle in a temporary directory")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return dict(vars(parser.parse_args(argv)))


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(f"supervisor: {line}", file=sys.stderr)
    return EXIT_USAGE


CONTROL_HELP = {
    "deploy": "fetch now and deploy what is new (like kill -USR1)",
    "restart": "drain and restart the current release",
    "stop-child": "stop the app and keep it stopped (no crash restarts)",
    "start-child": "start the app again after stop-child",
    "rollback": "release mode: go back to the previous good release; hold this one",
    "reload": "read the config again (like systemctl reload); exits 1 with its problems",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["events"]:
        from supervisor.cli.viewer import main as events

        return events(argv[1:])
    if argv[:1] == ["init"]:
        from supervisor.cli.init import main as init

        return init(argv[1:])
    args = _parse(argv)
    if args["command"] == "demo":
        from supervisor.cli.demo import run_demo

        return run_demo(keep=bool(args["keep"]))
    return _with_config(args)


def _with_config(args: dict[str, object]) -> int:
    """The commands that read the config: check, status, the control requests and run."""
    from supervisor.core.config import ConfigError
    from supervisor.core.hostconfig import load_host

    try:
        host = load_host(str(args["config"]))
    except ConfigError as error:
        return _fail(error.problems)
    command = str(args["command"])
    if command == "check":
        return _check(host)
    if command == "status":
        return _statuses(host, args.get("app"), bool(args["json"]))  # type: ignore[arg-type]
    if command == "fleet":
        from supervisor.cli.fleetstatus import fleet_status

        return fleet_status(host, bool(args["json"]))
    if command == "reload":  # the process's, not one app's: any app's state dir reaches it
        return _ask(host.apps[0].app.state_dir, command)
    if command in CONTROL_HELP:
        config = _one_app(host, args.get("app"))  # type: ignore[arg-type]
        if config is None:
            return EXIT_USAGE
        return _ask(config.app.state_dir, command)
    return _run(host, args.get("log_format"), bool(args.get("verbose")))  # type: ignore[arg-type]


def _one_app(host: HostConfig, name: str | None) -> Config | None:
    """The app a command is for: the only one, or the one named; else one line, and None."""
    names = [app.app.name for app in host.apps]
    if name is None and len(host.apps) == 1:
        return host.apps[0]
    if name is None:
        _fail([f"name the app: one of {', '.join(names)}"])
        return None
    config = host.app(name)
    if config is None:
        _fail([f"no app {name!r} in {host.path}: the apps are {', '.join(names)}"])
    return config


def _check(host: HostConfig) -> int:
    """One app: the config with its defaults, as TOML. A main file: every app and where its
    state lives, and every app file with problems (exit 2: run would set it aside)."""
    from supervisor.core.config import format_config

    problems = [f"{app.app.name}: {p}" if host.main else p
                for app in host.apps for p in _startup_problems(app)]
    if not host.main:
        if problems:
            return _fail(problems)
        print(format_config(host.apps[0]), end="")
        if host.fleet is not None:  # the [fleet] table printed last: the connection's keys too
            print(_fleet_connection_toml(host.fleet), end="")
        return 0
    print(f"{host.path}: {len(host.apps)} app{'s' * (len(host.apps) != 1)}, "
          f"max_builds = {host.limits.max_builds}, max_fetches = {host.limits.max_fetches}")
    if host.fleet is not None:
        fleet = host.fleet
        print(f"fleet: box {fleet.box}, etcd {', '.join(fleet.endpoints)}, lease_ttl "
              f"{fleet.lease_ttl:g}s, solo_after "
              f"{'never' if fleet.solo_after is None else f'{fleet.solo_after:g}s'}")
    for app in host.apps:
        policy = "" if app.fleet is None else (
            f", fleet group {app.fleet.group}: max_parallel {app.fleet.max_parallel}, "
            f"canary {app.fleet.canary}")
        print(f"  {app.app.name}: {app.path} (state in {app.app.state_dir}{policy})")
    for broken in host.broken:
        _fail([f"{broken.path}: {problem}" for problem in broken.problems])
    if problems:
        _fail(problems)
    return EXIT_USAGE if host.broken or problems else 0


def _fleet_connection_toml(fleet: FleetConfig) -> str:
    """The keys of a single-app file's [fleet] that say how to reach etcd (never the password)."""
    from dataclasses import fields

    from supervisor.core.config import _toml_value

    lines = []
    for field in fields(fleet):
        value = getattr(fleet, field.name)
        if field.name == "password" and value is not None:
            value = "(set)"
        if value is not None:
            value = f"{value:g}s" if field.name in ("lease_ttl", "solo_after") else value
            lines.append(f"{field.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _statuses(host: HostConfig, name: str | None, as_json: bool) -> int:
    """One app: its full status. Many: a line each (or --json keyed by app), or APP's full."""
    if name is not None or not host.main:
        config = _one_app(host, name)
        return EXIT_USAGE if config is None else _status(config.app.state_dir, as_json)
    import json

    from supervisor.loop import control

    report: dict[str, object] = {}
    running = False
    for app in host.apps:
        status = control.read_status(app.app.state_dir)
        alive = control.running_pid(app.app.state_dir) is not None
        running |= alive
        if status is not None:
            control.refresh(status, alive)
        report[app.app.name] = status
    for broken in host.broken:
        report[broken.name] = {"config_problems": list(broken.problems)}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for app_name, status in report.items():
            print(_summary(app_name, status))  # type: ignore[arg-type]
    return 0 if running else 3


def _summary(name: str, status: dict[str, object] | None) -> str:
    """One app in one line: name, phase, live commit, and what it waits for."""
    from supervisor.core.display import short_commit

    if status is None:
        return f"{name}: never ran"
    if "config_problems" in status:
        problems = status["config_problems"]
        return f"{name}: not run, its file has problems: {problems[0]}"  # type: ignore[index]
    if not status.get("running", True):
        return f"{name}: not running (last: {status.get('phase')})"
    child = status.get("child") or {}
    line = f"{name}: {status.get('phase')}"
    if child:
        line += f", {short_commit(child.get('commit'))} pid {child.get('pid')}"  # type: ignore[union-attr]
    else:
        line += ", no app running"
    waiting = status.get("waiting")
    if waiting:
        line += f", {waiting.get('reason')}"  # type: ignore[union-attr]
    return line


def _startup_problems(config: Config) -> list[str]:
    """What `run` would refuse at start and can be seen without starting: the directories
    startup.claim needs and what GitRepo.prepare asks of the tree, in the same words. Only
    reads: a half-updated tree is left for `run` to repair, and no lock is taken."""
    problems = []
    stats_directory = os.path.dirname(config.drain.stats_file) if config.drain else ""
    # run makes app.state_dir (and its parents) before it looks for the stats directory.
    made = os.path.realpath(config.app.state_dir) + "/"
    if (config.drain and not os.path.isdir(stats_directory)
            and not made.startswith(os.path.realpath(stats_directory) + "/")):
        problems.append(f"drain.stats_file: directory {stats_directory} does not exist")
    if not os.path.isdir(config.app.cwd):
        problems.append(f"app.cwd: {config.app.cwd} is not a directory")
    problem = _tree_problem(config)
    return problems + ([problem] if problem else [])


def _tree_problem(config: Config) -> str | None:
    import subprocess

    from supervisor.drivers.gitrepo import NO_HOOKS, git_environment

    repo = config.git.repo
    if not os.path.isdir(repo):
        return f"git.repo: {repo} is not a directory"
    env = git_environment(os.environ, config.git.timeout)

    def git(*args: str) -> tuple[bool, str]:
        """(succeeded, stdout or git's complaint)"""
        try:
            done = subprocess.run(("git", *NO_HOOKS, *args), cwd=repo, env=env, text=True,
                                  capture_output=True, timeout=config.git.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            return False, str(error)
        return done.returncode == 0, (done.stdout if done.returncode == 0 else done.stderr).strip()

    ok, top = git("rev-parse", "--show-toplevel")
    if not ok and "dubious ownership" in top:
        return (f"git.repo: {repo} belongs to another user and git refuses it "
                "(\"dubious ownership\"): run the supervisor as the tree's owner, or name "
                "the tree in git's safe.directory")
    if not ok:
        return f"git.repo: {repo} is not a git working tree"
    if os.path.realpath(top) != os.path.realpath(repo):
        return f"git.repo: {repo} is inside {top}; name the top of the tree"
    if not git("rev-parse", "--verify", "-q", "HEAD^{commit}")[0]:
        return f"git.repo: {repo} has no commit checked out"
    on_branch, current = git("symbolic-ref", "--short", "-q", "HEAD")
    if config.git.branch is None and not on_branch:
        return "git.branch: HEAD is detached and no branch is configured"
    if config.git.branch is None and not git("config", "--get", f"branch.{current}.merge")[0]:
        return f"git.branch: branch {current} has no upstream; set git.remote and git.branch"
    if (config.git.remote is None and on_branch
            and git("config", "--get", f"branch.{current}.remote") == (True, ".")):
        return f"git.remote: {current} tracks a local branch; set git.remote"
    return None


def _ask(state_dir: str, request: str) -> int:
    """Send the request and wait (briefly) for the supervisor's answer: exit 0 once it took
    the request, 1 with its reason when the request cannot apply now, or when no answer came."""
    from supervisor.loop import control

    try:
        pid, answer = control.ask(state_dir, request)
    except LookupError as error:  # none runs, or none provably: nothing was signalled
        return _fail([str(error)])
    except OSError as error:
        return _fail([f"cannot reach the supervisor: {error.strerror}"])
    if answer is None:
        _fail([f"asked supervisor {pid} to {request}, but it did not answer within 5s: "
               "`supervisor events` shows what it does"])
        return 1
    if not answer.get("ok"):
        _fail([f"supervisor {pid} did not {request}: {answer.get('reason')} "
               f"(phase {answer.get('phase')})"])
        return 1
    print(f"asked supervisor {pid} to {request}; it did (now {answer.get('phase')}): "
          "`supervisor events` shows what follows")
    return 0


def _status(state_dir: str, as_json: bool) -> int:
    import json

    from supervisor.loop import control

    status = control.read_status(state_dir)
    running = control.running_pid(state_dir)
    if status is None:
        return _fail([f"no status in {state_dir}: the supervisor has never run here"])
    control.refresh(status, running is not None)
    try:
        print(json.dumps(status, indent=2) if as_json else control.describe_status(status))
        sys.stdout.flush()
    except BrokenPipeError:  # `supervisor status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if running is not None else 3


def under_journald() -> bool:
    """stderr is the journal's stream (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{info.st_dev}:{info.st_ino}"


def _run(host: HostConfig, log_format: str | None, verbose: bool = False) -> int:
    from supervisor.drivers.proc import seal_inherited_fds
    from supervisor.loop.footprint import forget_startup_modules, without_tls
    from supervisor.loop.startup import StartupError, claim

    seal_inherited_fds()  # what we inherited is not the apps' business
    without_tls()
    forget_startup_modules()
    claims: dict[str, Claim] = {}
    refused: list[tuple[str, str]] = []
    for app in host.apps:
        try:
            # One app: first of all, while fds 3.. are free, where it finds its sockets.
            claims[app.app.name] = claim(app, os.environ, place_sockets=not host.main)
        except StartupError as error:
            if not host.main:
                return _fail([str(error)])
            refused.append((app.app.name, str(error)))
    if not claims:
        return _fail([f"{name}: {error}" for name, error in refused])
    try:
        stream = _open_log_file(host.log)
    except OSError as error:
        return _fail([f"log.file: cannot open {host.log.file}: {error.strerror}"])
    try:
        return _serve(host, claims, refused, stream, log_format, verbose)
    except StartupError as error:
        return _fail([str(error)])
    except KeyboardInterrupt:
        return 130
    finally:
        if stream is not None:
            stream.close()


def _open_log_file(log: object) -> RotatingFile | None:
    """Rotated by size like the app's output, so the log cannot fill a small disk."""
    file, max_bytes, keep = log.file, log.max_bytes, log.keep  # type: ignore[attr-defined]
    if file is None:
        return None
    from supervisor.drivers.childlog import RotatingFile

    stream = RotatingFile(file, max_bytes, keep)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    stream.open()
    return stream


def _serve(host: HostConfig, claims: dict[str, Claim], refused: list[tuple[str, str]],
           stream: RotatingFile | None, log_format: str | None, verbose: bool = False) -> int:
    import asyncio

    from supervisor.drivers.eventlog import EventLog
    from supervisor.loop.host import Host

    log: EventLog = EventLog(stream, log_format or host.log.format)
    log.priority_prefix = stream is None and under_journald()
    log.verbose = verbose
    for name, error in refused:  # claimed by nobody: another supervisor, or a bad directory
        log.write("app.start_failed", {"app": None, "app_name": name, "error": error})
    runner = Host(host, log, claims, log_format_forced=log_format is not None)
    return asyncio.run(runner.run())
