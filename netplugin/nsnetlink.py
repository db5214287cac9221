"""Netlink (RTNL) sockets inside another network namespace, given its path.

pyroute2 0.9.7 can open an ``AsyncIPRoute(netns=...)`` itself, but it does so by
forking a child process per socket (synchronously, on the calling thread) and it
*creates* the namespace when the path does not exist (``flags=O_CREAT``). Neither fits
a node agent setting up a hundred pods at once. A netlink socket stays bound to the
namespace it was created in, so instead a short-lived thread ``setns(2)``-s into the
target namespace, creates the socket and exits; the socket is then driven by an
``AsyncIPRoute(use_socket=...)`` on the event loop. ``setns(CLONE_NEWNET)`` only
affects the calling thread, and that thread is never reused, so no other code ever
runs in the pod's namespace by accident. Measured cost: ~1-2 ms per socket, versus
~10 ms for pyroute2's fork.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from dataclasses import dataclass
from types import TracebackType

from pyroute2 import AsyncIPRoute

from netplugin.types import NetworkError

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
_SOCKET_BUFFER_BYTES = 1 << 20  # what pyroute2 uses for its own sockets

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class NetnsId:
    """Identity of a network namespace (same namespace <=> same device and inode)."""

    dev: int
    ino: int


def netns_id_of_fd(fd: int) -> NetnsId:
    st = os.fstat(fd)
    return NetnsId(st.st_dev, st.st_ino)


def process_netns_id() -> NetnsId:
    """The namespace of this process (its main thread), where the host sockets live."""
    st = os.stat("/proc/self/ns/net")
    return NetnsId(st.st_dev, st.st_ino)


def current_thread_netns_id() -> NetnsId:
    """The namespace of the calling thread (threads may differ from the process)."""
    st = os.stat("/proc/thread-self/ns/net")
    return NetnsId(st.st_dev, st.st_ino)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _new_rtnl_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
    return sock


def rtnl_socket_in_netns(netns_fd: int) -> socket.socket:
    """Blocking: an RTNL socket bound to the namespace behind ``netns_fd``."""
    outcome: dict[str, object] = {}

    def in_namespace() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(netns_fd)
                try:
                    outcome["socket"] = _new_rtnl_socket()
                finally:
                    # The thread ends right after; going home is only hygiene.
                    _setns(home)
            finally:
                os.close(home)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=in_namespace, name="netns-socket", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        sock = outcome.get("socket")
        if isinstance(sock, socket.socket):
            sock.close()
        raise outcome["error"]  # type: ignore[misc]
    sock = outcome["socket"]
    assert isinstance(sock, socket.socket)
    return sock


class NetnsRoute:
    """An open network namespace: its fd plus an ``AsyncIPRoute`` working inside it.

    ``async with NetnsRoute(path) as ns: await ns.ipr.link(...)``. Raises
    ``FileNotFoundError`` when the path does not exist and ``NetworkError`` when it is
    not a network namespace.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int = -1
        self.id: NetnsId | None = None
        self.ipr: AsyncIPRoute | None = None
        self._socket: socket.socket | None = None

    async def open(self) -> NetnsRoute:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.id = netns_id_of_fd(self.fd)
            if self.id == process_netns_id():
                # Whatever the caller meant to do to "the pod's" links would hit the
                # host's own (its eth0, say): refuse outright.
                raise NetworkError(
                    f"netns_path {self.path!r} is the host's own network namespace, not a pod's"
                )
            opening = asyncio.ensure_future(asyncio.to_thread(rtnl_socket_in_netns, self.fd))
            try:
                # Shielded: the thread cannot be stopped, so on cancellation the socket
                # it still makes is closed when it arrives instead of leaking.
                self._socket = await asyncio.shield(opening)
            except asyncio.CancelledError:
                # The thread still needs the fd: hand both over to the callback.
                fd, self.fd = self.fd, -1
                opening.add_done_callback(lambda done: _close_unclaimed(done, fd))
                raise
            except OSError as exc:
                raise NetworkError(
                    f"netns_path {self.path!r} is not a usable network namespace: {exc}"
                ) from exc
            self.ipr = AsyncIPRoute(use_socket=self._socket)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self._socket is not None:
            # pyroute2 does not close a socket it was handed.
            self._socket.close()
            self._socket = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def __aenter__(self) -> NetnsRoute:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _close_unclaimed(opening: asyncio.Future[socket.socket], netns_fd: int) -> None:
    os.close(netns_fd)
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
