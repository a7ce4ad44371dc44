"""One cycle per project at a time: the project lock, one interface, two implementations.

`ProjectLock.acquire()` takes the lock when it is free and never waits: the caller decides
what waiting means (the in-process queue polls; an RQ job puts itself back in the queue,
so its worker serves other projects meanwhile). `release()` gives it back and is safe to
call when the lock is not held.

- `RedisLock`: `key` = `token` in Redis with a TTL, renewed by a heartbeat thread while
  held; it spans every worker on every machine sharing the Redis. A SIGKILLed holder
  stops renewing, and the lock expires after its TTL.
- `FileLock`: an exclusive flock on a file; it spans the processes of one machine
  (gunicorn workers sharing MODEL_DIR). The OS releases it when the process dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# renew KEYS[1]'s TTL (ms) if it still holds the token ARGV[1]
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class ProjectLock(Protocol):
    def acquire(self) -> bool:
        """Take the lock if it is free; False at once if someone holds it."""

    def release(self) -> None:
        """Give the lock back (nothing happens when it is not held)."""


class RedisLock:
    """Holds `key` = `token` with a TTL, renewed from a daemon thread until `release()`."""

    def __init__(self, connection, key: str, token: str, ttl: float):
        self.connection, self.key, self.token, self.ttl = connection, key, token, ttl
        self._held = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lock {key}", daemon=True)

    def acquire(self) -> bool:
        if not self.connection.set(self.key, self.token, nx=True, px=int(self.ttl * 1000)):
            return False
        self.hold()
        return True

    def hold(self) -> None:
        """Keep renewing a key this token already holds (set by a script that took it
        together with other work, e.g. chunk_jobs' claim of a chunk)."""
        self._held = True
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.connection.eval(_RENEW, 1, self.key, self.token,
                                            int(self.ttl * 1000)):
                    log.error("lost the training lock %s (expired?)", self.key)
                    return
            except Exception as exc:  # Redis blips: try again at the next beat
                log.warning("could not renew lock %s: %s", self.key, exc)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        try:
            self.connection.eval(_RELEASE, 1, self.key, self.token)
        except Exception as exc:
            log.warning("could not release lock %s (it expires by itself): %s", self.key, exc)


class FileLock:
    """An exclusive flock on `path` (its folder is created); released by the OS if the
    process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
