"""`supervisor.toml`: every mistake is exit code 2 and one line per problem naming the key and
what was expected (through the real CLI), the full table of problems through parse_config, the
valid forms and defaults, and `supervisor check` printing a config that loads back equal.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.core.condition import parse_condition
from supervisor.core.config import (
    AppConfig,
    BuildConfig,
    Config,
    ConfigError,
    DeployConfig,
    DrainConfig,
    GitConfig,
    HealthConfig,
    LogConfig,
    RestartConfig,
    default_state_dir,
    format_config,
    load_config,
    parse_config,
    parse_duration,
)
from tests.helpers_git import git, make_repos

ENVIRON = {"HOME": "/home/someone"}
MINIMAL = '[app]\ncommand = "./server"\n'
DURATION_KEYS = [
    ("app", "stop_timeout"), ("git", "poll_interval"), ("git", "timeout"), ("build", "timeout"),
    ("drain", "timeout"), ("restart", "backoff_min"), ("restart", "backoff_max"),
    ("restart", "reset_after"),
]
# Sections that need their required keys when present.
REQUIRED = {"app": {"command": "x"}, "build": {"command": "make"},
            "drain": {"stats_file": "stats", "until": "n_clients == 0"}}


def cli_check(config: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "check", "-c", str(config)], cwd=cwd,
        capture_output=True, text=True, timeout=30, check=False,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str],
                       *expected: str | tuple[str, ...]) -> list[str]:
    """Exit 2, nothing on stdout, no traceback, exactly one `supervisor: ` line per expected
    line; an expected line is a fragment or a tuple of fragments found together in one line."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert all(line.startswith("supervisor: ") for line in lines), lines
    assert len(lines) == len(expected), lines
    for fragments in expected:
        together = (fragments,) if isinstance(fragments, str) else fragments
        assert any(all(f in line for f in together) for line in lines), (together, lines)
    return lines


def problems(data: dict[str, Any], path: Path = Path("/srv/app/supervisor.toml")) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path, ENVIRON)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def with_app(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"app": {"command": "./server"}}
    for name, table in sections.items():
        data[name] = {**REQUIRED.get(name, {}), **table} if isinstance(table, dict) else table
    return data


# ---------------------------------------------------------------------------------------------
# Through the real CLI


