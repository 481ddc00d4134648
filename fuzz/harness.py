"""What every fuzz_*.py shares: it runs one target's `check(data)` under atheris (coverage-guided,
libFuzzer) or, where atheris is not installed, under a small seeded mutation fuzzer; bounds every
call; records each distinct failure once, with the smallest input seen, and keeps going.

A target's contract is its `check`: it returns, or raises the documented error itself, and
anything else that escapes is a failure: an exception, a `Violation` of a stated property, or a
`Hang` (a call that outlived its bound).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
# FUZZ_ENGINE=mutate forces the fallback; run.py sets it from --engine.
ENGINE = os.environ.get("FUZZ_ENGINE") or ("atheris" if find_spec("atheris") else "mutate")
# What the shell-looking seeds would create in the sandbox (the working directory) if any of it
# were ever run. Its appearance is a failure of whichever input was being checked.
MARKER = "fuzz-executed"
SUMMARY_EVERY = 1.0  # seconds between summary writes: libFuzzer exits without atexit handlers


class Violation(AssertionError):
    """A stated property of the target does not hold for this input."""


class Hang(BaseException):
    """A call outlived its bound. A BaseException, so that no `except Exception` in the code
    under test can swallow it."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise Violation(message)


def no_code_ran() -> None:
    expect(not os.path.lexists(MARKER), f"{MARKER} appeared: an input was executed")


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Modules imported inside get atheris's coverage counters: only the code under test (and
    tomllib, whose branches shape the configs that reach ours). atheris's RegEx hook is left
    off: its proxy drops `Pattern.match(text, pos)`, which condition.py uses."""
    if ENGINE == "atheris":
        import atheris

        with atheris.instrument_imports(include=["supervisor", "tomllib"]):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Bounding a call


class Watchdog:
    """Interrupts the main thread with SIGUSR1 when a call passes its deadline, so a blocking
    open() or a runaway loop becomes a `Hang` for the call that caused it. SIGALRM is left to
    libFuzzer, whose own -timeout is the last resort (for code that holds the GIL throughout)."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.deadline: float | None = None
        self.fired = False
        signal.signal(signal.SIGUSR1, self._interrupt)
        threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        started = time.monotonic()
        self.fired, self.deadline = False, started + self.bound
        try:
            yield
        finally:
            self.deadline = None
        elapsed = time.monotonic() - started
        if elapsed > self.bound:  # it returned, but late (the GIL was held past the deadline)
            raise Hang(f"took {elapsed:.1f}s, more than the bound of {self.bound}s")

    def _watch(self) -> None:
        main = threading.main_thread().ident
        assert main is not None
        while True:
            time.sleep(min(0.05, self.bound / 4))
            deadline = self.deadline
            if deadline is not None and not self.fired and time.monotonic() > deadline:
                self.fired = True
                signal.pthread_kill(main, signal.SIGUSR1)

    def _interrupt(self, signum: int, frame: object) -> None:
        if self.deadline is not None:
            raise Hang(f"no result within the bound of {self.bound}s")


# ---------------------------------------------------------------------------------------------
# Recording failures


