"""The unit files in contrib/systemd/, checked by systemd's own `systemd-analyze verify` and
against the supervisor's defaults: the template runs one app per process, tiny-supervisor.service
the main file of many apps. verify exits 0 on an unknown key or a bad value, so any line
it prints is a failure. It also wants ExecStart's binary to exist: each test verifies a copy
whose ExecStart points at a stub. No systemd manager is started.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from supervisor.core.config import AppConfig, BuildConfig, GitConfig

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
INSTALLED = "/opt/tiny-supervisor/.venv/bin/supervisor"
# (file in contrib/systemd, the name it is verified under: an instance, for the template)
UNIT_FILES = [("tiny-supervisor.service", "tiny-supervisor.service"),
              ("tiny-supervisor@.service", "tiny-supervisor@demo.service")]
# Debian's supervisor package (supervisord) owns supervisor.service and /etc/supervisor/ (and
# logs to /var/log/supervisor/): ours must name none of them.
DEBIAN_SUPERVISORD = re.compile(r"(?<![\w-])supervisor@?\.service|(?<![\w-])supervisor/")


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: apt-get install systemd (.ci/run should)"
    return path


def installed_copy(tmp_path: Path, source: str, name: str, edit=lambda text: text) -> Path:
    """The unit as it would be installed, with ExecStart's binary replaced by a stub."""
    stub = tmp_path / "bin" / "supervisor"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (UNITS / source).read_text()
    assert f"ExecStart={INSTALLED} " in text
    unit = tmp_path / "units" / name
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(edit(text.replace(INSTALLED, str(stub))))
    return unit


def verify(unit: Path) -> str:
    """Everything `systemd-analyze verify` says about the unit, stdout and stderr."""
    result = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=unit.parent)
    return (result.stdout + result.stderr).strip() or (
        f"(exit code {result.returncode})" if result.returncode else "")


def directives(source: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in order; systemd allows a key more than once."""
    found: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in (UNITS / source).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault((section, key), []).append(value)
    return found


def seconds(span: str) -> float:
    """A systemd time span as these units write it: "30s", "15min", "1h"."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", span):
        total += int(number) * units[unit or "s"]
    return total


def default(cls: type, name: str) -> float:
    return next(f.default for f in fields(cls) if f.name == name)


@pytest.mark.parametrize(("source", "name"), UNIT_FILES)
def test_systemd_analyze_verify_has_nothing_to_say(tmp_path, source, name):
    assert verify(installed_copy(tmp_path, source, name)) == ""


def test_verify_reports_mistakes_that_its_exit_code_hides(tmp_path):
    """The premise of the test above, on this machine's systemd: mistakes are printed, yet the
    exit code is 0, so only the printed lines can catch them."""
    unit = installed_copy(tmp_path, "tiny-supervisor@.service", "tiny-supervisor@demo.service",
                          lambda text: text.replace("KillMode=mixed", "KillMode=mixd\nKilMode=1"))
    result = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=unit.parent)
    said = result.stdout + result.stderr
    assert result.returncode == 0
    assert "mixd" in said and "KilMode" in said, said


def test_verify_wants_the_binary_to_exist(tmp_path):
    unit = installed_copy(tmp_path, "tiny-supervisor.service", "tiny-supervisor.service",
                          lambda text: text.replace(str(tmp_path / "bin"), str(tmp_path / "no")))
    assert "not executable" in verify(unit)


# What differs between the two: (the config, the user and the directories' name).
EXPECTED = {"tiny-supervisor@.service": ("/etc/tiny-supervisor/%i.toml", "%i"),
            "tiny-supervisor.service": ("/etc/tiny-supervisor/supervisor.toml",
                                        "tiny-supervisor")}
# The keys that say which config, which user, which directories; the rest must be the same.
PER_UNIT = {("Unit", "Description"), ("Unit", "AssertPathExists"), ("Service", "ExecStart"),
            ("Service", "User"), ("Service", "Group"), ("Service", "StateDirectory"),
            ("Service", "RuntimeDirectory"), ("Service", "ReadWritePaths"),
            ("Service", "TimeoutStartSec")}


