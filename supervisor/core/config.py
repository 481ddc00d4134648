"""`supervisor.toml` as frozen data: read once with tomllib, every problem reported at once as
one line naming the key and what was expected. Nothing here starts or touches anything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from supervisor.core.condition import Condition, ConditionError, parse_condition

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DURATION_HINT = 'a duration such as 10, "500ms", "30s", "5m" or "1h"'
HEALTH_TIMEOUT = 60.0  # health.timeout's default: the deadline for proving health


class ConfigError(Exception):
    """Every problem found, one line each, ready for the user."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    command: tuple[str, ...]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    state_dir: str = "."
    oom_score_adj: int = 0  # the app's; the kernel's OOM killer spares lower values first


@dataclass(frozen=True, slots=True)
class GitConfig:
    repo: str
    remote: str | None = None
    branch: str | None = None
    poll_interval: float = 300.0
    timeout: float = 120.0
    on_diverge: str = "report"


@dataclass(frozen=True, slots=True)
class BuildConfig:
    command: tuple[str, ...]
    timeout: float = 600.0
    min_free: int = 0  # bytes of MemAvailable a build waits for; 0: never waits
    nice: int = 10  # CPU niceness of the build; with it, the lowest best-effort IO priority
    memory_max: int = 0  # bytes: a hard cap, in a cgroup of the build's own; 0: no cap


@dataclass(frozen=True, slots=True)
class DeployConfig:
    mode: str = "in-place"  # or "releases": build beside the live release, switch `current`
    dir: str = ""  # releases/, failed/ and the `current` link; default: app.state_dir
    keep: int = 3  # good releases kept on disk, the live one included


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """How a newly started child proves it is healthy; at most one probe, else just `grace`."""

    grace: float = 5.0  # it must stay up this long (besides passing the probe)
    tcp: str | None = None  # "127.0.0.1:8080": a connect succeeds
    http: str | None = None  # "http://127.0.0.1:8080/up": a GET answers 2xx
    command: tuple[str, ...] | None = None  # exits 0
    notify: bool = False  # READY=1 on the NOTIFY_SOCKET the supervisor gives the child
    interval: float = 1.0  # between probes
    probe_timeout: float = 2.0  # one probe
    timeout: float = HEALTH_TIMEOUT

    @property
    def probe(self) -> str | None:
        for kind in ("tcp", "http", "command"):
            if getattr(self, kind) is not None:
                return kind
        return "notify" if self.notify else None


@dataclass(frozen=True, slots=True)
class DrainConfig:
    stats_file: str
    until: Condition
    timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class RestartConfig:
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    reset_after: float = 10.0
    style: str = "stop-start"  # or "overlap": the next generation starts before this one stops
    overlap_reserve: int = 32 << 20  # MemAvailable left over once a second generation runs


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "json"
    file: str | None = None
    child: str = "events"  # the app's output: "events", "file" or "inherit"
    child_file: str | None = None  # with child = "file"; default: child.log in app.state_dir
    max_bytes: int = 1 << 20  # a log file past this size is rotated to FILE.1
    keep: int = 3  # rotated copies kept
    # The app's captured lines: at most `burst` per `interval` (as journald's RateLimitBurst=
    # and RateLimitIntervalSec=), the rest counted and dropped; 0: no limit.
    child_rate_limit_burst: int = 1000
    child_rate_limit_interval: float = 10.0


@dataclass(frozen=True, slots=True)
class SocketConfig:
    listen: str  # "127.0.0.1:8080", "[::1]:8080" or an absolute Unix socket path
    name: str = "socket0"  # in LISTEN_FDNAMES
    mode: int | None = None  # permissions of a Unix socket file


@dataclass(frozen=True, slots=True)
class TriggerConfig:
    listen: str
    secret: str = field(repr=False)
    path: str | None = "/"  # None: any path
    burst: int = 5
    refill: float = 10.0


