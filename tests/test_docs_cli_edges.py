"""Issue 14, rough edges 1, 3 and 8, each as a new user met it: `supervisor events` with no log
to read, `supervisor check` passing what `run` refuses, and the order and look of its output.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from supervisor.core.config import format_config, load_config
from tests.helpers_git import git_env, make_repos

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def supervisor(cwd: Path, *args: str, stdin: int | None = subprocess.DEVNULL,
               ) -> subprocess.CompletedProcess[str]:
    # stdin and stdout are never a terminal here, as under a script or ssh without -t.
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd, stdin=stdin,
                          env={**git_env(), "PYTHONPATH": str(PROJECT_ROOT)},
                          capture_output=True, text=True, timeout=30, check=False)


def one_line_each(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(lines) == len(fragments), lines
    for fragment in fragments:
        assert [line for line in lines if fragment in line], (fragment, lines)


# ---------------------------------------------------------------------------------------------
# 1. `supervisor events` with no log.file


def test_events_with_no_log_file_and_nothing_piped_in_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "web.toml"
    config.write_text('[app]\ncommand = "true"\n')
    result = supervisor(tmp_path, "events", "-c", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert "no log to read" in result.stderr
    # The template unit's instance is the config's name: /etc/tiny-supervisor/web.toml.
    assert "journalctl -u tiny-supervisor@web -o cat | supervisor events" in result.stderr
    assert "-u tiny-supervisor " in result.stderr
    assert "journalctl -u myapp" not in result.stderr


def test_events_names_the_app_for_the_default_config_and_reads_an_empty_pipe(
        tmp_path: Path) -> None:
    (tmp_path / "supervisor.toml").write_text('[app]\nname = "shop"\ncommand = "true"\n')
    read, write = os.pipe()
    os.close(write)  # journalctl found nothing: the pipe ends at once
    try:
        result = supervisor(tmp_path, "events", stdin=read)
    finally:
        os.close(read)
    assert result.returncode == 2, result
    assert "tiny-supervisor@shop" in result.stderr


def test_events_still_reads_what_is_piped_in(tmp_path: Path) -> None:
    (tmp_path / "supervisor.toml").write_text('[app]\ncommand = "true"\n')
    line = '{"ts": "2026-11-24T23:00:00.000Z", "event": "supervisor.started"}\n'
    (tmp_path / "journal").write_text(line)
    with open(tmp_path / "journal", "rb") as stdin:
        result = supervisor(tmp_path, "events", "--json", stdin=stdin.fileno())
    assert result.returncode == 0, result.stderr
    assert result.stdout == line
    # Asked for explicitly, standard input may be empty: that is no mistake of configuration.
    assert supervisor(tmp_path, "events", "-").returncode == 0


# ---------------------------------------------------------------------------------------------
# 3. `supervisor check` refuses what `run` refuses at start


def test_check_names_every_directory_run_would_refuse(tmp_path: Path) -> None:
    config = tmp_path / "supervisor.toml"
    config.write_text('[app]\ncommand = "./server"\ncwd = "nowhere"\nstate_dir = "state"\n'
                      '[git]\nrepo = "plain"\n'
                      '[drain]\nstats_file = "gone/stats"\nuntil = "n_clients == 0"\n')
    (tmp_path / "plain").mkdir()
    result = supervisor(tmp_path, "check", "-c", str(config))
    one_line_each(result, f"app.cwd: {tmp_path / 'nowhere'} is not a directory",
                  f"drain.stats_file: directory {tmp_path / 'gone'} does not exist",
                  f"git.repo: {tmp_path / 'plain'} is not a git working tree")
    # `run` refuses the git.repo in the same words, once the directories exist.
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "gone").mkdir()
    run = supervisor(tmp_path, "run", "-c", str(config))
    assert run.returncode == 2, run.stderr
    assert f"git.repo: {tmp_path / 'plain'} is not a git working tree" in run.stderr
    one_line_each(supervisor(tmp_path, "check", "-c", str(config)),
                  f"git.repo: {tmp_path / 'plain'} is not a git working tree")


def test_check_refuses_a_branch_with_no_upstream_and_accepts_a_real_clone(
        tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    (repos.work / "supervisor.toml").write_text('[app]\ncommand = "./server"\n')
    accepted = supervisor(repos.work, "check")
    assert accepted.returncode == 0, accepted.stderr
    subprocess.run(["git", "checkout", "-q", "-b", "local"], cwd=repos.work, check=True,
                   env=git_env())
    one_line_each(supervisor(repos.work, "check"), "git.branch: branch local has no upstream")


# ---------------------------------------------------------------------------------------------
# 8. What `supervisor check` prints


def test_check_prints_app_first_sockets_last_and_an_empty_env_as_two_braces(
        tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    config = repos.work / "supervisor.toml"
    config.write_text('[[socket]]\nlisten = "127.0.0.1:8080"\nname = "web"\n'
                      '[[socket]]\nlisten = "/run/web.sock"\nmode = "0660"\n'
                      '[app]\ncommand = "./server"\n')
    result = supervisor(repos.work, "check")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert headers[0] == "[app]"
    assert headers[-2:] == ["[[socket]]", "[[socket]]"]
    assert "env = {}" in result.stdout.splitlines()
    assert "{  }" not in result.stdout
    printed = tomllib.loads(result.stdout)
    assert [s["listen"] for s in printed["socket"]] == ["127.0.0.1:8080", "/run/web.sock"]
    copy = tmp_path / "printed.toml"
    copy.write_text(result.stdout)
    original = load_config(config)
    assert dataclasses.replace(load_config(copy), path=original.path) == original
    assert format_config(original) == result.stdout
