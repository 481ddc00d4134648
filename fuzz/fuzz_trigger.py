"""Fuzz the push webhook: any bytes as one raw HTTP request to a Trigger listening on 127.0.0.1,
in this process, on one event loop. Contract: each request gets an answer of the documented
kind, or a close, within a bound; nothing reaches `trigger.error` or the loop's exception
handler; no connection or file descriptor is left behind; a good signed push right after is
still accepted; nothing runs.

    .venv/bin/python fuzz/fuzz_trigger.py --seconds 60
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
from typing import Any

import harness
from harness import expect

with harness.instrumented():
    from supervisor.drivers.trigger import Trigger

SECRET = "fuzzing-secret-0123456789abcdef"  # the seeds in corpus/trigger are signed with it
BOUND = 3.0  # seconds for one exchange; a half-closed request needs no timeout to end
ANSWERS = {200, 202, 400, 401, 404, 405, 411, 413, 429, 431}
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def good_request(delivery: str, body: bytes = b'{"ref": "refs/heads/main"}') -> bytes:
    """A push as GitHub sends it, signed with SECRET."""
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return (f"POST / HTTP/1.1\r\nHost: box.example\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-GitHub-Event: push\r\n"
            f"X-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: sha256={digest}\r\n"
            f"\r\n").encode() + body


class Endpoint:
    """One Trigger for the whole run, with what it logged and called for the current input."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: self.unhandled.append(context))
        self.unhandled: list[dict[str, Any]] = []
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.pushes = 0
        # A burst no input can exhaust, so that the good push after it is never rate limited.
        self.trigger = Trigger(SECRET, self._pushed, self._log, burst=10**9, refill=1e-3)
        self.loop.run_until_complete(self.trigger.start("127.0.0.1:0"))
        self.deliveries = 0
        self.fds = len(os.listdir("/proc/self/fd"))
        self.checks = 0

    def _pushed(self) -> None:
        self.pushes += 1

    def _log(self, event: str, facts: dict[str, Any]) -> None:
        self.records.append((event, facts))

    async def exchange(self, data: bytes) -> bytes:
        """Send `data` and half-close; read until the trigger closes (a reset is a close)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.trigger.port)
        try:
            writer.write(data)
            writer.write_eof()
            return await reader.read()
        except ConnectionError:
            return b""
        finally:
            writer.close()

    async def bounded(self, data: bytes) -> bytes:
        try:
            async with asyncio.timeout(BOUND):
                return await self.exchange(data)
        except TimeoutError:
            raise harness.Violation(f"no answer nor close within {BOUND}s") from None

    def check(self, data: bytes) -> None:
        self.records.clear()
        reply = self.loop.run_until_complete(self.bounded(data))
        if reply.startswith(CONTINUE):
            reply = reply[len(CONTINUE):]
        if reply:
            match = STATUS.match(reply)
            expect(match and int(match.group(1)) in ANSWERS, f"an answer of no known kind: "
                   f"{reply[:200]!r}")
            expect(b"\r\n\r\n" in reply, f"an unfinished answer: {reply[:200]!r}")

        self.deliveries += 1
        before = self.pushes
        delivery = f"after-{self.deliveries}"  # a new push: its own id and its own body
        body = f'{{"ref": "refs/heads/main", "after": "{delivery}"}}'.encode()
        good = self.loop.run_until_complete(self.bounded(good_request(delivery, body)))
        expect(good.startswith(b"HTTP/1.1 202 "), f"a good push after it got {good[:200]!r}")
        expect(self.pushes == before + 1, "a good push after it did not call on_push")

        errors = [facts for event, facts in self.records if event == "trigger.error"]
        expect(not errors, f"trigger.error: {errors}")
        expect(not self.unhandled, f"the loop's exception handler got {self.unhandled}")
        expect(not any(facts.get("reason") == "too many connections"
                       for _, facts in self.records), "connections pile up")
        logged = repr(self.records)
        expect(SECRET not in logged or SECRET.encode() in data, "the secret was logged")
        self.checks += 1
        if self.checks % 500 == 0:
            self.loop.run_until_complete(asyncio.sleep(0.05))  # let closed connections finish
            fds = len(os.listdir("/proc/self/fd"))
            expect(fds <= self.fds + 8, f"file descriptors grew from {self.fds} to {fds}")


ENDPOINT: Endpoint | None = None


def check(data: bytes) -> None:
    global ENDPOINT
    if ENDPOINT is None:
        ENDPOINT = Endpoint()
    ENDPOINT.check(data)


TARGET = harness.Target(
    "trigger", check, max_len=16384, bound=10.0,
    tokens=[b"POST", b"GET", b" / HTTP/1.1\r\n", b"HTTP/1.0", b"\r\n", b"\r\n\r\n", b": ",
            b"Content-Length: ", b"Transfer-Encoding: chunked", b"Expect: 100-continue",
            b"X-Hub-Signature-256: sha256=", b"X-Gitea-Signature: ", b"X-Forgejo-Signature: ",
            b"X-Gitlab-Token: ", SECRET.encode(), b"X-GitHub-Delivery: ", b"X-Gitlab-Event-UUID: ",
            b"X-GitHub-Event: push", b"1048577", b"99999999999999999", b"\x00", b"\xb2", b"?",
            b"$(touch fuzz-executed)", b"`touch fuzz-executed`"])

if __name__ == "__main__":
    harness.main(TARGET)
