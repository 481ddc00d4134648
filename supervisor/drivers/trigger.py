"""The optional push trigger: a small HTTP/1.1 endpoint that turns a signed push webhook (GitHub,
Gitea, Forgejo, GitLab) into one call of `on_push`, "fetch git now". The payload is only hashed to
check its signature, never parsed or trusted; the trigger decides nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

# SHA-256 from the interpreter's own module: hashlib and hmac map OpenSSL's libcrypto, 3.4 MB
# resident on Debian 12 (1 to 2 MB of it shared), for one hash the builtin module computes as well.
try:
    from _sha2 import sha256  # Python 3.12 and later
except ImportError:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,no-redef]  # Python 3.11
    except ImportError:  # an interpreter built without its own hashes
        from hashlib import sha256  # type: ignore[assignment]
try:  # the constant-time comparison hmac.compare_digest falls back to, without libcrypto
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest

MAX_HEAD = 8192  # the request line and headers together
MAX_REQUEST_LINE = 1024
MAX_HEADER_LINES = 50
MAX_BODY = 1 << 20  # push payloads with many commits pass 64 KiB; the body is hashed, never held
TIMEOUT = 5.0  # the whole request, from connect to the last body byte
LINGER = 1.0  # after an early answer, how long unread input is drained so that it arrives
MAX_CONNECTIONS = 16
DELIVERIES_KEPT = 64
ROUTE_PREFIX = 16384  # of a body, kept to learn which repository it names (near the start)
# Where GitHub, Gitea, Forgejo and GitLab name the pushed repository's address.
REPOSITORY_KEYS = (b"clone_url", b"ssh_url", b"git_url", b"git_http_url", b"git_ssh_url",
                   b"html_url")
BURST, REFILL = 5, 10.0  # accepted pushes: 5 at once, then one per 10 s
LOG_BURST, LOG_REFILL = 10, 30.0  # `trigger.rejected` lines, so that a flood cannot fill a disk

# header -> (source, prefix): hex HMAC-SHA256 of the raw body with the secret
HEX_SIGNATURES = {
    "x-forgejo-signature": ("forgejo", b""),
    "x-gitea-signature": ("gitea", b""),
    "x-hub-signature-256": ("github", b"sha256="),
}
TOKEN = "x-gitlab-token"  # GitLab sends the secret itself
DELIVERY_IDS = ("x-github-delivery", "x-gitea-delivery", "x-forgejo-delivery",
                "x-gitlab-event-uuid")
EVENT_KINDS = ("x-github-event", "x-gitea-event", "x-forgejo-event", "x-gitlab-event")
SINGLE = {"content-length", "transfer-encoding", "expect", TOKEN, *HEX_SIGNATURES,
          *DELIVERY_IDS}
TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
PHRASES = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
           404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
           413: "Content Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large"}


def parse_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9000) from "127.0.0.1:9000"; "[::1]:9000" for IPv6. ValueError otherwise."""
    host, colon, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not (colon and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError('expected HOST:PORT such as "127.0.0.1:9000" or "[::1]:9000"')
    return host, int(port)


class Signer:
    """HMAC-SHA256 (RFC 2104) with one secret, fed piece by piece so a body is never held."""

    def __init__(self, secret: bytes) -> None:
        key = sha256(secret).digest() if len(secret) > 64 else secret
        key = key.ljust(64, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in key))
        self._outer = sha256(bytes(b ^ 0x5C for b in key))
        self._secret_digest = sha256(secret).digest()

    def start(self) -> Any:
        return self._inner.copy()

    def hexdigest(self, inner: Any) -> bytes:
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode()

    def is_secret(self, token: bytes) -> bool:
        """Constant time, length included: both sides are hashed to the same size first."""
        return compare_digest(sha256(token).digest(), self._secret_digest)


class Bucket:
    """A token bucket: `burst` at once, then one more every `refill` seconds."""

    def __init__(self, burst: int, refill: float, now: float) -> None:
        if burst < 1 or refill <= 0:
            raise ValueError("a bucket needs burst >= 1 and refill > 0")
        self.burst, self.refill = burst, refill
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until the next one."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) / self.refill)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * self.refill


