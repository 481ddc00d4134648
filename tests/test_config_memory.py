"""app.oom_score_adj and build.memory_max: read, defaulted, and refused with one line naming the
key; a broken one makes `supervisor check` exit 2 without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor.core.config import ConfigError, parse_config


def config(app: dict | None = None, build: dict | None = None):
    return parse_config({"app": {"command": "true", **(app or {})},
                         "build": {"command": "true", **(build or {})}}, "/tmp/x/s.toml")


def test_defaults_and_values():
    assert config().app.oom_score_adj == 0
    assert config().build.memory_max == 0
    assert config(app={"oom_score_adj": -500}).app.oom_score_adj == -500
    assert config(build={"memory_max": "300MiB"}).build.memory_max == 300 << 20
    assert config(build={"memory_max": 0}).build.memory_max == 0


@pytest.mark.parametrize(("section", "key", "value"), [
    ("app", "oom_score_adj", 1001), ("app", "oom_score_adj", -1001),
    ("app", "oom_score_adj", "100"), ("app", "oom_score_adj", True),
    ("build", "memory_max", "1MiB"), ("build", "memory_max", "lots"),
    ("build", "memory_max", -5),
])
def test_a_bad_value_is_one_problem_naming_the_key(section, key, value):
    with pytest.raises(ConfigError) as error:
        config(**{section: {key: value}})
    assert len(error.value.problems) == 1
    assert error.value.problems[0].startswith(f"{section}.{key}: expected ")


def test_check_exits_2_with_one_line(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[app]\ncommand = "true"\noom_score_adj = 5000\n')
    result = subprocess.run([sys.executable, "-m", "supervisor", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "app.oom_score_adj" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