def one_of(source: str):
    unit = directives(source)

    def one(key: str, section: str = "Service") -> str:
        values = unit.get((section, key), [])
        assert len(values) == 1, f"{key}= in [{section}]: {values}"
        return values[0]

    return one


@pytest.mark.parametrize(("source", "name"), UNIT_FILES)
def test_the_unit_is_what_the_supervisor_expects(source, name):
    one = one_of(source)
    config, app = EXPECTED[source]
    assert one("ExecStart") == f"{INSTALLED} run -c {config}"
    assert one("AssertPathExists", "Unit") == config
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("KillMode") == "mixed"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"  # a config mistake: restarting cannot help
    assert one("OOMPolicy") == "continue"
    assert seconds(one("WatchdogSec")) >= 10
    assert seconds(one("TimeoutStopSec")) > default(AppConfig, "stop_timeout")
    # Before READY=1 the supervisor may fetch and build; systemd must not give up on it.
    assert seconds(one("TimeoutStartSec")) > (default(GitConfig, "timeout")
                                              + default(BuildConfig, "timeout"))
    directory = "tiny-supervisor" if app == "tiny-supervisor" else f"tiny-supervisor/{app}"
    assert one("StateDirectory") == directory
    assert one("RuntimeDirectory") == directory
    assert one("User") == one("Group") == app
    assert one("ProtectSystem") == "strict"
    assert one("ReadWritePaths") == f"/srv/{app}"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert one(key) == "yes", key
    assert one("WantedBy", "Install") == "multi-user.target"


def test_the_template_and_the_main_unit_differ_only_in_names_and_start_time():
    template, main = directives("tiny-supervisor@.service"), directives("tiny-supervisor.service")
    assert set(template) == set(main)
    for key, values in template.items():
        if key not in PER_UNIT:
            assert values == main[key], key
    # Many apps may each fetch and build before READY=1: never less time than one app gets.
    assert seconds(one_of("tiny-supervisor.service")("TimeoutStartSec")) >= seconds(
        one_of("tiny-supervisor@.service")("TimeoutStartSec"))


def test_the_main_unit_puts_each_apps_state_where_the_shell_commands_look(tmp_path):
    """Under the unit, a main file without state_dir keeps each app's state in
    $STATE_DIRECTORY/NAME-of-the-app: the same directory the documented main file writes out,
    so `supervisor status` from a shell (no $STATE_DIRECTORY there) finds the running apps."""
    from supervisor.core.hostconfig import load_host

    one = one_of("tiny-supervisor.service")
    state = f"/var/lib/{one('StateDirectory')}"
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "web.toml").write_text(
        f'[app]\ncommand = "true"\n[git]\nrepo = "{tmp_path}"\n')
    (tmp_path / "main.toml").write_text('[supervisor]\napps = ["apps/*.toml"]\n')
    under_unit = load_host(str(tmp_path / "main.toml"),
                           {"STATE_DIRECTORY": state, "HOME": f"/srv/{one('User')}"})
    (tmp_path / "main.toml").write_text(
        f'[supervisor]\napps = ["apps/*.toml"]\nstate_dir = "{state}"\n')
    from_shell = load_host(str(tmp_path / "main.toml"), {"HOME": "/root"})
    assert under_unit.app("web").app.state_dir == f"{state}/web"
    assert from_shell.app("web").app.state_dir == f"{state}/web"


def test_nothing_clashes_with_debians_supervisord():
    sources = [s for s, _ in UNIT_FILES] + ["tiny-supervisor@.socket"]  # test_docs_systemd.py
    assert sorted(path.name for path in UNITS.iterdir()) == sorted(sources)
    for source in sources:
        for (section, key), values in directives(source).items():
            for value in values:
                assert not DEBIAN_SUPERVISORD.search(value), f"[{section}] {key}={value}"


def test_the_clash_check_sees_the_old_names():
    for value in ("/etc/supervisor/myapp.toml", "supervisor/myapp", "supervisor@.service",
                  "After=supervisor.service"):
        assert DEBIAN_SUPERVISORD.search(value), value
    for value in ("/etc/tiny-supervisor/myapp.toml", "tiny-supervisor/myapp",
                  "/opt/tiny-supervisor/.venv/bin/supervisor run", "tiny-supervisor@.service"):
        assert not DEBIAN_SUPERVISORD.search(value), value