class Refused(Exception):
    """Answer `status` and log `reason`; `read_all` is False while input may be left unread."""

    def __init__(self, status: int, reason: str, read_all: bool = False, header: str = "") -> None:
        super().__init__(reason)
        self.status, self.reason, self.read_all, self.header = status, reason, read_all, header


def response(status: int, text: str, header: str = "") -> bytes:
    body = text + "\n"
    return (f"HTTP/1.1 {status} {PHRASES[status]}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{header}\r\n{body}").encode()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, up to the empty line, line by line: a line ended by a bare
    LF is refused at once (400), instead of waiting for a CRLF CRLF that never comes until the
    timeout. Raises Refused(431) past MAX_HEAD."""
    head = b""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise Refused(431, "bad request") from None
        if not line.endswith(b"\r\n"):
            raise Refused(400, "bad request")
        head += line
        if len(head) > MAX_HEAD:
            raise Refused(431, "bad request")
        if line == b"\r\n":
            if len(head) == 2:
                raise Refused(400, "bad request")  # no request line
            return head


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, path and lower-cased headers of a head that ends in CRLF CRLF."""
    lines = head[:-4].split(b"\r\n")
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise Refused(400, "bad request")
    if len(lines) > MAX_HEADER_LINES + 1:
        raise Refused(431, "bad request")
    method, target = _request_line(lines[0])
    return method, target, _headers(lines[1:])


def _request_line(line: bytes) -> tuple[str, str]:
    """Method and path (the query left off) of "METHOD /path HTTP/1.x"."""
    parts = line.split(b" ")
    if (len(parts) != 3 or not parts[0] or not TOKEN_CHARS.issuperset(parts[0])
            or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].startswith(b"/")
            or not all(0x21 <= b <= 0x7E for b in parts[1])):
        raise Refused(400, "bad request")
    return parts[0].decode("ascii"), parts[1].split(b"?")[0].decode("ascii")


