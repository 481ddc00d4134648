"""Health probes for a child on probation: a TCP connect, an HTTP GET answering 2xx, a command
exiting 0, or READY=1 sent by the child over sd_notify. A probe reports HealthPassed once, or
HealthProbeFailed when its reason changes; the deadline is the machine's timer, not ours.
Loaded only by configs with a health gate.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
from collections.abc import Callable, Mapping

from supervisor.core.config import HealthConfig
from supervisor.core.events import Event, HealthPassed, HealthProbeFailed
from supervisor.drivers import proc
from supervisor.drivers.procfs import stat_fields

_URL = re.compile(r"^http://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+)(?::([0-9]{1,5}))?(/\S*)?$")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):([0-9]{1,5})$")
MAX_STATUS_LINE = 4096
MAX_DATAGRAM = 4096


class ProbeFailed(Exception):
    """One probe did not pass; the message says why, in a few words."""


def _host(text: str) -> str:
    return text[1:-1] if text.startswith("[") else text


async def probe_tcp(address: str) -> str:
    match = _ADDRESS.match(address)
    if match is None:
        raise ProbeFailed(f"not an address: {address}")
    _, writer = await asyncio.open_connection(_host(match.group(1)), int(match.group(2)))
    writer.close()
    return "connected"


async def probe_http(url: str) -> str:
    """A bare HTTP/1.0 GET: no http.client (and no ssl): only the status line matters."""
    match = _URL.match(url)
    if match is None:
        raise ProbeFailed(f"not a plain-HTTP URL: {url}")
    host, port, path = _host(match.group(1)), int(match.group(2) or 80), match.group(3) or "/"
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_STATUS_LINE)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {match.group(1)}\r\n"
                     "User-Agent: supervisor-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise ProbeFailed("status line too long") from None
    finally:
        writer.close()
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProbeFailed("no HTTP status line" if line else "closed without an answer")
    if not 200 <= int(parts[1]) < 300:
        raise ProbeFailed(f"HTTP {parts[1]}")
    return f"HTTP {parts[1]}"


class Prober:
    """Runs the configured probe against one child at a time."""

    def __init__(self, config: HealthConfig, post: Callable[[Event], None]) -> None:
        self.config, self.post = config, post
        self.task: asyncio.Task[None] | None = None
        self.notify: NotifyListener | None = None

    def start(self, pid: int, cwd: str, env: Mapping[str, str]) -> None:
        self.stop()
        if self.config.notify:
            if self.notify is not None:
                self.notify.expect(pid)
            return
        self.task = asyncio.get_running_loop().create_task(self._probe(pid, cwd, dict(env)))

    def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = None
        if self.notify is not None:
            self.notify.expect(None)

    async def _once(self, cwd: str, env: Mapping[str, str]) -> str:
        config = self.config
        if config.tcp is not None:
            return await probe_tcp(config.tcp)
        if config.http is not None:
            return await probe_http(config.http)
        assert config.command is not None
        result = await proc.run(config.command, cwd=cwd, env=env,
                                timeout=config.probe_timeout, tail_lines=1, line_limit=200)
        if result.timed_out:
            raise ProbeFailed(f"command timed out after {config.probe_timeout:g}s")
        if not result.ok:
            code, signal_name = proc.describe_returncode(result.returncode or 0)
            words = f"killed by {signal_name}" if signal_name else f"exit code {code}"
            raise ProbeFailed(words + (f": {result.output}" if result.output else ""))
        return "exit code 0"

    async def _probe(self, pid: int, cwd: str, env: Mapping[str, str]) -> None:
        last_error = None
        while True:
            try:
                async with asyncio.timeout(self.config.probe_timeout + 1.0):
                    detail = await self._once(cwd, env)
            except (ProbeFailed, OSError, TimeoutError) as error:
                reason = _reason(error, self.config.probe_timeout)
            else:
                self.post(HealthPassed(pid=pid, detail=detail))
                return
            if reason != last_error:
                self.post(HealthProbeFailed(pid=pid, error=reason))
                last_error = reason
            await asyncio.sleep(self.config.interval)


def _reason(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(error, OSError) and error.errno:
        # asyncio words a refused connect around the address; the errno says it plainly.
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


class NotifyListener:
    """The NOTIFY_SOCKET we give each child: READY=1 from the expected child's process group
    proves it is up. Senders are identified by the kernel (SO_PASSCRED), not by what they say;
    datagrams are parsed as text, never executed. Idle, it costs one fd and no CPU."""

    def __init__(self, path: str, post: Callable[[Event], None]) -> None:
        self.path, self.post = path, post
        self.expected: int | None = None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def expect(self, pid: int | None) -> None:
        self.expected = pid

    def _read(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(MAX_DATAGRAM,
                                                          socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sender = _sender_pid(ancillary)
            expected = self.expected
            if expected is None or sender is None or not _in_group(sender, expected):
                continue
            if b"READY=1" in data.split(b"\n"):
                self.expected = None
                self.post(HealthPassed(pid=expected, detail="READY=1"))

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        except RuntimeError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return struct.unpack("iII", data[:12])[0]
    return None


def _in_group(pid: int, group: int) -> bool:
    """The child itself or a process in its group (a wrapper's child sends for it)."""
    if pid == group:
        return True
    fields = stat_fields(pid)
    return fields is not None and len(fields) > 2 and fields[2] == str(group)
