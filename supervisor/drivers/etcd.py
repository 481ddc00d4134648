"""The etcd client for the fleet: etcd v3's JSON gateway (etcd 3.4 and later) over asyncio
streams. It reports what etcd answered and raises EtcdError for anything else; it never decides,
never logs, never sleeps between tries, and makes no TLS context unless an endpoint is https.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MAX_REPLY = 16 << 20  # bytes of one reply or one watch message: a fleet's keys are a few kB
MAX_HEAD = 16 << 10
IDLE_KEPT = 2  # open connections kept for the next calls to the member that answered last
# gRPC status codes etcd puts in its error replies.
UNAVAILABLE = 14  # no leader, a timed-out proposal, a member shutting down: try another one
UNAUTHENTICATED = 16  # the token expired (or the member restarted): authenticate again
NOT_FOUND = 5


class EtcdError(Exception):
    """Any failure of a call. `reason` is one short line for the log; `code` is etcd's gRPC
    status code when etcd itself refused the request."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout (dead, silent, refusing, or without a leader).
    From `create`, `delete_if` and `delete` it may come after a member received the request:
    the outcome is then unknown, and the caller reads the key to learn it."""


class LeaseLost(EtcdError):
    """keep_alive found the lease expired or unknown: every key put under it is gone."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    kv: KeyValue  # for a delete: the key, an empty value, and the revision of the delete


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str
    host: str
    port: int
    tls: bool

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_endpoint(url: str) -> _Endpoint:
    scheme, separator, rest = url.partition("://")
    rest = rest.rstrip("/")
    if not separator or scheme not in ("http", "https") or not rest or "/" in rest:
        raise EtcdError(f"etcd endpoint {url!r}: not http://HOST:PORT or https://HOST:PORT")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        port = port.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host, port = rest, ""
    if not host or not (port == "" or (port.isdigit() and 0 < int(port) < 65536)):
        raise EtcdError(f"etcd endpoint {url!r}: not http://HOST:PORT or https://HOST:PORT")
    return _Endpoint(url, host, int(port or 2379), scheme == "https")


# --- what etcd's JSON looks like ----------------------------------------------------------
# proto3's JSON mapping: int64s are strings, bytes are base64, and a field at its zero value is
# left out. Anything else is a bad reply, an EtcdError, whatever the member sent.


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EtcdError(f"bad reply from etcd: {what} is not an object")
    return value


def _int(raw: dict[str, Any], field: str) -> int:
    value = raw.get(field, 0)
    if isinstance(value, str):
        digits = value.removeprefix("-")
        if digits.isdigit() and digits.isascii() and len(digits) <= 20:
            return int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise EtcdError(f"bad reply from etcd: {field} is not an integer")


def _bytes(raw: dict[str, Any], field: str) -> bytes:
    value = raw.get(field, "")
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise EtcdError(f"bad reply from etcd: {field} is not base64")


def _key_value(raw: Any) -> KeyValue:
    raw = _object(raw, "kv")
    return KeyValue(
        # Any key round-trips: bytes that are not UTF-8 become surrogates, and back.
        key=_bytes(raw, "key").decode("utf-8", "surrogateescape"),
        value=_bytes(raw, "value"),
        create_revision=_int(raw, "create_revision"),
        mod_revision=_int(raw, "mod_revision"),
        lease=_int(raw, "lease"),
    )


def _list(raw: dict[str, Any], field: str) -> list[Any]:
    value = raw.get(field, [])
    if not isinstance(value, list):
        raise EtcdError(f"bad reply from etcd: {field} is not a list")
    return value


def _revision(reply: dict[str, Any]) -> int:
    revision = _int(_object(reply.get("header"), "header"), "revision")
    if revision <= 0:
        raise EtcdError("bad reply from etcd: no revision in the header")
    return revision


def _watch_event(raw: Any) -> WatchEvent:
    raw = _object(raw, "watch event")
    kind = {"PUT": "put", "DELETE": "delete"}.get(raw.get("type", "PUT"))
    if kind is None:
        raise EtcdError("bad reply from etcd: unknown watch event type")
    return WatchEvent(kind, _key_value(raw.get("kv")))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key(key: str) -> str:
    return _b64(key.encode("utf-8", "surrogateescape"))


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # with key "\0": every key


