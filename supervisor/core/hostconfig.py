"""What one supervisor process runs: a main file with a `[supervisor]` table naming app files (each
in today's single-app format), or a single-app file as before. What exists once per process (the
event log, the webhook listener) is configured in the main file; an app file with errors is set
aside with its problems while the others run.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.config import (
    Config,
    ConfigError,
    LogConfig,
    TriggerConfig,
    _Bad,
    _choice,
    _count,
    _keep,
    _Section,
    _size,
    _text,
    _trigger,
    default_state_dir,
    parse_config,
    read_toml,
)

MAIN_SECTIONS = ("supervisor", "log", "trigger")
MAIN_LOG_KEYS = ("file", "format", "max_bytes", "keep")  # the event log: once per process
PROCESS_WIDE = ("log.file", "log.format", "trigger")  # in an app file of a main file: refused


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
        return HostConfig(path, (config,), state_dir=config.app.state_dir, log=config.log,
                          trigger=config.trigger)
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
    if problems:
        raise ConfigError(problems)
    apps, broken = _load_apps(path, globs, state_dir, environ)
    return HostConfig(path, apps, broken, main=True, globs=globs, state_dir=state_dir, log=log,
                      trigger=trigger, limits=limits)


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


def _load_apps(main: str, globs: tuple[str, ...], state_dir: str,
               environ: Mapping[str, str]) -> tuple[tuple[Config, ...], tuple[BrokenApp, ...]]:
    apps: list[Config] = []
    broken: list[BrokenApp] = []
    seen: dict[str, str] = {}
    for file in app_files(main, globs):
        stem = os.path.splitext(os.path.basename(file))[0]
        try:
            config = load_app(file, state_dir, environ)
        except ConfigError as error:
            broken.append(BrokenApp(file, stem, tuple(error.problems)))
            continue
        name = config.app.name
        if name in seen:
            raise ConfigError([f"app.name: {name!r} names two apps: {seen[name]} and {file}"])
        seen[name] = file
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
