"""One lock per entry, so two processes never compute the same entry at once.

The lock only avoids duplicated work: every write is atomic and the manifest is written last,
so correctness never depends on it. Locking itself is filelock's (OS-level flock/msvcrt locks,
released by the OS if the holder dies).
"""

import errno
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import filelock

from cache.errors import CacheBusyError, ReadOnlyCacheError
from cache.layout import EntryPaths

# How often a waiting process wakes to call poll_callback (and check its timeout).
POLL_SECONDS = 1.0


def _busy(paths: EntryPaths, waited: float) -> CacheBusyError:
    return CacheBusyError(
        f"cache entry {paths.id} is busy: another process holds {paths.lock} (waited {waited:.1f}s) "
        "— wait for it to finish, or delete that lock file if no cogedit process is running"
    )


def _read_only(paths: EntryPaths, exc: OSError) -> ReadOnlyCacheError:
    return ReadOnlyCacheError(
        f"cannot create lock file {paths.lock}: {exc.strerror or exc} "
        "— pass --cache-dir to a writable folder or set COGEDIT_CACHE"
    )


@contextmanager
def entry_lock(
    paths: EntryPaths,
    timeout: float = -1,
    poll_callback: Callable[[float], None] | None = None,
) -> Iterator[filelock.BaseFileLock]:
    """Hold the entry's lock for the `with` block.

    timeout: seconds to wait; < 0 waits forever, 0 tries once. CacheBusyError when it runs out.
    poll_callback(seconds_waited): called once when the lock is found busy, then every
    POLL_SECONDS while waiting (e.g. to print "waiting for another cogedit...").
    """
    try:
        paths.lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _read_only(paths, exc) from exc
    lock = filelock.FileLock(str(paths.lock))
    start = time.monotonic()
    attempt = 0.0  # first a single try, then waits of POLL_SECONDS cut short by the timeout
    while True:
        if timeout >= 0:
            attempt = max(0.0, min(attempt, timeout - (time.monotonic() - start)))
        try:
            lock.acquire(timeout=attempt, poll_interval=0.05)
            break
        except filelock.Timeout:
            waited = time.monotonic() - start
            if timeout >= 0 and waited >= timeout:
                raise _busy(paths, waited) from None
            if poll_callback is not None:
                poll_callback(waited)
            attempt = POLL_SECONDS
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _read_only(paths, exc) from exc
            raise
    try:
        yield lock
    finally:
        lock.release()
