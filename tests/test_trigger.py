"""The push trigger against real sockets on the loopback: signatures of each forge, replays,
oversized and slow requests, floods of requests and of connections, and random bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.drivers.trigger import LOG_BURST, Bucket, Signer, Trigger, parse_listen

SECRET = "It's a Secret to Everybody"
PAYLOAD = b'{"ref": "refs/heads/main", "after": "' + b"a" * 40 + b'"}'
BOUND = 10.0  # no scenario may take longer; a passing one takes a fraction of a second


@dataclass
class Box:
    trigger: Trigger
    calls: list[float] = field(default_factory=list)
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [facts for event, facts in self.records if event == name]


def run(scenario: Callable[[Box], Awaitable[Any]], listen: str = "127.0.0.1:0",
        **options: Any) -> Box:
    """Start a trigger, play `scenario` against it, close it; every line it logged is kept."""

    async def main() -> Box:
        box = Box(Trigger(SECRET, lambda: box.calls.append(time.monotonic()),
                          lambda event, facts: box.records.append((event, facts)), **options))
        await box.trigger.start(listen)
        try:
            async with asyncio.timeout(BOUND):
                await scenario(box)
        finally:
            box.trigger.close()
            await box.trigger.wait_closed()
        return box

    box = asyncio.run(main())
    logged = repr(box.records)
    assert SECRET not in logged and hexmac(PAYLOAD) not in logged
    assert not box.events("trigger.error"), box.events("trigger.error")
    return box


def hexmac(body: bytes, secret: str = SECRET, algorithm: Any = hashlib.sha256) -> str:
    return hmac.new(secret.encode(), body, algorithm).hexdigest()


def signed(source: str, body: bytes = PAYLOAD, delivery: str = "d-1",
           secret: str = SECRET) -> dict[str, str]:
    """The headers each forge sends (Gitea and Forgejo also send GitHub's, for compatibility)."""
    digest = hexmac(body, secret)
    github = {"X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
              "X-Hub-Signature-256": "sha256=" + digest}
    gitea = {**github, "X-Gitea-Event": "push", "X-Gitea-Delivery": delivery,
             "X-Gitea-Signature": digest}
    return {
        "github": github,
        "gitea": gitea,
        "forgejo": {**gitea, "X-Forgejo-Event": "push", "X-Forgejo-Delivery": delivery,
                    "X-Forgejo-Signature": digest},
        "gitlab": {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": delivery,
                   "X-Gitlab-Token": secret},
    }[source]


def request(headers: dict[str, str] | None = None, body: bytes = PAYLOAD, method: str = "POST",
            path: str = "/", length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: box.example", "User-Agent: test",
             "Content-Type: application/json",
             f"Content-Length: {len(body) if length is None else length}",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(port: int, data: bytes, host: str = "127.0.0.1",
                   half_close: bool = False) -> bytes:
    """Send `data`, read until the trigger closes; a reset counts as a close."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def status(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


def payload(delivery: str) -> bytes:
    """Each real push has a body of its own (its commits, its timestamps)."""
    return PAYLOAD if delivery == "d-1" else PAYLOAD[:-1] + f', "n": "{delivery}"}}'.encode()


def good(source: str = "github", delivery: str = "d-1") -> bytes:
    body = payload(delivery)
    return request(signed(source, body, delivery=delivery), body=body)


# ---------------------------------------------------------------------------------------------
# Signatures


@pytest.mark.parametrize("source", ["github", "gitea", "forgejo", "gitlab"])
def test_a_signed_push_from_each_forge_is_accepted_and_calls_on_push_once(source):
    async def scenario(box: Box) -> None:
        reply = await exchange(box.trigger.port, good(source))
        assert status(reply) == 202 and b"Connection: close" in reply

    box = run(scenario)
    assert len(box.calls) == 1
    [accepted] = box.events("trigger.accepted")
    assert accepted == {"remote": "127.0.0.1", "source": source, "delivery": "d-1",
                        "kind": "Push Hook" if source == "gitlab" else "push"}
    assert box.events("trigger.listening") == [
        {"address": f"127.0.0.1:{box.trigger.port}", "path": "/"}]


BAD = {
    "missing": ({}, "missing signature"),
    "sha1 only": ({"X-Hub-Signature": "sha1=" + hexmac(PAYLOAD, algorithm=hashlib.sha1)},
                  "missing signature"),
    "sha1 in the sha256 header": (
        {"X-Hub-Signature-256": "sha1=" + hexmac(PAYLOAD, algorithm=hashlib.sha1)},
        "bad signature"),
    "no prefix": ({"X-Hub-Signature-256": hexmac(PAYLOAD)}, "bad signature"),
    "wrong secret": (signed("github", secret="guess"), "bad signature"),
    "other body": (signed("github", body=b"{}"), "bad signature"),
    "gitea wrong": ({"X-Gitea-Signature": hexmac(PAYLOAD, "guess")}, "bad signature"),
    "forgejo not hex": ({"X-Forgejo-Signature": "\xe9" * 64}, "bad signature"),
    "gitlab wrong": ({"X-Gitlab-Token": SECRET + "x"}, "bad signature"),
    "gitlab empty": ({"X-Gitlab-Token": ""}, "bad signature"),
    "one of two wrong": ({**signed("github"), "X-Gitea-Signature": "0" * 64}, "bad signature"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_or_missing_signature_is_refused_with_401_and_logged(case):
    headers, reason = BAD[case]

    async def scenario(box: Box) -> None:
        reply = await exchange(box.trigger.port, request(headers))
        assert status(reply) == 401

    box = run(scenario)
    assert box.calls == []
    assert box.events("trigger.rejected") == [
        {"remote": "127.0.0.1", "reason": reason, "status": 401}]


def test_upper_case_hex_is_accepted():
    headers = {"X-Hub-Signature-256": "sha256=" + hexmac(PAYLOAD).upper()}
    box = run(lambda box: expect(box, request(headers), 202))
    assert len(box.calls) == 1


async def expect(box: Box, data: bytes, code: int | None) -> bytes:
    reply = await exchange(box.trigger.port, data)
    assert status(reply) == code, reply
    return reply


def test_the_signer_is_hmac_sha256():
    # The example from GitHub's documentation on validating webhook deliveries.
    signer = Signer(SECRET.encode())
    inner = signer.start()
    inner.update(b"Hello, World!")
    assert signer.hexdigest(inner) == (
        b"757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.lists(st.binary(max_size=100), max_size=4))
def test_the_signer_agrees_with_the_standard_library(secret, pieces):
    signer = Signer(secret)
    inner = signer.start()
    for piece in pieces:
        inner.update(piece)
    expected = hmac.new(secret, b"".join(pieces), hashlib.sha256).hexdigest().encode()
    assert signer.hexdigest(inner) == expected
    assert signer.is_secret(secret) and not signer.is_secret(secret + b"x")


def test_an_empty_secret_is_refused():
    with pytest.raises(ValueError):
        Trigger("", lambda: None, lambda event, facts: None)


# ---------------------------------------------------------------------------------------------
# Replays and floods


def test_a_replayed_delivery_is_answered_but_calls_nothing():
    async def scenario(box: Box) -> None:
        await expect(box, good(delivery="d-1"), 202)
        reply = await expect(box, good(delivery="d-1"), 200)
        assert reply.endswith(b"duplicate\n")
        await expect(box, good("gitlab", delivery="d-1"), 200)
        await expect(box, good(delivery="d-2"), 202)

    box = run(scenario)
    assert len(box.calls) == 2
    assert [f["delivery"] for f in box.events("trigger.duplicate")] == ["d-1", "d-1"]


def test_a_captured_body_replayed_under_a_new_or_no_id_is_a_duplicate():
    """The delivery id is not signed: anyone who saw one signed body could replay it forever
    with fresh ids. The body is what the signature vouches for, so it is remembered too."""
    no_id = {k: v for k, v in signed("github").items() if k != "X-GitHub-Delivery"}

    async def scenario(box: Box) -> None:
        await expect(box, good(delivery="d-1"), 202)
        for headers in (signed("github", delivery="d-new"), no_id,
                        signed("gitea", delivery="d-other")):
            reply = await expect(box, request(headers), 200)
            assert reply.endswith(b"duplicate\n")
        # A new push (a new body) without an id is a new delivery, once.
        body = payload("d-9")
        fresh = {k: v for k, v in signed("github", body).items() if k != "X-GitHub-Delivery"}
        await expect(box, request(fresh, body=body), 202)
        await expect(box, request(fresh, body=body), 200)

    box = run(scenario)
    assert len(box.calls) == 2
    assert [(f["delivery"], f["same"]) for f in box.events("trigger.duplicate")] == [
        ("d-new", "body"), (None, "body"), ("d-other", "body"), (None, "body")]


def test_a_body_refused_for_the_rate_is_not_remembered():
    async def scenario(box: Box) -> None:
        await expect(box, good(delivery="d-1"), 202)
        await expect(box, good(delivery="d-2"), 429)
        box.trigger.pushes.tokens = 1.0  # the bucket has refilled
        await expect(box, good(delivery="d-2"), 202)

    assert len(run(scenario, burst=1, refill=600.0).calls) == 2


@pytest.mark.parametrize("data", [
    b"POST / HTTP/1.1\nContent-Length: 0\n\n",
    b"POST / HTTP/1.1\r\nHost: x\nContent-Length: 0\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\n",
], ids=["all LF", "one header LF", "LF at the end"])
def test_a_request_with_bare_line_feeds_is_answered_400_at_once(data):
    async def scenario(box: Box) -> None:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", box.trigger.port)
        writer.write(data)  # and the connection stays open, as a client awaiting its answer
        reply = await reader.readuntil(b"\r\n\r\n")
        assert status(reply) == 400
        assert time.monotonic() - started < 1.0  # not the 5 s timeout
        writer.close()

    box = run(scenario)
    assert box.calls == []
    assert [f["status"] for f in box.events("trigger.rejected")] == [400]


def test_only_the_last_64_deliveries_are_remembered():
    async def scenario(box: Box) -> None:
        for number in range(65):
            await expect(box, good(delivery=f"d-{number}"), 202)
        await expect(box, good(delivery="d-64"), 200)
        await expect(box, good(delivery="d-0"), 202)

    assert len(run(scenario, burst=100).calls) == 66


def test_a_flood_is_limited_to_the_burst_and_answered_429():
    replies: list[bytes] = []

    async def scenario(box: Box) -> None:
        for number in range(50):
            replies.append(await exchange(box.trigger.port, good(delivery=f"d-{number}")))

    box = run(scenario, burst=5, refill=10.0)
    codes = [status(reply) for reply in replies]
    assert codes == [202] * 5 + [429] * 45
    assert all(b"\r\nRetry-After: " in reply for reply in replies[5:])
    assert len(box.calls) == 5
    # A flood of refusals is not a flood of log lines.
    assert len(box.events("trigger.rejected")) == LOG_BURST
    assert box.events("trigger.rejected")[0]["reason"] == "rate limited"


def test_a_refused_push_still_leads_to_one_check_once_the_bucket_allows():
    codes: list[int | None] = []

    async def scenario(box: Box) -> None:
        for number in range(10):
            codes.append(status(await exchange(box.trigger.port, good(delivery=f"d-{number}"))))
        accepted = codes.count(202)
        while len(box.calls) < accepted + 1:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.8)  # long enough for two more refills: nothing else is owed

    box = run(scenario, burst=2, refill=0.3)
    assert set(codes) == {202, 429} and codes[:2] == [202, 202]
    assert len(box.calls) == codes.count(202) + 1


def test_the_bucket_refills_one_token_per_interval():
    bucket = Bucket(2, 10.0, now=100.0)
    assert [bucket.take(100.0), bucket.take(100.0)] == [0.0, 0.0]
    assert bucket.take(101.0) == pytest.approx(9.0)
    assert bucket.take(110.0) == 0.0
    assert bucket.take(1000.0) == 0.0 and bucket.take(1000.0) == 0.0  # capped at the burst
    assert bucket.take(1000.0) == pytest.approx(10.0)


def test_idle_connections_beyond_the_cap_are_closed_and_a_delivery_still_gets_through():
    async def scenario(box: Box) -> None:
        clients = [await asyncio.open_connection("127.0.0.1", box.trigger.port)
                   for _ in range(100)]
        reads = [asyncio.ensure_future(reader.read()) for reader, _ in clients]
        done: set[asyncio.Future[bytes]] = set()
        while len(done) < 84:
            done, _ = await asyncio.wait(reads, timeout=0.05)
        assert len(box.trigger.connections) <= 16
        await expect(box, good(), 202)
        box.trigger.close()  # the idle ones left
        await asyncio.wait(reads)
        for _, writer in clients:
            writer.close()

    box = run(scenario, max_connections=16)
    assert len(box.calls) == 1
    rejected = box.events("trigger.rejected")
    assert 0 < len(rejected) <= LOG_BURST
    assert {facts["reason"] for facts in rejected} == {"too many connections"}


# ---------------------------------------------------------------------------------------------
# Size, time and shape of a request


def test_an_oversized_body_is_refused_at_once_without_being_read():
    async def scenario(box: Box) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", box.trigger.port)
        writer.write(request(signed("github"), body=b"", length=10_000_000))
        writer.write(b"x" * 200_000)  # part of the body is already on its way
        started = time.monotonic()
        reply = await reader.read()  # the trigger's FIN ends it
        assert time.monotonic() - started < 2.0
        assert status(reply) == 413
        writer.close()

    box = run(scenario)
    assert box.calls == []
    assert box.events("trigger.rejected")[0]["reason"] == "too large"


@pytest.mark.parametrize("sent", [
    b"POST / HTTP/1.1\r\nHost: box.example\r\n",  # half a head
    request(signed("github"))[:-10],  # all but the end of the body
])
def test_a_slow_request_is_cut_off_at_the_timeout(sent):
    async def scenario(box: Box) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", box.trigger.port)
        writer.write(sent)
        started = time.monotonic()
        reply = await reader.read()
        assert reply == b"" and 0.25 <= time.monotonic() - started < 2.0
        writer.close()

    box = run(scenario, timeout=0.3)
    assert box.calls == []
    assert box.events("trigger.rejected") == [
        {"remote": "127.0.0.1", "reason": "timeout", "status": None}]


def test_a_body_that_trickles_in_is_cut_off_at_the_timeout_of_the_whole_request():
    async def scenario(box: Box) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", box.trigger.port)
        data = request(signed("github"))
        started = time.monotonic()
        for byte in range(len(data)):
            writer.write(data[byte:byte + 1])
            await asyncio.sleep(0.02)
            if reader.at_eof() or reader.exception() or time.monotonic() - started > 2.0:
                break
        # Cut off: EOF, or a reset when the trigger closed with a byte of ours still unread.
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        assert time.monotonic() - started < 1.0
        writer.close()

    assert run(scenario, timeout=0.3).calls == []


def test_a_client_that_expects_100_continue_gets_it():
    async def scenario(box: Box) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", box.trigger.port)
        writer.write(request({**signed("github"), "Expect": "100-continue"}, body=b""
                             , length=len(PAYLOAD)))
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(PAYLOAD)
        assert status(await reader.read()) == 202
        writer.close()

    assert len(run(scenario).calls) == 1


MALFORMED = {
    "not POST": (request(signed("github"), method="GET"), 405),
    "PUT": (request(signed("github"), method="PUT"), 405),
    "garbage": (b"\x16\x03\x01\x02\x00 hello there\r\n\r\n", 400),
    "no version": (b"POST /\r\n\r\n", 400),
    "HTTP/2": (b"POST / HTTP/2.0\r\nContent-Length: 0\r\n\r\n", 400),
    "absolute target": (b"POST http://x/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400),
    "long request line": (request(path="/" + "a" * 1100), 400),
    "space before colon": (b"POST / HTTP/1.1\r\nContent-Length : 0\r\n\r\n", 400),
    "folded header": (b"POST / HTTP/1.1\r\nX-A: 1\r\n  2\r\nContent-Length: 0\r\n\r\n", 400),
    "header block too big": (request({"X-Pad": "a" * 9000}), 431),
    "too many header lines": (request({f"X-H{n}": "1" for n in range(60)}), 431),
    "no length": (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    "chunked": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    "chunked and a length": (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                             b"Content-Length: 5\r\n\r\n0\r\n\r\n", 411),
    "length not a number": (request(length=-1), 400),
    "length in other digits": (b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
    "two lengths": (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    "two signatures": (request({**signed("github"), "x-hub-signature-256": "sha256=00"}), 400),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_request_of_the_wrong_shape_gets_its_status_and_calls_nothing(case):
    data, code = MALFORMED[case]

    async def scenario(box: Box) -> None:
        reply = await exchange(box.trigger.port, data)
        assert status(reply) == code, reply
        if code == 405:
            assert b"\r\nAllow: POST\r\n" in reply

    box = run(scenario)
    assert box.calls == []
    assert len(box.events("trigger.rejected")) == 1


def test_the_path_can_be_fixed_or_left_open():
    async def fixed(box: Box) -> None:
        await expect(box, request(signed("github"), path="/hook?from=github"), 202)
        await expect(box, request(signed("github", delivery="d-2"), path="/other"), 404)

    async def any_path(box: Box) -> None:
        await expect(box, request(signed("github"), path="/whatever"), 202)

    assert len(run(fixed, path="/hook").calls) == 1
    assert len(run(any_path, path=None).calls) == 1


def test_an_empty_connection_is_not_logged():
    async def scenario(box: Box) -> None:
        assert await exchange(box.trigger.port, b"", half_close=True) == b""

    assert run(scenario).events("trigger.rejected") == []


def test_close_stops_listening_and_drops_open_connections():
    async def scenario(box: Box) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", box.trigger.port)
        writer.write(b"POST / HTTP/1.1\r\n")
        while not box.trigger.connections:
            await asyncio.sleep(0.01)
        box.trigger.close()
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", box.trigger.port)

    run(scenario)


# ---------------------------------------------------------------------------------------------
# Addresses


def test_listen_addresses_are_host_and_port():
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("localhost:0") == ("localhost", 0)
    for bad in ("9000", ":9000", "::1:9000", "[::1]", "host:", "host:65536", "host:9x",
                "host:\u0669", "[]:9000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_it_listens_on_ipv6():
    async def scenario(box: Box) -> None:
        reply = await exchange(box.trigger.port, good(), host="::1")
        assert status(reply) == 202

    box = run(scenario, listen="[::1]:0")
    assert len(box.calls) == 1
    assert box.events("trigger.listening")[0]["address"] == f"[::1]:{box.trigger.port}"
    assert box.events("trigger.accepted")[0]["remote"] == "::1"


# ---------------------------------------------------------------------------------------------
# Random input


def spliced(data: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    for at, noise in cuts:
        at %= len(data) + 1
        data = data[:at] + noise + data[at + len(noise) // 2:]
    return data


LATIN1 = st.text(st.characters(max_codepoint=255), max_size=80)
NUMBERISH = st.text(st.characters(categories=("Nd", "No"), max_codepoint=255), min_size=1,
                    max_size=3)
HEADER_NAMES = ["Content-Length", "Transfer-Encoding", "Expect", "X-Hub-Signature-256",
                "X-Gitea-Signature", "X-Forgejo-Signature", "X-Gitlab-Token",
                "X-GitHub-Delivery", "X-A"]


def raw_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


FUZZ = st.one_of(
    st.binary(max_size=600),
    st.builds(spliced, st.sampled_from([good(), good("gitlab"), request(method="GET")]),
              st.lists(st.tuples(st.integers(0, 1000), st.binary(max_size=12)), max_size=4)),
    # well framed, so that the signature checks see random values
    st.builds(request, st.dictionaries(st.sampled_from(HEADER_NAMES[2:]), LATIN1, max_size=4),
              st.binary(max_size=100)),
    # random framing, for the parser
    st.builds(raw_request,
              st.sampled_from(["POST", "POST", "GET", "post", "P\x00ST", "POST ", ""]),
              st.one_of(st.just("/"), LATIN1.map(lambda text: "/" + text)),
              st.lists(st.tuples(st.one_of(st.sampled_from(HEADER_NAMES), LATIN1),
                                 st.one_of(LATIN1, st.integers(-5, 10**20).map(str), NUMBERISH)),
                       max_size=5),
              st.binary(max_size=100)),
)


@settings(max_examples=300, deadline=None)
@given(FUZZ)
def test_random_requests_never_break_the_trigger(data):
    async def scenario(box: Box) -> None:
        reply = await exchange(box.trigger.port, data, half_close=True)
        assert reply == b"" or status(reply) in {200, 202, 400, 401, 404, 405, 411, 413, 431}
        await expect(box, good(delivery="after the noise"), 202)

    run(scenario, timeout=2.0, burst=10)


# ---------------------------------------------------------------------------------------------
# What it costs


def test_importing_the_trigger_loads_no_openssl_and_no_http_package():
    code = ("import sys, supervisor.loop.footprint as f; f.without_tls(); "
            "import supervisor.drivers.trigger; "
            "print(sorted(m for m in ('hashlib', '_hashlib', 'hmac', 'ssl', 'http', 'email') "
            "if sys.modules.get(m)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_repository_a_push_names_is_read_from_its_first_bytes():
    from supervisor.drivers.trigger import names_repository, repositories_named

    body = (b'{"ref":"refs/heads/main","repository":{"html_url":"https://github.com/me/web",'
            b'"clone_url" : "https://github.com/me/web.git","ssh_url":"git@github.com:me/web.git"'
            b'},"commits":[{"message":"\\"clone_url\\": not a key here"}]}')
    named = repositories_named(body)
    assert named == ("https://github.com/me/web.git", "git@github.com:me/web.git",
                     "https://github.com/me/web")
    assert names_repository(named, "ssh://git@github.com:22/me/web.git")
    assert names_repository(named, "git@github.com:me/web")
    assert not names_repository(named, "git@github.com:me/api.git")
    assert not names_repository((), "git@github.com:me/web.git")
    assert repositories_named(b'{"clone_url": 7, "ssh_url": "x') == ()