def _token_refused(message: Any) -> bool:
    """Whether a watch was refused for its token (expired, or from another member): etcd says
    so in the cancel reason, with the gRPC code's name."""
    result = message.get("result") if isinstance(message, dict) else None
    reason = result.get("cancel_reason") if isinstance(result, dict) else None
    return isinstance(reason, str) and "code = Unauthenticated" in reason


def _error_of(status: int, reply: Any) -> tuple[int | None, str] | None:
    """etcd's complaint in a reply, if it makes one: (gRPC code, message). A unary error is
    {"error", "message", "code"}; a streamed one is {"error": {"grpc_code", "message"}}."""
    if not isinstance(reply, dict):
        return None, f"HTTP {status}" if status != 200 else "reply is not an object"
    error = reply.get("error")
    if error is None and status == 200:
        return None
    if isinstance(error, dict):
        code, message = error.get("grpc_code"), error.get("message")
    else:
        code, message = reply.get("code"), reply.get("message") or error
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    if not isinstance(message, str) or not message:
        message = f"HTTP {status}"
    return code, message.splitlines()[0][:200]


# --- HTTP/1.1, as much of it as etcd's gateway speaks ----------------------------------------


class _Broken(Exception):
    """This member did not answer properly (a transport failure, or etcd said it cannot serve):
    another member may."""


class _Try:
    """One call's try on one member: whether the request has left for it (after which a
    transaction may have been applied even if no answer comes)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


class _Dechunker:
    """Undoes HTTP/1.1 chunked transfer coding incrementally, so that a watch can wait for more
    bytes under a timeout without ever losing half a chunk to a cancelled read."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = 0
        self._state = "size"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        buffer = self._buffer
        while self._state != "done":
            if self._state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise _Broken("bad chunked reply")
                    break
                try:
                    size = int(bytes(buffer[:end]).split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    raise _Broken("bad chunked reply") from None
                del buffer[:end + 2]
                self._left, self._state = size, ("data" if size else "trailer")
            elif self._state == "data":
                take = min(self._left, len(buffer))
                out += buffer[:take]
                del buffer[:take]
                self._left -= take
                if self._left:
                    break
                self._state = "crlf"
            elif self._state == "crlf":
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise _Broken("bad chunked reply")
                del buffer[:2]
                self._state = "size"
            else:  # trailer lines, up to an empty one
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise _Broken("bad chunked reply")
                    break
                del buffer[:end + 2]
                if end == 0:
                    self._state = "done"
        return bytes(out)


class _Connection:
    """One HTTP/1.1 connection to one member; requests on it take turns (no pipelining)."""

    def __init__(self, endpoint: _Endpoint, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.endpoint = endpoint
        self.reader = reader
        self.writer = writer
        self.reusable = True

    @classmethod
    async def open(cls, endpoint: _Endpoint, ssl: Any) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=ssl, limit=MAX_HEAD,
                server_hostname=endpoint.host if ssl is not None else None)
        except OSError as error:
            raise _Broken(_describe(error)) from None
        return cls(endpoint, reader, writer)

    @property
    def stale(self) -> bool:
        """The member closed it while it sat idle (or it broke): not worth a request."""
        return self.reader.at_eof() or self.writer.is_closing()

    async def send(self, path: str, body: bytes, token: str | None) -> None:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.endpoint.authority}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        if token is not None:
            head += f"Authorization: {token}\r\n"
        try:
            self.writer.write(head.encode("latin-1") + b"\r\n" + body)
            await self.writer.drain()
        except OSError as error:
            raise _Broken(_describe(error)) from None

    async def read_head(self) -> tuple[int, dict[str, str]]:
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            raise _Broken("connection closed" if not error.partial else "reply cut short") \
                from None
        except asyncio.LimitOverrunError:
            raise _Broken("reply head too long") from None
        except OSError as error:
            raise _Broken(_describe(error)) from None
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _Broken("not an HTTP reply")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0":
            self.reusable = False
        return int(parts[1]), headers

    async def read_body(self, headers: dict[str, str]) -> bytes:
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                dechunker, body = _Dechunker(), bytearray()
                while not dechunker.done:
                    data = await self.reader.read(65536)
                    if not data:
                        raise _Broken("reply cut short")
                    body += dechunker.feed(data)
                    if len(body) > MAX_REPLY:
                        raise _Broken("reply too large")
                return bytes(body)
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit() or int(length) > MAX_REPLY:
                    raise _Broken("bad or too large Content-Length")
                return await self.reader.readexactly(int(length))
            self.reusable = False  # the body ends where the connection does
            body = await self.reader.read(MAX_REPLY + 1)
            while data := await self.reader.read(65536):
                body += data
                if len(body) > MAX_REPLY:
                    break
            if len(body) > MAX_REPLY:
                raise _Broken("reply too large")
            return body
        except asyncio.IncompleteReadError:
            raise _Broken("reply cut short") from None
        except OSError as error:
            raise _Broken(_describe(error)) from None

    def close(self) -> None:
        self.reusable = False
        self.writer.close()  # not awaited: a silent member must not hold up whoever drops it


