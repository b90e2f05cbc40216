"""One run per output folder: an exclusive lock on ``<output_dir>/.lock`` held for the run's lifetime.

The kernel drops the lock when the holder's process ends, however it ends (SIGKILL included), so a
stale lock never blocks a resume. It is a POSIX record lock (``lockf``), not ``flock``: DataLoader
workers are forked with the lock file open, and an ``flock`` would live on in them for the seconds
they take to notice a SIGKILLed parent, refusing the immediate resume; record locks are not inherited.
The holder writes its host and pid into the file for the message a second run gets. Only rank 0
takes it (the other ranks of a torchrun job are the same run).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path


class RunFolderBusy(ValueError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, name: str = ".lock"):
        self.path = Path(run_dir) / name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to end or use another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Truncate before unlocking so a later reader never sees a dead holder's name as current.
        os.ftruncate(self._fd, 0)
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