def _headers(lines: list[bytes]) -> dict[str, str]:
    """Lower-cased names; a header that must be single and comes twice is refused, since two
    readers could each believe a different one."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if (not colon or not name or not TOKEN_CHARS.issuperset(name)
                or any(b in b"\r\n\0" for b in value)):
            raise Refused(400, "bad request")
        key = name.decode("ascii").lower()
        if key in headers and key in SINGLE:
            raise Refused(400, "bad request")
        headers[key] = value.strip(b" \t").decode("latin-1")
    return headers


def content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers or "content-length" not in headers:
        raise Refused(411, "length required")
    text = headers["content-length"]
    if not (text.isascii() and text.isdigit() and len(text) <= 15):
        raise Refused(400, "bad request")
    return int(text)


def first(headers: dict[str, str], names: tuple[str, ...]) -> str | None:
    """The first of `names` present, cut short: only ever logged or remembered."""
    value = next((headers[name] for name in names if name in headers), None)
    return None if value is None else value[:128]


class Trigger:
    """Listens on one address; each valid, new, not rate-limited delivery calls `on_push()`.
    `log(event, facts)` receives `trigger.*` lines; the secret and signatures are never in them."""

    def __init__(self, secret: bytes | str, on_push: Callable[[], None],
                 log: Callable[[str, dict[str, Any]], None], *, path: str | None = "/",
                 burst: int = BURST, refill: float = REFILL, max_body: int = MAX_BODY,
                 timeout: float = TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        secret = secret.encode() if isinstance(secret, str) else secret
        if not secret:
            raise ValueError("the trigger needs a secret")
        self.signer = Signer(secret)
        self.on_push, self.log, self.path = on_push, log, path
        # The repository addresses the push being handled names (for a supervisor of many apps,
        # which fetches only theirs); empty when the body names none or it came deferred.
        self.last_repositories: tuple[str, ...] = ()
        self.max_body, self.timeout, self.max_connections = max_body, timeout, max_connections
        self.pushes = Bucket(burst, refill, 0.0)
        self.log_lines = Bucket(LOG_BURST, LOG_REFILL, 0.0)
        self.suppressed = 0
        self.deliveries: dict[str, None] = {}  # insertion-ordered: the oldest goes first
        self.bodies: dict[bytes, None] = {}  # the keyed digests of recent accepted bodies
        self.connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.server: asyncio.Server | None = None
        self.deferred: asyncio.TimerHandle | None = None
        self.port = 0

    async def start(self, listen: str) -> None:
        """Listen on "HOST:PORT" ("[::1]:9000" for IPv6); OSError if the address is taken."""
        host, port = parse_listen(listen)
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        self.port = self.server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.log("trigger.listening", {"address": f"{shown}:{self.port}", "path": self.path})

    def close(self) -> None:
        """Stop listening and drop every open connection; a deferred check is dropped too."""
        if self.server is not None:
            self.server.close()
        if self.deferred is not None:
            self.deferred.cancel()
            self.deferred = None
        for writer in self.connections.values():
            writer.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    # -----------------------------------------------------------------------------------------

    def _rejected(self, remote: str, reason: str, status: int | None, **facts: Any) -> None:
        if self.log_lines.take(asyncio.get_running_loop().time()) > 0:
            self.suppressed += 1
            return
        if self.suppressed:
            facts["suppressed"] = self.suppressed
            self.suppressed = 0
        self.log("trigger.rejected", {"remote": remote, "reason": reason, "status": status,
                                      **facts})

    def _admit(self, writer: asyncio.StreamWriter) -> asyncio.Task[Any]:
        """At the cap, the oldest connection makes room: idle connections then cannot lock a
        real delivery out, which arrives whole and is answered within milliseconds."""
        if len(self.connections) >= self.max_connections:
            oldest = next(iter(self.connections))
            evicted = self.connections.pop(oldest)
            evicted.transport.abort()
            self._rejected(remote_of(evicted), "too many connections", None)
        task = asyncio.current_task()
        assert task is not None
        self.connections[task] = writer
        return task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task, remote = self._admit(writer), remote_of(writer)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    status, text, header = await self._answer(reader, writer, remote)
                read_all = True
            except Refused as refused:
                status, text, header = refused.status, refused.reason, refused.header
                read_all = refused.read_all
                self._rejected(remote, refused.reason, status)
            writer.write(response(status, text, header))
            if not read_all:
                await linger(reader, writer)
        except TimeoutError:
            self._rejected(remote, "timeout", None)
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            partial = getattr(error, "partial", b"?")
            if task in self.connections and partial:  # not evicted, and not an empty probe
                self._rejected(remote, "bad request", None)
        except Exception as error:  # a bug here must not go unreported nor stop the listener
            self.log("trigger.error", {"remote": remote, "error": repr(error)[:200]})
        finally:
            self.connections.pop(task, None)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      remote: str) -> tuple[int, str, str]:
        method, path, headers = parse_head(await read_head(reader))
        if method != "POST":
            raise Refused(405, "method", header="Allow: POST\r\n")
        if self.path is not None and path != self.path:
            raise Refused(404, "path")
        length = content_length(headers)
        if length > self.max_body:
            raise Refused(413, "too large")
        hex_signatures = [(name, headers[name]) for name in HEX_SIGNATURES if name in headers]
        if not hex_signatures and TOKEN not in headers:
            raise Refused(401, "missing signature")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        inner = self.signer.start()
        prefix = bytearray()
        while length:
            piece = await reader.read(min(length, 16384))
            if not piece:
                raise asyncio.IncompleteReadError(b"?", length)
            inner.update(piece)
            if len(prefix) < ROUTE_PREFIX:
                prefix += piece[:ROUTE_PREFIX - len(prefix)]
            length -= len(piece)
        digest = self.signer.hexdigest(inner)
        if not self._signed(headers, hex_signatures, inner, digest):
            raise Refused(401, "bad signature", read_all=True)
        self.last_repositories = repositories_named(bytes(prefix))
        return self._push(headers, hex_signatures, remote, digest)

    def _signed(self, headers: dict[str, str], hex_signatures: list[tuple[str, str]],
                inner: Any, expected: bytes) -> bool:
        """Every signature present must match; a missing one was refused before."""
        valid = True
        if hex_signatures:
            for name, value in hex_signatures:
                given = value.encode("latin-1").lower()
                prefix = HEX_SIGNATURES[name][1]
                valid &= given.startswith(prefix) and compare_digest(given[len(prefix):],
                                                                     expected)
        if TOKEN in headers:
            valid &= self.signer.is_secret(headers[TOKEN].encode("latin-1"))
        return valid

    def _push(self, headers: dict[str, str], hex_signatures: list[tuple[str, str]],
              remote: str, digest: bytes) -> tuple[int, str, str]:
        """A delivery is new only if neither its id nor its body was seen lately. The id is
        not signed, so a captured body replayed under a new id (or none) is the same delivery:
        a forge's own redelivery repeats both, and two real pushes never send equal bodies
        (each names its before and after commits and carries its own timestamps)."""
        source = HEX_SIGNATURES[hex_signatures[0][0]][0] if hex_signatures else "gitlab"
        delivery = first(headers, DELIVERY_IDS)
        same = ("delivery" if delivery is not None and delivery in self.deliveries
                else "body" if digest in self.bodies else None)
        if same is not None:
            self.log("trigger.duplicate", {"remote": remote, "source": source,
                                           "delivery": delivery, "same": same})
            return 200, "duplicate", ""
        loop = asyncio.get_running_loop()
        wait = self.pushes.take(loop.time())
        if wait > 0:
            # The check is only postponed: the last push of a flood is fetched once the bucket
            # allows, however many were refused before it.
            if self.deferred is None:
                self.deferred = loop.call_later(wait, self._deferred_push)
            retry = int(wait) + 1
            self._rejected(remote, "rate limited", 429, source=source, delivery=delivery,
                           check_in=round(wait, 1))
            return 429, "rate limited; a check follows", f"Retry-After: {retry}\r\n"
        for seen, key in ((self.deliveries, delivery), (self.bodies, digest)):
            if key is not None:
                seen[key] = None
                if len(seen) > DELIVERIES_KEPT:
                    del seen[next(iter(seen))]
        self.log("trigger.accepted", {"remote": remote, "source": source, "delivery": delivery,
                                      "kind": first(headers, EVENT_KINDS)})
        self.on_push()
        return 202, "accepted", ""

    def _deferred_push(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.pushes.take(loop.time())
        if wait > 0:  # the clock ran a little behind the timer
            self.deferred = loop.call_later(wait, self._deferred_push)
            return
        self.deferred = None
        self.last_repositories = ()  # the last of a flood: which one is not known
        self.on_push()


def repositories_named(body: bytes) -> tuple[str, ...]:
    """The repository addresses a push payload names ("clone_url": "...", and the like), read
    from its first bytes without parsing JSON: only a signed body gets here, and only strings
    come out, compared with each app's remote, never used as one."""
    found: list[str] = []
    for key in REPOSITORY_KEYS:
        start = 0
        while (at := body.find(b'"' + key + b'"', start)) != -1:
            start = at + len(key) + 2
            rest = body[start:start + 1024].lstrip()
            if not rest.startswith(b":"):
                continue
            rest = rest[1:].lstrip()
            end = rest.find(b'"', 1)
            if rest.startswith(b'"') and end > 1:
                value = rest[1:end].decode("utf-8", "replace")
                if value not in found:
                    found.append(value)
    return tuple(found)


