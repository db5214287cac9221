"""Blocking nf_tables socket: send one batch, read table contents.

All calls block; ServiceProxy runs them on its own single worker thread so that the
event loop never waits on netlink and transactions never interleave.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import time

from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_DUMP_INTR, NLMSG_DONE, NLMSG_ERROR

from . import nfnl

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
NLMSGERR_ATTR_MSG = 1
NLM_F_ACK_TLVS = 0x200
_HDR = struct.Struct("=IHHII")
RECV_SIZE = 1 << 20
# Time to wait for the END ack after the last operation was acknowledged; kernels
# older than 6.10 do not send one, so its absence is not an error.
END_ACK_GRACE = 2.0


class NftError(Exception):
    """The kernel rejected a batch; nothing of it was applied."""

    def __init__(self, message: str, errors: list[tuple[int, int, str, str | None]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []  # (seq, errno, what, kernel message)


class NftUnknownOutcome(NftError):
    """Replies were lost (receive buffer overflow): the batch may or may not be in."""


def open_netlink(protocol: int, netns: str | None) -> socket.socket:
    """A netlink socket in ``netns`` (a name under /var/run/netns or a path).

    pyroute2 creates it in a short-lived child that enters the namespace, so this
    thread's own namespace never changes.
    """
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    if not os.path.exists(netns if netns.startswith("/") else f"/var/run/netns/{netns}"):
        raise FileNotFoundError(f"network namespace {netns} does not exist")
    return pyroute2_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, protocol, flags=0)


class NftSocket:
    def __init__(self, netns: str | None = None, rcvbuf: int = 32 << 20) -> None:
        self.sock = open_netlink(NETLINK_NETFILTER, netns)
        self.sock.bind((0, 0))
        for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            try:
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:
                pass
        self._force_buffer(SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        self._sndbuf = 0
        self._seq = random.randrange(1 << 20, 1 << 30)

    def close(self) -> None:
        self.sock.close()

    def _force_buffer(self, force_opt: int, opt: int, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, opt, size)

    def next_seq(self, reserve: int = 0) -> int:
        """The first sequence number for a new request or batch. ``send_batch`` moves
        past the numbers a batch used, so replies can always be told apart."""
        if self._seq + reserve > 0x7FFFFFFF - (1 << 24):
            self._seq = 1 << 20
        seq = self._seq
        self._seq += reserve + 1
        return seq

    # ------------------------------------------------------------------ batches

    def send_batch(self, batch: nfnl.Batch, timeout: float = 120.0) -> None:
        """Send the batch and wait for the verdict. Raises NftError on rejection."""
        data, last_seq, end_seq = batch.finish()
        self._seq = max(self._seq, end_seq + 1)
        if len(data) + 4096 > self._sndbuf:
            self._sndbuf = max(len(data) + 4096, 1 << 20)
            self._force_buffer(SO_SNDBUFFORCE, socket.SO_SNDBUF, self._sndbuf)
        self.sock.sendto(data, (0, 0))
        errors: list[tuple[int, int, str, str | None]] = []
        deadline = time.monotonic() + timeout
        last_acked = False
        while True:
            remaining = deadline - time.monotonic()
            if last_acked:
                remaining = min(remaining, END_ACK_GRACE)
            if remaining <= 0:
                if last_acked and not errors:
                    return
                raise NftUnknownOutcome(f"no reply from the kernel within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                buf = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                if last_acked and not errors:
                    return
                raise NftUnknownOutcome("timed out waiting for the kernel's reply", errors)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._drain()
                    raise NftUnknownOutcome("netlink replies overflowed the receive buffer", errors)
                raise
            for seq, err, message in _acks(buf):
                if not batch.first_seq <= seq <= end_seq:
                    continue  # a late reply to an earlier batch
                if err:
                    errors.append((seq, err, batch.describe(seq), message))
                if seq == end_seq:
                    if errors:
                        raise _batch_error(errors)
                    return
                if seq == last_seq:
                    if errors:
                        raise _batch_error(errors)
                    last_acked = True

    def _drain(self) -> None:
        self.sock.settimeout(0.2)
        try:
            while self.sock.recv(RECV_SIZE):
                pass
        except (socket.timeout, OSError):
            pass

    # ------------------------------------------------------------------ reads

    def table_exists(self, table: str) -> bool:
        seq = self.next_seq(1)
        self.sock.sendto(nfnl.get_table_request(table, seq), (0, 0))
        self.sock.settimeout(10.0)
        while True:
            buf = self.sock.recv(RECV_SIZE)
            for msg_seq, msg_type, _payload in _messages(buf):
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", _payload, 0)[0]
                    if err == 0:
                        return True
                    if err == errno.ENOENT:
                        return False
                    raise OSError(err, f"reading table {table}: {os.strerror(err)}")
                # the table itself; the ack follows

    def list_names(self, table: str) -> tuple[set[str], set[str]] | None:
        """Names of the chains and sets in ``table``, or None when it does not exist."""
        if not self.table_exists(table):
            return None
        # the kernel does not filter chain dumps by table: check NFTA_*_TABLE (attr 1)
        wanted = table.encode() + b"\0"
        chains = {attrs[3].rstrip(b"\0").decode() for attrs in self._dump(nfnl.GETCHAIN, table)
                  if 3 in attrs and attrs.get(1) == wanted}
        sets = {attrs[2].rstrip(b"\0").decode() for attrs in self._dump(nfnl.GETSET, table)
                if 2 in attrs and attrs.get(1) == wanted}
        return chains, sets

    def _dump(self, msg_type: int, table: str) -> list[dict[int, bytes]]:
        for _attempt in range(5):
            seq = self.next_seq(1)
            self.sock.sendto(nfnl.dump_request(msg_type, seq, table), (0, 0))
            self.sock.settimeout(30.0)
            out: list[dict[int, bytes]] = []
            interrupted = False
            done = False
            while not done:
                buf = self.sock.recv(RECV_SIZE)
                offset = 0
                while offset + 16 <= len(buf):
                    length, kind, flags, msg_seq, _pid = _HDR.unpack_from(buf, offset)
                    if length < 16:
                        break
                    if msg_seq == seq:
                        if flags & NLM_F_DUMP_INTR:
                            interrupted = True
                        if kind == NLMSG_DONE:
                            done = True
                        elif kind == NLMSG_ERROR:
                            err = -struct.unpack_from("=i", buf, offset + 16)[0]
                            if err:
                                raise OSError(err, f"dumping {table}: {os.strerror(err)}")
                            done = True
                        else:
                            out.append(nfnl.parse_attrs(buf, offset + 20, offset + length))
                    offset += (length + 3) & ~3
            if not interrupted:
                return out
        raise OSError(errno.EINTR, f"dump of {table} kept being interrupted by concurrent changes")


def _messages(buf: bytes):
    offset = 0
    while offset + 16 <= len(buf):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(buf, offset)
        if length < 16:
            return
        yield seq, kind, buf[offset + 16:offset + length]
        offset += (length + 3) & ~3


def _acks(buf: bytes):
    """(seq, errno, kernel message) for every NLMSG_ERROR in ``buf``."""
    offset = 0
    while offset + 16 <= len(buf):
        length, kind, flags, seq, _pid = _HDR.unpack_from(buf, offset)
        if length < 16:
            return
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", buf, offset + 16)[0]
            message = None
            if err and flags & NLM_F_ACK_TLVS:
                # with NETLINK_CAP_ACK the echoed request is only its 16-byte header
                attrs = nfnl.parse_attrs(buf, offset + 16 + 4 + 16, offset + length)
                if NLMSGERR_ATTR_MSG in attrs:
                    message = attrs[NLMSGERR_ATTR_MSG].rstrip(b"\0").decode(errors="replace")
            yield seq, err, message
        offset += (length + 3) & ~3


def _batch_error(errors: list[tuple[int, int, str, str | None]]) -> NftError:
    first = errors[0]
    detail = f"{first[2]}: {os.strerror(first[1])}" + (f" ({first[3]})" if first[3] else "")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return NftError(f"nftables transaction rejected: {detail}{more}", errors)