# (id, file content, expected lines: each a fragment or a tuple of fragments of the same line)
CLI_CASES: list[tuple[str, str | bytes, list[str | tuple[str, ...]]]] = [
    ("invalid TOML", "[app\ncommand = 'x'\n", ["not valid TOML"]),
    ("unclosed string", '[app]\ncommand = "x\n', ["not valid TOML"]),
    ("not UTF-8", b'[app]\ncommand = "caf\xe9"\n', ["not valid TOML: not UTF-8 text"]),
    ("empty file", "", ["app: missing section; expected [app]"]),
    ("missing [app]", "[git]\npoll_interval = 10\n", ["app: missing section; expected [app]"]),
    ("[app] not a table", "app = 3\n", ["app: expected a table", "app.command: missing"]),
    ("missing app.command", "[app]\nname = 'web'\n", ["app.command: missing; expected"]),
    ("unknown section", MINIMAL + "[deployment]\nx = 1\n", ["deployment: unknown section"]),
    ("unknown key", MINIMAL + "comand = 'y'\n", ["app.comand: unknown key"]),
    ("garbage duration", MINIMAL + "[git]\npoll_interval = '10x'\n",
     [('git.poll_interval: expected a duration such as 10, "500ms"', 'got "10x"')]),
    ("negative duration", MINIMAL + "stop_timeout = -1\n",
     [("app.stop_timeout: expected a duration", "not negative", "got -1")]),
    ("boolean duration", MINIMAL + "[restart]\nreset_after = true\n",
     [("restart.reset_after: expected a duration", "got True")]),
    ("zero poll interval", MINIMAL + "[git]\npoll_interval = 0\n",
     [("git.poll_interval: expected a duration", "at least 1s")]),
    ("poll interval in ms", MINIMAL + "[git]\npoll_interval = '1ms'\n",
     [('git.poll_interval: expected a duration such as 10, "500ms", "30s", "5m" or "1h", at '
       'least 1s (a fetch is a git process; did you mean minutes?), got "1ms"',)]),
    ("poll interval just under a second", MINIMAL + "[git]\npoll_interval = 0.999\n",
     [("git.poll_interval: expected", "at least 1s", "got 0.999")]),
    ("duration as a table", MINIMAL + "[build]\ncommand = 'make'\ntimeout = {s = 1}\n",
     ["build.timeout: expected a duration"]),
    ("unknown signal", MINIMAL + "stop_signal = 'SIGFOO'\n",
     [('app.stop_signal: expected a signal name such as "SIGTERM"', 'got "SIGFOO"')]),
    ("uncatchable signal", MINIMAL + "stop_signal = 'SIGKILL'\n", ["app.stop_signal: expected"]),
    ("signal as a number", MINIMAL + "stop_signal = 15\n", ["app.stop_signal: expected"]),
    ("on_diverge maybe", MINIMAL + "[git]\non_diverge = 'maybe'\n",
     ['git.on_diverge: expected "report" or "reset", got "maybe"']),
    ("log format xml", MINIMAL + "[log]\nformat = 'xml'\n",
     ['log.format: expected "json" or "text", got "xml"']),
    ("until without value", MINIMAL + "[drain]\nstats_file = 's'\nuntil = 'n_clients =='\n",
     [("drain.until: expected comparisons joined by \"and\"", "at the end")]),
    ("until with =", MINIMAL + "[drain]\nstats_file = 's'\nuntil = 'n_clients = 0'\n",
     [("drain.until: expected", "column 11")]),
    ("until is shell", MINIMAL + "[drain]\nstats_file = 's'\nuntil = 'rm -rf /'\n",
     [("drain.until: expected", "column 4")]),
    ("until with or", MINIMAL + "[drain]\nstats_file = 's'\nuntil = 'a == 1 or b == 2'\n",
     [("drain.until: expected", "found 'or'")]),
    ("until missing", MINIMAL + "[drain]\nstats_file = 's'\n", ["drain.until: missing"]),
    ("backoff inverted", MINIMAL + "[restart]\nbackoff_min = '10s'\nbackoff_max = '5s'\n",
     ["restart.backoff_max: expected a duration not below restart.backoff_min"]),
    ("env not strings", MINIMAL + "env = { PORT = 8080 }\n",
     ["app.env: expected string values (got 8080 for PORT)"]),
    ("env not a table", MINIMAL + "env = 'PORT=1'\n", ["app.env: expected a table"]),
    ("command empty list", "[app]\ncommand = []\n", ["app.command: expected a command string"]),
    ("command list of numbers", "[app]\ncommand = [1, 2]\n", ["app.command: expected"]),
    ("huge integer duration", MINIMAL + "[git]\npoll_interval = 1" + "0" * 400 + "\n",
     ["git.poll_interval: expected a duration"]),
    ("deeply nested array", MINIMAL + "x = " + "[" * 3000 + "]" * 3000 + "\n",
     ["not valid TOML"]),
    ("several problems", "[app]\nstop_signal = 'SIGFOO'\nbogus = 1\n[git]\ntimeout = '1y'\n"
     "[log]\nformat = 'xml'\n[extra]\n",
     ["app.command: missing", "app.stop_signal:", "app.bogus: unknown key", "git.timeout:",
      "log.format:", "extra: unknown section"]),
]


