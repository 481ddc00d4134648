"""`supervisor events`: the JSON event log printed for people, filtered by time, event name and
app, and followed as it grows, across rotation. It only reads; `--json` passes the matching lines
through unchanged, so its output stays valid for jq.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import IO, Any

from supervisor.core.display import short_commit
from supervisor.drivers.eventlog import parse_timestamp

POLL_INTERVAL = 0.25  # seconds between looks at a followed file: a person is watching, not a test
MAX_PARTIAL = 1 << 20  # an unfinished last line is held up to this size, then shown as it is

# The colour of an event's name, by the last part of the name (ANSI SGR codes).
RED, YELLOW, GREEN, CYAN, DIM = "31", "33", "32", "36", "2"
_KINDS = {
    RED: {"crash_looping", "crashed", "diverged", "dirty", "timed_out", "output_dropped"},
    YELLOW: {"restarting", "backing_off", "ignored", "lines_ignored",
             "stale_found", "stale_stopped", "stop_requested", "reverting", "waiting_for_drain"},
    GREEN: {"started", "succeeded", "satisfied", "tree_updated", "stopped"},
    DIM: {"output", "read", "fired"},
}
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


# ---------------------------------------------------------------------------------------------
# Formatting one line


def colour_of(event: str) -> str:
    name = event.rpartition(".")[2]
    if name.endswith("failed"):
        return RED
    return next((code for code, names in _KINDS.items() if name in names), CYAN)


def format_time(seconds: float, utc: bool) -> str:
    moment = datetime.fromtimestamp(seconds, UTC if utc else None)
    text = moment.strftime("%Y-%m-%d %H:%M:%S") + f".{moment.microsecond // 1000:03d}"
    return text + "Z" if utc else text


def escape_controls(text: str) -> str:
    """A child's line may hold terminal escapes; on our output they are shown, not obeyed."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def short(value: Any) -> Any:
    """Commits shortened to 12 characters, in nested values too: people compare prefixes."""
    if isinstance(value, str) and _COMMIT.fullmatch(value):
        return short_commit(value)
    if isinstance(value, dict):
        return {key: short(item) for key, item in value.items()}
    if isinstance(value, list):
        return [short(item) for item in value]
    return value


def format_value(value: Any) -> str:
    value = short(value)
    if isinstance(value, str) and value and value.isprintable() and " " not in value:
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def format_action(action: dict[str, Any]) -> str:
    action = dict(action)
    name = str(action.pop("action", "?"))
    args = ", ".join(f"{key}={format_value(value)}" for key, value in action.items()
                     if value is not None)
    return f"{name}({args})" if args else name


def format_record(record: dict[str, Any], *, utc: bool = False, colour: bool = False) -> str:
    """One event as one line for people: time, name, phases, facts, `=>` actions."""
    record = dict(record)
    seconds = parse_timestamp(record.pop("ts", None))
    event = str(record.pop("event"))
    parts = [format_time(seconds, utc) if seconds is not None else "-"]
    parts.append(f"\x1b[{colour_of(event)}m{event}\x1b[0m" if colour else event)
    if event == "child.output" and isinstance(record.get("line"), str):
        parts.append(_output_part(record))
    return " ".join(parts + _rest(record))


def _output_part(record: dict[str, Any]) -> str:
    """The app's own line, as it wrote it (its control characters escaped)."""
    line = escape_controls(record.pop("line"))
    cut = " [cut]" if record.pop("truncated", False) else ""
    return f"pid={record.pop('pid', '?')} {record.pop('stream', '?')}: {line}{cut}"


def _rest(record: dict[str, Any]) -> list[str]:
    """Phases, facts that say something, then `=>` actions."""
    parts = []
    before, after = record.pop("before", None), record.pop("after", None)
    if before is not None:
        parts.append(str(before) if before == after else f"{before}->{after}")
    actions = record.pop("actions", None)
    for key, value in record.items():
        if value is None or value == "" or value == {} or value == []:
            continue
        parts.append(f"{key}={format_value(value)}")
    if actions and isinstance(actions, list):
        parts.append("=> " + ", ".join(format_action(a) if isinstance(a, dict) else str(a)
                                       for a in actions))
    return parts


# ---------------------------------------------------------------------------------------------
# Choosing lines


