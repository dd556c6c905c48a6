"""Child processes for the crash and concurrency tests (test_checkpoint, test_store): fork a child that does
some work and wait until it says it is in the middle of it; then kill it (a crash) or let it go on."""

from __future__ import annotations

import multiprocessing


def fork_until_ready(work, *, timeout: float = 20.0):
    """Fork a child running `work(ready, done)` and return (process, done) once it has set `ready`.

    `done` is for the child to wait on until the test lets it finish. Fork (POSIX only), so the child
    shares the test's imports and monkeypatches and starts in milliseconds."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=work, args=(ready, done), daemon=True)
    p.start()
    if not ready.wait(timeout):
        kill(p)
        raise AssertionError("the child never reached the point it was meant to stop at")
    return p, done


def kill(p) -> None:
    """SIGKILL: no finally blocks, no atexit, exactly like kill -9."""
    p.kill()
    p.join(10)