# A wrong value for every duration key, each in its own file.
_WRONG = ["'10x'", "-1", "true", "[5]", "'soon'", "'-2s'", "{ s = 1 }", "'1d'"]
for (_section, _key), _value in zip(DURATION_KEYS, _WRONG, strict=True):
    _table = "" if _section == "app" else f"[{_section}]\n" + "".join(
        f"{k} = {v!r}\n".replace("'", '"') for k, v in REQUIRED.get(_section, {}).items())
    CLI_CASES.append((f"{_section}.{_key} = {_value}", f"{MINIMAL}{_table}{_key} = {_value}\n",
                      [(f"{_section}.{_key}: expected a duration such as 10", "got ")]))


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory,
                ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every CLI case at once: the subprocesses run side by side, each test reads its own."""
    base = tmp_path_factory.mktemp("cli")
    running = {}
    for index, (name, content, _) in enumerate(CLI_CASES):
        path = base / str(index) / "supervisor.toml"
        path.parent.mkdir()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        argv = [sys.executable, "-m", "supervisor", "check", "-c", str(path)]
        running[name] = (argv, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (argv, process) in running.items():
        stdout, stderr = process.communicate(timeout=30)
        results[name] = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize(("name", "fragments"), [(c[0], c[2]) for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_reports_each_problem_on_one_line(
        cli_results: dict[str, subprocess.CompletedProcess[str]], name: str,
        fragments: list[str | tuple[str, ...]]) -> None:
    lines = assert_usage_error(cli_results[name], *fragments)
    for line in lines:
        assert len(line) < 300


def test_cli_missing_file(tmp_path: Path) -> None:
    lines = assert_usage_error(cli_check(Path("supervisor.toml"), cwd=tmp_path), "no such file")
    assert "-c PATH" in lines[0]


def test_cli_config_path_is_a_directory(tmp_path: Path) -> None:
    assert_usage_error(cli_check(tmp_path), "not a regular file")


def test_cli_config_path_is_a_fifo_and_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "supervisor.toml"
    os.mkfifo(fifo)
    assert_usage_error(cli_check(fifo), "not a regular file")


def test_cli_a_multiline_value_still_gives_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.toml"
    path.write_text('[app]\ncommand = "x"\nstop_signal = """SIG\nFOO"""\n'
                    '[drain]\nstats_file = "s"\nuntil = """n_clients == 0\nor ready == 1"""\n')
    assert_usage_error(cli_check(path), "app.stop_signal:", "drain.until:")


def test_cli_check_prints_the_effective_config(tmp_path: Path) -> None:
    path = make_repos(tmp_path).work / "supervisor.toml"  # check refuses what run would
    path.write_text(MINIMAL)
    result = cli_check(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = tomllib.loads(result.stdout)
    assert printed["app"]["command"] == "./server"
    assert printed["git"]["poll_interval"] == "300s"
    assert printed["restart"] == {"backoff_min": "1s", "backoff_max": "60s",
                                  "reset_after": "10s", "style": "stop-start",
                                  "overlap_reserve": 33554432}
    assert printed["deploy"]["mode"] == "in-place"
    assert "health" not in printed


FULL = """
[app]
name = "web"
command = ["./server", "--port", "8080"]
cwd = "srv"
env = { PORT = "8080", "WITH SPACE" = "a \\"quoted\\" \\\\ value" }
stop_signal = "INT"
stop_timeout = "2500ms"

[git]
repo = "repo"
remote = "upstream"
branch = "release"
poll_interval = "5m"
timeout = 30
on_diverge = "reset"

[build]
command = "make && make install"
timeout = "1h"

[drain]
stats_file = "/tmp/SERVER_STATS"
until = "n_clients == 0 and mode != 'busy'"
timeout = 2.5

[restart]
backoff_min = "500ms"
backoff_max = "2m"
reset_after = 0

