"""Command line: `run`, `check` and `demo`. Imports are lazy so that each command loads only
what it uses; exit code 2 with one line per problem for anything the user must fix.
"""

from __future__ import annotations

import os
import sys

from supervisor import __version__

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
    commands.add_parser("events", help="print the event log for people (see: events --help)",
                        add_help=False)
    for command in (run, check, status, *asks):
        command.add_argument("-c", "--config", default="supervisor.toml",
                             metavar="PATH", help="config file (default: ./supervisor.toml)")
    run.add_argument("--log-format", choices=("json", "text"),
                     help="event log format (overrides log.format)")
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
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["events"]:
        from supervisor.cli.viewer import main as events

        return events(argv[1:])
    args = _parse(argv)
    if args["command"] == "demo":
        from supervisor.cli.demo import run_demo

        return run_demo(keep=bool(args["keep"]))

    from supervisor.core.config import ConfigError, format_config, load_config

    try:
        config = load_config(str(args["config"]))
    except ConfigError as error:
        return _fail(error.problems)
    if args["command"] == "check":
        print(format_config(config), end="")
        return 0
    if args["command"] == "status":
        return _status(config.app.state_dir, bool(args["json"]))
    if args["command"] in CONTROL_HELP:
        return _ask(config.app.state_dir, str(args["command"]))
    return _run(config, args.get("log_format"))  # type: ignore[arg-type]


def _ask(state_dir: str, request: str) -> int:
    from supervisor.loop import control

    try:
        pid = control.send_request(state_dir, request)
    except LookupError as error:  # none runs, or none provably: nothing was signalled
        return _fail([str(error)])
    except OSError as error:
        return _fail([f"cannot reach the supervisor: {error.strerror}"])
    print(f"asked supervisor {pid} to {request}; `supervisor events` shows what it does")
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


def _stop_children_left_behind(config, notes: list[tuple[str, dict[str, object]]]  # type: ignore[no-untyped-def]
                               ) -> bool:
    """Stop the app (both generations, after an overlap) that state.json says a killed
    supervisor left running, if it provably is that app; True if one was stopped."""
    from supervisor.drivers.child import stop_stale_child_now
    from supervisor.drivers.statefile import StateStore

    store = StateStore(config.app.state_dir)
    persisted = store.load()
    stopped = False
    for record in (persisted.old_child, persisted.child):
        if record is not None:
            stopped |= stop_stale_child_now(record, config.app.stop_signal,
                                            config.app.stop_timeout,
                                            lambda event, facts: notes.append((event, facts)))
    if stopped:
        store.save(child=None, old_child=None)
    return stopped


def _run(config, log_format: str | None) -> int:  # type: ignore[no-untyped-def]
    from supervisor.loop.footprint import forget_startup_modules, without_tls

    without_tls()
    forget_startup_modules()
    listeners, inherited = [], False
    early_notes: list[tuple[str, dict[str, object]]] = []  # logged once the log exists
    if config.sockets:
        # First of all, while fds 3.. are still free: that is where the app will find them.
        from supervisor.drivers.sockets import SocketError, open_sockets
        from supervisor.loop import control

        running = control.running_pid(config.app.state_dir)
        if running is not None:
            return _fail([f"app.state_dir: pid {running} already runs a supervisor for this app "
                          f"({config.app.state_dir})"])
        try:
            listeners, inherited = open_sockets(config.sockets, os.environ)
        except SocketError as error:
            # The app a killed supervisor left behind may hold the socket: stop it, try again.
            if not _stop_children_left_behind(config, early_notes):
                return _fail([str(error)])
            try:
                listeners, inherited = open_sockets(config.sockets, os.environ)
            except SocketError as error:
                return _fail([str(error)])
    import asyncio

    from supervisor.drivers.eventlog import EventLog
    from supervisor.loop.service import Service, StartupError

    stream = None
    if config.log.file is not None:
        from supervisor.drivers.childlog import RotatingFile

        # Rotated by size like the app's output, so the log cannot fill a small disk.
        stream = RotatingFile(config.log.file, config.log.max_bytes, config.log.keep)
        try:
            os.makedirs(os.path.dirname(config.log.file), exist_ok=True)
            stream.open()
        except OSError as error:
            return _fail([f"log.file: cannot open {config.log.file}: {error.strerror}"])
    log = EventLog(stream, log_format or config.log.format)
    log.priority_prefix = stream is None and under_journald()
    try:
        service = Service(config, log, log_format_forced=log_format is not None,
                          listeners=listeners, inherited=inherited, early_notes=early_notes)
        return asyncio.run(service.run())
    except StartupError as error:
        return _fail([str(error)])
    except KeyboardInterrupt:
        return 130
    finally:
        if stream is not None:
            stream.close()