@dataclass(frozen=True, slots=True)
class FleetPolicy:
    """[fleet] in an app file: how a new commit rolls out across the boxes of the app's group
    (the connection to etcd is the main file's, once per process: see hostconfig)."""

    group: str
    max_parallel: int = 1  # boxes of the group out (stopped, restarting, on probation) at once
    canary: int = 1  # boxes that take a new commit first; the rest follow once it is proven


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    app: AppConfig
    git: GitConfig
    build: BuildConfig | None
    drain: DrainConfig | None
    restart: RestartConfig
    log: LogConfig
    trigger: TriggerConfig | None = None
    sockets: tuple[SocketConfig, ...] = ()
    deploy: DeployConfig = field(default_factory=DeployConfig)
    health: HealthConfig | None = None  # None: no health gate (in-place mode only)
    fleet: FleetPolicy | None = None

    @property
    def releases(self) -> bool:
        return self.deploy.mode == "releases"


# ---------------------------------------------------------------------------------------------
# Value readers: each returns the value or raises _Bad with what was expected.


class _Bad(Exception):
    pass


def _describe(value: object) -> str:
    # Escaped, so that a multi-line TOML string cannot split a problem over several lines.
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _describe(name)


def parse_duration(value: object) -> float:
    """Seconds from 10, 2.5, "500ms", "30s", "5m" or "1h"; never negative."""
    if isinstance(value, bool):
        raise _Bad(DURATION_HINT)
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # tomllib reads integers of any size
            raise _Bad(DURATION_HINT + " (not negative, under ten years)") from None
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise _Bad(DURATION_HINT)
    if not 0 <= seconds < 10 * 365 * 86400:
        raise _Bad(DURATION_HINT + " (not negative, under ten years)")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise _Bad(DURATION_HINT + ", more than zero")
    return seconds


# Nobody polls a git remote more than once a second: below that, a value is a slip of the unit
# ("1ms" for "1m"), and each fetch is a git process (with ssh or TLS, a handshake) on a tiny box.
MIN_POLL_INTERVAL = 1.0


def _poll_interval(value: object) -> float:
    seconds = parse_duration(value)
    if seconds < MIN_POLL_INTERVAL:
        raise _Bad(DURATION_HINT + f", at least {MIN_POLL_INTERVAL:g}s (a fetch is a git "
                   "process; did you mean minutes?)")
    return seconds


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty string")
    if "\x00" in value:
        raise _Bad("a string without NUL characters")
    return value


def _command(value: object) -> tuple[str, ...]:
    """A string runs through /bin/sh -c; a list is an argv run as is."""
    if isinstance(value, str) and value.strip() and "\x00" not in value:
        return ("/bin/sh", "-c", value)
    if (isinstance(value, list) and value
            and all(isinstance(a, str) and a and "\x00" not in a for a in value)):
        return tuple(value)
    raise _Bad("a command string (run with /bin/sh -c) or a non-empty list of strings")


def _env(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Bad("a table of NAME = \"value\" strings")
    for name, item in value.items():
        if not name or "=" in name or "\x00" in name:
            raise _Bad(f"variable names without '=' (got {_describe(name)})")
        if not isinstance(item, str) or "\x00" in item:
            raise _Bad(f"string values (got {_describe(item)} for {_key(name)})")
    return dict(value)


def _signal(value: object) -> signal.Signals:
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"):
            return signal.Signals[name]
    raise _Bad('a signal name such as "SIGTERM", "SIGINT" or "SIGQUIT"')


def _choice(*choices: str) -> Callable[[object], str]:
    def read(value: object) -> str:
        if value not in choices:
            raise _Bad(" or ".join(f'"{c}"' for c in choices))
        return str(value)
    return read


def _condition(value: object) -> Condition:
    text = _text(value)
    try:
        return parse_condition(text)
    except ConditionError as error:
        raise _Bad(f'comparisons joined by "and", like "n_clients == 0": {error}') from None


# ---------------------------------------------------------------------------------------------
# Sections


class _Section:
    """Reads one table, collecting problems instead of stopping at the first."""

    def __init__(self, name: str, table: object, problems: list[str]) -> None:
        self.name, self.problems = name, problems
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table ([{name}])")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def get(self, key: str, read: Callable[[Any], Any], default: Any = None,
            required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                self.problems.append(f"{self.name}.{key}: missing; expected a value")
            return default
        value = self.table[key]
        try:
            return read(value)
        except _Bad as bad:
            self.problems.append(f"{self.name}.{key}: expected {bad}, got {_describe(value)}")
            return default

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.used):
            self.problems.append(f"{self.name}.{_key(key)}: unknown key")


