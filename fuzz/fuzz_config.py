"""Fuzz the config loader: any bytes as a config file, through tomllib into parse_config, and
through load_config from a real file. Contract: a Config or ConfigError (each problem one line),
the same either way; a bad file is ConfigError too; a Config prints (`supervisor check`) to TOML
that loads back equal; a trigger address the config accepts is one the trigger can listen on;
nothing runs. The sandbox holds files a config may name: `secret`, `short` and a FIFO, `fifo`.

    .venv/bin/python fuzz/fuzz_config.py --seconds 60
"""

from __future__ import annotations

import os
from typing import Any

import harness
from harness import expect

with harness.instrumented():
    import tomllib

    from supervisor.core.config import Config, ConfigError, format_config, load_config, parse_config
    from supervisor.drivers.trigger import parse_listen

PATH = "supervisor.toml"  # relative to the sandbox, the working directory while fuzzing


def outcome(load: Any, *args: Any) -> Config | ConfigError:
    try:
        return load(*args)  # type: ignore[no-any-return]
    except ConfigError as error:
        expect(error.problems and all(isinstance(p, str) and len(p.splitlines()) == 1
                                      for p in error.problems),
               f"problems not one line each: {error.problems!r}")
        return error


def same(a: Config | ConfigError, b: Config | ConfigError) -> bool:
    if isinstance(a, ConfigError) and isinstance(b, ConfigError):
        return a.problems == b.problems
    return a == b


def check(data: bytes) -> None:
    path, environ = os.path.abspath(PATH), {"HOME": os.path.abspath("home")}
    with open(path, "wb") as file:
        file.write(data)
    try:
        parsed: dict[str, Any] | None = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        parsed = None
    except ValueError:  # tomllib lets int()'s "Exceeds the limit (4300 digits)" through
        parsed = None
    loaded = outcome(load_config, path, environ)
    if parsed is None:
        expect(isinstance(loaded, ConfigError) and "not valid TOML" in loaded.problems[0],
               f"a file tomllib refuses loaded as {loaded!r}")
        return
    direct = outcome(parse_config, parsed, path, environ)
    expect(same(loaded, direct), f"load_config gave {loaded!r}, parse_config {direct!r}")
    if isinstance(direct, Config):
        check_config(direct, environ)


def check_config(config: Config, environ: dict[str, str]) -> None:
    if config.trigger is not None:
        try:
            parse_listen(config.trigger.listen)
        except ValueError as error:
            raise harness.Violation(f"listen = {config.trigger.listen!r} passes the config "
                                    f"check but the trigger refuses it: {error}") from None
    printed = format_config(config)
    try:
        data = tomllib.loads(printed)
    except tomllib.TOMLDecodeError as error:
        raise harness.Violation(f"`supervisor check` printed invalid TOML: {error}\n{printed}"
                                ) from None
    if config.trigger is not None:  # the secret is never printed
        data["trigger"]["secret"] = config.trigger.secret
    again = outcome(parse_config, data, config.path, environ)
    expect(again == config, f"`supervisor check` printed\n{printed}\nwhich loads as {again!r}")


def prepare_sandbox() -> None:
    with open("secret", "w") as file:
        file.write("0123456789abcdef0123456789abcdef\n")
    with open("short", "w") as file:
        file.write("short\n")
    os.mkfifo("fifo")  # a path a config may name; opening it for reading blocks
    os.makedirs("home", exist_ok=True)


TARGET = harness.Target(
    "config", check, max_len=8192, bound=10.0, prepare=prepare_sandbox,
    tokens=[b"[app]", b"[git]", b"[build]", b"[drain]", b"[restart]", b"[log]", b"[trigger]",
            b"command = ", b"name = ", b"cwd = ", b"env = ", b"stop_signal = ", b"stop_timeout = ",
            b"state_dir = ", b"repo = ", b"remote = ", b"branch = ", b"poll_interval = ",
            b"timeout = ", b"on_diverge = ", b"stats_file = ", b"until = ", b"backoff_min = ",
            b"backoff_max = ", b"reset_after = ", b"format = ", b"file = ", b"child = ",
            b"child_file = ", b"max_bytes = ", b"keep = ", b"listen = ", b"secret = ",
            b"secret_file = ", b"path = ", b"burst = ", b"refill = ", b'"500ms"', b'"30s"',
            b'"5m"', b'"1h"', b'"1MiB"', b'"64KiB"', b'"GiB"', b'"SIGTERM"', b'"reset"',
            b'"n_clients == 0"', b'"127.0.0.1:9000"', b'"[::1]:9000"', b'"fifo"', b'"secret"',
            b'"short"', b'"/dev/zero"', b'"/dev/stdin"', b'"~"', b'"*"', b'"file"',
            b'"inherit"', b'"text"', b"1e-7", b"inf", b"nan", b"-0", b"0x10", b"1979-05-27",
            b'"""', b"'''", b"\\u0000", b"[[", b"{ ", b"touch fuzz-executed",
            "\u0669".encode(), b"99999999999999999999", b"[[socket]]", b"mode = ", b'"0660"',
            b'"./http.sock"'])

if __name__ == "__main__":
    harness.main(TARGET)
