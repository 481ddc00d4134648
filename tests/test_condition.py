"""The `drain.until` language: tables of parses and evaluations, error messages that say what was
expected where, and hypothesis for "only ConditionError" and the str() round trip.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.core.condition import (
    MAX_LENGTH,
    Comparison,
    Condition,
    ConditionError,
    parse_condition,
)


def cond(*triples: tuple[str, str, str]) -> Condition:
    return Condition(tuple(Comparison(*t) for t in triples))


@pytest.mark.parametrize(("text", "expected"), [
    ("n_clients == 0", cond(("n_clients", "==", "0"))),
    ("n_clients==0", cond(("n_clients", "==", "0"))),
    ("  n_clients   ==   0  ", cond(("n_clients", "==", "0"))),
    ("n != 1", cond(("n", "!=", "1"))),
    ("n < 1", cond(("n", "<", "1"))),
    ("n <= -1.5", cond(("n", "<=", "-1.5"))),
    ("n > +2", cond(("n", ">", "+2"))),
    ("n >= .5", cond(("n", ">=", ".5"))),
    ('mode == "idle"', cond(("mode", "==", "idle"))),
    ("mode == 'idle now'", cond(("mode", "==", "idle now"))),
    ("mode == idle", cond(("mode", "==", "idle"))),
    ('mode == ""', cond(("mode", "==", ""))),
    ('q == "and"', cond(("q", "==", "and"))),
    ("n_clients == 0 and n_jobs < 2", cond(("n_clients", "==", "0"), ("n_jobs", "<", "2"))),
    ("a == 1 and b == 2 and c != 'x'", cond(("a", "==", "1"), ("b", "==", "2"),
                                            ("c", "!=", "x"))),
    ("_x1 == 1", cond(("_x1", "==", "1"))),
])
def test_parse(text: str, expected: Condition) -> None:
    assert parse_condition(text) == expected


@pytest.mark.parametrize(("text", "stats", "holds"), [
    ("n == 0", {"n": "0"}, True),
    ("n == 0", {"n": "0.0"}, True),  # compared as numbers
    ("n == 0", {"n": "00"}, True),
    ("n == 0", {"n": "1"}, False),
    ("n != 0", {"n": "1"}, True),
    ("n != 0", {"n": "0"}, False),
    ("n < 2", {"n": "1"}, True),
    ("n < 2", {"n": "2"}, False),
    ("n < 2", {"n": "10"}, False),  # numbers, not strings ("10" < "2")
    ("n <= 2", {"n": "2"}, True),
    ("n > 2", {"n": "2.5"}, True),
    ("n > 2", {"n": "-3"}, False),
    ("n >= -1", {"n": "-1"}, True),
    ("n == 0", {}, False),  # missing: unknown is not safe
    ("n != 0", {}, False),
    ("n < 5", {"other": "1"}, False),
    ("n < 5", {"n": "many"}, False),  # non-numeric with an ordering: False
    ("n >= 0", {"n": ""}, False),
    ("n < 5", {"n": "nan"}, False),
    ("n > 5", {"n": "inf"}, False),
    ("n == 0", {"n": "zero"}, False),
    ("mode == idle", {"mode": "idle"}, True),
    ('mode == "idle"', {"mode": "idle"}, True),
    ("mode == 'idle'", {"mode": "busy"}, False),
    ('mode != "idle"', {"mode": "busy"}, True),
    ('mode < "z"', {"mode": "a"}, False),  # strings only compare for (in)equality
    ("a == 1 and b == 2", {"a": "1", "b": "2"}, True),
    ("a == 1 and b == 2", {"a": "1", "b": "3"}, False),
    ("a == 1 and b == 2", {"a": "1"}, False),
])
def test_evaluate(text: str, stats: dict[str, str], holds: bool) -> None:
    assert parse_condition(text).holds(stats) is holds


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected a stats key such as n_clients at the end"),
    ("   ", "expected a stats key such as n_clients at the end"),
    ("n_clients ==", "expected a number or a quoted string at the end"),
    ("n_clients", "expected a comparison (== != < <= > >=) at the end"),
    ("n_clients = 0", "unexpected character at column 11"),
    ("rm -rf /", "unexpected character at column 4"),
    ("$(reboot)", "unexpected character at column 1"),
    ("n == 0; reboot", "unexpected character at column 7"),
    ("a == 1 or b == 2", "expected 'and' at column 8, found 'or'"),
    ("a == 1 b == 2", "expected 'and' at column 8, found 'b'"),
    ("a == 1 and", "expected a stats key such as n_clients at the end"),
    ("a == 1 and and b == 2", "expected a stats key at column 12, found 'and'"),
    ("and == 1", "expected a stats key at column 1, found 'and'"),
    ("0 == n", "expected a stats key such as n_clients at column 1, found '0'"),
    ("n == == 1", "expected a number or a quoted string at column 6, found '=='"),
    ("n == 0 0", "expected 'and' at column 8"),
    ('n == "open', "unexpected character at column 6"),
    ("n == 1.2.3", "unexpected character at column 6"),
    ("n == 0 ==", "expected 'and' at column 8, found '=='"),
    ("n === 0", "unexpected character at column 5"),
    ("a==1and b==2", "unexpected character at column 4"),
])
def test_errors_say_what_was_expected_where(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition(text)
    assert message in str(caught.value)


def test_overlong_text_is_refused_before_parsing() -> None:
    text = " and ".join(["n == 0"] * 200)
    assert len(text) > MAX_LENGTH
    with pytest.raises(ConditionError, match="at most"):
        parse_condition(text)


def test_condition_error_is_a_value_error() -> None:
    assert issubclass(ConditionError, ValueError)


def test_values_are_compared_never_evaluated() -> None:
    # Nothing in a stats value or a condition is ever looked up, imported or executed.
    condition = parse_condition("n == __import__")
    assert condition.holds({"n": "__import__"})
    assert not condition.holds({"n": "__import__('os').system('true')"})


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
@example("n == 0 and")
@example("n == '")
@example("\x00")
def test_arbitrary_text_parses_or_raises_condition_error(text: str) -> None:
    try:
        result = parse_condition(text)
    except ConditionError as error:
        assert str(error).startswith("expected") or str(error).startswith("unexpected")
    else:
        assert isinstance(result, Condition) and result.comparisons


_ALPHABET = st.sampled_from(list("n_ab01.+-=!<>'\" \t") + ["and", "==", " and ", "0", "x"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_ALPHABET, max_size=25).map("".join))
def test_condition_like_text_parses_or_raises_condition_error(text: str) -> None:
    try:
        parse_condition(text)
    except ConditionError:
        pass


_KEY = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda k: k != "and")
_OP = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
_NUMBER = st.from_regex(r"[-+]?([0-9]{1,5}(\.[0-9]{0,3})?|\.[0-9]{1,3})", fullmatch=True)
_STRING = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda v: not ('"' in v and "'" in v))
_COMPARISON = st.builds(Comparison, _KEY, _OP, st.one_of(_NUMBER, _STRING))


@settings(max_examples=200, deadline=None)
@given(st.lists(_COMPARISON, min_size=1, max_size=4).map(lambda cs: Condition(tuple(cs))))
@example(cond(("n", "==", "0")))
@example(cond(("mode", "==", "idle"), ("n", "<", "-2.5")))
@example(cond(("path", "==", "C:\\temp")))  # a backslash
@example(cond(("n", "==", "1e5")))  # numeric to float(), not to the grammar
@example(cond(("n", "==", " 5")))  # numeric to float() once stripped
@example(cond(("n", "==", "1_000")))
@example(cond(("label", "==", "tab\there")))
def test_str_parses_back_to_an_equal_condition(condition: Condition) -> None:
    assert parse_condition(str(condition)) == condition


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_KEY, _OP, _NUMBER, st.floats(allow_nan=False, allow_infinity=False,
                                                          width=32)), min_size=1, max_size=3))
def test_numeric_comparisons_agree_with_float_comparison(
        cases: list[tuple[str, str, str, float]]) -> None:
    ops = {"==": float.__eq__, "!=": float.__ne__, "<": float.__lt__, "<=": float.__le__,
           ">": float.__gt__, ">=": float.__ge__}
    for key, op, literal, actual in cases:
        comparison = Comparison(key, op, literal)
        assert comparison.holds({key: repr(actual)}) is ops[op](actual, float(literal))


# Other scripts' digits: float() reads all of these as numbers, so an app (or whoever writes
# its stats) could make `n_clients == 0` hold with a value that is no ASCII number at all.
@pytest.mark.parametrize("value", [
    "\u0660",  # Arabic-Indic zero
    "\uff10",  # fullwidth zero
    "\u06f0",  # Extended Arabic-Indic zero
    "\u0966",  # Devanagari zero
    "\U0001d7ce",  # mathematical bold zero
    "0\u0660", "-\uff10", "\uff10.0", " 0", "0 ", "\t0", "0\n", "0_0", "0x0", "0e\u0660",
])
def test_only_ascii_digits_are_numbers(value: str) -> None:
    assert parse_condition("n_clients == 0").holds({"n_clients": value}) is False
    assert parse_condition("n_clients <= 0").holds({"n_clients": value}) is False
    assert parse_condition("n_clients != 0").holds({"n_clients": value}) is True  # a string


@pytest.mark.parametrize("text", ["n_clients == \u0660", "n_clients == \uff10",
                                  "n < 1\u0660", "n == \u00b2"])
def test_a_condition_with_other_digits_is_refused(text: str) -> None:
    with pytest.raises(ConditionError):
        parse_condition(text)


@pytest.mark.parametrize(("value", "holds"), [("0", True), ("0.0", True), ("-0", True),
                                              ("0e5", True), ("1e-05", False), ("+.0", True)])
def test_ascii_numbers_still_compare_as_numbers(value: str, holds: bool) -> None:
    assert parse_condition("n_clients == 0").holds({"n_clients": value}) is holds
