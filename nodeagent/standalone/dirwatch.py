"""Wake up when a directory changes (Linux inotify through ctypes).

Only a wake-up signal: the manifest source re-scans the directory itself, so a
missed or coalesced notification costs at most one poll period, never correctness.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os

import structlog

log = structlog.get_logger(__name__)

IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
         | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)


class DirectoryWatch:
    """``changed`` is set whenever the directory's entries change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.changed = asyncio.Event()
        self._fd: int | None = None

    def start(self) -> bool:
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            if libc.inotify_add_watch(fd, os.fsencode(self.path), _MASK) < 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, os.strerror(err))
        except (OSError, AttributeError) as exc:
            log.info("inotify unavailable; polling the manifest directory only",
                     directory=self.path, error=str(exc))
            return False
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._drain)
        return True

    def _drain(self) -> None:
        assert self._fd is not None
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        self.changed.set()

    def close(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