def parse_since(text: str, now: float | None = None) -> float:
    """`10m`, `2h`, `1.5d` ago, or an RFC 3339 time (without an offset: local time)."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        now = time.time() if now is None else now
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a time like 2026-11-24T23:04:30Z or an age like 10m, 2h; got {text!r}"
        ) from None
    return moment.timestamp()  # a naive time is taken as local time


class Printer:
    """Decides for each line of the log whether and how it is printed."""

    def __init__(self, out: IO[str], *, since: float | None = None,
                 patterns: list[str] | None = None, as_json: bool = False, utc: bool = False,
                 colour: bool = False, apps: list[str] | None = None) -> None:
        self.out, self.since, self.patterns = out, since, patterns or []
        self.apps = set(apps or ())
        self.as_json, self.utc, self.colour = as_json, utc, colour
        self.last_seen: float | None = None  # the time of the last event read

    def line(self, text: str) -> None:
        text = text.rstrip("\r\n")
        if not text.strip():
            return
        record = _record(text)
        if record is None:
            self._plain(text)
            return
        if not self._wanted(record):
            return
        if self.as_json:
            self.out.write(text + "\n")
        else:
            self.out.write(format_record(record, utc=self.utc, colour=self.colour) + "\n")


    def _plain(self, text: str) -> None:
        """Not an event (the app's own output, when it shares the stream): shown with the
        events around it, unless only events were asked for."""
        if self.as_json or self.patterns or self.apps:
            return
        if self.since is not None and (self.last_seen is None or self.last_seen < self.since):
            return
        self.out.write(escape_controls(text) + "\n")

    def _wanted(self, record: dict[str, Any]) -> bool:
        seconds = parse_timestamp(record.get("ts"))
        if seconds is not None:
            self.last_seen = seconds
        if self.since is not None and (seconds is None or seconds < self.since):
            return False
        if self.patterns and not any(fnmatchcase(record["event"], p) for p in self.patterns):
            return False
        return not self.apps or self._about_apps(record)

    def _about_apps(self, record: dict[str, Any]) -> bool:
        """An app's own lines, and the process's lines about it (`app.added`, a broken file's
        `app.config_failed`...), which carry `app` null and name it in `app_name`: asked for
        one app, a person wants to see it being added, set aside or removed too."""
        app, named = record.get("app"), record.get("app_name")
        if isinstance(app, str):
            return app in self.apps
        return app is None and isinstance(named, str) and named in self.apps


def _record(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("event"), str):
        return record
    return None


# ---------------------------------------------------------------------------------------------
# Reading


def _split(data: bytes, partial: bytes) -> tuple[list[bytes], bytes]:
    *lines, partial = (partial + data).split(b"\n")
    if len(partial) > MAX_PARTIAL:
        lines.append(partial)
        partial = b""
    return lines, partial


def follow(path: str, on_line: Callable[[str], None], on_batch: Callable[[], None],
           stop: Callable[[], bool] = lambda: False, interval: float = POLL_INTERVAL) -> None:
    """Read `path` from its start, then whatever is appended, like `tail -F`: a file that is
    replaced (rotation) is read to its end and then the new one from its start; a file that
    shrinks (truncation) is read again from its start; a missing file is waited for."""
    file: IO[bytes] | None = None
    partial = b""
    try:
        while not stop():
            if file is None:
                try:
                    file = open(path, "rb")  # noqa: SIM115
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
                partial = b""
            lines, partial = _split(file.read(), partial)
            for raw in lines:
                on_line(raw.decode("utf-8", errors="replace"))
            on_batch()
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is None or current.st_ino != os.fstat(file.fileno()).st_ino:
                lines, partial = _split(file.read(), partial)  # what came before the rename
                for raw in [*lines, partial] if partial else lines:
                    on_line(raw.decode("utf-8", errors="replace"))
                partial = b""
                on_batch()
                file.close()
                file = None
                continue
            if current.st_size < file.tell():
                file.seek(0)
                partial = b""
                continue
            time.sleep(interval)
    finally:
        if file is not None:
            file.close()


def rotated(path: str) -> list[str]:
    """The rotated copies of `path` that exist (path.1, path.2...), oldest first."""
    directory, _, name = path.rpartition("/")
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        return []
    numbers = sorted((int(entry[len(name) + 1:]) for entry in entries
                      if entry.startswith(name + ".") and entry[len(name) + 1:].isdigit()),
                     reverse=True)
    return [f"{path}.{number}" for number in numbers]


def read_all(stream: IO[bytes], on_line: Callable[[str], None],
             each_line: Callable[[], None]) -> None:
    for raw in _lines(stream):
        on_line(raw.decode("utf-8", errors="replace"))
        each_line()


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        raw = stream.readline(MAX_PARTIAL)
        if not raw:
            return
        yield raw


# ---------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `supervisor events`, without the file (cli.py gets it from the config)."""
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep reading as the log grows, across rotation")
    parser.add_argument("--since", type=parse_since, metavar="WHEN",
                        help="only events from WHEN on: RFC 3339 (2026-11-24T23:00:00Z) or an "
                             "age (30s, 10m, 2h, 1d)")
    parser.add_argument("--event", action="append", default=[], metavar="PATTERN",
                        help="only events whose name matches this glob (child.*); repeatable")
    parser.add_argument("--app", action="append", default=[], metavar="NAME",
                        help="only the lines of this app (a main file runs several), and the "
                             "process's lines about it (app.added...); repeatable")
    parser.add_argument("--json", action="store_true",
                        help="print the matching lines unchanged, as JSON for jq")
    parser.add_argument("--utc", action="store_true", help="times in UTC instead of local time")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour event names: auto (default) on a terminal unless NO_COLOR "
                             "is set")