def repository_key(address: str) -> str:
    """An address as host/path, lowercase, without scheme, user, port or ".git": the same
    repository reached over https, ssh or scp-like syntax gives the same key."""
    address = address.strip().rstrip("/").lower().removesuffix(".git")
    if "://" in address:
        address = address.split("://", 1)[1]
        host, _, path = address.partition("/")
        host = host.rpartition("@")[2].partition(":")[0]
        return f"{host}/{path}"
    if ":" in address and not address.startswith("/"):  # git@host:owner/name
        host, _, path = address.partition(":")
        return f"{host.rpartition('@')[2]}/{path}"
    return address


def names_repository(named: tuple[str, ...], remote: str) -> bool:
    """Whether a push naming `named` is for the repository at `remote` (the same host and
    path; or, where the hosts differ as a mirror's would, the same owner/name)."""
    mine = repository_key(remote)
    for address in named:
        theirs = repository_key(address)
        if theirs == mine or theirs.split("/")[-2:] == mine.split("/")[-2:]:
            return True
    return False


def remote_of(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send our FIN after the answer, then drain what the client still sends for a moment:
    closing a socket with unread input resets it, and the reset can destroy the answer."""
    if writer.can_write_eof():
        writer.write_eof()
    try:
        async with asyncio.timeout(LINGER):
            while await reader.read(65536):
                pass
    except (TimeoutError, ConnectionError):
        pass
