"""The `drain.until` language: comparisons of stats keys joined by `and`, e.g.
`n_clients == 0 and n_jobs < 2`. Parsed once at config load; evaluated against values read from
the stats file. Pure: it never executes anything, whatever the file or the config says.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_OPERATORS: dict[str, Callable[[object, object], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<=": operator.le,
    ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>==|!=|<=|>=|<|>)
      | (?P<string>"[^"]*"|'[^']*')
      | (?P<number>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?![\w.]))
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
# What counts as a number on either side: ASCII digits only. float() also takes U+0660,
# U+FF10, " 5" and "1_000", so an app's garbage would satisfy `n_clients == 0`; the exponent
# stays, as a float's repr writes one (1e-05).
_NUMERIC = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
MAX_LENGTH = 1000


class ConditionError(ValueError):
    """A malformed condition; the message says what was expected where."""


def _as_number(text: str) -> float | None:
    if not _NUMERIC.fullmatch(text):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class Comparison:
    key: str
    op: str
    value: str  # the literal as written (quotes removed)

    def holds(self, stats: Mapping[str, str]) -> bool:
        """False when the key is missing or the values cannot be compared: unknown is not safe."""
        actual = stats.get(self.key)
        if actual is None:
            return False
        expected_number, actual_number = _as_number(self.value), _as_number(actual)
        if expected_number is not None and actual_number is not None:
            return _OPERATORS[self.op](actual_number, expected_number)
        if self.op in ("==", "!="):
            return _OPERATORS[self.op](actual, self.value)
        return False

    def __str__(self) -> str:
        # Written back in the grammar's own terms: bare only if the lexer reads it as a number,
        # else quoted without escapes (the lexer has none), with a quote the value lacks.
        if _NUMBER.fullmatch(self.value):
            literal = self.value
        elif '"' in self.value:
            literal = "'" + self.value + "'"
        else:
            literal = '"' + self.value + '"'
        return f"{self.key} {self.op} {literal}"


@dataclass(frozen=True, slots=True)
class Condition:
    comparisons: tuple[Comparison, ...]

    def holds(self, stats: Mapping[str, str]) -> bool:
        return all(comparison.holds(stats) for comparison in self.comparisons)

    def __str__(self) -> str:
        return " and ".join(str(c) for c in self.comparisons)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            column = len(text) - len(text[position:].lstrip()) + 1
            raise ConditionError(f"unexpected character at column {column}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind), match.start(kind) + 1))
        position = match.end()
    return tokens


def parse_condition(text: str) -> Condition:
    """Parse `KEY OP VALUE [and KEY OP VALUE ...]`; ConditionError says what was expected."""
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"expected at most {MAX_LENGTH} characters")
    tokens = _tokens(text)
    comparisons: list[Comparison] = []
    index = 0

    def expect(kinds: tuple[str, ...], what: str) -> tuple[str, str, int]:
        nonlocal index
        if index >= len(tokens):
            raise ConditionError(f"expected {what} at the end")
        token = tokens[index]
        if token[0] not in kinds:
            raise ConditionError(f"expected {what} at column {token[2]}, found {token[1]!r}")
        index += 1
        return token

    while True:
        _, key, column = expect(("word",), "a stats key such as n_clients")
        if key == "and":
            raise ConditionError(f"expected a stats key at column {column}, found 'and'")
        _, op, _ = expect(("op",), "a comparison (== != < <= > >=)")
        kind, value, _ = expect(("number", "string", "word"), "a number or a quoted string")
        if kind == "string":
            value = value[1:-1]
        comparisons.append(Comparison(key, op, value))
        if index == len(tokens):
            condition = Condition(tuple(comparisons))
            # str() spells it out ("a<1" -> "a < 1"): what is accepted must print as accepted.
            if len(str(condition)) > MAX_LENGTH:
                raise ConditionError(f"expected at most {MAX_LENGTH} characters once written "
                                     "out as KEY OP VALUE and ...")
            return condition
        expect(("word",), "'and'")
        if tokens[index - 1][1] != "and":
            raise ConditionError(f"expected 'and' at column {tokens[index - 1][2]}, "
                                 f"found {tokens[index - 1][1]!r}")
