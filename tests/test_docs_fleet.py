"""docs/fleet.md as written: every main file and app file it shows passes `supervisor check`
together, with the certificates its openssl commands make; the [fleet] keys of
docs/configuration.md are the ones the code reads; and (slow) its certificates, its
/etc/default/etcd and its etcdctl check bring up a real three-member etcd with TLS on loopback,
which `supervisor fleet status` then reads with the page's main file. Addresses 10.0.0.N become
127.0.0.N and the ports free ones (never 2379/2380); /etc, /var and /srv a temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from supervisor.core.config import FLEET_CONNECTION_KEYS, FleetPolicy
from supervisor.core.hostconfig import FleetConfig
from tests.conftest import BASE_ENV, GIT_ENV
from tests.etcdtest import need_etcd
from tests.test_docs_config import documented_keys

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "fleet.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
BOXES = {"fra-1": "10.0.0.5", "fra-2": "10.0.0.6", "fra-3": "10.0.0.7"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", PAGE.read_text(), re.M | re.S)


def block_starting(language: str, first_line: str) -> str:
    (found,) = [b for b in blocks(language) if b.startswith(first_line)]
    return found


def fleet_files() -> tuple[list[str], list[str]]:
    """The TOML blocks with a [fleet]: (main files, app files), each opening with its path."""
    shown = [b for b in blocks("toml") if re.search(r"^\[fleet\]", b, re.M)]
    mains = [b for b in shown if re.search(r"^\[supervisor\]", b, re.M)]
    return mains, [b for b in shown if b not in mains]


def local(text: str, root: Path) -> str:
    """The page's absolute paths, under `root`."""
    for prefix in ("/etc/tiny-supervisor", "/var/lib/tiny-supervisor", "/srv/tiny-supervisor"):
        text = text.replace(prefix, str(root) + prefix)
    return text


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env or BASE_ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page's openssl commands, run in bash in an empty directory, for members on
    127.0.0.N."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("pki")
    commands = loopback(block_starting("sh", "# the CA\n"), 2379, 2380)
    done = run(["bash", "-euc", commands], directory)
    assert done.returncode == 0, done.stderr
    shown = run(["openssl", "x509", "-in", "fra-2-etcd.pem", "-noout", "-ext", "subjectAltName"],
                directory)
    assert "IP Address:127.0.0.6, IP Address:127.0.0.1" in shown.stdout
    return directory


def install_box(pki: Path, root: Path, box: str) -> None:
    """The page's table of which file goes where on a box: the supervisor's half."""
    etcd = root / "etc" / "tiny-supervisor" / "etcd"
    etcd.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki / "ca.pem", etcd / "ca.pem")
    shutil.copy(pki / f"{box}-client.pem", etcd / "client.pem")
    shutil.copy(pki / f"{box}-client.key", etcd / "client.key")


def write_box(root: Path, main: str, apps: list[str]) -> Path:
    """The main file and the app files at the paths their first lines name, and the app's clone
    (with an upstream) at its git.repo."""
    written = []
    for text in [main, *apps]:
        path = Path(local(text.splitlines()[0].lstrip("# ").strip(), root))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(local(text, root))
        written.append(path)
    for repo in re.findall(r'^repo = "(.*)"', "\n".join(apps), re.M):
        clone_with_upstream(Path(local(repo, root)))
    return written[0]


def clone_with_upstream(clone: Path) -> None:
    remote = clone.parent / (clone.name + ".git")
    clone.parent.mkdir(parents=True, exist_ok=True)
    for command in (["git", "init", "-q", "--bare", "-b", "main", str(remote)],
                    ["git", "clone", "-q", str(remote), str(clone)],
                    ["git", "-C", str(clone), "commit", "-q", "--allow-empty", "-m", "first"],
                    ["git", "-C", str(clone), "push", "-q", "origin", "main"]):
        done = run(command, clone.parent, env=GIT_ENV)
        assert done.returncode == 0, done.stderr


def check(main: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "supervisor", "check", "-c", str(main)], main.parent)


def test_every_fleet_config_on_the_page_passes_check(pki: Path, tmp_path: Path) -> None:
    mains, apps = fleet_files()
    assert mains and apps, "the page shows a main file and an app file with [fleet]"
    for index, main in enumerate(mains):
        root = tmp_path / str(index)
        install_box(pki, root, "fra-1")
        path = write_box(root, main, apps)
        done = check(path)
        assert done.returncode == 0, f"{main}\n{done.stderr}"
        assert "web:" in done.stdout and "Traceback" not in done.stderr


def test_the_check_above_fails_without_the_client_certificate(pki: Path, tmp_path: Path) -> None:
    mains, apps = fleet_files()
    install_box(pki, tmp_path, "fra-1")
    (tmp_path / "etc" / "tiny-supervisor" / "etcd" / "client.key").unlink()
    done = check(write_box(tmp_path, mains[0], apps))
    assert done.returncode == 2 and "fleet.key: cannot read" in done.stderr, done.stderr


def test_the_fleet_keys_of_the_configuration_page_are_the_codes() -> None:
    documented = documented_keys(CONFIGURATION.read_text())["fleet"]
    policy = {item.name for item in fields(FleetPolicy)}
    connection = {item.name for item in fields(FleetConfig)}
    assert connection == set(FLEET_CONNECTION_KEYS)
    assert documented == policy | connection, sorted(documented ^ (policy | connection))


