"""What the running supervisor keeps out of memory: modules only start-up needed, and TLS. Called
by the command line before the loop starts and by a reload after it re-read the config."""

from __future__ import annotations

import gc
import sys

STARTUP_ONLY = ("argparse", "gettext", "tomllib", "datetime")  # tomllib imports datetime


def forget_startup_modules() -> None:
    """Drop what only start-up needed (parsing arguments and TOML), before asyncio is imported:
    its modules then reuse that memory instead of adding to it (about 0.5 MB on a tiny box)."""
    for name in [m for m in sys.modules if m.split(".")[0] in STARTUP_ONLY]:
        del sys.modules[name]
    gc.collect()


def without_tls() -> None:
    """Keep `ssl` out of the running service: asyncio imports it only in case a program opens
    TLS connections, which the supervisor never does in-process (git runs as a subprocess), and
    on a 128 MB box its ~3.5 MB are better left to the app. asyncio handles its absence."""
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
