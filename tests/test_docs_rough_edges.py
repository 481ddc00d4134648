"""Issue 14, rough edge 9: docs that disagreed with the code. Each fact is checked against the
code's behaviour, and the old wording must not come back in any page or the example config.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from supervisor.core.config import default_state_dir
from tests.conftest import wait_until
from tests.helpers_git import git_env, make_repos

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "supervisor.toml", *sorted((ROOT / "docs").glob("*.md"))]


def said_anywhere(pattern: str) -> list[str]:
    return [page.name for page in PAGES if pattern in " ".join(page.read_text().split())]


def test_the_state_dir_under_systemd_is_the_state_directory_itself() -> None:
    systemd = {"STATE_DIRECTORY": "/var/lib/tiny-supervisor/myapp", "HOME": "/srv/myapp"}
    assert default_state_dir("myapp", systemd) == "/var/lib/tiny-supervisor/myapp"
    assert not said_anywhere("$STATE_DIRECTORY/NAME")
    assert said_anywhere("$STATE_DIRECTORY")


def test_the_log_file_directory_is_created(tmp_path: Path) -> None:
    repos = make_repos(tmp_path)
    log = repos.work / "logs" / "deeper" / "events.log"
    config = repos.work / "supervisor.toml"
    config.write_text('[app]\ncommand = ["sleep", "60"]\nstate_dir = "../state"\n'
                      '[log]\nfile = "logs/deeper/events.log"\n')
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "-c", str(config)], cwd=repos.work,
        env=git_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: log.exists() and '"child.started"' in log.read_text(), 30,
                   "the app started, logged to a file in a directory that did not exist")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        _, errors = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 0, errors
    assert not said_anywhere("directory must exist when the supervisor starts, even if")
