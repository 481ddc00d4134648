"""The etcd client against real etcd members on loopback (tests/etcdtest.py): keys, transactions,
leases, the watch, members that die or go silent, a proxy that refuses or black-holes, TLS with a
client certificate, authentication, and replies no etcd would send from a server of our own."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.drivers.etcd import (
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    LeaseLost,
    WatchEvent,
)
from tests.etcdtest import EtcdCluster, TcpProxy, etcd_fixture, make_certificates, need_etcd
from tests.processes import run

shared = etcd_fixture(3, scope="module")  # for the tests that leave every member running
_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own on the shared cluster."""
    return f"/test/{next(_prefixes)}/"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    """A cluster of the test's own, for tests that kill or stop members."""
    need_etcd()
    with EtcdCluster(tmp_path / "etcd", 3) as running:
        yield running


def client_run(endpoints: list[str], body: Callable[[EtcdClient], Awaitable[Any]],
               **options: Any) -> Any:
    async def main() -> Any:
        client = EtcdClient(endpoints, **options)
        try:
            return await body(client)
        finally:
            await client.close()
    return run(main())


async def next_batch(watch: AsyncIterator[list[WatchEvent]], limit: float = 5.0) -> list[Any]:
    """The next batch of a watch as (kind, key, value) triples."""
    async with asyncio.timeout(limit):
        batch = await anext(watch)
    return [(event.kind, event.kv.key, event.kv.value) for event in batch]


