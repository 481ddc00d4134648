"""Fds handed to a child: each app finds its sockets at 3, 4, ... wherever the supervisor holds
them (one process binds many apps' sockets), and nothing else of ours reaches it."""

from __future__ import annotations

import asyncio
import os
import socket

from supervisor.drivers import proc


def child_fds(pass_fds: list[int]) -> dict[int, str]:
    """What `ls -l /proc/self/fd` shows in a child started with `pass_fds`: fd -> target."""
    async def run() -> str:
        read, write = os.pipe()
        try:
            started = proc.spawn(["sh", "-c", "ls -l /proc/self/fd >&2; :"], cwd="/", env=None,
                                 stderr=write, pass_fds=pass_fds)
        finally:
            os.close(write)
        async with asyncio.timeout(10):
            await started.exited
        with os.fdopen(read) as file:
            return file.read()

    seen = {}
    for line in asyncio.run(run()).splitlines()[1:]:
        fd, _, target = line.split()[-3:]
        seen[int(fd)] = target
    return seen


def inode(sock: socket.socket) -> str:
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


def test_sockets_held_anywhere_reach_the_child_at_three_on_in_their_order():
    proc.seal_inherited_fds()  # as `supervisor run` does first: what pytest inherited stays
    first, second = socket.socket(), socket.socket()
    spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]  # push them up
    high = [socket.socket() for _ in range(2)]
    try:
        fds = [high[1].fileno(), high[0].fileno()]
        seen = child_fds(fds)
        assert seen[3] == inode(high[1]) and seen[4] == inode(high[0])
        assert {fd for fd in seen if fd > 2} <= {3, 4, 5}, seen  # 5: ls's own listing
    finally:
        for fd in spare:
            os.close(fd)
        for sock in (first, second, *high):
            sock.close()


def test_an_fd_the_supervisor_inherited_never_reaches_a_child():
    import fcntl

    opened = os.open("/dev/null", os.O_RDONLY)
    leaked = fcntl.fcntl(opened, fcntl.F_DUPFD, 200)  # as a shell or a service manager leaves one
    os.close(opened)
    os.set_inheritable(leaked, True)
    sock = socket.socket()
    try:
        assert leaked in child_fds([sock.fileno()]), "before the seal, it would reach the child"
        proc.seal_inherited_fds()
        seen = child_fds([sock.fileno()])
        assert leaked not in seen and seen[3] == inode(sock)
    finally:
        os.close(leaked)
        sock.close()