[log]
format = "text"
file = "logs/events.log"
"""


@pytest.mark.parametrize("text", [MINIMAL, FULL], ids=["minimal", "full"])
def test_check_output_loads_back_to_an_equal_config(tmp_path: Path, text: str) -> None:
    repos = make_repos(tmp_path)  # check refuses what run would: a clone, FULL's directories
    conf = repos.work
    git(tmp_path, "clone", "-q", str(repos.remote), str(conf / "repo"))
    (conf / "srv").mkdir()
    path = conf / "supervisor.toml"
    path.write_text(text)
    result = cli_check(path)
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "elsewhere" / "printed.toml"
    copy.parent.mkdir()
    copy.write_text(result.stdout)
    original, reloaded = load_config(path), load_config(copy)
    assert dataclasses.replace(reloaded, path=original.path) == original


# ---------------------------------------------------------------------------------------------
# parse_config: the full table of problems


BAD_DURATIONS = ["10x", "", "ten", "-5s", "5 minutes", "1d", -1, -0.5, True, False, [10], {},
                 float("inf"), float("nan"), "1e3", 10 * 365 * 86400]


@pytest.mark.parametrize(("section", "key"), DURATION_KEYS)
@pytest.mark.parametrize("value", BAD_DURATIONS, ids=repr)
def test_bad_durations_name_the_key(section: str, key: str, value: object) -> None:
    [problem] = problems(with_app(**{section: {key: value}}))
    assert problem.startswith(f"{section}.{key}: expected a duration such as 10")


PROBLEM_TABLE: list[tuple[dict[str, Any], str]] = [
    ({}, "app: missing section"),
    ({"app": {}}, "app.command: missing; expected a value"),
    ({"app": {"command": ""}}, "app.command: expected a command string"),
    ({"app": {"command": "  "}}, "app.command: expected a command string"),
    ({"app": {"command": ["a", ""]}}, "app.command: expected"),
    ({"app": {"command": ["a", "b\x00"]}}, "app.command: expected"),
    ({"app": {"command": 5}}, "app.command: expected"),
    (with_app(app={"command": "x", "name": "a/b"}), "app.name: expected a name without '/'"),
    (with_app(app={"command": "x", "name": ".."}), "app.name: expected a name without '/'"),
    (with_app(app={"command": "x", "name": 3}), "app.name: expected a non-empty string"),
    (with_app(app={"command": "x", "cwd": ""}), "app.cwd: expected a non-empty string"),
    (with_app(app={"command": "x", "cwd": 1}), "app.cwd: expected a non-empty string"),
    (with_app(app={"command": "x", "state_dir": []}), "app.state_dir: expected"),
    (with_app(app={"command": "x", "env": {"A": 1}}), "app.env: expected string values"),
    (with_app(app={"command": "x", "env": {"A": ["b"]}}), "app.env: expected string values"),
    (with_app(app={"command": "x", "env": {"A=B": "c"}}), "app.env: expected variable names"),
    (with_app(app={"command": "x", "env": {"": "c"}}), "app.env: expected variable names"),
    (with_app(app={"command": "x", "env": {"A": "\x00"}}), "app.env: expected string values"),
    (with_app(app={"command": "x", "stop_signal": "SIGFOO"}), "app.stop_signal: expected"),
    (with_app(app={"command": "x", "stop_signal": "SIGKILL"}), "app.stop_signal: expected"),
    (with_app(app={"command": "x", "stop_signal": "STOP"}), "app.stop_signal: expected"),
    (with_app(app={"command": "x", "stop_signal": 15}), "app.stop_signal: expected"),
    (with_app(app={"command": "x", "stop_signal": ""}), "app.stop_signal: expected"),
    (with_app(app={"command": "x", "extra": 1}), "app.extra: unknown key"),
    (with_app(git=[]), "git: expected a table ([git])"),
    (with_app(git={"repo": ""}), "git.repo: expected a non-empty string"),
    (with_app(git={"remote": 1}), "git.remote: expected a non-empty string"),
    (with_app(git={"branch": ""}), "git.branch: expected a non-empty string"),
    (with_app(git={"on_diverge": "maybe"}), 'git.on_diverge: expected "report" or "reset"'),
    (with_app(git={"on_diverge": True}), "git.on_diverge: expected"),
    (with_app(git={"poll_interval": 0}), "git.poll_interval: expected a duration"),
    (with_app(git={"timeout": "0s"}), "git.timeout: expected a duration"),
    (with_app(git={"pull": True}), "git.pull: unknown key"),
    ({"app": {"command": "x"}, "build": {}}, "build.command: missing"),
    (with_app(build={"command": []}), "build.command: expected"),
    (with_app(build={"timeout": 0}), "build.timeout: expected a duration"),
    (with_app(build={"retries": 3}), "build.retries: unknown key"),
    ({"app": {"command": "x"}, "drain": {"until": "n == 0"}}, "drain.stats_file: missing"),
    ({"app": {"command": "x"}, "drain": {"stats_file": "s"}}, "drain.until: missing"),
    (with_app(drain={"stats_file": 7}), "drain.stats_file: expected a non-empty string"),
    (with_app(drain={"until": ""}), "drain.until: expected a non-empty string"),
    (with_app(drain={"until": 0}), "drain.until: expected a non-empty string"),
    (with_app(drain={"until": "n_clients =="}), "drain.until: expected comparisons joined"),
    (with_app(drain={"until": "n_clients = 0"}), "drain.until: expected comparisons joined"),
    (with_app(drain={"until": "rm -rf /"}), "drain.until: expected comparisons joined"),
    (with_app(drain={"until": "a == 1 or b == 2"}), "drain.until: expected comparisons"),
    (with_app(drain={"until": "$(reboot) == 0"}), "drain.until: expected comparisons"),
    (with_app(drain={"poll": 1}), "drain.poll: unknown key"),
    (with_app(restart={"backoff_min": 10, "backoff_max": 5}),
     "restart.backoff_max: expected a duration not below restart.backoff_min"),
    (with_app(restart={"backoff_max": "500ms"}),
     "restart.backoff_max: expected a duration not below restart.backoff_min"),
    (with_app(restart={"backoff_min": 0}), "restart.backoff_min: expected a duration"),
    (with_app(restart={"max_retries": 3}), "restart.max_retries: unknown key"),
    (with_app(log={"format": "xml"}), 'log.format: expected "json" or "text"'),
    (with_app(log={"format": "JSON"}), 'log.format: expected "json" or "text"'),
    (with_app(log={"file": ""}), "log.file: expected a non-empty string"),
    (with_app(log={"level": "debug"}), "log.level: unknown key"),
    (with_app(deploy={"mode": "blue-green"}), 'deploy.mode: expected "in-place" or "releases"'),
    (with_app(deploy={"keep": 0}), "deploy.keep: expected a whole number from 1 to 100"),
    (with_app(restart={"style": "overlap"}), 'restart.style: "overlap" needs deploy.mode'),
    (with_app(restart={"style": "blue-green"}), 'restart.style: expected "stop-start" or'),
    (with_app(restart={"style": "overlap"}, deploy={"mode": "releases"},
              socket=[{"listen": "127.0.0.1:8080"}], health={"http": "http://127.0.0.1:8080/"}),
     "health.http: expected notify, a command or grace with restart.style"),
    (with_app(health={"http": "https://127.0.0.1/up"}), "health.http: expected a plain-HTTP URL"),
    (with_app(health={"tcp": "localhost"}), "health.tcp: expected an address and port"),
    (with_app(health={"tcp": "127.0.0.1:80", "notify": True}),
     "health.notify: expected at most one probe of tcp, http, command and notify (also set: tcp)"),
    (with_app(health={"notify": "yes"}), "health.notify: expected true or false"),
    (with_app(health={"grace": "10s", "timeout": "5s"}),
     "health.timeout: expected a duration longer than health.grace"),
    (with_app(health={"probe": "tcp"}), "health.probe: unknown key"),
    (with_app(build={"command": "make", "min_free": "1KiB"}), "build.min_free: expected a size"),
    (with_app(build={"command": "make", "nice": 20}), "build.nice: expected a niceness"),
    (with_app(releases={}), "releases: unknown section (expected one of app, git, build"),
    (with_app(App={"command": "x"}), "App: unknown section"),
]


@pytest.mark.parametrize(("data", "expected"), PROBLEM_TABLE,
                         ids=[expected.split(":")[0] + f"-{i}"
                              for i, (_, expected) in enumerate(PROBLEM_TABLE)])
def test_problem_table(data: dict[str, Any], expected: str) -> None:
    found = problems(data)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found
    assert "\n" not in found[0]


def test_all_problems_are_reported_at_once() -> None:
    found = problems({
        "app": {"stop_signal": "SIGFOO", "stop_timeout": "10x", "typo": 1},
        "git": {"poll_interval": -1, "on_diverge": "maybe"},
        "drain": {"stats_file": "s", "until": "n_clients = 0"},
        "restart": {"backoff_min": 10, "backoff_max": 5},
        "log": {"format": "xml"},
        "other": {},
    })
    keys = [problem.split(":")[0] for problem in found]
    assert sorted(keys) == sorted([
        "other", "git.poll_interval", "git.on_diverge", "app.command", "app.stop_signal",
        "app.stop_timeout", "app.typo", "drain.until", "restart.backoff_max", "log.format",
    ])


def test_long_values_are_shortened_in_problems() -> None:
    [problem] = problems(with_app(log={"format": "x" * 500}))
    assert "..." in problem and len(problem) < 200


def test_a_section_that_is_not_a_table() -> None:
    assert problems({"app": []}) == ["app: expected a table ([app])",
                                     "app.command: missing; expected a value"]
    assert problems(with_app(build=[]))[0] == "build: expected a table ([build])"


# ---------------------------------------------------------------------------------------------
# Valid configs


def config_of(data: dict[str, Any], path: Path = Path("/srv/app/supervisor.toml"),
              environ: dict[str, str] | None = None) -> Config:
    return parse_config(data, path, ENVIRON if environ is None else environ)


@pytest.mark.parametrize(("value", "seconds"), [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), (10, 10.0), (2.5, 2.5),
    ("10", 10.0), ("1.5m", 90.0), (".5s", 0.5), (" 2s ", 2.0), ("0.25h", 900.0),
])
@pytest.mark.parametrize(("section", "key"), DURATION_KEYS)
def test_durations(section: str, key: str, value: object, seconds: float) -> None:
    if (section, key) == ("git", "poll_interval") and seconds < 1:
        return  # below its floor: see test_the_poll_interval_floor_is_one_second
    data = with_app(**{section: {key: value}})
    if (section, key) == ("restart", "backoff_min"):
        data["restart"]["backoff_max"] = 3600
    if (section, key) == ("restart", "backoff_max"):
        data["restart"]["backoff_min"] = 0.001
    config = config_of(data)
    assert getattr(getattr(config, section), key) == pytest.approx(seconds)


@pytest.mark.parametrize(("section", "key"), [
    ("app", "stop_timeout"), ("drain", "timeout"), ("restart", "reset_after"),
])
def test_zero_is_allowed_where_it_means_something(section: str, key: str) -> None:
    config = config_of(with_app(**{section: {key: 0}}))
    assert getattr(getattr(config, section), key) == 0


def test_defaults() -> None:
    path = Path("/srv/site/supervisor.toml")
    config = config_of({"app": {"command": "./server"}}, path=path)
    base = os.path.realpath("/srv/site")
    assert config == Config(
        path=str(path),
        app=AppConfig(name="site", command=("/bin/sh", "-c", "./server"), cwd=base, env={},
                      stop_signal=signal.SIGTERM, stop_timeout=10.0,
                      state_dir=default_state_dir("site", ENVIRON)),
        git=GitConfig(repo=base, remote=None, branch=None, poll_interval=300.0, timeout=120.0,
                      on_diverge="report"),
        build=None, drain=None,
        restart=RestartConfig(backoff_min=1.0, backoff_max=60.0, reset_after=10.0),
        log=LogConfig(format="json", file=None, child="events", child_file=os.path.join(
            default_state_dir("site", ENVIRON), "child.log")),
        deploy=DeployConfig(mode="in-place", dir=default_state_dir("site", ENVIRON), keep=3),
        health=None,
    )


def test_release_mode_gets_a_health_gate_by_default() -> None:
    config = config_of(with_app(deploy={"mode": "releases", "dir": "/srv/releases"}))
    assert config.releases and config.deploy.dir == "/srv/releases"
    assert config.health == HealthConfig(grace=5.0)
    assert config_of(with_app()).health is None


def test_a_probe_needs_no_grace_unless_given() -> None:
    config = config_of(with_app(health={"http": "http://[::1]:8080/up", "timeout": "10s"}))
    assert config.health is not None and config.health.probe == "http"
    assert config.health.grace == 0 and config.health.timeout == 10
    assert config_of(with_app(health={})).health == HealthConfig()


def test_section_defaults_when_present() -> None:
    config = config_of(with_app(build={}, drain={}))
    assert config.build == BuildConfig(command=("/bin/sh", "-c", "make"), timeout=600.0,
                                       min_free=0, nice=10)
    assert config.drain == DrainConfig(stats_file=os.path.realpath("/srv/app/stats"),
                                       until=parse_condition("n_clients == 0"), timeout=0.0)


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    data = with_app(app={"command": "x", "cwd": "srv", "state_dir": "../state"},
                    git={"repo": "../repo"}, drain={"stats_file": "run/stats"},
                    log={"file": "events.log"})
    config = config_of(data, path=conf / "supervisor.toml")
    assert config.app.cwd == os.path.realpath(conf / "srv")
    assert config.app.state_dir == os.path.realpath(tmp_path / "state")
    assert config.git.repo == os.path.realpath(tmp_path / "repo")
    assert config.drain is not None
    assert config.drain.stats_file == os.path.realpath(conf / "run/stats")
    assert config.log.file == os.path.realpath(conf / "events.log")
    assert config.app.name == "repo"  # named after the repository by default


def test_absolute_and_home_paths() -> None:
    data = with_app(drain={"stats_file": "/tmp/SERVER_STATS"}, log={"file": "~/events.log"})
    config = config_of(data, environ={"HOME": "/home/someone"})
    assert config.drain is not None and config.drain.stats_file == "/tmp/SERVER_STATS"
    assert config.log.file == os.path.realpath(os.path.expanduser("~/events.log"))


def test_cwd_defaults_to_the_repository() -> None:
    config = config_of(with_app(git={"repo": "/opt/site"}))
    assert config.app.cwd == config.git.repo == os.path.realpath("/opt/site")
    assert config.app.name == "site"


def test_load_config_resolves_against_the_file_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "supervisor.toml").write_text(MINIMAL + '[drain]\nstats_file = "stats"\n'
                                          'until = "n_clients == 0"\n')
    monkeypatch.chdir(tmp_path)  # the process's cwd, not an internal
    config = load_config(Path("conf/supervisor.toml"), ENVIRON)
    assert config.git.repo == os.path.realpath(conf)
    assert config.drain is not None and config.drain.stats_file == os.path.realpath(conf / "stats")


@pytest.mark.parametrize(("value", "argv"), [
    ("./server --port 8080", ("/bin/sh", "-c", "./server --port 8080")),
    ("exec python3 -m http.server", ("/bin/sh", "-c", "exec python3 -m http.server")),
    (["./server", "--port", "8080"], ("./server", "--port", "8080")),
    (["/usr/bin/env", "a b"], ("/usr/bin/env", "a b")),
])
def test_command_forms(value: object, argv: tuple[str, ...]) -> None:
    config = config_of(with_app(app={"command": value}, build={"command": value}))
    assert config.app.command == argv
    assert config.build is not None and config.build.command == argv


@pytest.mark.parametrize(("value", "expected"), [
    ("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT), ("term", signal.SIGTERM),
    ("QUIT", signal.SIGQUIT), ("sighup", signal.SIGHUP), ("SIGUSR2", signal.SIGUSR2),
])
def test_stop_signals(value: str, expected: signal.Signals) -> None:
    assert config_of(with_app(app={"stop_signal": value})).app.stop_signal == expected


def test_env_and_choices() -> None:
    config = config_of(with_app(app={"env": {"PORT": "8080", "EMPTY": ""}},
                                git={"on_diverge": "reset", "remote": "up", "branch": "prod"},
                                log={"format": "text"}))
    assert config.app.env == {"PORT": "8080", "EMPTY": ""}
    assert (config.git.on_diverge, config.git.remote, config.git.branch) == ("reset", "up",
                                                                              "prod")
    assert config.log.format == "text"


def test_state_dir_follows_systemd_then_xdg() -> None:
    # systemd's StateDirectory= is one directory per unit (instance) already: used as it is.
    assert default_state_dir("web", {"STATE_DIRECTORY": "/var/lib/sup:/var/lib/other"}) == \
        "/var/lib/sup"
    assert default_state_dir("web", {"XDG_STATE_HOME": "/x", "HOME": "/h"}) == \
        "/x/supervisor/web"
    assert Path(default_state_dir("web", {"HOME": "/h"})).parts[-2:] == ("supervisor", "web")
    empty_xdg = Path(default_state_dir("web", {"XDG_STATE_HOME": ""}))
    assert empty_xdg.parts[-2:] == ("supervisor", "web")
    config = config_of(with_app(app={"name": "web"}),
                       environ={"STATE_DIRECTORY": "/var/lib/sup"})
    assert config.app.state_dir == "/var/lib/sup"


def test_state_dir_takes_home_from_the_given_environment() -> None:
    # parse_config/default_state_dir take the environment as a parameter; HOME must come from
    # it too, not from the process (the XDG default is $HOME/.local/state).
    assert default_state_dir("web", {"HOME": "/home/someone"}) == \
        "/home/someone/.local/state/supervisor/web"


# ---------------------------------------------------------------------------------------------
# Round trip of the printed config


def round_trip(config: Config, tmp_path: Path) -> Config:
    copy = tmp_path / "printed.toml"
    copy.write_text(format_config(config))
    return dataclasses.replace(load_config(copy, ENVIRON), path=config.path)


def test_a_multiline_command_round_trips(tmp_path: Path) -> None:
    config = config_of(with_app(build={"command": "set -e\nmake\nmake install\n"}))
    assert round_trip(config, tmp_path) == config


@pytest.mark.parametrize("seconds", [1234567, 0.1234567, 1e-7, 86400 * 365 * 2])
def test_any_valid_duration_round_trips(tmp_path: Path, seconds: float) -> None:
    config = config_of(with_app(restart={"reset_after": seconds}))
    assert round_trip(config, tmp_path).restart.reset_after == seconds


def test_the_poll_interval_floor_is_one_second(tmp_path: Path) -> None:
    assert config_of(with_app(git={"poll_interval": 1})).git.poll_interval == 1.0
    assert config_of(with_app(git={"poll_interval": "1s"})).git.poll_interval == 1.0


def test_a_config_reached_through_a_symlink_is_the_same_app(tmp_path: Path) -> None:
    """Relative paths follow the file, not the link: two names for one config must not give
    two state directories (two supervisors for one app)."""
    real = tmp_path / "srv" / "app"
    real.mkdir(parents=True)
    (real / "supervisor.toml").write_text(
        '[app]\ncommand = "x"\nstate_dir = "state"\n[git]\nrepo = "."\n')
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "app.toml").symlink_to(real / "supervisor.toml")
    direct = load_config(str(real / "supervisor.toml"))
    linked = load_config(str(etc / "app.toml"))
    assert linked.app.state_dir == direct.app.state_dir == str(real / "state")
    assert linked.git.repo == direct.git.repo == str(real)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=20).filter(lambda s: s.strip() != "")
_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,10}", fullmatch=True)
_DURATION = st.one_of(
    st.integers(1, 10**7),
    st.floats(min_value=0.001, max_value=10**7, allow_nan=False, allow_infinity=False),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 999), st.sampled_from(["ms", "s",
                                                                                   "m", "h"])),
)
_UNTIL = st.sampled_from(["n_clients == 0", "n_clients <= 1 and mode != 'busy'",
                          'state == "idle"', "a >= -2.5"])


@st.composite
def valid_data(draw: st.DrawFn) -> dict[str, Any]:
    command = draw(st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=3)))
    backoff_min = draw(_DURATION)
    return {
        "app": {"command": command, "name": draw(_NAME),
                "env": draw(st.dictionaries(_NAME, st.text(st.characters(
                    blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10),
                    max_size=3)),
                "stop_signal": draw(st.sampled_from(["TERM", "SIGINT", "SIGQUIT", "SIGHUP"])),
                "stop_timeout": draw(_DURATION)},
        "git": {"poll_interval": draw(_DURATION.filter(lambda d: parse_duration(d) >= 1)),
                "timeout": draw(_DURATION),
                "branch": draw(_TEXT), "on_diverge": draw(st.sampled_from(["report", "reset"]))},
        "build": {"command": draw(_TEXT), "timeout": draw(_DURATION)},
        "drain": {"stats_file": draw(_NAME), "until": draw(_UNTIL), "timeout": draw(_DURATION)},
        "restart": {"backoff_min": backoff_min, "backoff_max": 10**8,
                    "reset_after": draw(_DURATION)},
        "log": {"format": draw(st.sampled_from(["json", "text"]))},
    }


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_data())
def test_format_config_round_trips(tmp_path: Path, data: dict[str, Any]) -> None:
    config = config_of(data, path=tmp_path / "supervisor.toml")
    printed = format_config(config)
    reloaded = parse_config(tomllib.loads(printed), tmp_path / "other.toml", ENVIRON)
    assert dataclasses.replace(reloaded, path=config.path) == config


# ---------------------------------------------------------------------------------------------
# Arbitrary input never escapes as anything but ConfigError, and problems stay one line each


_TOML_SCALAR = st.one_of(
    st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["10x", "5m", "SIGTERM", "json", "reset", "n_clients == 0", "", "a\nb"]),
)
_TOML_VALUE = st.recursive(
    _TOML_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
_SECTION_KEYS = st.sampled_from([
    "command", "name", "cwd", "env", "stop_signal", "stop_timeout", "state_dir", "repo", "remote",
    "branch", "poll_interval", "timeout", "on_diverge", "stats_file", "until", "backoff_min",
    "backoff_max", "reset_after", "format", "file", "bogus",
])
_DATA = st.dictionaries(
    st.sampled_from(["app", "git", "build", "drain", "restart", "log", "extra"]),
    st.one_of(st.dictionaries(_SECTION_KEYS, _TOML_VALUE, max_size=6), _TOML_SCALAR),
    max_size=7,
)


@settings(max_examples=150, deadline=None)
@given(_DATA)
@example({"git": {"poll_interval": 10**400}})  # tomllib reads integers of any size
@example({"app": {"command": "x", "stop_timeout": -(10**400)}})
def test_parse_config_raises_only_config_error(data: dict[str, Any]) -> None:
    try:
        parse_config(data, Path("/srv/app/supervisor.toml"), ENVIRON)
    except ConfigError as error:
        assert error.problems


@settings(max_examples=150, deadline=None)
@given(_DATA)
@example({"app": {"command": "x", "stop_signal": "SIG\nFOO"}})  # a multi-line TOML string
@example({"app": {"command": "x", "env": {"A\nB": "x"}}})
@example({"app": {"command": "x", "env": {"A": ["a\nb"]}}})
@example({"app": {"command": "x", "bad\nkey": 1}})
@example({"app": {"command": "x"}, "drain": {"stats_file": "s", "until": "n == 0\nor m == 1"}})
def test_every_problem_is_one_line_naming_its_key(data: dict[str, Any]) -> None:
    try:
        parse_config(data, Path("/srv/app/supervisor.toml"), ENVIRON)
    except ConfigError as error:
        for problem in error.problems:
            assert "\n" not in problem and "\r" not in problem, problem
            where = problem.split(":")[0].split(".")[0]
            assert where in data or where == "app", problem
    except OverflowError:
        pass  # reported by test_parse_config_raises_only_config_error


def test_the_apps_output_limit_defaults_to_1000_lines_per_10_seconds() -> None:
    config = config_of(with_app())
    assert (config.log.child_rate_limit_burst, config.log.child_rate_limit_interval) == (1000, 10.0)
    config = config_of(with_app(log={"child_rate_limit_burst": 0,
                                     "child_rate_limit_interval": "30s"}))
    assert (config.log.child_rate_limit_burst, config.log.child_rate_limit_interval) == (0, 30.0)
    for value in (-1, True, "many", 2.5):
        with pytest.raises(ConfigError) as error:
            config_of(with_app(log={"child_rate_limit_burst": value}))
        assert error.value.problems[0].startswith(
            "log.child_rate_limit_burst: expected a number of lines from 0 (no limit)")
    with pytest.raises(ConfigError, match=r"log\.child_rate_limit_interval: expected a duration"):
        config_of(with_app(log={"child_rate_limit_interval": 0}))
