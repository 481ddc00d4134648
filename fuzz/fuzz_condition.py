"""Fuzz the `drain.until` language: any text before the first NUL byte is a condition, the bytes
after it a stats file to evaluate it against. Contract: a Condition or ConditionError (one line,
saying what was expected); a parsed condition prints back to itself; holds() is a bool and is
never true on stats that lack its keys; nothing runs.

    .venv/bin/python fuzz/fuzz_condition.py --seconds 60
"""

from __future__ import annotations

import harness
from harness import expect

with harness.instrumented():
    from supervisor.core.condition import MAX_LENGTH, Condition, ConditionError, parse_condition
    from supervisor.drivers.statsfile import parse_stats


def check(data: bytes) -> None:
    source, _, stats_file = data.partition(b"\x00")
    # surrogateescape: every byte string is some str, lone surrogates included
    text = source.decode("utf-8", errors="surrogateescape")
    try:
        condition = parse_condition(text)
    except ConditionError as error:
        message = str(error)
        expect(message.startswith(("expected", "unexpected")), f"unclear error {message!r}")
        expect(len(message.splitlines()) == 1, f"a multi-line error {message!r}")
        return
    expect(isinstance(condition, Condition) and condition.comparisons, f"parsed to {condition!r}")
    expect(len(text) <= MAX_LENGTH, "an overlong condition was accepted")
    printed = str(condition)
    try:
        again = parse_condition(printed)
    except ConditionError as error:
        raise harness.Violation(f"str() of {text!r} is {printed!r}, which fails: {error}") from None
    expect(again == condition, f"{text!r} prints as {printed!r}, which parses to {again!r}")

    values = parse_stats(stats_file).values or {}
    own = {comparison.key: comparison.value for comparison in condition.comparisons}
    for stats in (values, own, {}, {key: "0" for key in own}, {key: "nan" for key in own}):
        expect(condition.holds(stats) in (True, False), "holds() gave a non-bool")
    expect(condition.holds({}) is False, "holds on stats without its keys")


TARGET = harness.Target(
    "condition", check, max_len=2048,
    tokens=[b"n_clients", b"==", b"!=", b"<=", b">=", b"<", b">", b" and ", b"and", b"'", b'"',
            b"-", b"+", b".", b"0", b"1e5", b"nan", b"inf", b"\x00", b"n_clients=\"0\"\n",
            "\u0661".encode(), "\u00b2".encode(), b"$(touch fuzz-executed)", b"__import__",
            b"; touch fuzz-executed", b"`touch fuzz-executed`", b" or ", b"\t", b"\n"])

if __name__ == "__main__":
    harness.main(TARGET)