def signature(error: BaseException) -> str:
    """The exception's type and the deepest line of ours it passed through: a crash in
    supervisor/ names its line there; a broken property names the check in fuzz/."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(REPO) + os.sep)
            and "/.venv/" not in f.filename and not f.filename.endswith("harness.py")]
    frame = next((f for f in reversed(ours)
                  if os.path.relpath(f.filename, REPO).startswith("supervisor" + os.sep)), None)
    frame = frame or (ours[-1] if ours else (frames[-1] if frames else None))
    where = "?" if frame is None else (
        f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno}")
    return f"{type(error).__name__} at {where}"


@dataclass
class Failure:
    signature: str
    message: str
    count: int = 0
    size: int = -1  # of the smallest input kept
    input: str = ""  # where it is kept


@dataclass
class Recorder:
    """Keeps one input per distinct signature, replaced by any smaller one found later."""

    target: str
    crash_dir: Path
    summary_path: Path | None
    executions: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)
    last_write: float = 0.0

    def record(self, error: BaseException, data: bytes) -> None:
        key = signature(error)
        report = "".join(traceback.format_exception(error))
        failure = self.failures.get(key)
        if failure is None:
            print(f"\n=== {self.target}: new failure: {key}\n{report}", file=sys.stderr,
                  flush=True)
            failure = self.failures[key] = Failure(key, str(error)[:300])
        failure.count += 1
        if failure.size < 0 or len(data) < failure.size:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-").lower()[:60]
            path = self.crash_dir / f"{self.target}-{slug}-{sha(key.encode())}"
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.with_name(path.name + ".txt").write_text(
                f"{key}\n{len(data)} bytes: {data[:400]!r}\n\n{report}")
            failure.size, failure.input = len(data), str(path)
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.summary_path is None or not (force or now - self.last_write > SUMMARY_EVERY):
            return
        self.last_write = now
        summary = {"target": self.target, "engine": ENGINE, "executions": self.executions,
                   "failures": [asdict(failure) for failure in self.failures.values()]}
        temporary = self.summary_path.with_name(self.summary_path.name + ".tmp")
        temporary.write_text(json.dumps(summary, indent=1))
        os.replace(temporary, self.summary_path)


def sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------
# Mutations: atheris's own, plus "repeat a slice", which libFuzzer rarely does at scale and which
# finds what only size brings out (4301 digits, 51 headers, nesting a thousand deep).


def amplify(rng: random.Random, data: bytes, max_size: int) -> bytes:
    if not data or len(data) >= max_size:
        return data
    start = rng.randrange(len(data))
    piece = data[start:start + rng.randint(1, 16)]
    room = (max_size - len(data)) // len(piece)
    if room < 1:
        return data
    times = min(room, rng.choice([2, 8, 64, 512, 5000, room]))
    return data[:start] + piece * times + data[start:]


def mutate(rng: random.Random, data: bytes, pool: Sequence[bytes], tokens: Sequence[bytes],
           max_size: int) -> bytes:
    """One to four random edits: the fallback engine's whole mutator."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(8)
        at = rng.randint(0, len(out))
        if choice == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif choice == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 3 and out:
            del out[at:at + rng.randint(1, 16)]
        elif choice == 4 and tokens:
            out[at:at] = rng.choice(tokens)
        elif choice == 5 and tokens:
            out[at:at + rng.randint(0, 8)] = rng.choice(tokens)
        elif choice == 6 and pool:
            other = rng.choice(pool)
            cut = rng.randint(0, len(other))
            out = out[:at] + bytearray(other[cut:])
        else:
            out = bytearray(amplify(rng, bytes(out), max_size))
    return bytes(out[:max_size])


def atheris_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    rng = random.Random(seed)
    if rng.random() < 0.04:
        return amplify(rng, data, max_size)
    return atheris.Mutate(data, max_size)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Running a target


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[bytes], None]
    max_len: int = 4096
    tokens: Sequence[bytes] = ()
    bound: float = 2.0  # seconds one call may take
    hard_timeout: int = 30  # libFuzzer's -timeout, for what the watchdog cannot interrupt
    prepare: Callable[[], None] | None = None  # called once, in the sandbox, before any input


