"""Real etcd for the fleet's tests: members on loopback ports in a temporary directory, started,
killed, stopped and found leader of; and a TCP proxy that can refuse or black-hole. Never the
packaged service, never the default ports; every process started here is ended by close().
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.drivers.sockets import free_port

ETCD = shutil.which("etcd")
START_WAIT = 20.0  # a fresh 3-member cluster answers in about a second on 2 quiet cores


class EtcdHarnessError(Exception):
    """The cluster did not come up or answer in time; carries the members' last log lines."""


def need_etcd() -> str:
    """The etcd binary, or the test is skipped (CI installs etcd-server, so there it runs)."""
    if ETCD is None:
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    return ETCD


def _post(endpoint: str, path: str, payload: dict[str, Any], timeout: float,
          context: Any = None) -> dict[str, Any]:
    request = urllib.request.Request(endpoint + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.loads(response.read())


def _poll(condition: Callable[[], Any], timeout: float, what: str,
          detail: Callable[[], str] = lambda: "") -> Any:
    """For what nothing notifies us about: a member that starts answering HTTP."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise EtcdHarnessError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(0.05)


class EtcdCluster:
    """`size` members on 127.0.0.1, tuned to elect fast on loopback.

    `endpoints` are the client URLs in member order; `tls` is (ca, cert, key) paths for members
    that serve https and ask for client certificates."""

    def __init__(self, directory: Path, size: int = 3, *,
                 tls: tuple[Path, Path, Path] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        """`tls`: (ca, cert, key); `extra_args`: more etcd flags for every member."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.tls = tls
        self.extra_args = extra_args
        self.binary = ETCD or "etcd"
        scheme = "https" if tls else "http"
        self.client_ports = [free_port() for _ in range(size)]
        self.peer_ports = [free_port() for _ in range(size)]
        self.endpoints = [f"{scheme}://127.0.0.1:{port}" for port in self.client_ports]
        self.names = [f"m{i}" for i in range(size)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[Any] = [None] * size
        self._cluster = ",".join(f"{name}=http://127.0.0.1:{port}"
                                 for name, port in zip(self.names, self.peer_ports, strict=True))
        try:
            for index in range(size):
                self._start(index)
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    # -- members -----------------------------------------------------------------------------

    def _command(self, index: int) -> list[str]:
        client = self.endpoints[index]
        peer = f"http://127.0.0.1:{self.peer_ports[index]}"
        command = [
            self.binary, "--name", self.names[index],
            "--data-dir", str(self.directory / f"{self.names[index]}.etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self._cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"test-{os.getpid()}-{self.peer_ports[0]}",
            # Loopback answers in microseconds: elect within a second, not the default's 1-2 s.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-level", "warn", "--logger", "zap",
        ]
        if self.tls is not None:
            ca, cert, key = self.tls
            command += ["--cert-file", str(cert), "--key-file", str(key),
                        "--trusted-ca-file", str(ca), "--client-cert-auth"]
        return command + list(self.extra_args)

    def _start(self, index: int) -> None:
        log = open(self.directory / f"{self.names[index]}.log", "ab")  # noqa: SIM115
        self._logs[index] = log
        self.processes[index] = subprocess.Popen(
            self._command(index), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})

    def _signal(self, index: int, number: signal.Signals) -> None:
        process = self.processes[index]
        if process is not None and process.poll() is None:
            process.send_signal(number)  # our own child, not yet reaped: the pid is still its

    def kill(self, index: int) -> None:
        """SIGKILL member `index` and reap it."""
        process = self.processes[index]
        if process is None:
            return
        self._signal(index, signal.SIGKILL)
        process.wait(timeout=10)
        self.processes[index] = None
        self._logs[index].close()

    def stop(self, index: int) -> None:
        """SIGSTOP: the member keeps its sockets but answers nothing."""
        self._signal(index, signal.SIGSTOP)

    def cont(self, index: int) -> None:
        self._signal(index, signal.SIGCONT)

    def restart(self, index: int) -> None:
        """Kill member `index` if it runs, start it again on its data, wait until it serves."""
        self.kill(index)
        self._start(index)
        self.wait_ready(index)

    def alive(self, index: int) -> bool:
        process = self.processes[index]
        return process is not None and process.poll() is None

    # -- asking the members ------------------------------------------------------------------

    def status(self, index: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """Member `index`'s /v3/maintenance/status, or None if it does not answer."""
        try:
            return _post(self._url(index), "/v3/maintenance/status", {}, timeout,
                         **self._tls_args())
        except (OSError, ValueError):
            return None

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the member that leads now (waiting out an election, bounded)."""
        def find() -> int | None:
            ids, leaders = {}, set()
            for index in range(self.size):
                if not self.alive(index):
                    continue
                status = self.status(index, timeout=0.5)
                if status is None:
                    continue
                ids[status["header"]["member_id"]] = index
                leaders.add(status.get("leader"))
            if len(leaders) == 1:
                leader = leaders.pop()
                if leader in ids:
                    return ids[leader] + 1  # 0 is a leader too: keep the value truthy
            return None

        return _poll(find, timeout, "one leader all members agree on", self.tail) - 1

    def put(self, index: int, key: str, value: str, timeout: float = 2.0) -> int:
        """A put through member `index` (a linearizable write: it needs a leader); revision."""
        reply = _post(self._url(index), "/v3/kv/put", {
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(value.encode()).decode()}, timeout, **self._tls_args())
        return int(reply["header"]["revision"])

    def compact(self, revision: int) -> None:
        """Forget the history before `revision`: a watch from earlier fails."""
        _post(self._url(self.first_alive()), "/v3/kv/compaction",
              {"revision": str(revision), "physical": True}, 5.0, **self._tls_args())

    def enable_auth(self, user: str, password: str) -> None:
        """Make `user` root and turn authentication on: from then on every request needs a
        token."""
        url, tls = self._url(self.first_alive()), self._tls_args()
        _post(url, "/v3/auth/role/add", {"name": "root"}, 5.0, **tls)
        _post(url, "/v3/auth/user/add", {"name": user, "password": password}, 5.0, **tls)
        _post(url, "/v3/auth/user/grant", {"user": user, "role": "root"}, 5.0, **tls)
        _post(url, "/v3/auth/enable", {}, 5.0, **tls)

    def first_alive(self) -> int:
        return next(index for index in range(self.size) if self.alive(index))

    def wait_ready(self, index: int | None = None, timeout: float = START_WAIT) -> None:
        """Until a put works through member `index` (or through each member)."""
        for member in range(self.size) if index is None else (index,):
            def put_works(member: int = member) -> bool:
                if not self.alive(member):
                    raise EtcdHarnessError(f"etcd member {member} exited\n{self.tail()}")
                try:
                    self.put(member, "/etcdtest/ready", str(member), timeout=1.0)
                except (OSError, ValueError, KeyError):
                    return False
                return True

            _poll(put_works, timeout, f"a put through etcd member {member}", self.tail)

    def _url(self, index: int) -> str:
        return self.endpoints[index]

    def _tls_args(self) -> dict[str, Any]:
        return {} if self.tls is None else {"context": self._ssl_context()}

    def _ssl_context(self) -> Any:
        import ssl

        assert self.tls is not None
        ca, cert, key = self.tls
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        return context

    def tail(self, lines: int = 5) -> str:
        out = []
        for name in self.names:
            with contextlib.suppress(OSError):
                text = (self.directory / f"{name}.log").read_text(errors="replace")
                out += [f"{name}: {line}" for line in text.splitlines()[-lines:]]
        return "\n".join(out)

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every member (a stopped one too: SIGKILL ends it) and wait for each."""
        for index in range(self.size):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.kill(index)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def etcd_fixture(size: int = 3, scope: str = "function", **kwargs: Any) -> Any:
    """A pytest fixture giving a running EtcdCluster, skipped without etcd:
    `cluster = etcd_fixture(3, scope="module")` in a test module."""
    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
        need_etcd()
        with EtcdCluster(tmp_path_factory.mktemp("etcd"), size, **kwargs) as running:
            yield running

    return cluster


# ---------------------------------------------------------------------------------------------
# Certificates, made by openssl for one test run


def make_certificates(directory: Path) -> tuple[Path, Path, Path, Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it:
    (ca, server_cert, server_key, client_cert, client_key). Skips without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True,
                       timeout=30)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test etcd CA")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage="
                                       "serverAuth,clientAuth"),
                            ("client", "extendedKeyUsage=clientAuth")):
        (directory / f"{name}.ext").write_text(extension + "\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext")
    return (directory / "ca.pem", directory / "server.pem", directory / "server.key",
            directory / "client.pem", directory / "client.key")


# ---------------------------------------------------------------------------------------------
# A proxy that a test can make refuse or black-hole


class TcpProxy:
    """A port on 127.0.0.1 forwarding to (target_host, target_port), on a thread of the test
    process. `mode` can be switched at any time:

    - "pass": forward both ways;
    - "refuse": new connections are reset at once, and so are the open ones;
    - "blackhole": connections are accepted and their bytes swallowed, nothing ever answers;
      open ones go silent too (and stay so: their streams have lost bytes).
    """

    MODES = ("pass", "refuse", "blackhole")

    def __init__(self, target_host: str, target_port: int, mode: str = "pass") -> None:
        self.target = (target_host, target_port)
        self._mode = self._check(mode)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._peer: dict[socket.socket, socket.socket | None] = {}  # None: swallowed
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        with self._lock:
            self._mode = self._check(mode)
        self._wake()

    def _check(self, mode: str) -> str:
        if mode not in self.MODES:
            raise ValueError(f"proxy mode {mode!r}: one of {self.MODES}")
        return mode

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        applied = None
        while not self._stopping:
            with self._lock:
                mode = self._mode
            if mode != applied:
                self._apply(mode)
                applied = mode
            for key, _ in self._selector.select(timeout=None):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_read.recv(4096)
                elif key.data == "accept":
                    self._accept(mode)
                else:
                    self._forward(key.fileobj)  # type: ignore[arg-type]
        for sock in list(self._peer):
            self._drop(sock, reset=True)

    def _apply(self, mode: str) -> None:
        if mode == "refuse":
            for sock in list(self._peer):
                self._drop(sock, reset=True)
        elif mode == "blackhole":
            for sock, peer in list(self._peer.items()):
                if peer is not None and sock in self._peer:
                    self._swallow(sock, peer)

    def _accept(self, mode: str) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.accepted += 1
        if mode == "refuse":
            _reset(client)
            return
        if mode == "blackhole":
            self._add(client, None)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            _reset(client)
            return
        self._add(client, upstream)
        self._add(upstream, client)

    def _add(self, sock: socket.socket, peer: socket.socket | None) -> None:
        sock.settimeout(5)  # for sendall; reads happen only when select says so
        self._peer[sock] = peer
        self._selector.register(sock, selectors.EVENT_READ, sock)

    def _swallow(self, sock: socket.socket, peer: socket.socket) -> None:
        """Both ends of a pair stop forwarding: bytes in either direction vanish."""
        self._peer[sock] = None
        self._peer[peer] = None

    def _forward(self, sock: socket.socket) -> None:
        if sock not in self._peer:
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        peer = self._peer[sock]
        if not data:
            self._drop(sock, reset=False)
            return
        if peer is None:
            return  # black-holed
        try:
            peer.sendall(data)
        except OSError:
            self._drop(sock, reset=True)

    def _drop(self, sock: socket.socket, *, reset: bool) -> None:
        """Close `sock` and whatever it is paired with."""
        peer = self._peer.pop(sock, None)
        for one in (sock, peer):
            if one is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(one)
            if one is peer:
                self._peer.pop(peer, None)
            _reset(one) if reset else one.close()

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "TCP proxy thread did not stop"
        self._selector.close()
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: the peer sees 'connection reset' at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
