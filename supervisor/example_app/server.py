"""Example app for supervisor: a tiny HTTP server that reports its connected clients in a stats
file, the way the seed's server did. Standard library only; shipped for the demo and the tests.

    GET /            -> "hello from VERSION" (VERSION is the file beside this script)
    GET /hold?s=N    -> keeps the connection for N seconds, so a client stays "connected"
    GET /up          -> 200 "ok", or 503 while a file UNHEALTHY lies beside this script
                        (a health check that fails, to see a rollback)

Environment: PORT (default 8080), HOST (default 127.0.0.1), STATS_FILE (default: none),
START_DELAY (seconds to wait before serving, to show that the socket handoff makes clients wait
rather than fail). With socket activation (LISTEN_PID is this process, LISTEN_FDS >= 1) it serves
on fd 3, the socket the supervisor holds, and ignores HOST and PORT. With NOTIFY_SOCKET set it
sends READY=1 there once it serves. A file CRASH beside this script makes it exit at start
(exit code 3), to see a bad release rolled back.
"""

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "VERSION")) as version_file:
    VERSION = version_file.read().strip()
STATS_FILE = os.environ.get("STATS_FILE")
lock = threading.Lock()
clients = 0
stopping = threading.Event()  # set by SIGTERM: answer what is in flight, then go
STOP_GRACE = float(os.environ.get("STOP_GRACE", "1"))  # at most this long, seconds


def write_stats():
    """Write then rename, so the supervisor never reads half a file."""
    if not STATS_FILE:
        return
    temporary = f"{STATS_FILE}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        file.write(f'n_clients="{clients}"\nversion="{VERSION}"\npid={os.getpid()}\n')
    os.replace(temporary, STATS_FILE)


def count(delta):
    global clients
    with lock:
        clients += delta
        write_stats()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered: the headers and the body leave in one write (flushed after each request), not
    # two, which Nagle's algorithm and the client's delayed ACK would hold apart for 40 ms.
    wbufsize = -1

    def setup(self):
        super().setup()
        count(+1)

    def finish(self):
        try:
            super().finish()
        finally:
            count(-1)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/hold":
            seconds = float(parse_qs(url.query).get("s", ["10"])[0])
            time.sleep(min(seconds, 3600))
        status, body = 200, f"hello from {VERSION}\n".encode()
        if url.path == "/up":
            healthy = not os.path.exists(os.path.join(HERE, "UNHEALTHY"))
            status, body = (200, b"ok\n") if healthy else (503, b"unhealthy\n")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if stopping.is_set():
            self.send_header("Connection", "close")  # the client reconnects: to the next one
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def make_server():
    """Serve on the socket handed over by the supervisor (systemd's protocol), else bind."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and \
            int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        listener = socket.socket(fileno=3)
        ThreadingHTTPServer.address_family = listener.family
        server = ThreadingHTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = listener
        return server
    return ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"),
                                int(os.environ.get("PORT", "8080"))), Handler)


def notify_ready():
    """sd_notify's READY=1, for a supervisor (or systemd) that asked with NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


def main():
    if os.path.exists(os.path.join(HERE, "CRASH")):
        print(f"example app {VERSION}: CRASH file found, exiting", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(float(os.environ.get("START_DELAY", "0")))
    server = make_server()
    server.daemon_threads = True

    def on_term(*_):
        stopping.set()
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    write_stats()
    address = server.socket.getsockname()
    where = f"port {address[1]}" if isinstance(address, tuple) else address
    print(f"example app {VERSION} listening on {where}", file=sys.stderr,
          flush=True)
    notify_ready()
    server.serve_forever(poll_interval=0.1)  # answers a stop request within ~0.1 s
    server.server_close()  # accept no more; a held socket keeps queueing for the next one
    # Finish the requests in flight (their answers say "Connection: close") and let keep-alive
    # clients send their next request here, for at most STOP_GRACE: exiting under them would
    # cut answers in half and reset requests already sent.
    deadline = time.monotonic() + STOP_GRACE
    while clients and time.monotonic() < deadline:
        time.sleep(0.01)


if __name__ == "__main__":
    main()