def test_the_page_names_the_keys_etcd_really_writes() -> None:
    """The key layout the troubleshooting section tells people to delete is core/fleet.py's."""
    from supervisor.core.fleet import Keys

    keys = Keys("/tiny-supervisor", "web")
    text = PAGE.read_text()
    assert f"etcdctl del {keys.slot(0)}" in text
    held = re.search(r"etcdctl del (/\S+/held/)([0-9a-f]{40})", text)
    assert held is not None and held.group(1) + held.group(2) == keys.held(held.group(2))


# ---------------------------------------------------------------------------------------------
# The page's etcd, for real: three members with TLS on 127.0.0.5-7


def free_port() -> int:
    """A port free on every address (bound on 0.0.0.0), so on 127.0.0.5-7 too."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def member_environment(box: str, client: int, peer: int, local_port: int,
                       directory: Path) -> dict[str, str]:
    """/etc/default/etcd of `box`: fra-1's as the page shows it, with the changes it names for
    the others (ETCD_NAME and the box's own address in the four _URLS lines)."""
    variables = {}
    for line in block_starting("sh", "# /etc/default/etcd on fra-1\n").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.partition("=")
        if name == "ETCD_NAME":
            value = box
        elif name.endswith("_URLS"):
            value = value.replace(BOXES["fra-1"] + ":", BOXES[box] + ":")
        value = value.replace("127.0.0.1:2379", f"127.0.0.1:{local_port}")
        value = value.replace("/var/lib/etcd/default", str(directory / "data"))
        value = value.replace("/etc/etcd/pki", str(directory / "pki"))
        variables[name] = loopback(value, client, peer)
    return variables


def loopback(text: str, client: int, peer: int) -> str:
    text = re.sub(r"10\.0\.0\.(\d+)", r"127.0.0.\1", text)
    return text.replace(":2379", f":{client}").replace(":2380", f":{peer}")


@pytest.fixture
def cluster(pki: Path, tmp_path: Path) -> Iterator[tuple[int, int]]:
    etcd = need_etcd()
    client, peer = free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index, box in enumerate(BOXES):
            directory = tmp_path / box
            (directory / "pki").mkdir(parents=True)
            shutil.copy(pki / "ca.pem", directory / "pki" / "ca.pem")
            shutil.copy(pki / f"{box}-etcd.pem", directory / "pki" / "server.pem")
            shutil.copy(pki / f"{box}-etcd.key", directory / "pki" / "server.key")
            variables = member_environment(box, client, peer, free_port(), directory)
            assert index > 0 or variables["ETCD_NAME"] == "fra-1"
            log = open(directory / "etcd.log", "wb")  # noqa: SIM115
            processes.append(subprocess.Popen(
                [etcd], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **variables}))
            log.close()
        yield client, peer
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def etcdctl_environment(pki: Path, root: Path, client: int, peer: int) -> dict[str, str]:
    """The page's `export ETCDCTL_...` lines, on a box installed as its table says."""
    install_box(pki, root, "fra-1")
    text = loopback(local(block_starting("sh", "export ETCDCTL_ENDPOINTS="), root), client, peer)
    variables = dict(re.findall(r"(ETCDCTL_[A-Z]+)=(\S+)", text))
    assert set(variables) == {"ETCDCTL_ENDPOINTS", "ETCDCTL_CACERT", "ETCDCTL_CERT",
                              "ETCDCTL_KEY"}
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ETCDCTL_API": "3", **variables}


@pytest.mark.slow
def test_the_pages_etcd_forms_a_tls_cluster_that_the_pages_config_reads(
        pki: Path, cluster: tuple[int, int], tmp_path: Path) -> None:
    client, peer = cluster
    env = etcdctl_environment(pki, tmp_path, client, peer)
    commands = [line for line in block_starting("sh", "export ETCDCTL_ENDPOINTS=").splitlines()
                if line.startswith("etcdctl ")]
    assert commands == ["etcdctl endpoint health", "etcdctl member list -w table"]
    deadline = time.monotonic() + 60
    while True:  # the members elect a leader once a majority is up: bounded by the deadline
        health = run(commands[0].split(), tmp_path, env=env)
        if health.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert health.returncode == 0, health.stdout + health.stderr
    assert (health.stdout + health.stderr).count("is healthy: successfully committed") == 3
    members = run(commands[1].split(), tmp_path, env=env)
    assert members.returncode == 0 and all(box in members.stdout for box in BOXES)
    without = {k: v for k, v in env.items() if k not in ("ETCDCTL_CERT", "ETCDCTL_KEY")}
    refused = run(["etcdctl", "--dial-timeout=2s", "--command-timeout=3s", "endpoint",
                   "health"], tmp_path, env=without)
    assert refused.returncode != 0 and "is unhealthy" in refused.stdout + refused.stderr

    mains, apps = fleet_files()
    main = write_box(tmp_path, loopback(mains[0], client, peer), apps)
    shown = run([sys.executable, "-m", "supervisor", "fleet", "status", "-c", str(main)],
                tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "no fleet group in etcd under /tiny-supervisor yet"