def default_state_dir(name: str, environ: Mapping[str, str]) -> str:
    """systemd's StateDirectory= when we run under it (already one per unit instance), else
    the XDG state home."""
    if environ.get("STATE_DIRECTORY"):
        return environ["STATE_DIRECTORY"].split(":")[0]
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "supervisor", name)


_SECTIONS = ("app", "git", "build", "drain", "restart", "log", "trigger", "deploy", "health",
             "fleet")
# [fleet] keys that say how this process reaches etcd: read once per process by hostconfig
# (from the main file, or from a single-app file's own [fleet]).
FLEET_CONNECTION_KEYS = ("endpoints", "box", "ca", "cert", "key", "user", "password",
                         "lease_ttl", "solo_after", "prefix")
_ARRAYS = ("socket",)  # [[socket]] tables
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):([0-9]{1,5})$")  # as parse_listen
MIN_SECRET = 16


def parse_config(data: Mapping[str, Any], path: str,
                 environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML; raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    path = os.fspath(path)
    # Relative paths are relative to the config file itself, not to a symlink that reaches it:
    # one config is one app, with one state directory, however it is named.
    base = os.path.dirname(os.path.realpath(path))

    def path_reader(value: object) -> str:
        return os.path.realpath(os.path.join(base, os.path.expanduser(_text(value))))

    for section in sorted(set(data) - set(_SECTIONS) - set(_ARRAYS)):
        problems.append(f"{_key(section)}: unknown section "
                        f"(expected one of {', '.join(_SECTIONS)})")
    # The readers run in this order so that problems are listed as the sections are read.
    git_config = _git(data, base, path_reader, problems)
    app_config = _app(data, git_config.repo, path_reader, environ, problems)
    build_config = _build(data, problems)
    drain_config = _drain(data, base, path_reader, problems)
    restart_config = _restart(data, problems)
    log_config = _log(data, app_config.state_dir, path_reader, problems)
    trigger_config = None
    if "trigger" in data:
        trigger_config = _trigger(_Section("trigger", data["trigger"], problems), base, problems)
    sockets = _sockets(data.get("socket", []), base, problems)
    deploy_config = _deploy(data, app_config.state_dir, path_reader, problems)
    health_config = None
    if "health" in data:
        health_config = _health(_Section("health", data["health"], problems), problems)
    elif deploy_config.mode == "releases" or restart_config.style == "overlap":
        health_config = HealthConfig()  # rollback needs probation: by default, staying up
    if restart_config.style == "overlap":
        _overlap_problems(deploy_config, sockets, health_config, problems)
    fleet_policy = None
    if "fleet" in data:
        fleet_policy = _fleet(_Section("fleet", data["fleet"], problems), app_config.name,
                              deploy_config, problems)

    if problems:
        raise ConfigError(problems)
    return Config(path, app_config, git_config, build_config, drain_config, restart_config,
                  log_config, trigger_config, sockets, deploy_config, health_config,
                  fleet_policy)


def _git(data: Mapping[str, Any], base: str, path_reader: Callable[[object], str],
         problems: list[str]) -> GitConfig:
    git = _Section("git", data.get("git", {}), problems)
    config = GitConfig(
        repo=git.get("repo", path_reader, os.path.realpath(base)),
        remote=git.get("remote", _text),
        branch=git.get("branch", _text),
        poll_interval=git.get("poll_interval", _poll_interval, 300.0),
        timeout=git.get("timeout", _positive_duration, 120.0),
        on_diverge=git.get("on_diverge", _choice("report", "reset"), "report"),
    )
    git.finish()
    return config


def _app(data: Mapping[str, Any], repo: str, path_reader: Callable[[object], str],
         environ: Mapping[str, str], problems: list[str]) -> AppConfig:
    """[app]: its name defaults to the repository's, and names the default state directory."""
    app = _Section("app", data.get("app"), problems) if "app" in data else None
    if app is None:
        problems.append("app: missing section; expected [app] with at least command = \"...\"")
        app = _Section("app", {}, [])
    name = app.get("name", _text, os.path.basename(repo) or "app")
    if "/" in name or name in (".", ".."):
        problems.append(f"app.name: expected a name without '/', got {_describe(name)}")
    config = AppConfig(
        name=name,
        command=app.get("command", _command, ("/bin/false",), required=True),
        cwd=app.get("cwd", path_reader, repo),
        env=app.get("env", _env, {}),
        stop_signal=app.get("stop_signal", _signal, signal.SIGTERM),
        stop_timeout=app.get("stop_timeout", parse_duration, 10.0),
        state_dir=app.get("state_dir", path_reader, None) or default_state_dir(name, environ),
        oom_score_adj=app.get("oom_score_adj", _oom_score_adj, 0),
    )
    app.finish()
    return config


def _build(data: Mapping[str, Any], problems: list[str]) -> BuildConfig | None:
    if "build" not in data:
        return None
    build = _Section("build", data["build"], problems)
    config = BuildConfig(
        command=build.get("command", _command, ("/bin/true",), required=True),
        timeout=build.get("timeout", _positive_duration, 600.0),
        min_free=build.get("min_free", _free_memory, 0),
        nice=build.get("nice", _nice, 10),
        memory_max=build.get("memory_max", _memory_max, 0),
    )
    build.finish()
    return config


def _drain(data: Mapping[str, Any], base: str, path_reader: Callable[[object], str],
           problems: list[str]) -> DrainConfig | None:
    if "drain" not in data:
        return None
    drain = _Section("drain", data["drain"], problems)
    config = DrainConfig(
        stats_file=drain.get("stats_file", path_reader, base, required=True),
        until=drain.get("until", _condition, Condition(()), required=True),
        timeout=drain.get("timeout", parse_duration, 0.0),
    )
    drain.finish()
    return config


def _restart(data: Mapping[str, Any], problems: list[str]) -> RestartConfig:
    restart = _Section("restart", data.get("restart", {}), problems)
    config = RestartConfig(
        backoff_min=restart.get("backoff_min", _positive_duration, 1.0),
        backoff_max=restart.get("backoff_max", _positive_duration, 60.0),
        reset_after=restart.get("reset_after", parse_duration, 10.0),
        style=restart.get("style", _choice("stop-start", "overlap"), "stop-start"),
        overlap_reserve=restart.get("overlap_reserve", _free_memory, 32 << 20),
    )
    if config.backoff_max < config.backoff_min:
        problems.append("restart.backoff_max: expected a duration not below restart.backoff_min")
    restart.finish()
    return config


def _log(data: Mapping[str, Any], state_dir: str, path_reader: Callable[[object], str],
         problems: list[str]) -> LogConfig:
    log = _Section("log", data.get("log", {}), problems)
    config = LogConfig(
        format=log.get("format", _choice("json", "text"), "json"),
        file=log.get("file", path_reader),
        child=log.get("child", _choice("events", "file", "inherit"), "events"),
        child_file=log.get("child_file", path_reader)
        or os.path.join(state_dir, "child.log"),
        max_bytes=log.get("max_bytes", _size, 1 << 20),
        keep=log.get("keep", _keep, 3),
        child_rate_limit_burst=log.get("child_rate_limit_burst", _line_count, 1000),
        child_rate_limit_interval=log.get("child_rate_limit_interval", _positive_duration,
                                          10.0),
    )
    log.finish()
    return config


def _deploy(data: Mapping[str, Any], state_dir: str, path_reader: Callable[[object], str],
            problems: list[str]) -> DeployConfig:
    deploy = _Section("deploy", data.get("deploy", {}), problems)
    config = DeployConfig(
        mode=deploy.get("mode", _choice("in-place", "releases"), "in-place"),
        dir=deploy.get("dir", path_reader, None) or state_dir,
        keep=deploy.get("keep", _releases_kept, 3),
    )
    deploy.finish()
    return config


def _overlap_problems(deploy: DeployConfig, sockets: tuple[SocketConfig, ...],
                   health: HealthConfig | None, problems: list[str]) -> None:
    """What restart.style = "overlap" needs of the other sections."""
    if deploy.mode != "releases" or not sockets:
        problems.append('restart.style: "overlap" needs deploy.mode = "releases" (each '
                        "generation runs from its own release) and a [[socket]] (both serve on "
                        "the socket the supervisor holds)")
    if health is not None:
        shared = {s.listen for s in sockets}
        probed = health.tcp or _http_address(health.http)
        if probed in shared:
            problems.append(f"health.{health.probe}: expected notify, a command or grace "
                            f'with restart.style = "overlap": {probed} is the shared socket, '
                            "where the old generation would answer for the new one")


def _fleet(section: _Section, app_name: str, deploy: DeployConfig,
           problems: list[str]) -> FleetPolicy:
    """The rollout policy. Fleet mode needs release mode: a canary that fails a commit must be
    able to go back to the release that proved healthy, and the group then holds the commit."""
    policy = FleetPolicy(
        group=section.get("group", _group_name, app_name),
        max_parallel=section.get("max_parallel", _count, 1),
        canary=section.get("canary", _canary_count, 1))
    section.used.update(FLEET_CONNECTION_KEYS)  # the process's: checked by hostconfig
    section.finish()
    if deploy.mode != "releases":
        problems.append('fleet: needs deploy.mode = "releases" (a box that fails a new commit '
                        "rolls back to the release that proved healthy, and the group holds "
                        "the commit)")
    return policy


def _group_name(value: object) -> str:
    text = _text(value)
    if not _NAME.match(text):
        raise _Bad("a name of letters, digits, '.', '_' and '-'")
    return text


def _whole_number(low: int, high: int, expected: str) -> Callable[[object], int]:
    """A reader of whole numbers from `low` to `high`; true and false are not numbers here."""
    def read(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Bad(expected)
        return value

    return read


_releases_kept = _whole_number(1, 100, "a whole number from 1 to 100 (the live release counts)")


_line_count = _whole_number(0, 10**9, "a number of lines from 0 (no limit) to 1000000000")


_nice = _whole_number(0, 19, "a niceness from 0 (as the supervisor) to 19 (lowest priority)")


_oom_score_adj = _whole_number(-1000, 1000, "a whole number from -1000 (never killed for lack "
                                            "of memory) to 1000 (killed first)")


def _memory_max(value: object) -> int:
    """A build's hard memory cap: 0 for none, else at least 16 MiB (an interpreter and git)."""
    if value == 0 or value == "0":
        return 0
    hint = 'a size such as "300MiB" (at least 16MiB), or 0 for no cap'
    try:
        size = _size(value)
    except _Bad:
        raise _Bad(hint) from None
    if size < 16 << 20:
        raise _Bad(hint)
    return size


def _free_memory(value: object) -> int:
    """Like _size, but 0 is allowed: it means "do not wait"."""
    if value == 0 or value == "0":
        return 0
    return _size(value)


def _http_url(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"http://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+)(:[0-9]{1,5})?(/\S*)?", text):
        raise _Bad('a plain-HTTP URL such as "http://127.0.0.1:8080/up" (no https: the probe '
                   "runs on loopback)")
    return text


def _http_address(url: str | None) -> str | None:
    """host:port of a plain-HTTP URL, as [[socket]] listen addresses are written."""
    if url is None:
        return None
    authority = url.removeprefix("http://").split("/", 1)[0]
    return authority if re.search(r":[0-9]+$", authority) else authority + ":80"


def _health(section: _Section, problems: list[str]) -> HealthConfig:
    """[health]: at most one probe; without one, surviving `grace` is the proof."""
    probes = {
        "tcp": section.get("tcp", _listen),
        "http": section.get("http", _http_url),
        "command": section.get("command", _command),
        "notify": section.get("notify", _flag, False) or None,
    }
    chosen = [name for name, value in probes.items() if value is not None]
    if len(chosen) > 1:
        problems.append(f"health.{chosen[1]}: expected at most one probe of tcp, http, command "
                        f"and notify (also set: {chosen[0]})")
    config = HealthConfig(
        grace=section.get("grace", parse_duration, 0.0 if chosen else 5.0),
        tcp=probes["tcp"], http=probes["http"], command=probes["command"],
        notify=bool(probes["notify"]),
        interval=section.get("interval", _positive_duration, 1.0),
        probe_timeout=section.get("probe_timeout", _positive_duration, 2.0),
        timeout=section.get("timeout", _positive_duration, HEALTH_TIMEOUT),
    )
    if config.timeout <= config.grace:
        problems.append("health.timeout: expected a duration longer than health.grace")
    section.finish()
    return config


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _socket_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _Bad("a name of letters, digits, '_', '.' or '-' (it goes into LISTEN_FDNAMES)")
    return value


def _mode(value: object) -> int:
    if isinstance(value, str) and value and all(c in "01234567" for c in value):
        value = int(value, 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise _Bad('permissions such as "0660" or 0o660')
    return value


def _sockets(tables: object, base: str, problems: list[str]) -> tuple[SocketConfig, ...]:
    """[[socket]] entries: bound by the supervisor, handed to every generation of the app."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append("socket: expected [[socket]] tables with listen = \"127.0.0.1:8080\"")
        return ()
    sockets = []
    for index, table in enumerate(tables):
        section = _Section("socket", table, problems)
        listen = _socket_listen(section.get("listen", _text, "", required=True), base, problems)
        mode = section.get("mode", _mode)
        if mode is not None and listen and not listen.startswith("/"):
            problems.append("socket.mode: expected only for a Unix socket path")
        sockets.append(SocketConfig(listen, section.get("name", _socket_name, f"socket{index}"),
                                    mode))
        section.finish()
    names = [s.name for s in sockets]
    if len(set(names)) != len(names):
        problems.append("socket.name: expected a different name for each [[socket]]")
    listens = [s.listen for s in sockets]
    if len(set(listens)) != len(listens):
        problems.append("socket.listen: expected a different address for each [[socket]]")
    return tuple(sockets)


def _socket_listen(listen: str, base: str, problems: list[str]) -> str:
    """A Unix socket path made absolute, or an address whose form and port are checked."""
    if listen.startswith(("/", "./", "../", "~")):
        return os.path.realpath(os.path.join(base, os.path.expanduser(listen)))
    if listen and not _LISTEN.match(listen):
        problems.append(f'socket.listen: expected "127.0.0.1:8080", "[::1]:8080" or a Unix '
                        f'socket path such as "/run/app.sock", got {_describe(listen)}')
    elif listen:
        port = int(_LISTEN.match(listen).group(2))  # type: ignore[union-attr]
        if not 0 < port < 65536:
            problems.append(f"socket.listen: expected a port from 1 to 65535, got {port}")
    return listen


def _listen(value: object) -> str:
    text = _text(value)
    match = _LISTEN.match(text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise _Bad('an address and port such as "127.0.0.1:9000" or "[::1]:9000"')
    return text


_SIZE = re.compile(r"^\s*(\d{1,16})\s*(B|KiB|MiB|GiB)?\s*$")  # int() refuses 4301 digits
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _size(value: object) -> int:
    """Bytes, from 1048576, "512KiB" or "1MiB"; at least 64 KiB so a capped line fits a file."""
    hint = 'a size such as 1048576, "512KiB" or "1MiB", at least 64KiB'
    if isinstance(value, bool):
        raise _Bad(hint)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise _Bad(hint)
    if not 64 << 10 <= size <= 1 << 40:
        raise _Bad(hint)
    return size


_keep = _whole_number(0, 100, "a whole number from 0 to 100")


_count = _whole_number(1, 1000, "a whole number from 1 to 1000")


_canary_count = _whole_number(0, 1000, "a whole number from 0 (no canary: every box at once, "
                                       "within max_parallel) to 1000")


def _trigger(section: _Section, base: str, problems: list[str]) -> TriggerConfig | None:
    """The push webhook; its secret comes from the config or, better, from a file of its own."""
    listen = section.get("listen", _listen, "", required=True)
    secret = section.get("secret", _text)
    secret_file = section.get("secret_file", _text)
    path = section.get("path", _text, "/")
    config = TriggerConfig(listen=listen, secret="", path=None if path == "*" else path,
                           burst=section.get("burst", _count, 5),
                           refill=section.get("refill", _positive_duration, 10.0))
    section.finish()
    if (secret is None) == (secret_file is None):
        problems.append("trigger.secret: expected exactly one of secret or secret_file")
        return None
    if secret_file is not None:
        secret_path = os.path.join(base, os.path.expanduser(secret_file))
        try:
            if not stat.S_ISREG(os.stat(secret_path).st_mode):  # a FIFO would block the open
                raise OSError(0, "not a regular file")
            with open(secret_path, "rb") as file:
                secret = file.read(4096).decode().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"trigger.secret_file: cannot read {secret_path}: "
                            f"{getattr(error, 'strerror', None) or 'not UTF-8 text'}")
            return None
    if secret is None or len(secret) < MIN_SECRET:
        problems.append(f"trigger.secret: expected at least {MIN_SECRET} characters "
                        "(make one with: openssl rand -hex 32)")
        return None
    return TriggerConfig(config.listen, secret, config.path, config.burst, config.refill)


MAX_CONFIG_BYTES = 256 * 1024


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; every failure becomes a ConfigError."""
    return parse_config(read_toml(path), os.path.abspath(path), environ)


def read_toml(path: str) -> dict[str, Any]:
    """A config file's tables; every failure to read or parse it becomes a ConfigError."""
    import tomllib  # start-up only: `supervisor run` drops it before the loop starts

    path = os.fspath(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the open below
            raise ConfigError([f"{path}: not a regular file"])
        if info.st_size > MAX_CONFIG_BYTES:  # tomllib slows down badly on some huge inputs
            raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a config is "
                               "a few hundred"])
        with open(path, "rb") as file:
            data = tomllib.loads(file.read(MAX_CONFIG_BYTES + 1).decode())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file (use -c PATH to name the config)"]) from None
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid TOML: not UTF-8 text"]) from None
    except ValueError:  # tomllib lets int()'s limit through: "Exceeds the limit (4300 digits)"
        raise ConfigError([f"{path}: not valid TOML: a number of more than 4300 digits"]
                          ) from None
    except RecursionError:
        raise ConfigError([f"{path}: not valid TOML: nested too deeply"]) from None
    return data


# ---------------------------------------------------------------------------------------------
# `supervisor check` prints the effective config back as TOML.


def _toml_value(value: object) -> str:
    if isinstance(value, tuple) and value[:2] == ("/bin/sh", "-c") and len(value) == 3:
        return _toml_value(value[2])
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return _toml_scalar(value)


def _toml_scalar(value: object) -> str:
    # bool and Signals are ints too: they are told apart first.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, signal.Signals):
        return f'"{value.name}"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # every float in a Config is a duration in seconds
        if value.is_integer():
            return f'"{int(value)}s"'
        return f'"{value!r}s"' if "e" not in repr(value) else repr(value)
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif (char < " " and char != "\t") or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def format_config(config: Config) -> str:
    """The config as a reader expects it, [app] first and the [[socket]] tables last, and as
    TOML that loads back to an equal Config."""
    lines = [f"# effective config from {config.path}"]
    for section in _SECTIONS:
        value = getattr(config, section)
        if value is None:
            continue
        lines.append(f"\n[{section}]")
        assert is_dataclass(value)
        for item in fields(value):
            item_value = getattr(value, item.name)
            if item.name == "secret":
                lines.append("# secret: set (not shown)")
            elif section == "trigger" and item.name == "path" and item_value is None:
                lines.append('path = "*"')
            elif item_value is not None:
                lines.append(f"{item.name} = {_toml_value(item_value)}")
    for sock in config.sockets:
        lines.append("\n[[socket]]")
        lines += [f"listen = {_toml_value(sock.listen)}", f"name = {_toml_value(sock.name)}"]
        if sock.mode is not None:
            lines.append(f'mode = "{sock.mode:04o}"')
    return "\n".join(lines) + "\n"
