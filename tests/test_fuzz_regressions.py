"""Inputs that broke a contract under fuzzing (fuzz/) or while writing its checks, minimized:
each must now give a result or the documented error.
"""

from __future__ import annotations

import os
import threading
import tomllib
from pathlib import Path

import pytest

from supervisor.core.condition import MAX_LENGTH, ConditionError, parse_condition
from supervisor.core.config import ConfigError, format_config, load_config, parse_config
from supervisor.drivers.trigger import parse_listen

ENVIRON = {"HOME": "/home/fuzz"}
APP = {"command": "make run"}


def test_an_integer_of_more_than_4300_digits_is_a_config_error(tmp_path: Path) -> None:
    # fuzz_config: tomllib lets int()'s "Exceeds the limit (4300 digits)" ValueError through.
    path = tmp_path / "supervisor.toml"
    path.write_text('[app]\ncommand = "x"\n[git]\npoll_interval = 3' + "0" * 4300 + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), ENVIRON)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: not valid TOML")


def test_a_size_of_more_than_4300_digits_is_a_config_error() -> None:
    # Found while writing fuzz_config's checks: _size() calls int() on what its regex matched.
    with pytest.raises(ConfigError) as caught:
        parse_config({"app": APP, "log": {"max_bytes": "1" * 4301}}, "/srv/s.toml", ENVIRON)
    assert caught.value.problems[0].startswith("log.max_bytes: expected a size")


def test_a_condition_that_is_accepted_prints_as_one_that_is_accepted() -> None:
    # fuzz_condition: str() spells each comparison out ("a<1" -> "a < 1"), so an input under
    # MAX_LENGTH could print over it, and `supervisor check` then printed an `until` that does
    # not load back.
    text = " and ".join(["a<1"] * 125)
    assert len(text) <= MAX_LENGTH
    try:
        condition = parse_condition(text)
    except ConditionError:
        return  # refusing it is fine too
    assert parse_condition(str(condition)) == condition


def test_a_trigger_on_any_path_is_printed_so_that_it_loads_back(tmp_path: Path) -> None:
    # Found while writing fuzz_config's round trip: path = "*" is kept as None, which
    # format_config left out, so the printed config answered only "/".
    data = {"app": APP, "trigger": {"listen": "127.0.0.1:9000", "secret": "s" * 16, "path": "*"}}
    config = parse_config(data, str(tmp_path / "s.toml"), ENVIRON)
    printed = tomllib.loads(format_config(config))
    printed["trigger"]["secret"] = "s" * 16
    assert parse_config(printed, str(tmp_path / "s.toml"), ENVIRON) == config


@pytest.mark.parametrize("listen", ["127.0.0.1:\u0669\u0660\u0660\u0660",  # Arabic-Indic digits
                                    "127.0.0.1:\uff19\uff10\uff10\uff10"])  # fullwidth digits
def test_a_listen_address_the_config_accepts_is_one_the_trigger_accepts(listen: str) -> None:
    # Found while writing fuzz_config's checks: the config's regex took any Unicode digit for
    # the port, the trigger's parse_listen only ASCII, so `supervisor check` passed and
    # `supervisor run` then failed at start with a ValueError traceback.
    data = {"app": APP, "trigger": {"listen": listen, "secret": "s" * 16}}
    try:
        config = parse_config(data, "/srv/s.toml", ENVIRON)
    except ConfigError as error:
        assert error.problems[0].startswith("trigger.listen: expected")
        return
    assert config.trigger is not None
    parse_listen(config.trigger.listen)


def test_a_secret_file_that_is_a_fifo_does_not_block(tmp_path: Path) -> None:
    # Found while writing fuzz_config's sandbox: the config file itself is checked for a FIFO
    # (the open would block), but trigger.secret_file was opened as it was.
    os.mkfifo(tmp_path / "secret")
    path = tmp_path / "supervisor.toml"
    path.write_text('[app]\ncommand = "x"\n[trigger]\nlisten = "127.0.0.1:9000"\n'
                    'secret_file = "secret"\n')
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_config(str(path), ENVIRON)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=2)
    if thread.is_alive():  # unblock the reader, so that the thread ends with the test
        os.close(os.open(tmp_path / "secret", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=2)
        pytest.fail("load_config blocked on a FIFO named by trigger.secret_file")
    [error] = outcome
    assert isinstance(error, ConfigError)
    assert error.problems[0].startswith("trigger.secret_file: ")


def test_a_config_file_larger_than_the_cap_is_refused_before_parsing(tmp_path: Path) -> None:
    # tomllib takes minutes on some huge inputs (long dotted keys): no config needs 256 KiB.
    from supervisor.core.config import MAX_CONFIG_BYTES

    path = tmp_path / "supervisor.toml"
    path.write_text('[app]\ncommand = "x"\n' + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), ENVIRON)
    assert caught.value.problems == [f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a config "
                                     "is a few hundred"]
