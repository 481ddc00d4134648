"""Listening sockets the supervisor owns and hands to each generation of the app with systemd's
socket-activation protocol (fds from 3, LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), so the kernel
queues connections while one app process replaces another. Bound once, before anything else
opens a file, so they sit at fds 3.. for good; or taken over from systemd when it started us.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import MutableMapping, Sequence

from supervisor.core.config import SocketConfig

FIRST_FD = 3  # SD_LISTEN_FDS_START
BACKLOG = 1024  # connections the kernel holds while no app process accepts


class SocketError(Exception):
    """A socket could not be set up; one line naming the socket and why."""


def _parse_inet(listen: str) -> tuple[int, str, int]:
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def _bind(config: SocketConfig) -> socket.socket:
    if config.listen.startswith("/"):
        return _bind_unix(config)
    family, host, port = _parse_inet(config.listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR only: connections left in TIME_WAIT by an earlier run must not block us,
        # but no second process may bind the port beside us (that is SO_REUSEPORT, not set).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise SocketError(f"socket {config.listen}: cannot listen: "
                          f"{os.strerror(error.errno) if error.errno else error}") from None
    return sock


def _bind_unix(config: SocketConfig) -> socket.socket:
    path = config.listen
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketError(f"socket {path}: a file that is not a socket is in the way")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a socket file left by a process that is gone
        else:
            raise SocketError(f"socket {path}: another process listens on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if config.mode is not None:
            os.chmod(path, config.mode)
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        raise SocketError(f"socket {path}: cannot listen: {error.strerror}") from None
    return sock


def _place(sock: socket.socket, fd: int) -> socket.socket:
    """Move a socket to exactly `fd`: the app expects its sockets at 3, 4, ... in order."""
    if sock.fileno() == fd:
        return sock
    moved = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, fd)
    if moved != fd:
        os.close(moved)
        sock.close()
        raise SocketError(f"fd {fd} is taken, so the sockets cannot be handed on at fds "
                          f"{FIRST_FD}..: start the supervisor with only stdin, stdout and "
                          "stderr open")
    sock.close()
    return socket.socket(fileno=fd)


def from_systemd(configs: Sequence[SocketConfig], environ: MutableMapping[str, str]
                 ) -> list[socket.socket] | None:
    """The sockets systemd passed us (LISTEN_PID is our pid), in the order of the config, or
    None when we were not socket-activated. The variables are removed: they were for us."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(environ.get("LISTEN_FDS", "0") or 0)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if count != len(configs):
        raise SocketError(f"systemd passed {count} sockets; the config has {len(configs)} "
                          "[[socket]] entries")
    given = [socket.socket(fileno=FIRST_FD + i) for i in range(count)]
    if names and len(names) == count and {c.name for c in configs} == set(names):
        by_name = dict(zip(names, given, strict=True))
        given = [by_name[c.name] for c in configs]
    return given


def open_sockets(configs: Sequence[SocketConfig], environ: MutableMapping[str, str],
                 place: bool = True) -> tuple[list[socket.socket], bool]:
    """Take the sockets over from systemd, or bind them; either way they end at fds 3...
    The flag says whether systemd gave them (then their files are systemd's, not ours).
    Without `place` (many apps in one process) they are bound wherever the kernel puts them,
    never taken from systemd, and each app's reach it at 3.. when it starts."""
    inherited = from_systemd(configs, environ) if place else None
    if inherited is not None:
        return inherited, True
    bound: list[socket.socket] = []
    try:
        for config in configs:
            bound.append(_bind(config))
        if not place:
            return bound, False
        return [_place(sock, FIRST_FD + i) for i, sock in enumerate(bound)], False
    except BaseException:
        for sock in bound:
            if sock.fileno() != -1:
                sock.close()
        raise


def child_environment(configs: Sequence[SocketConfig]) -> dict[str, str]:
    """The variables a child needs besides LISTEN_PID, which only it can know (see wrap)."""
    return {"LISTEN_FDS": str(len(configs)),
            "LISTEN_FDNAMES": ":".join(config.name for config in configs)}


def wrap(argv: Sequence[str]) -> tuple[str, ...]:
    """LISTEN_PID must be the app's own pid, unknown before it starts: a shell exports its own
    pid and execs the app, which keeps that pid."""
    return ("/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "supervisor-app",
            *argv)


def passed_fds(count: int) -> tuple[int, ...]:
    return tuple(range(FIRST_FD, FIRST_FD + count))


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, tuple):
        host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
        return f"{host}:{address[1]}"
    return str(address)


def close_all(sockets: Sequence[socket.socket], configs: Sequence[SocketConfig],
              bound_here: bool) -> None:
    """Close the sockets; a Unix socket file we bound ourselves is removed (one that systemd
    made is systemd's)."""
    for sock, config in zip(sockets, configs, strict=False):
        sock.close()
        if bound_here and config.listen.startswith("/"):
            try:
                if stat.S_ISSOCK(os.lstat(config.listen).st_mode):
                    os.unlink(config.listen)
            except OSError:
                pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, chosen by the kernel (bind to port 0). For the
    demo, the tests and the benchmarks: another process may still take it before the caller
    binds it, which on loopback in a test is rare enough; the supervisor itself never uses it."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
