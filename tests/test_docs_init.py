"""`supervisor init` on real clones of a real bare remote: what it writes must pass `supervisor
check` as a separate process, follow the branch's upstream, build with make only when there is
a Makefile, and never replace a file. Refusals are one line and exit code 2.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers_git import commit, git, git_env, make_repos


def supervisor(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = git_env(HOME=str(cwd), XDG_STATE_HOME=str(cwd / "state"))
    env.pop("STATE_DIRECTORY", None)
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("supervisor: "), result
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_init_writes_a_config_that_check_accepts(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    commit(repos.dev, "Makefile", "all:\n\ttrue\n")
    repos.push()
    git(repos.work, "pull", "-q", "--ff-only")

    made = supervisor(repos.work, "init", "--", "./server", "--port", "8080")
    assert made.returncode == 0, made.stderr
    text = (repos.work / "supervisor.toml").read_text()
    data = tomllib.loads(text)
    assert data["app"]["command"] == ["./server", "--port", "8080"]
    assert data["git"]["remote"] == "origin" and data["git"]["branch"] == "main"
    assert data["build"]["command"] == "make"
    assert "drain" not in data and "socket" not in data  # offered, commented out
    assert "# [drain]" in text and "# [[socket]]" in text

    checked = supervisor(repos.work, "check")
    assert checked.returncode == 0, checked.stderr
    assert f'repo = "{repos.work.resolve()}"' in checked.stdout
    assert 'command = ["./server", "--port", "8080"]' in checked.stdout


def test_the_commented_sections_are_valid_once_uncommented(tmp_path: Path) -> None:
    """A newcomer's next step is to uncomment [drain] or [[socket]]: that must check too."""
    repos = make_repos(tmp_path)
    assert supervisor(repos.work, "init", "--", "./server").returncode == 0
    path = repos.work / "supervisor.toml"
    lines = path.read_text().splitlines()
    for section in ("# [drain]", "# [[socket]]"):
        start = lines.index(section)
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("# "))
        for i in range(start, end):
            lines[i] = lines[i].removeprefix("# ")
    path.write_text("\n".join(lines) + "\n")
    (repos.work / "run").mkdir()
    path.write_text(path.read_text().replace("/run/myapp/stats", "run/stats"))
    checked = supervisor(repos.work, "check")
    assert checked.returncode == 0, checked.stderr
    assert "[drain]" in checked.stdout and "[[socket]]" in checked.stdout


def test_no_makefile_no_build_and_a_shell_command_stays_a_string(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    made = supervisor(repos.work, "init", "--", "exec ./server --port 8080")
    assert made.returncode == 0, made.stderr
    data = tomllib.loads((repos.work / "supervisor.toml").read_text())
    assert data["app"]["command"] == "exec ./server --port 8080"
    assert "build" not in data


def test_the_upstream_is_the_branch_checked_out(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    git(repos.dev, "push", "-q", "origin", "main:live")
    git(repos.work, "fetch", "-q")
    git(repos.work, "checkout", "-q", "-b", "deployed", "--track", "origin/live")
    assert supervisor(repos.work, "init", "--", "./server").returncode == 0
    data = tomllib.loads((repos.work / "supervisor.toml").read_text())
    assert (data["git"]["remote"], data["git"]["branch"]) == ("origin", "live")


def test_a_config_outside_the_clone_names_it(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    made = supervisor(repos.work, "init", "-c", str(etc / "myapp.toml"), "--", "./server")
    assert made.returncode == 0, made.stderr
    assert tomllib.loads((etc / "myapp.toml").read_text())["git"]["repo"] == str(
        repos.work.resolve())
    assert supervisor(repos.work, "check", "-c", str(etc / "myapp.toml")).returncode == 0


def test_never_overwrites(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    (repos.work / "supervisor.toml").write_text("# mine\n")
    one_line_refusal(supervisor(repos.work, "init", "--", "./server"), "supervisor.toml",
                     "exists")
    assert (repos.work / "supervisor.toml").read_text() == "# mine\n"


def test_refusals_name_the_fix(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    one_line_refusal(supervisor(repos.work, "init"), "supervisor init -- ./server")
    git(repos.work, "checkout", "-q", "-b", "local")
    one_line_refusal(supervisor(repos.work, "init", "--", "./server"), "no upstream",
                     "git branch -u")
    git(repos.work, "checkout", "-q", "--detach")
    one_line_refusal(supervisor(repos.work, "init", "--", "./server"), "detached")
    plain = tmp_path / "plain"
    plain.mkdir()
    one_line_refusal(supervisor(plain, "init", "--", "./server"), "not in a git working tree")
    for where in (repos.work, plain):
        assert not (where / "supervisor.toml").exists()