async def elapsed(call: Awaitable[Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call
    except EtcdError as error:
        return time.monotonic() - started, error
    return time.monotonic() - started, None


# --- keys and transactions ------------------------------------------------------------------------


def test_put_get_get_prefix_and_delete(shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        first = await client.put(prefix + "a", b"1")
        second = await client.put(prefix + "b", b"\x00\xff binary")
        assert second > first
        assert await client.get(prefix + "a") == KeyValue(prefix + "a", b"1", first, first, 0)
        assert await client.get(prefix + "missing") is None
        await client.put(prefix[:-1] + "x", b"outside")  # shares the text, not the prefix
        revision, kvs = await client.get_prefix(prefix)
        assert revision >= second
        assert [(kv.key, kv.value) for kv in kvs] == [
            (prefix + "a", b"1"), (prefix + "b", b"\x00\xff binary")]
        assert await client.delete(prefix + "a") == 1
        assert await client.delete(prefix + "a") == 0
        assert await client.get(prefix + "a") is None

    client_run(shared.endpoints, body)


def test_create_is_exclusive_when_two_clients_race(shared: EtcdCluster, prefix: str) -> None:
    async def body(one: EtcdClient) -> None:
        other = EtcdClient(list(reversed(shared.endpoints)))
        try:
            keys = [f"{prefix}slot{n}" for n in range(20)]
            results = await asyncio.gather(*(
                client.create(key, name)
                for key in keys for client, name in ((one, b"one"), (other, b"other"))))
            for n, key in enumerate(keys):
                won_one, won_other = results[2 * n], results[2 * n + 1]
                assert won_one != won_other, key
                stored = await one.get(key)
                assert stored is not None
                assert stored.value == (b"one" if won_one else b"other")
        finally:
            await other.close()

    client_run(shared.endpoints, body)


def test_delete_if_gives_back_only_what_is_ours(shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        key = prefix + "slot"
        assert await client.create(key, b"box-a")
        assert not await client.delete_if(key, b"box-b")
        assert (await client.get(key)).value == b"box-a"  # type: ignore[union-attr]
        assert await client.delete_if(key, b"box-a")
        assert await client.get(key) is None
        assert not await client.delete_if(key, b"box-a")

    client_run(shared.endpoints, body)


# --- leases --------------------------------------------------------------------------------------


def test_keep_alive_holds_a_lease_past_its_ttl(shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        lease = await client.grant(1)
        await client.put(prefix + "alive", b"x", lease)
        end = time.monotonic() + 2.5  # well past the TTL: only the keep-alives hold it
        while time.monotonic() < end:
            assert await client.keep_alive(lease) >= 1
            await asyncio.sleep(0.3)  # the cadence of keep-alives is the thing under test
        assert (await client.get(prefix + "alive")).lease == lease  # type: ignore[union-attr]
        await client.revoke(lease)
        assert await client.get(prefix + "alive") is None
        await client.revoke(lease)  # gone already: no error

    client_run(shared.endpoints, body)


def test_an_expired_lease_deletes_its_keys_and_keep_alive_raises_lease_lost(
        shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        lease = await client.grant(1)
        revision = await client.put(prefix + "leased", b"x", lease)
        await client.put(prefix + "kept", b"y")
        watch = client.watch(prefix, revision + 1)
        assert await next_batch(watch) == [("put", prefix + "kept", b"y")]
        # Nobody keeps the lease alive: etcd deletes the key when it expires.
        assert await next_batch(watch, limit=6) == [("delete", prefix + "leased", b"")]
        await watch.aclose()
        with pytest.raises(LeaseLost):
            await client.keep_alive(lease)
        assert await client.get(prefix + "kept") is not None

    client_run(shared.endpoints, body)


# --- the watch -----------------------------------------------------------------------------------


def test_watch_sees_puts_and_deletes_in_order_from_a_start_revision(
        shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        before = await client.put(prefix + "a", b"old")
        start = await client.put(prefix + "a", b"1")
        await client.put(prefix + "b", b"2")
        await client.delete(prefix + "a")
        watch = client.watch(prefix, start)
        seen = []
        while len(seen) < 3:
            seen += await next_batch(watch)
        assert seen == [("put", prefix + "a", b"1"), ("put", prefix + "b", b"2"),
                        ("delete", prefix + "a", b"")]
        # And what happens from now on, in order, with the revisions etcd gave.
        revision = await client.put(prefix + "c", b"3")
        await client.put(prefix[:-1] + "-other", b"not ours")
        deleted = await client.delete(prefix + "b")
        assert deleted == 1
        async with asyncio.timeout(5):
            batch = await anext(watch)
        assert [(e.kind, e.kv.key, e.kv.mod_revision) for e in batch] == [
            ("put", prefix + "c", revision)]
        assert await next_batch(watch) == [("delete", prefix + "b", b"")]
        assert before < start
        await watch.aclose()

    client_run(shared.endpoints, body)


def test_a_watch_from_a_compacted_revision_is_an_error(shared: EtcdCluster,
                                                       prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        old = await client.put(prefix + "a", b"1")
        now = await client.put(prefix + "a", b"2")
        shared.compact(now)
        with pytest.raises(EtcdError, match="compacted"):
            await next_batch(client.watch(prefix, old))

    client_run(shared.endpoints, body)


def test_close_ends_a_running_watch(shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        revision, _ = await client.get_prefix(prefix)
        watch = client.watch(prefix, revision + 1)
        waiting = asyncio.ensure_future(anext(watch))
        await client.put(prefix + "a", b"1")
        assert [e.kv.key for e in await asyncio.wait_for(waiting, 5)] == [prefix + "a"]
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0)
        await client.close()
        with pytest.raises(EtcdError, match="closed"):
            await asyncio.wait_for(waiting, 5)

    client_run(shared.endpoints, body)


# --- members that die or go silent ---------------------------------------------------------------


def test_a_killed_member_is_skipped_and_the_one_that_answered_remembered(
        cluster: EtcdCluster) -> None:
    # A follower, listed first: killing the leader is an election, another test.
    leader = cluster.leader()
    follower, other = (index for index in range(3) if index != leader)
    cluster.kill(follower)
    # Behind a proxy only to count the connections the client makes to it.
    with TcpProxy("127.0.0.1", cluster.client_ports[follower]) as proxy:
        endpoints = [f"http://{proxy.address}", cluster.endpoints[other],
                     cluster.endpoints[leader]]

        async def body(client: EtcdClient) -> None:
            took, error = await elapsed(client.put("/k", b"v"))
            assert error is None and took < 1.0
            for _ in range(10):
                assert (await client.get("/k")).value == b"v"  # type: ignore[union-attr]
            assert proxy.accepted == 1

        client_run(endpoints, body, timeout=3.0)


def test_a_silent_member_is_skipped_within_the_timeout(cluster: EtcdCluster) -> None:
    leader = cluster.leader()
    follower = (leader + 1) % 3
    cluster.stop(follower)  # a stopped leader would be an election: another test
    endpoints = [cluster.endpoints[follower], *(e for i, e in enumerate(cluster.endpoints)
                                                if i != follower)]
    try:
        async def body(client: EtcdClient) -> None:
            took, error = await elapsed(client.put("/k", b"v"))
            assert error is None, error
            assert 0.4 < took < 1.5  # the first member's share of 1.5 s, then an answer
            took, error = await elapsed(client.get("/k"))
            assert error is None and took < 0.45  # straight to the member that answered

        client_run(endpoints, body, timeout=1.5)
    finally:
        cluster.cont(follower)


def test_calls_go_on_after_the_leader_is_killed(cluster: EtcdCluster) -> None:
    async def body(client: EtcdClient) -> None:
        await client.put("/k", b"before")
        cluster.kill(cluster.leader())
        # During the election a member may answer that it has no leader; within a few tries
        # of the timeout, a put goes through the new leader.
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.put("/k", b"after")
                break
            except EtcdUnavailable:
                assert time.monotonic() < deadline
        assert (await client.get("/k")).value == b"after"  # type: ignore[union-attr]

    client_run(cluster.endpoints, body, timeout=2.0)


def test_a_blackholed_endpoint_times_out_within_the_bound(shared: EtcdCluster) -> None:
    with TcpProxy("127.0.0.1", shared.client_ports[0]) as proxy:
        async def body(client: EtcdClient) -> None:
            await client.put("/blackhole", b"1")  # a kept connection, answered
            proxy.mode = "blackhole"
            for call in (client.get("/blackhole"), client.create("/blackhole/new", b"x"),
                         client.keep_alive(1)):
                took, error = await elapsed(call)
                assert isinstance(error, EtcdUnavailable), error
                assert 0.5 <= took < 1.0, (took, error.reason)  # the bound, plus a loaded box
            took, error = await elapsed(client.create("/blackhole/new", b"x"))
            assert error is not None and "outcome is unknown" in error.reason
            proxy.mode = "pass"
            assert (await client.get("/blackhole")).value == b"1"  # type: ignore[union-attr]

        client_run([f"http://{proxy.address}"], body, timeout=0.5)


def test_a_refusing_endpoint_fails_fast(shared: EtcdCluster) -> None:
    with TcpProxy("127.0.0.1", shared.client_ports[0], mode="refuse") as proxy:
        async def body(client: EtcdClient) -> None:
            for call in (client.get("/refused"), client.create("/refused", b"x")):
                took, error = await elapsed(call)
                assert isinstance(error, EtcdUnavailable), error
                assert took < 0.5

        client_run([f"http://{proxy.address}"], body, timeout=5.0)
        assert proxy.accepted == 2


@pytest.mark.parametrize("mode", ["blackhole", "refuse"])
def test_a_watch_ends_when_its_member_is_cut_off(shared: EtcdCluster, prefix: str,
                                                 mode: str) -> None:
    with TcpProxy("127.0.0.1", shared.client_ports[0]) as proxy:
        async def body(client: EtcdClient) -> None:
            revision, _ = await client.get_prefix(prefix)
            watch = client.watch(prefix, revision + 1)
            await client.put(prefix + "a", b"1")
            assert await next_batch(watch) == [("put", prefix + "a", b"1")]
            proxy.mode = mode
            took, error = await elapsed(next_batch(watch, limit=5))
            assert isinstance(error, EtcdUnavailable), error
            assert took < 0.3 + 0.5 + 0.5  # silent for watch_check, then a check that fails

        client_run([f"http://{proxy.address}"], body, timeout=0.5, watch_check=0.3)


def test_an_idle_watch_outlives_its_checks(shared: EtcdCluster, prefix: str) -> None:
    async def body(client: EtcdClient) -> None:
        revision, _ = await client.get_prefix(prefix)
        watch = client.watch(prefix, revision + 1)
        waiting = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.8)  # several checks of a member that is idle, not gone
        assert not waiting.done()
        await client.put(prefix + "late", b"1")
        assert [e.kv.key for e in await asyncio.wait_for(waiting, 5)] == [prefix + "late"]
        await watch.aclose()

    client_run(shared.endpoints, body, timeout=0.5, watch_check=0.2)


# --- TLS and authentication ----------------------------------------------------------------------


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    need_etcd()
    ca, server_cert, server_key, client_cert, client_key = make_certificates(tmp_path / "pki")
    with EtcdCluster(tmp_path / "etcd", 1, tls=(ca, server_cert, server_key)) as cluster:
        assert cluster.endpoints[0].startswith("https://")
        tls = {"ca": str(ca), "cert": str(client_cert), "key": str(client_key)}

        async def body(client: EtcdClient) -> None:
            revision = await client.put("/tls", b"secret")
            watch = client.watch("/tls", revision)
            assert await next_batch(watch) == [("put", "/tls", b"secret")]
            await watch.aclose()
            assert (await client.get("/tls")).value == b"secret"  # type: ignore[union-attr]

        client_run(cluster.endpoints, body, **tls)

        async def refused(client: EtcdClient) -> EtcdError:
            with pytest.raises(EtcdError) as caught:
                await client.get("/tls")
            return caught.value

        without_cert = client_run(cluster.endpoints, refused, ca=str(ca))
        assert "TLS" in without_cert.reason or "reset" in without_cert.reason
        unknown_ca = client_run(cluster.endpoints, refused, cert=str(client_cert),
                                key=str(client_key))
        assert "CERTIFICATE_VERIFY_FAILED" in unknown_ca.reason
        missing = client_run(cluster.endpoints, refused, ca=str(tmp_path / "none.pem"))
        assert not isinstance(missing, EtcdUnavailable) and "CA" in missing.reason


def test_user_and_password_and_a_token_another_member_does_not_know(
        cluster: EtcdCluster) -> None:
    cluster.enable_auth("root", "pw")

    async def body(client: EtcdClient) -> None:
        await client.put("/auth", b"1")  # a token from member 0
        cluster.kill(0)
        # Member 1 knows nothing of member 0's simple token: the client authenticates again.
        assert (await client.get("/auth")).value == b"1"  # type: ignore[union-attr]

    client_run(cluster.endpoints, body, user="root", password="pw")

    async def refused(client: EtcdClient) -> EtcdError:
        with pytest.raises(EtcdError) as caught:
            await client.get("/auth")
        return caught.value

    wrong = client_run(cluster.endpoints[1:], refused, user="root", password="no")
    assert not isinstance(wrong, EtcdUnavailable) and "authentication failed" in wrong.reason
    anonymous = client_run(cluster.endpoints[1:], refused)
    assert not isinstance(anonymous, EtcdUnavailable)


# --- replies no etcd would send ------------------------------------------------------------------

RANGE_CALL = ("get", lambda client: client.get("/k"))
PUT_CALL = ("put", lambda client: client.put("/k", b"v"))
PREFIX_CALL = ("get_prefix", lambda client: client.get_prefix("/k"))
KEEPALIVE_CALL = ("keep_alive", lambda client: client.keep_alive(7))
CREATE_CALL = ("create", lambda client: client.create("/k", b"v"))


def http(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def chunked(*chunks: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
            + b"0\r\n\r\n")


GARBAGE = {
    "not json": (http(b"<html>502 Bad Gateway</html>"), RANGE_CALL),
    "json, not an object": (http(b"[1, 2]"), RANGE_CALL),
    "not UTF-8": (http(b'{"kvs": ["\xff"]}'), RANGE_CALL),
    "kvs not a list": (http(b'{"header": {"revision": "3"}, "kvs": "x"}'), RANGE_CALL),
    "kv not an object": (http(b'{"header": {"revision": "3"}, "kvs": [7]}'), RANGE_CALL),
    "key not base64": (http(b'{"kvs": [{"key": "%%%"}]}'), RANGE_CALL),
    "revision not a number": (http(b'{"header": {"revision": [1]}}'), PUT_CALL),
    "revision as text": (http(b'{"header": {"revision": "12abc"}}'), PUT_CALL),
    "no header": (http(b'{"kvs": []}'), PREFIX_CALL),
    "header not an object": (http(b'{"header": "3"}'), PREFIX_CALL),
    "no revision": (http(b'{"header": {}}'), PUT_CALL),
    "succeeded not a bool": (http(b'{"header": {"revision": "3"}, "succeeded": "yes"}'),
                             CREATE_CALL),
    "keepalive without result": (chunked(b'{"header": {}}\n'), KEEPALIVE_CALL),
    "TTL a float": (chunked(b'{"result": {"TTL": 1.5}}\n'), KEEPALIVE_CALL),
    "HTTP error, text": (http(b"oops", "500 Internal Server Error"), RANGE_CALL),
    "HTTP error, etcd's body": (http(b'{"error": "boom", "message": "boom", "code": 2}',
                                     "500 Internal Server Error"), PUT_CALL),
    "200 with an error": (http(b'{"error": "etcdserver: bad", "code": 3}'), RANGE_CALL),
    "stream error": (chunked(b'{"error": {"grpc_code": 9, "message": "nope"}}\n'),
                     KEEPALIVE_CALL),
    "bad chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}",
                       RANGE_CALL),
    "cut short": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", RANGE_CALL),
    "not HTTP": (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", RANGE_CALL),
    "huge length": (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n", RANGE_CALL),
    "closed at once": (b"", RANGE_CALL),
    "endless head": (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10000, RANGE_CALL),
}


async def garbage_server(reply: bytes) -> tuple[asyncio.Server, str]:
    """An HTTP server of the test's own that answers every request with `reply`, then closes."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_a_reply_no_etcd_would_send_is_an_etcd_error(case: str) -> None:
    reply, (name, call) = GARBAGE[case]

    async def main() -> None:
        server, endpoint = await garbage_server(reply)
        client = EtcdClient([endpoint], timeout=2.0)
        try:
            took, error = await elapsed(call(client))
        finally:
            await client.close()
            server.close()
        assert isinstance(error, EtcdError), f"{case}: {name} gave {error!r}"
        assert error.reason and "\n" not in error.reason
        assert took < 1.5, f"{case}: {name} took {took:.2f}s"

    run(main())


def test_a_watch_stream_of_garbage_is_an_etcd_error() -> None:
    created = b'{"result": {"header": {"revision": "1"}, "created": true}}\n'
    cases = {
        "not json": chunked(created, b"not json\n"),
        "event not an object": chunked(created, b'{"result": {"events": [1]}}\n'),
        "unknown event type": chunked(created, b'{"result": {"events": [{"type": "X"}]}}\n'),
        "ends": chunked(created),
        "error": chunked(created, b'{"error": {"grpc_code": 14, "message": "stop"}}\n'),
        "no created": chunked(b'{"result": {"canceled": true}}\n'),
    }

    async def main() -> None:
        for case, reply in cases.items():
            server, endpoint = await garbage_server(reply)
            client = EtcdClient([endpoint], timeout=1.0)
            try:
                with pytest.raises(EtcdError):
                    await next_batch(client.watch("/k", 1), limit=3)
            except BaseException as error:
                raise AssertionError(case) from error
            finally:
                await client.close()
                server.close()

    run(main())


def test_bad_settings_are_etcd_errors() -> None:
    for endpoints in (["127.0.0.1:2379"], ["ftp://x:1"], ["http://x:99999"], [], "http://x:1",
                      ["http://x:1/path"]):
        with pytest.raises(EtcdError):
            EtcdClient(endpoints)  # type: ignore[arg-type]
    with pytest.raises(EtcdError):
        EtcdClient(["https://x:1"], cert="c.pem")
    with pytest.raises(EtcdError):
        EtcdClient(["http://x:1"], user="root")
    assert EtcdClient(["http://[::1]:2379", "https://etcd.example:2379"]).endpoints[0].port \
        == 2379
