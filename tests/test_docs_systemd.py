"""contrib/systemd/tiny-supervisor@.socket, the unit docs/systemd.md ships for socket activation:
systemd's own `systemd-analyze verify` finds nothing to say about an instance of it next to the
same instance of the template service (one process per app: the main-file unit binds its apps'
sockets itself), and it
passes the socket under the name and address that the page's [[socket]] gives the supervisor.
(That a supervisor started this way passes the socket on is tests/test_e2e_sockets.py's.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
DOC = ROOT / "docs" / "systemd.md"


def verify(tmp_path: Path, socket_text: str) -> str:
    """All verify prints for the socket and its service (ExecStart pointed at a real binary);
    it exits 0 even on unknown keys, so any output is a finding."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    (tmp_path / "tiny-supervisor@demo.socket").write_text(socket_text)
    service = (UNITS / "tiny-supervisor@.service").read_text()
    (tmp_path / "tiny-supervisor@demo.service").write_text(
        service.replace("/opt/tiny-supervisor/.venv/bin/supervisor", "/bin/true"))
    done = subprocess.run([analyze, "verify", "tiny-supervisor@demo.socket",
                           "tiny-supervisor@demo.service"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    return (done.stdout + done.stderr).strip()


def test_systemd_finds_nothing_wrong_with_the_socket_unit(tmp_path: Path) -> None:
    text = (UNITS / "tiny-supervisor@.socket").read_text()
    assert verify(tmp_path, text) == ""
    assert "Unknown key" in verify(tmp_path, text.replace("[Socket]\n", "[Socket]\nBogus=1\n"))


def test_the_socket_matches_the_documented_config() -> None:
    unit = (UNITS / "tiny-supervisor@.socket").read_text()
    listen = re.findall(r"^ListenStream=(.+)$", unit, re.M)
    name = re.findall(r"^FileDescriptorName=(.+)$", unit, re.M)
    block = next(b for b in re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
                 if b.startswith("[[socket]]"))
    documented = tomllib.loads(block)["socket"]
    assert [s["listen"] for s in documented] == listen
    assert [s["name"] for s in documented] == name
    assert re.search(r"^Accept=no$", unit, re.M)  # one supervisor, not one per connection