def sandbox(directory: Path) -> Path:
    """Empty `directory` and work in it: the marker and any file a target writes land there,
    never in the repository."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.chdir(directory)
    return directory


def seeds(target: str) -> list[bytes]:
    corpus = FUZZ_DIR / "corpus" / target
    return [path.read_bytes() for path in sorted(corpus.iterdir()) if path.is_file()]


def dictionary_file(tokens: Sequence[bytes], directory: Path) -> Path:
    path = directory / "tokens.dict"
    lines = ['"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}"
                           for b in token) + '"' for token in tokens]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(target: Target) -> None:
    parser = argparse.ArgumentParser(description=f"Fuzz the {target.name} target.")
    parser.add_argument("--seconds", type=int, default=60, help="how long to run (default 60)")
    parser.add_argument("--runs", type=int, default=0, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0: a random one)")
    parser.add_argument("--crash-dir", type=Path, default=FUZZ_DIR / "crashes")
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="where atheris keeps the inputs it found (default: a temp dir)")
    parser.add_argument("--summary", type=Path, default=None, help="write counts here (JSON)")
    parser.add_argument("--sandbox", type=Path, default=FUZZ_DIR / "out" / f"{target.name}.sandbox",
                        help="the working directory while fuzzing; emptied first")
    parser.add_argument("--reproduce", type=Path, nargs="+", default=None,
                        help="run these inputs once each and print what they do")
    parser.add_argument("--minimize", type=Path, default=None,
                        help="shrink this input while it fails the same way")
    args = parser.parse_args()
    crash_dir, summary = args.crash_dir.resolve(), args.summary and args.summary.resolve()
    corpus_dir = args.corpus_dir and args.corpus_dir.resolve()
    inputs = [path.resolve() for path in args.reproduce or []]
    to_minimize = args.minimize and args.minimize.resolve()
    sandbox_dir = sandbox(args.sandbox.resolve())
    if target.prepare is not None:
        target.prepare()
    watchdog = Watchdog(target.bound)

    def attempt(data: bytes) -> BaseException | None:
        try:
            with watchdog.bounded():
                target.check(data)
                no_code_ran()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARKER)  # so that one executed input is not blamed on the next
            return error
        return None

    if inputs:
        sys.exit(reproduce(attempt, inputs))
    if to_minimize:
        sys.exit(minimize(attempt, to_minimize))

    recorder = Recorder(target.name, crash_dir, summary)

    def one_input(data: bytes) -> None:
        recorder.executions += 1
        error = attempt(data)
        if error is not None:
            recorder.record(error, data)
        else:
            recorder.write()

    seed = args.seed or random.randrange(1, 2**31)
    print(f"{target.name}: engine {ENGINE}, seed {seed}, sandbox {sandbox_dir}", file=sys.stderr,
          flush=True)
    if ENGINE == "atheris":
        import atheris

        corpus = corpus_dir or sandbox_dir / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        crash_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.argv[0], f"-seed={seed}", f"-max_len={target.max_len}",
                f"-timeout={target.hard_timeout}", "-print_final_stats=1",
                f"-artifact_prefix={crash_dir}/{target.name}-libfuzzer-",
                f"-dict={dictionary_file(target.tokens, sandbox_dir)}",
                f"-max_total_time={args.seconds}", f"-runs={args.runs or -1}",
                str(corpus), str(FUZZ_DIR / "corpus" / target.name)]
        atheris.Setup(argv, one_input, custom_mutator=atheris_mutator)
        atheris.Fuzz()  # exits the process when done
    else:
        run_mutations(target, one_input, seed, args.seconds, args.runs)
        recorder.write(force=True)
        print(f"Done {recorder.executions} runs; {len(recorder.failures)} distinct failures",
              file=sys.stderr)


def run_mutations(target: Target, one_input: Callable[[bytes], None], seed: int, seconds: int,
                  runs: int) -> None:
    """The fallback engine: no coverage feedback, so it leans on the seeds and the tokens. With
    --runs it is deterministic for a given seed."""
    rng = random.Random(seed)
    pool = seeds(target.name) or [b""]
    for data in pool:
        one_input(data)
    deadline = time.monotonic() + seconds
    done = len(pool)
    while (done < runs) if runs else (time.monotonic() < deadline):
        data = mutate(rng, rng.choice(pool), pool, target.tokens, target.max_len)
        one_input(data)
        done += 1
        if len(pool) < 256 and rng.random() < 0.01:
            pool.append(data)  # a little drift away from the seeds


def reproduce(attempt: Callable[[bytes], BaseException | None], paths: list[Path]) -> int:
    failed = 0
    for path in paths:
        error = attempt(path.read_bytes())
        if error is None:
            print(f"{path}: passes")
        else:
            failed += 1
            print(f"{path}: {signature(error)}")
            traceback.print_exception(error)
    return 1 if failed else 0


def minimize(attempt: Callable[[bytes], BaseException | None], path: Path) -> int:
    """Delta debugging on bytes: drop chunks, then single bytes, while the failure keeps its
    signature. Writes PATH.min and prints it."""
    data = path.read_bytes()
    first = attempt(data)
    if first is None:
        print(f"{path}: passes; nothing to minimize")
        return 1
    wanted = signature(first)

    def still_fails(candidate: bytes) -> bool:
        error = attempt(candidate)
        return error is not None and signature(error) == wanted

    chunk = max(1, len(data) // 2)
    while chunk >= 1:
        at, shrunk = 0, False
        while at < len(data):
            candidate = data[:at] + data[at + chunk:]
            if still_fails(candidate):
                data, shrunk = candidate, True
            else:
                at += chunk
        if not shrunk:
            chunk //= 2
    out = path.with_name(path.name + ".min")
    out.write_bytes(data)
    print(f"{wanted}\n{len(data)} bytes: {data!r}\nwritten to {out}")
    return 0
