"""[fleet] in the config: the main file says how this box reaches etcd, each app file its
rollout policy; a single-app file says both. Every mistake is one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.core.config import ConfigError
from supervisor.core.hostconfig import load_host
from tests.test_hostconfig import ENV, app_file, main_file

RELEASES = '[deploy]\nmode = "releases"\n'
ETCD = '[fleet]\nendpoints = ["http://127.0.0.1:2379", "http://127.0.0.1:2479"]\nbox = "fra-1"\n'


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_host(str(path), ENV)
    return caught.value.problems


def test_the_main_file_names_etcd_and_each_app_file_its_policy(tmp_path):
    main = main_file(tmp_path, ETCD + 'lease_ttl = "5s"\nsolo_after = "10m"\n')
    app_file(tmp_path / "apps", "web", RELEASES + '[fleet]\nmax_parallel = 2\ncanary = 0\n')
    app_file(tmp_path / "apps", "api", RELEASES + '[fleet]\ngroup = "api-eu"\n')
    app_file(tmp_path / "apps", "cron")
    host = load_host(str(main), ENV)
    assert host.fleet.endpoints == ("http://127.0.0.1:2379", "http://127.0.0.1:2479")
    assert host.fleet.box == "fra-1" and host.fleet.lease_ttl == 5.0
    assert host.fleet.solo_after == 600.0 and host.fleet.prefix == "/tiny-supervisor"
    web, api, cron = host.app("web").fleet, host.app("api").fleet, host.app("cron").fleet
    assert (web.group, web.max_parallel, web.canary) == ("web", 2, 0)
    assert (api.group, api.max_parallel, api.canary) == ("api-eu", 1, 1)
    assert cron is None


def test_without_a_box_name_the_host_name_is_used(tmp_path):
    main = main_file(tmp_path, '[fleet]\nendpoints = ["http://10.0.0.5:2379"]\n')
    app_file(tmp_path / "apps", "web")
    import os
    assert load_host(str(main), ENV).fleet.box == os.uname().nodename


def test_a_single_app_file_holds_both_halves(tmp_path):
    path = app_file(tmp_path, "web", RELEASES + ETCD + "max_parallel = 1\n")
    host = load_host(str(path), ENV)
    assert host.fleet.box == "fra-1" and host.apps[0].fleet.group == "web"


def test_a_single_app_file_with_a_policy_but_no_endpoints_is_an_error(tmp_path):
    path = app_file(tmp_path, "web", RELEASES + "[fleet]\ncanary = 1\n")
    assert problems(path) == ["fleet.endpoints: missing; expected a value"]


def test_fleet_needs_release_mode(tmp_path):
    path = app_file(tmp_path, "web", ETCD)
    (problem,) = problems(path)
    assert problem.startswith('fleet: needs deploy.mode = "releases"')


def test_connection_keys_in_an_app_file_belong_in_the_main_file(tmp_path):
    main = main_file(tmp_path, ETCD)
    app_file(tmp_path / "apps", "web", RELEASES + '[fleet]\nbox = "x"\n')
    app_file(tmp_path / "apps", "ok", RELEASES + "[fleet]\n")
    host = load_host(str(main), ENV)
    (broken,) = host.broken
    assert broken.problems == ("fleet.box: belongs in the main file, once for all apps",)


def test_policy_keys_in_the_main_file_belong_in_each_app_file(tmp_path):
    main = main_file(tmp_path, ETCD + "canary = 2\n")
    app_file(tmp_path / "apps", "web")
    (problem,) = problems(main)
    assert problem.startswith("fleet.canary: belongs in each app file")


def test_an_app_with_a_policy_under_a_main_file_without_fleet_is_set_aside(tmp_path):
    main = main_file(tmp_path)
    app_file(tmp_path / "apps", "web", RELEASES + "[fleet]\n")
    app_file(tmp_path / "apps", "cron")
    host = load_host(str(main), ENV)
    assert [a.app.name for a in host.apps] == ["cron"]
    assert host.broken[0].problems[0].startswith("fleet: the main file has no [fleet]")


@pytest.mark.parametrize(("body", "expected"), [
    ('endpoints = "10.0.0.5:2379"', "fleet.endpoints: expected a list of etcd client URLs"),
    ('endpoints = []', "fleet.endpoints: expected a list of etcd client URLs"),
    ('endpoints = ["http://a:1", "https://b:2"]', "fleet.endpoints: expected all https://"),
    ('endpoints = ["http://a:1"]\nlease_ttl = "1s"', "fleet.lease_ttl: expected a duration of"),
    ('endpoints = ["http://a:1"]\nbox = "a b"', "fleet.box: expected a name"),
    ('endpoints = ["http://a:1"]\nca = "missing.pem"', "fleet.ca: cannot read"),
    ('endpoints = ["http://a:1"]\nuser = "root"', "fleet.user: expected both user and password"),
    ('endpoints = ["http://a:1"]\nprefix = "x/"', "fleet.prefix: expected a key prefix"),
    ('endpoints = ["http://a:1"]\nsolo = "1m"', "fleet.solo: unknown key"),
])
def test_each_mistake_in_the_main_files_fleet_is_one_line_naming_the_key(tmp_path, body,
                                                                        expected):
    main = main_file(tmp_path, f"[fleet]\n{body}\n")
    app_file(tmp_path / "apps", "web")
    found = problems(main)
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize(("body", "expected"), [
    ("max_parallel = 0", "fleet.max_parallel: expected a whole number from 1 to 1000"),
    ("canary = -1", "fleet.canary: expected a whole number from 0"),
    ('group = "a/b"', "fleet.group: expected a name"),
])
def test_each_mistake_in_an_apps_policy_names_the_key(tmp_path, body, expected):
    main = main_file(tmp_path, ETCD)
    app_file(tmp_path / "apps", "web", RELEASES + f"[fleet]\n{body}\n")
    app_file(tmp_path / "apps", "ok")
    (broken,) = load_host(str(main), ENV).broken
    assert len(broken.problems) == 1 and broken.problems[0].startswith(expected)


def test_check_says_it_in_one_line_and_exits_2(tmp_path):
    main = main_file(tmp_path, '[fleet]\nendpoints = ["http://a:1"]\nlease_ttl = "1s"\n')
    app_file(tmp_path / "apps", "web")
    done = subprocess.run([sys.executable, "-m", "supervisor", "check", "-c", str(main)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "fleet.lease_ttl: expected" in done.stderr


def test_a_reload_applies_the_policy_but_a_new_group_or_joining_needs_a_restart(tmp_path):
    from supervisor.loop.reload import merge

    main = main_file(tmp_path, ETCD)
    path = app_file(tmp_path / "apps", "web", RELEASES + "[fleet]\nmax_parallel = 1\n")
    old = load_host(str(main), ENV).app("web")
    path.write_text(path.read_text().replace("max_parallel = 1", 'max_parallel = 2\n'
                                             'group = "other"'))
    merged, applied, kept = merge(old, load_host(str(main), ENV).app("web"))
    assert merged.fleet.max_parallel == 2 and merged.fleet.group == "web"
    assert "fleet.max_parallel" in applied and "fleet.group" in kept
    plain = app_file(tmp_path / "apps", "web", RELEASES)
    _, _, kept = merge(old, load_host(str(main), ENV).app("web"))
    assert "[fleet]" in kept and plain.exists()


def test_two_apps_of_one_box_cannot_share_a_group(tmp_path):
    main = main_file(tmp_path, ETCD)
    app_file(tmp_path / "apps", "api", RELEASES + '[fleet]\ngroup = "web"\n')
    app_file(tmp_path / "apps", "web", RELEASES + "[fleet]\n")
    host = load_host(str(main), ENV)
    assert [a.app.name for a in host.apps] == ["api"]
    (broken,) = host.broken
    assert broken.name == "web" and broken.problems[0].startswith(
        "fleet.group: 'web' is the group of ")


def test_check_of_a_single_app_file_prints_its_whole_fleet_table(tmp_path):
    from tests.helpers_git import make_repos

    repos = make_repos(tmp_path)
    path = tmp_path / "web.toml"
    path.write_text(f'[app]\ncommand = "./server"\n[git]\nrepo = "{repos.work}"\n'
                    + RELEASES + ETCD + 'user = "root"\npassword = "secret-words"\n')
    done = subprocess.run([sys.executable, "-m", "supervisor", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("[fleet]\n", 1)[1]
    assert 'box = "fra-1"' in table and 'lease_ttl = "10s"' in table
    assert "secret-words" not in done.stdout and 'password = "(set)"' in table