def use_colour(choice: str, out: IO[str]) -> bool:
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def run(args: argparse.Namespace, path: str | None, unit: str | None = None) -> int:
    """Print the log at `path` ("-" or None: standard input) as asked in `args`. With no path
    at all (no log.file), standard input that brings nothing is an error with a hint naming
    `unit`: a script must not take "no log here" for "no events"."""
    out = sys.stdout
    printer = Printer(out, since=args.since, patterns=args.event, as_json=args.json,
                      utc=args.utc, colour=use_colour(args.color, out), apps=args.app)
    from_stdin = path is None or path == "-"
    if from_stdin and (sys.stdin is None or sys.stdin.isatty()):
        return _no_log(unit)
    try:
        if from_stdin:
            # A pipe (journalctl -f) is shown as it comes; a redirected file in one go.
            piped = not _is_regular(sys.stdin.fileno())
            seen = False

            def on_line(text: str) -> None:
                nonlocal seen
                seen = True
                printer.line(text)

            read_all(sys.stdin.buffer, on_line, out.flush if piped else _nothing)
            if path is None and not seen:
                return _no_log(unit)
        else:
            # What rotation kept comes first; missing copies were rotated away meanwhile.
            for older in rotated(str(path)):
                try:
                    with open(older, "rb") as file:
                        read_all(file, printer.line, _nothing)
                except FileNotFoundError:
                    pass
            if args.follow:
                follow(str(path), printer.line, out.flush)
            else:
                with open(str(path), "rb") as file:
                    read_all(file, printer.line, _nothing)
        out.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    except OSError as error:
        print(f"supervisor events: cannot read {path}: {error.strerror}", file=sys.stderr)
        return 2
    return 0


MAIN_UNIT = "tiny-supervisor"  # the shipped unit that runs a main file (many apps)


def unit_hint(unit: str | None) -> str:
    """The journal of the shipped units: the template's instance is the config's name
    (tiny-supervisor@NAME reads /etc/tiny-supervisor/NAME.toml); a main file runs under
    tiny-supervisor, and its lines are told apart by --app."""
    if unit == MAIN_UNIT:
        return f"journalctl -u {MAIN_UNIT} -o cat | supervisor events --app NAME"
    template = f"tiny-supervisor@{unit or 'NAME'}"
    return (f"journalctl -u {template} -o cat | supervisor events "
            f"(-u {MAIN_UNIT} for a main file of many apps)")


def _no_log(unit: str | None) -> int:
    print("supervisor events: no log to read: log.file is not set, so the log goes to stderr "
          f"(under systemd, the journal), and nothing came on standard input; e.g. "
          f"{unit_hint(unit)}", file=sys.stderr)
    return 2


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _nothing() -> None:
    pass


def log_file_from_config(config: str | None) -> tuple[str | None, list[str]]:
    """`log.file` of the config (`-c`, else ./supervisor.toml if there is one): the log to
    read, or None for standard input; and the config's problems, if any."""
    path, problems, _ = _from_config(config)
    return path, problems


def _from_config(config: str | None) -> tuple[str | None, list[str], str | None]:
    """log.file, the config's problems, and the unit it runs under: a main file's is
    tiny-supervisor; a single app's, the template's instance named after the config file, as in
    /etc/tiny-supervisor/NAME.toml, else after app.name."""
    if config is None:
        if not os.path.exists("supervisor.toml"):
            return None, [], None
        config = "supervisor.toml"
    from supervisor.core.config import ConfigError, parse_config, read_toml

    try:
        data = read_toml(config)
        if "supervisor" in data:
            return (*_main_log_file(data, config), MAIN_UNIT)
        loaded = parse_config(data, os.path.abspath(config))
    except ConfigError as error:
        return None, error.problems, None
    stem = os.path.splitext(os.path.basename(config))[0]
    unit = stem if stem != "supervisor" else loaded.app.name
    return (None if loaded.log.file is None else str(loaded.log.file)), [], unit


def _main_log_file(data: dict[str, Any], config: str) -> tuple[str | None, list[str]]:
    """The event log of a main file, from its [log] alone: the app files are not read, since
    a broken one must not keep anyone from the log that says what is wrong with it."""
    from supervisor.core.hostconfig import _main_log

    problems: list[str] = []
    log = _main_log(data.get("log", {}), os.path.dirname(os.path.abspath(config)), problems)
    return (None if problems or log.file is None else str(log.file)), problems


def main(argv: list[str] | None = None) -> int:
    """`supervisor events [-c PATH] [--file PATH] [options]`; a FILE argument works too."""
    parser = argparse.ArgumentParser(prog="supervisor events",
                                     description="Print the JSON event log for people.")
    parser.add_argument("file", nargs="?",
                        help="the JSON event log, read after its rotated copies FILE.N ... "
                             "FILE.1; - for standard input (default: log.file of the config)")
    parser.add_argument("--file", dest="file_option", metavar="PATH", help="the same as FILE")
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="config whose log.file to read (default: ./supervisor.toml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    path = args.file or args.file_option
    unit = None
    if path is None:
        path, problems, unit = _from_config(args.config)
        if problems:
            for problem in problems:
                print(f"supervisor: {problem}", file=sys.stderr)
            return 2
    return run(args, path, unit)


if __name__ == "__main__":
    raise SystemExit(main())
