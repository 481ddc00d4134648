"""Fuzz the stats file: any bytes, as parse_stats sees them and as read_stats reads them from a
real file. Contract: values (never None, never a problem) under keys of the grammar, one line
each; reading the file gives the same result, or "larger than" past the limit; nothing runs.

    .venv/bin/python fuzz/fuzz_stats.py --seconds 60
"""

from __future__ import annotations

import os
import re

import harness
from harness import expect

with harness.instrumented():
    from supervisor.core.condition import parse_condition
    from supervisor.drivers.statsfile import Stats, parse_stats, read_stats

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONDITIONS = [parse_condition(text) for text in (
    "n_clients == 0", "n_clients == 0 and n_jobs < 2", "n_clients <= 0", 'mode != "busy"',
    "n > -1.5")]
PATH = "stats"  # in the sandbox


def check(data: bytes) -> None:
    stats = parse_stats(data)
    expect(stats.values is not None and stats.problem is None, f"parse gave {stats}")
    assert stats.values is not None
    for key, value in stats.values.items():
        expect(KEY.fullmatch(key), f"key {key!r} is not of the grammar")
        # one line each: lines end at \n only; \x1c, \x85, U+2028 and the like stay in a value
        expect("\n" not in value and "\x00" not in value, f"value {value!r}")
    expect(stats.ignored_lines >= 0, "a negative count")
    expect((stats.first_ignored is None) == (stats.ignored_lines == 0),
           "first_ignored and ignored_lines disagree")
    expect(stats.first_ignored is None or len(stats.first_ignored) <= 80, "a long first_ignored")
    for condition in CONDITIONS:
        expect(condition.holds(stats.values) in (True, False), "holds() gave a non-bool")

    descriptor = os.open(PATH, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)
    expect(read_stats(PATH) == stats, "read_stats disagrees with parse_stats")
    if data:
        limit = len(data) - 1
        expect(read_stats(PATH, limit=limit) == Stats(None, problem=f"larger than {limit} bytes"),
               "a file over the limit was not refused whole")


TARGET = harness.Target(
    "stats", check, max_len=8192,
    tokens=[b"n_clients", b"n_authed", b'="', b"='", b"=", b"#", b"\n", b"\r\n", b"\xef\xbb\xbf",
            b"\x00", b"\xff", "\u2028".encode(), "\x85".encode(), b"\x0b", b"\x1c",
            b"$(touch fuzz-executed)", b"`touch fuzz-executed`", b"; touch fuzz-executed",
            b"export ", b". ./fuzz-executed", b"${x:-0}", b"\\\n"])

if __name__ == "__main__":
    harness.main(TARGET)
