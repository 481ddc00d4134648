"""The main file of a many-apps supervisor: app files found by glob, named by file, each with its
state in state_dir/NAME; a broken app file is set aside, a broken main file is exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.core.config import ConfigError
from supervisor.core.hostconfig import load_host

ENV = {"HOME": "/nonexistent"}


def app_file(directory: Path, name: str, body: str = "") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(f'[app]\ncommand = "./server"\n[git]\nrepo = "/srv/{name}"\n{body}')
    return path


def main_file(tmp_path: Path, body: str = "") -> Path:
    (tmp_path / "apps").mkdir(exist_ok=True)
    path = tmp_path / "supervisor.toml"
    path.write_text(f'[supervisor]\napps = ["apps/*.toml"]\nstate_dir = "state"\n{body}')
    return path


def test_each_app_file_is_an_app_named_by_its_file_with_its_state_under_state_dir(tmp_path):
    main = main_file(tmp_path, "max_builds = 2\n[log]\nfile = \"log/events.log\"\n")
    for name in ("web", "api"):
        app_file(tmp_path / "apps", name)
    app_file(tmp_path / "apps", "worker")
    host = load_host(str(main), ENV)
    assert host.main and [a.app.name for a in host.apps] == ["api", "web", "worker"]
    assert host.app("web").app.state_dir == str(tmp_path / "state" / "web")
    assert host.limits.max_builds == 2 and host.limits.max_fetches == 2
    assert host.log.file == str(tmp_path / "log" / "events.log")
    assert host.broken == ()


def test_app_name_and_state_dir_in_the_app_file_win(tmp_path):
    main = main_file(tmp_path)
    path = tmp_path / "apps" / "x.toml"
    path.write_text('[app]\ncommand = "./s"\nname = "shop"\nstate_dir = "/var/lib/shop"\n')
    host = load_host(str(main), ENV)
    assert host.apps[0].app.name == "shop" and host.apps[0].app.state_dir == "/var/lib/shop"


def test_a_broken_app_file_is_set_aside_and_the_others_run(tmp_path):
    main = main_file(tmp_path)
    app_file(tmp_path / "apps", "good")
    (tmp_path / "apps" / "bad.toml").write_text('[app]\ncommand = 3\n')
    host = load_host(str(main), ENV)
    assert [a.app.name for a in host.apps] == ["good"]
    (broken,) = host.broken
    assert broken.name == "bad" and broken.path == str(tmp_path / "apps" / "bad.toml")
    assert len(broken.problems) == 1 and broken.problems[0].startswith("app.command: expected")


def test_two_apps_with_one_name_are_a_config_error_naming_both_files(tmp_path):
    main = main_file(tmp_path)
    for stem in ("a", "b"):
        (tmp_path / "apps" / f"{stem}.toml").write_text('[app]\ncommand = "./s"\nname = "x"\n')
    with pytest.raises(ConfigError) as error:
        load_host(str(main), ENV)
    (line,) = error.value.problems
    assert "a.toml" in line and "b.toml" in line and "'x'" in line


def test_no_valid_app_is_a_config_error_listing_why(tmp_path):
    main = main_file(tmp_path)
    (tmp_path / "apps" / "bad.toml").write_text('[app]\n')
    with pytest.raises(ConfigError) as error:
        load_host(str(main), ENV)
    assert error.value.problems[0].startswith("supervisor.apps: no valid app file")
    assert any("bad.toml" in p and "app.command" in p for p in error.value.problems)


@pytest.mark.parametrize("body, key", [
    ('[log]\nfile = "/tmp/x.log"\n', "log.file"),
    ('[log]\nformat = "text"\n', "log.format"),
    ('[trigger]\nlisten = "127.0.0.1:9000"\nsecret = "0123456789abcdef0"\n', "trigger"),
])
def test_what_exists_once_per_process_is_refused_in_an_app_file(tmp_path, body, key):
    main = main_file(tmp_path)
    app_file(tmp_path / "apps", "good")
    app_file(tmp_path / "apps", "odd", body)
    host = load_host(str(main), ENV)
    (broken,) = host.broken
    assert broken.name == "odd" and broken.problems == (
        f"{key}: belongs in the main file, once for all apps",)


@pytest.mark.parametrize("body, problem", [
    ("[app]\ncommand = \"x\"\n", "app: does not belong in a main file"),
    ("max_builds = 0\n", "supervisor.max_builds: expected a whole number from 1 to 1000"),
    ("[log]\nchild = \"file\"\n", "log.child: belongs in each app file"),
])
def test_a_broken_main_file_is_a_config_error(tmp_path, body, problem):
    main = main_file(tmp_path, body)
    app_file(tmp_path / "apps", "good")
    with pytest.raises(ConfigError) as error:
        load_host(str(main), ENV)
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_a_single_app_file_is_a_one_app_supervisor_as_before(tmp_path):
    path = app_file(tmp_path, "solo")
    host = load_host(str(path), ENV)
    assert not host.main and [a.app.name for a in host.apps] == ["solo"]
    assert host.state_dir == host.apps[0].app.state_dir
