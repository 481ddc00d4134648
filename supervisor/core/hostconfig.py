"""What one supervisor process runs: a main file with a `[supervisor]` table naming app files (each
in today's single-app format), or a single-app file as before. What exists once per process (the
event log, the webhook listener) is configured in the main file; an app file with errors is set
aside with its problems while the others run.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.config import (
    _NAME,
    FLEET_CONNECTION_KEYS,
    Config,
    ConfigError,
    LogConfig,
    TriggerConfig,
    _Bad,
    _choice,
    _count,
    _keep,
    _positive_duration,
    _Section,
    _size,
    _text,
    _trigger,
    default_state_dir,
    parse_config,
    read_toml,
)

MAIN_SECTIONS = ("supervisor", "log", "trigger", "fleet")
MAIN_LOG_KEYS = ("file", "format", "max_bytes", "keep")  # the event log: once per process
# In an app file of a main file: refused, they exist once per process.
PROCESS_WIDE = ("log.file", "log.format", "trigger",
                *(f"fleet.{key}" for key in FLEET_CONNECTION_KEYS))
MIN_LEASE_TTL = 2.0  # etcd refuses shorter leases at its default election timeout


@dataclass(frozen=True, slots=True)
class Limits:
    """Shared by every app of the process, so that N apps are no N-fold load on a tiny box."""

    max_builds: int = 1  # builds running at once; more wait in a queue
    max_fetches: int = 2  # git fetches running at once


@dataclass(frozen=True, slots=True)
class BrokenApp:
    """An app file that could not be used: reported at start and in `status`; the rest run."""

    path: str
    name: str
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """[fleet] in the main file: how this box reaches etcd and who it is among the boxes."""

    endpoints: tuple[str, ...]
    box: str
    ca: str | None = None  # verifies etcd's certificate (https endpoints)
    cert: str | None = None  # this box's client certificate ...
    key: str | None = None  # ... and its key
    user: str | None = None  # or etcd's user/password authentication
    password: str | None = field(default=None, repr=False)
    lease_ttl: float = 10.0  # a box that dies is gone from the group (its slot free) after this
    solo_after: float | None = None  # etcd out of reach this long: deploy alone; None: never
    prefix: str = "/tiny-supervisor"  # every key of ours lives under it


@dataclass(frozen=True, slots=True)
class HostConfig:
    path: str
    apps: tuple[Config, ...]
    broken: tuple[BrokenApp, ...] = ()
    main: bool = False  # a main file with [supervisor]; False: one app file, as before
    globs: tuple[str, ...] = ()
    state_dir: str = ""  # where the process's own files live (its lock, its status)
    log: LogConfig = field(default_factory=LogConfig)
    trigger: TriggerConfig | None = None
    limits: Limits = field(default_factory=Limits)
    fleet: FleetConfig | None = None

    def app(self, name: str) -> Config | None:
        return next((a for a in self.apps if a.app.name == name), None)


def load_host(path: str, environ: Mapping[str, str] | None = None) -> HostConfig:
    """The apps this process runs. Raises ConfigError (exit 2) only when the main file itself is
    broken, two apps share a name, or no app at all is valid."""
    environ = os.environ if environ is None else environ
    path = os.path.abspath(path)
    data = read_toml(path)
    if "supervisor" not in data:
        config = parse_config(data, path, environ)
        fleet = None
        if config.fleet is not None:  # a box of one app: its [fleet] says both
            problems = []
            fleet = fleet_connection(data["fleet"], os.path.dirname(path), problems)
            if problems:
                raise ConfigError(problems)
        return HostConfig(path, (config,), state_dir=config.app.state_dir, log=config.log,
                          trigger=config.trigger, fleet=fleet)
    problems: list[str] = []
    base = os.path.dirname(path)
    for section in sorted(set(data) - set(MAIN_SECTIONS)):
        problems.append(f"{section}: does not belong in a main file (expected "
                        f"{', '.join(MAIN_SECTIONS)}; an app's own tables go in its app file)")
    table = _Section("supervisor", data["supervisor"], problems)
    globs = table.get("apps", _globs, (), required=True)
    state_dir = table.get("state_dir", _text, None)
    state_dir = (os.path.join(base, os.path.expanduser(state_dir)) if state_dir
                 else default_state_dir("", environ).rstrip("/"))
    limits = Limits(max_builds=table.get("max_builds", _count, 1),
                    max_fetches=table.get("max_fetches", _count, 2))
    table.finish()
    log = _main_log(data.get("log", {}), base, problems)
    trigger = (_trigger(_Section("trigger", data["trigger"], problems), base, problems)
               if "trigger" in data else None)
    fleet = None
    if "fleet" in data:
        fleet = fleet_connection(data["fleet"], base, problems, main=True)
    if problems:
        raise ConfigError(problems)
    apps, broken = _load_apps(path, globs, state_dir, environ, fleet is not None)
    return HostConfig(path, apps, broken, main=True, globs=globs, state_dir=state_dir, log=log,
                      trigger=trigger, limits=limits, fleet=fleet)


def _globs(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise _Bad('a list of file patterns, e.g. ["apps/*.toml"]')
    return tuple(value)


def _main_log(table: object, base: str, problems: list[str]) -> LogConfig:
    section = _Section("log", table, problems)
    file = section.get("file", _text)
    config = LogConfig(
        format=section.get("format", _choice("json", "text"), "json"),
        file=os.path.realpath(os.path.join(base, os.path.expanduser(file))) if file else None,
        max_bytes=section.get("max_bytes", _size, 1 << 20),
        keep=section.get("keep", _keep, 3))
    for key in sorted(set(section.table) - set(MAIN_LOG_KEYS)):
        section.used.add(key)
        problems.append(f"log.{key}: belongs in each app file (the main file's [log] is the "
                        f"event log: {', '.join(MAIN_LOG_KEYS)})")
    section.finish()
    return config


def app_files(main: str, globs: tuple[str, ...]) -> list[str]:
    """Every file the globs match, relative to the main file, sorted, the main file left out."""
    base = os.path.dirname(main)
    found: set[str] = set()
    for pattern in globs:
        for match in glob.glob(os.path.join(base, os.path.expanduser(pattern))):
            if os.path.isfile(match):
                found.add(os.path.abspath(match))
    found.discard(os.path.abspath(main))
    return sorted(found)


def _load_apps(main: str, globs: tuple[str, ...], state_dir: str, environ: Mapping[str, str],
               has_fleet: bool) -> tuple[tuple[Config, ...], tuple[BrokenApp, ...]]:
    apps: list[Config] = []
    broken: list[BrokenApp] = []
    seen: dict[str, str] = {}
    groups: dict[str, str] = {}  # fleet group -> the app file that is this box's member
    for file in app_files(main, globs):
        stem = os.path.splitext(os.path.basename(file))[0]
        try:
            config = load_app(file, state_dir, environ)
        except ConfigError as error:
            broken.append(BrokenApp(file, stem, tuple(error.problems)))
            continue
        if config.fleet is not None and not has_fleet:
            broken.append(BrokenApp(file, config.app.name, (
                "fleet: the main file has no [fleet] (endpoints: how this box reaches etcd)",)))
            continue
        if config.fleet is not None and config.fleet.group in groups:
            broken.append(BrokenApp(file, config.app.name, (
                f"fleet.group: {config.fleet.group!r} is the group of "
                f"{groups[config.fleet.group]} too; a box is one member of a group",)))
            continue
        name = config.app.name
        if name in seen:
            raise ConfigError([f"app.name: {name!r} names two apps: {seen[name]} and {file}"])
        seen[name] = file
        if config.fleet is not None:
            groups[config.fleet.group] = file
        apps.append(config)
    if not apps:
        problems = [f"supervisor.apps: no valid app file matches {list(globs)}"]
        problems += [f"{b.path}: {p}" for b in broken for p in b.problems]
        raise ConfigError(problems)
    return tuple(apps), tuple(broken)


def load_app(file: str, state_dir: str, environ: Mapping[str, str]) -> Config:
    """An app file of a main file: named after the file unless app.name says otherwise, its
    state in state_dir/NAME unless app.state_dir says otherwise."""
    data: dict[str, Any] = read_toml(file)
    problems = [f"{key}: belongs in the main file, once for all apps"
                for key in PROCESS_WIDE if _has(data, key)]
    if problems:
        raise ConfigError(problems)
    app = data.get("app")
    if isinstance(app, dict):
        app = dict(app)
        name = app.setdefault("name", os.path.splitext(os.path.basename(file))[0])
        if isinstance(name, str) and "/" not in name and name not in (".", ".."):
            app.setdefault("state_dir", os.path.join(state_dir, name))
        data = {**data, "app": app}
    return parse_config(data, file, environ)


def _has(data: Mapping[str, Any], dotted: str) -> bool:
    table, _, key = dotted.partition(".")
    value = data.get(table)
    return value is not None and (not key or (isinstance(value, dict) and key in value))


def fleet_connection(table: object, base: str, problems: list[str],
                     main: bool = False) -> FleetConfig:
    """How this process reaches etcd. In a main file, the rollout policy keys belong to each
    app file; in a single-app file one [fleet] holds both."""
    section = _Section("fleet", table, problems)
    endpoints = section.get("endpoints", _endpoints, (), required=True)
    paths = {name: section.get(name, _text) for name in ("ca", "cert", "key")}
    for name, value in paths.items():
        if value is not None:
            paths[name] = _readable(f"fleet.{name}", os.path.join(base, os.path.expanduser(
                value)), problems)
    user, password = section.get("user", _text), section.get("password", _text)
    config = FleetConfig(
        endpoints=endpoints,
        box=section.get("box", _box_name, None) or _box_name(os.uname().nodename),
        ca=paths["ca"], cert=paths["cert"], key=paths["key"], user=user, password=password,
        lease_ttl=section.get("lease_ttl", _lease_ttl, 10.0),
        solo_after=section.get("solo_after", _positive_duration, None),
        prefix=section.get("prefix", _prefix, "/tiny-supervisor"))
    if main:
        for key in ("group", "max_parallel", "canary"):
            if key in section.table:
                section.used.add(key)
                problems.append(f"fleet.{key}: belongs in each app file (the main file's "
                                "[fleet] says how this box reaches etcd)")
    else:
        section.used.update(("group", "max_parallel", "canary"))  # the app's policy
    section.finish()
    if (config.cert is None) != (config.key is None):
        problems.append("fleet.cert: expected both cert and key (a client certificate), "
                        "or neither")
    if (user is None) != (password is None):
        problems.append("fleet.user: expected both user and password, or neither")
    if len({endpoint.split(":", 1)[0] for endpoint in endpoints}) > 1:
        problems.append("fleet.endpoints: expected all https:// or all http://")
    return config


def _endpoints(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    hint = 'a list of etcd client URLs, e.g. ["https://10.0.0.5:2379"]'
    if not isinstance(value, list) or not value:
        raise _Bad(hint)
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(
                r"https?://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+):[0-9]{1,5}/?", item):
            raise _Bad(hint + f" (got {item!r})" if isinstance(item, str) else hint)
    return tuple(v.rstrip("/") for v in value)


def _box_name(value: object) -> str:
    text = _text(value)
    if not _NAME.match(text):
        raise _Bad("a name of letters, digits, '.', '_' and '-' (default: the host name)")
    return text


def _lease_ttl(value: object) -> float:
    seconds = _positive_duration(value)
    if seconds < MIN_LEASE_TTL:
        raise _Bad(f'a duration of at least {MIN_LEASE_TTL:g}s, such as "10s"')
    return seconds


def _prefix(value: object) -> str:
    text = _text(value)
    if not text.startswith("/") or text.endswith("/") or not re.fullmatch(r"[\w./-]+", text):
        raise _Bad('a key prefix such as "/tiny-supervisor" (starts with /, no trailing /)')
    return text


def _readable(key: str, path: str, problems: list[str]) -> str | None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        problems.append(f"{key}: cannot read {path}: {error.strerror}")
        return None
    return os.path.realpath(path)
