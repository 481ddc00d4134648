"""The process's one writer thread: durable state writes and event-log lines run there, in the
order they were asked for, so one app's fsync on a slow SD card never stalls the loop every app
shares. It runs what it is given and reports back on the loop; it decides nothing.
"""

from __future__ import annotations

import asyncio
import threading
from _queue import SimpleQueue  # the C queue alone: `queue` would import heapq and more
from collections.abc import Callable
from typing import Any

Job = Callable[[], None]
# Log lines that may wait for the thread. Beyond, the loop waits for it, as it waited for every
# write before the thread: a journald that stops reading its pipe must not fill a small box's
# memory with queued lines (about 0.5 kB each), and no line is ever dropped.
MAX_QUEUED_LINES = 4096


class DiskWriter:
    """One long-lived daemon thread behind a FIFO queue. Chosen over an executor pool
    (aiofiles runs each call in the loop's default pool, up to six threads here): one thread
    keeps writes in order (a newer state.json is never overwritten by an older one, log lines
    stay in order) and costs one stack. It blocks on its queue: an idle supervisor uses no CPU.

    Jobs never raise by contract (they report their own OSError); one that does is a bug, passed
    to `on_error` on the loop, and the thread goes on with the next job."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.loop = loop
        self.on_error = on_error
        # Guards what the loop and the thread share about a state file (is it being written,
        # what is pending). Held only to flip those flags, or by the loop for a write of its own
        # that needs no fsync: never across an fsync.
        self.lock = threading.Lock()
        self.submitted = 0  # jobs, counted under _counting (the thread submits too)
        self.done = 0  # counted by the thread alone
        self._counting = threading.Lock()
        self._queue: SimpleQueue[Job | asyncio.Future[None] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._line_room = threading.BoundedSemaphore(MAX_QUEUED_LINES)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue `job` behind everything submitted before it (from the loop, or from a job)."""
        if self._stopped:
            return  # only after a stop that found the disk stuck: the process is exiting
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="supervisor-writer",
                                            daemon=True)
            self._thread.start()
        with self._counting:
            self.submitted += 1
        self._queue.put(job)

    def submit_line(self, job: Job) -> None:
        """Queue a log line's write; once MAX_QUEUED_LINES wait, wait for room first."""
        self._line_room.acquire()

        def write() -> None:
            try:
                job()
            finally:
                self._line_room.release()

        self.submit(write)

    def on_loop(self, callback: Callable[..., object], *args: Any) -> None:
        """Run `callback(*args)` on the loop's thread (from the writer's): the event log and
        the machines are not thread-safe."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: the process is exiting, and nobody is left to tell

    async def drain(self) -> None:
        """Wait until every job submitted so far has run, and the reports they sent back to the
        loop (which may write lines in turn) have run and been written too."""
        while self._thread is not None and self.done < self.submitted:
            reached: asyncio.Future[None] = self.loop.create_future()
            self._queue.put(reached)  # a marker, not a job: it is not counted
            await reached

    def stop(self, timeout: float) -> bool:
        """End the thread once what is queued is written; False if it is still stuck (a disk
        that never answers) after `timeout` seconds."""
        thread, self._thread = self._thread, None
        self._stopped = True
        if thread is None:
            return True
        self._queue.put(None)
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._queue.get()  # blocks in the kernel: no timeout, no polling
            if job is None:
                return
            if isinstance(job, asyncio.Future):
                self.on_loop(_resolve, job)  # every job before it has run
                continue
            try:
                job()
            except Exception as error:  # a bug in a job must not end the writer
                if self.on_error is not None:
                    self.on_loop(self.on_error, error)
            self.done += 1


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