def _describe(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    name = type(error).__name__
    if name.startswith("SSL"):
        return f"TLS: {getattr(error, 'reason', None) or error}"
    return error.strerror or str(error) or name


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        return None


# --- the client ----------------------------------------------------------------------------


class EtcdClient:
    """Talks to an etcd cluster through any of its members.

    A call tries the endpoints in turn, starting with the one that answered last, and gives up
    with EtcdUnavailable when none answered within `timeout` seconds: the whole call, every try
    included, ends within `timeout`. Calls whose repetition is harmless (reads, put, leases,
    delete) go on to the next member after a silent one; `create` and `delete_if` do not once a
    member has received the request, since it may have applied it.
    """

    def __init__(self, endpoints: Sequence[str], *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, user: str | None = None,
                 password: str | None = None, timeout: float = 2.0,
                 watch_check: float = 5.0) -> None:
        """`watch_check`: after that many seconds with nothing on a watch stream, the watch asks
        its member for a linearizable read: a stopped or partitioned member ends the watch."""
        if isinstance(endpoints, str) or not endpoints:
            raise EtcdError("etcd endpoints: give a list of one or more URLs")
        if (cert is None) != (key is None):
            raise EtcdError("etcd TLS: cert and key go together")
        if (user is None) != (password is None):
            raise EtcdError("etcd auth: user and password go together")
        self.endpoints = tuple(_parse_endpoint(url) for url in endpoints)
        self.timeout = timeout
        self.watch_check = watch_check
        self._ca, self._cert, self._key = ca, cert, key
        self._user, self._password = user, password
        self._ssl: Any = None
        self._token: str | None = None
        self._current = 0  # the endpoint that answered last
        self._idle: list[_Connection] = []
        self._watches: set[_Connection] = set()
        self._closed = False

    # -- leases ---------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        reply = await self._call("/v3/lease/grant", {"TTL": ttl})
        lease = _int(reply, "ID")
        if lease <= 0:
            raise EtcdError("bad reply from etcd: lease grant without an ID")
        return lease

    async def keep_alive(self, lease: int) -> int:
        """Renews the lease once; its remaining TTL in seconds. Call it well within the TTL."""
        reply = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = _object(reply.get("result"), "result")
        ttl = _int(result, "TTL")
        if ttl <= 0:  # etcd answers a lease it no longer has with a TTL of zero (left out)
            raise LeaseLost(f"etcd lease {lease:x} expired")
        return ttl

    async def revoke(self, lease: int) -> None:
        """Ends the lease now, deleting its keys; a lease already gone is no error."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as error:
            if error.code != NOT_FOUND:
                raise

    # -- keys -----------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._call("/v3/kv/range", {"key": _key(key)})
        kvs = _list(reply, "kvs")
        return _key_value(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key starting with `prefix`, and the store's revision they were read at: watch
        from that revision + 1 to miss nothing and see nothing twice."""
        raw = prefix.encode("utf-8", "surrogateescape")
        reply = await self._call("/v3/kv/range", {
            "key": _b64(raw or b"\0"), "range_end": _b64(_prefix_end(raw))})
        return _revision(reply), [_key_value(kv) for kv in _list(reply, "kvs")]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """The revision of the put."""
        reply = await self._call("/v3/kv/put", {
            "key": _key(key), "value": _b64(value), "lease": str(lease)})
        return _revision(reply)

    async def delete(self, key: str) -> int:
        """How many keys were deleted (0 or 1). Tried again on another member after a silent
        one, so a 0 may follow a delete that a silent member did apply."""
        reply = await self._call("/v3/kv/deleterange", {"key": _key(key)})
        return _int(reply, "deleted")

    async def create(self, key: str, value: bytes, lease: int = 0,
                     also_absent: Sequence[str] = ()) -> bool:
        """Puts the key only if it does not exist, nor any of `also_absent`, in one
        transaction; False if one does."""
        reply = await self._call("/v3/kv/txn", {
            "compare": [{"key": _key(name), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"} for name in (key, *also_absent)],
            "success": [{"request_put": {"key": _key(key), "value": _b64(value),
                                         "lease": str(lease)}}],
        }, repeatable=False, what="create")
        return self._succeeded(reply)

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Deletes the key only if its value is still `value`, in one transaction: gives back
        only what is ours. False if the value differs or the key is gone."""
        reply = await self._call("/v3/kv/txn", {
            "compare": [{"key": _key(key), "target": "VALUE", "result": "EQUAL",
                         "value": _b64(value)}],
            "success": [{"request_delete_range": {"key": _key(key)}}],
        }, repeatable=False, what="delete_if")
        return self._succeeded(reply)

    @staticmethod
    def _succeeded(reply: dict[str, Any]) -> bool:
        succeeded = reply.get("succeeded", False)
        if not isinstance(succeeded, bool):
            raise EtcdError("bad reply from etcd: succeeded is not a boolean")
        _revision(reply)
        return succeeded

    # -- the watch ------------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """The changes to keys under `prefix` from `start_revision` on, in order, a batch per
        revision step, on a connection of its own. It never ends quietly: a broken or silent
        stream, a compacted start revision or close() raise EtcdError, after which the caller
        reads again with get_prefix and watches from there."""
        raw = prefix.encode("utf-8", "surrogateescape")
        keys = {"key": _b64(raw or b"\0"), "range_end": _b64(_prefix_end(raw))}
        body = json.dumps({"create_request": {
            **keys, "start_revision": str(start_revision)}}).encode()
        connection, stream = await self._open_watch(body)
        self._watches.add(connection)
        try:
            while True:
                for message in stream.messages():
                    events = self._watch_events(message, start_revision)
                    if events:
                        yield events
                if stream.ended:
                    raise EtcdUnavailable(f"etcd watch: {connection.endpoint.authority} "
                                          "ended the stream")
                try:
                    async with asyncio.timeout(self.watch_check):
                        data = await connection.reader.read(65536)
                except TimeoutError:
                    await self._check_member(connection.endpoint, keys)
                    continue
                except OSError as error:
                    raise EtcdUnavailable(f"etcd watch: {_describe(error)}") from None
                if self._closed:
                    raise EtcdError("etcd client closed")
                if not data:
                    raise EtcdUnavailable(f"etcd watch: {connection.endpoint.authority} "
                                          "closed the stream")
                try:
                    stream.feed(data)
                except _Broken as broken:
                    raise EtcdError(f"etcd watch: {broken}") from None
        finally:
            self._watches.discard(connection)
            connection.close()

    async def _open_watch(self, body: bytes) -> tuple[_Connection, _WatchStream]:
        """A watch stream whose member has confirmed it ("created")."""
        async def attempt(endpoint: _Endpoint, _: _Try) -> tuple[_Connection, _WatchStream]:
            connection, stream = await self._start_watch(endpoint, body)
            if self._user is not None and _token_refused(stream.peek()):
                connection.close()  # a token this member does not know: once more, afresh
                self._token = None
                connection, stream = await self._start_watch(endpoint, body)
            return connection, stream

        return await self._try_endpoints(attempt, "watch", repeatable=True)

    async def _start_watch(self, endpoint: _Endpoint,
                           body: bytes) -> tuple[_Connection, _WatchStream]:
        connection = await _Connection.open(endpoint, await self._ssl_for(endpoint))
        try:
            await self._authenticate(connection)
            await connection.send("/v3/watch", body, self._token)
            status, headers = await connection.read_head()
            if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
                reply = _parse_json(await connection.read_body(headers))
                error = _error_of(status, reply) or (None, f"HTTP {status}")
                self._raise_unless_unavailable(*error)
                raise _Broken(error[1])
            stream = _WatchStream()
            while not stream.pending:
                data = await connection.reader.read(65536)
                if not data:
                    raise _Broken("closed the stream")
                stream.feed(data)
            return connection, stream
        except BaseException:
            connection.close()
            raise

    def _watch_events(self, message: Any, start_revision: int) -> list[WatchEvent]:
        message = _object(message, "watch message")
        error = message.get("error")
        if error is not None:
            code, reason = _error_of(200, message) or (None, "watch error")
            raise EtcdError(f"etcd watch: {reason}", code)
        result = _object(message.get("result"), "watch result")
        if result.get("canceled"):
            compacted = _int(result, "compact_revision")
            if compacted:
                raise EtcdError(f"etcd watch: revision {start_revision} is compacted "
                                f"(the oldest kept is {compacted})")
            reason = result.get("cancel_reason")
            raise EtcdError(f"etcd watch canceled: {reason if isinstance(reason, str) else ''}"
                            .rstrip(": "))
        return [_watch_event(event) for event in _list(result, "events")]

    async def _check_member(self, endpoint: _Endpoint, keys: dict[str, str]) -> None:
        """The watch has been quiet: a member that can still serve a linearizable read is
        merely idle; one that cannot (stopped, cut off from its leader) ends the watch. The
        read is a count of the watched keys, which a user allowed to watch may read."""
        body = json.dumps({**keys, "count_only": True}).encode()
        await self._try_endpoints(
            lambda endpoint, attempt: self._request(endpoint, "/v3/kv/range", body, attempt),
            "watch check", repeatable=True, only=endpoint)

    # -- the calls, the tries, the connections --------------------------------------------------

    async def _call(self, path: str, payload: dict[str, Any], *, repeatable: bool = True,
                    what: str | None = None) -> dict[str, Any]:
        """`what` names the call in a failure's reason (else the path's last part)."""
        body = json.dumps(payload).encode()
        return await self._try_endpoints(
            lambda endpoint, attempt: self._request(endpoint, path, body, attempt, repeatable),
            what or path.rsplit("/", 1)[-1], repeatable=repeatable)

    async def _try_endpoints(self, attempt: Callable[[_Endpoint, _Try], Awaitable[T]],
                             what: str, *, repeatable: bool,
                             only: _Endpoint | None = None) -> T:
        """Each endpoint at most once, the last one that answered first, within `timeout` in
        all: each try gets an equal share of the time left, so a silent member early in the
        list leaves the others time to answer."""
        if self._closed:
            raise EtcdError("etcd client closed")
        count = len(self.endpoints)
        order = [only] if only is not None else [
            self.endpoints[(self._current + n) % count] for n in range(count)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        failures = []
        for n, endpoint in enumerate(order):
            share = (deadline - loop.time()) / (len(order) - n)
            progress = _Try()
            try:
                async with asyncio.timeout(share):
                    result = await attempt(endpoint, progress)
            except (_Broken, TimeoutError) as failure:
                reason = str(failure) if isinstance(failure, _Broken) else \
                    f"no answer within {share:.2g}s"
                failures.append(f"{endpoint.authority}: {reason}")
                if progress.sent and not repeatable:
                    raise EtcdUnavailable(f"etcd {what}: {endpoint.authority}: {reason} "
                                          "(the outcome is unknown)") from None
                continue
            if only is None:
                self._use(self.endpoints.index(endpoint))
            return result
        raise EtcdUnavailable(f"etcd {what}: no endpoint answered within {self.timeout:g}s ("
                              + "; ".join(failures) + ")")

    async def _request(self, endpoint: _Endpoint, path: str, body: bytes, progress: _Try,
                       repeatable: bool = True) -> dict[str, Any]:
        connection, reused = await self._connection(endpoint)
        try:
            await self._authenticate(connection)
            try:
                status, reply = await self._exchange(connection, path, body, progress)
            except _Broken:
                if not (reused and repeatable):
                    raise
                # A kept connection the member closed as we sent: the same member, afresh.
                connection.close()
                connection = await _Connection.open(endpoint, await self._ssl_for(endpoint))
                await self._authenticate(connection)
                status, reply = await self._exchange(connection, path, body, progress)
            if self._user is not None and (_error_of(status, reply) or (0,))[0] == \
                    UNAUTHENTICATED:
                self._token = None  # expired: once more with a new token
                await self._authenticate(connection)
                status, reply = await self._exchange(connection, path, body, progress)
            error = _error_of(status, reply)
            if error is not None:
                self._raise_unless_unavailable(*error)
                raise _Broken(error[1])
        except BaseException:
            connection.close()
            raise
        self._keep(connection)
        return reply

    async def _exchange(self, connection: _Connection, path: str, body: bytes,
                        progress: _Try) -> tuple[int, Any]:
        progress.sent = True
        await connection.send(path, body, self._token)
        status, headers = await connection.read_head()
        return status, _parse_json(await connection.read_body(headers))

    @staticmethod
    def _raise_unless_unavailable(code: int | None, reason: str) -> None:
        """etcd's own refusals are final, except those saying this member cannot serve now."""
        if code != UNAVAILABLE:
            raise EtcdError(f"etcd: {reason}", code)

    async def _authenticate(self, connection: _Connection) -> None:
        if self._user is None or self._token is not None:
            return
        body = json.dumps({"name": self._user, "password": self._password}).encode()
        await connection.send("/v3/auth/authenticate", body, None)
        status, headers = await connection.read_head()
        reply = _parse_json(await connection.read_body(headers))
        error = _error_of(status, reply)
        if error is not None:
            self._raise_unless_unavailable(error[0], f"authenticate as {self._user}: {error[1]}")
            raise _Broken(error[1])
        token = reply.get("token")
        if not isinstance(token, str) or not token or not token.isprintable():
            raise EtcdError("bad reply from etcd: authenticate without a token")
        self._token = token

    async def _connection(self, endpoint: _Endpoint) -> tuple[_Connection, bool]:
        """A kept connection to `endpoint` if one is still open, else a new one; and which."""
        while self._idle and self._idle[-1].endpoint == endpoint:
            connection = self._idle.pop()
            if not connection.stale:
                return connection, True
            connection.close()
        return await _Connection.open(endpoint, await self._ssl_for(endpoint)), False

    def _keep(self, connection: _Connection) -> None:
        if (connection.reusable and not self._closed and len(self._idle) < IDLE_KEPT
                and connection.endpoint == self.endpoints[self._current]):
            self._idle.append(connection)
        else:
            connection.close()

    def _use(self, index: int) -> None:
        if index != self._current:
            self._current = index
            for connection in self._idle:
                connection.close()
            self._idle.clear()

    async def _ssl_for(self, endpoint: _Endpoint) -> Any:
        if not endpoint.tls:
            return None
        if self._ssl is None:
            import ssl  # only for https endpoints

            try:
                context = ssl.create_default_context(cafile=self._ca)
                if self._cert is not None:
                    context.load_cert_chain(self._cert, self._key)
            except (OSError, ssl.SSLError) as error:
                raise EtcdError(f"etcd TLS: cannot load the CA or the client certificate: "
                                f"{getattr(error, 'strerror', None) or error}") from None
            self._ssl = context
        return self._ssl

    async def close(self) -> None:
        """Closes every connection; running watches end with EtcdError."""
        self._closed = True
        for connection in [*self._idle, *self._watches]:
            connection.close()
        self._idle.clear()
        for connection in list(self._watches):
            connection.reader.feed_eof()  # wakes the watch, which then sees the client closed


class _WatchStream:
    """A watch's chunked body, cut into its newline-separated JSON messages."""

    def __init__(self) -> None:
        self._dechunker = _Dechunker()
        self._text = bytearray()
        self._messages: list[Any] = []

    @property
    def pending(self) -> bool:
        return bool(self._messages)

    def feed(self, data: bytes) -> None:
        self._text += self._dechunker.feed(data)
        while (end := self._text.find(b"\n")) >= 0:
            line = bytes(self._text[:end]).strip()
            del self._text[:end + 1]
            if line:
                message = _parse_json(line)
                if message is None:
                    raise _Broken("a watch message is not JSON")
                self._messages.append(message)
        if len(self._text) > MAX_REPLY:
            raise _Broken("watch message too large")

    @property
    def ended(self) -> bool:
        return self._dechunker.done

    def peek(self) -> Any:
        return self._messages[0] if self._messages else None

    def messages(self) -> list[Any]:
        messages, self._messages = self._messages, []
        return messages
