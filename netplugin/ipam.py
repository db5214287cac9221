"""Host-local IPAM: one IPv4 pod CIDR, one file per allocated address.

On-disk layout under ``state_dir`` (modelled on CNI's host-local plugin)::

    network            the pod CIDR this store belongs to ("10.244.0.0/24\\n")
    10.244.0.2         one file per allocated address, content: "<owner>\\n"
    last_reserved_ip   the allocation cursor, so freed addresses are not reused at once
    lock               flock(2) target serialising allocators across processes

Crash consistency (kill -9 at any instant leaves a valid store):

* An address file is written to a uniquely named temp file (``O_CREAT|O_EXCL``),
  fsync'd, then hard-linked to its final name. ``link(2)`` fails with EEXIST when the
  name exists, so it is exactly as exclusive as ``O_EXCL`` on the final name, but the
  name only ever appears with its full content. Two allocators therefore can never
  hand out the same address, and no reader ever sees a half-written owner.
* The network marker is replaced with write-temp + fsync + rename; the cursor (only a
  hint of where to search first) with write-temp + rename, without fsync.
* The directory is fsync'd after every allocation or release, once. Leftover temp
  files from a crash are removed when the store is opened.

Damage from outside (a disk error, a hand edit, a restore from an old backup) is healed,
never fatal, and never lets one address reach two pods:

* A missing, truncated or garbled network marker is rewritten for the configured CIDR,
  unless address files outside that CIDR prove the store belongs to another one (then
  the error names the fix). A marker naming another CIDR is re-claimed the same way:
  the address files, not the marker, say what is in use.
* An address file that is not exactly one owner line (empty, zero-filled, binary,
  truncated) keeps its address reserved under ``<unknown:ADDRESS>`` and marks the
  store ``damaged``; so does an owner named by two files.
* ``repair`` heals both with the runtime's view (which pod's ``eth0`` carries which
  address): an address in use is recorded for the pod using it, a damaged or
  duplicate file whose address no pod uses is removed. Only ``repair`` ever frees an
  ``<unknown:...>`` address, so without a view nothing is freed on a guess.

Every public method is thread-safe and process-safe (a threading lock plus an flock on
``lock``); all of them do blocking file I/O, so async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import ipaddress
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import structlog

from netplugin.types import NetworkError

log = structlog.get_logger(__name__)

NETWORK_FILE = "network"
CURSOR_FILE = "last_reserved_ip"
LOCK_FILE = "lock"
TEMP_PREFIX = ".tmp-"
_MAX_OWNER_FILE_BYTES = 4096
_MAX_MARKER_BYTES = 256
UNKNOWN_OWNER_PREFIX = "<unknown:"


def unknown_owner(ip: IPv4Address | str) -> str:
    """The placeholder owner of an address whose file is damaged."""
    return f"{UNKNOWN_OWNER_PREFIX}{ip}>"


def is_unknown_owner(owner: str) -> bool:
    return owner.startswith(UNKNOWN_OWNER_PREFIX)


class IPAMError(NetworkError):
    """An address could not be allocated or released."""


class IPAMExhaustedError(IPAMError):
    """Every allocatable address of the pod CIDR is in use."""


class IPAMConfigError(IPAMError):
    """The configuration does not match the store (e.g. the pod CIDR changed)."""


def parse_pod_cidr(pod_cidr: str) -> IPv4Network:
    """Validate ``pod_cidr``: an IPv4 network without host bits, room for >= 1 pod."""
    try:
        network = ipaddress.ip_network(pod_cidr, strict=True)
    except ValueError as exc:
        raise IPAMConfigError(f"pod_cidr {pod_cidr!r} is not a valid network: {exc}") from exc
    if not isinstance(network, IPv4Network):
        raise IPAMConfigError(f"pod_cidr {pod_cidr!r} must be an IPv4 network")
    if network.prefixlen > 30:
        raise IPAMConfigError(
            f"pod_cidr {pod_cidr!r} is too small: needs a prefix of /30 or shorter "
            "(network, gateway and broadcast addresses are never allocated)"
        )
    return network


def gateway_of(network: IPv4Network) -> IPv4Address:
    """The gateway is the first host address of the pod CIDR (it lives on the bridge)."""
    return network.network_address + 1


class HostLocalIPAM:
    """Allocates addresses of one pod CIDR to owners (pod uids), persisted on disk."""

    def __init__(self, state_dir: str | Path, pod_cidr: str) -> None:
        self.network: IPv4Network = parse_pod_cidr(pod_cidr)
        self.gateway: IPv4Address = gateway_of(self.network)
        self.state_dir = Path(state_dir)
        # Allocatable range: after the gateway, before the broadcast address.
        self._first = int(self.gateway) + 1
        self._last = int(self.network.broadcast_address) - 1
        self._thread_lock = threading.Lock()
        # Set when a read finds a damaged address file or an owner named twice;
        # cleared by repair(). The pod network repairs before its next setup.
        self.damaged = False
        self._open_store()

    # ------------------------------------------------------------------ public API

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen

    @property
    def capacity(self) -> int:
        """How many addresses can be allocated in total."""
        return self._last - self._first + 1

    def allocate(self, owner: str) -> IPv4Address:
        """Reserve an address for ``owner``; idempotent (an owner keeps its address)."""
        _validate_owner(owner)
        with self._locked():
            by_ip = self._read_allocations()
            for ip, holder in sorted(by_ip.items()):
                if holder == owner:
                    return ip
            for candidate in self._candidates(self._read_cursor()):
                if candidate in by_ip:
                    continue
                if self._reserve(candidate, owner):
                    self._write_cursor(candidate)
                    # One directory fsync makes both the new address name and the
                    # cursor's rename durable.
                    _fsync_dir(self.state_dir)
                    log.debug("ipam.allocated", owner=owner, ip=str(candidate))
                    return candidate
            raise IPAMExhaustedError(
                f"pod CIDR {self.network} is exhausted: all {self.capacity} allocatable "
                f"addresses are in use (state dir {self.state_dir}); cannot allocate for {owner!r}"
            )

    def release(self, owner: str) -> IPv4Address | None:
        """Free ``owner``'s address; returns it, or None when the owner had none."""
        _validate_owner(owner)
        with self._locked():
            released: IPv4Address | None = None
            for ip, holder in self._read_allocations().items():
                if holder == owner:
                    _unlink_missing_ok(self._path_of(ip))
                    released = ip
            if released is not None:
                _fsync_dir(self.state_dir)
                log.debug("ipam.released", owner=owner, ip=str(released))
            return released

    def address_of(self, owner: str) -> IPv4Address | None:
        """The address currently held by ``owner``, if any."""
        with self._locked():
            for ip, holder in sorted(self._read_allocations().items()):
                if holder == owner:
                    return ip
            return None

    def owner_of(self, ip: str | IPv4Address) -> str | None:
        """Who holds ``ip`` (None when free or outside the pod CIDR)."""
        try:
            address = IPv4Address(ip)
        except ValueError as exc:
            raise IPAMError(f"owner_of: {ip!r} is not an IPv4 address") from exc
        if not self._allocatable(address):
            return None
        with self._locked():
            return self._read_owner(self._path_of(address))

    def allocations(self) -> dict[str, IPv4Address]:
        """Every owner and its address."""
        with self._locked():
            # Reversed, so that an owner named by two files (damage) maps to its lowest
            # address, the one allocate() and address_of() return.
            return {owner: ip for ip, owner in sorted(self._read_allocations().items(), reverse=True)}

    def repair(self, in_use: dict[str, set[IPv4Address]], *, complete: bool = True) -> dict[str, list[str]]:
        """Make the store agree with what the runtime shows.

        ``in_use`` maps pod uid -> the addresses its running sandboxes' ``eth0``
        carry right now. The address a pod uses is recorded for it (a missing file is
        created, a damaged one or one naming another owner is rewritten); a damaged
        file, or a second file of an owner, whose address no pod uses is removed.
        Owners that use no address (pods still starting, gone pods) are left to
        allocation and garbage collection. With ``complete=False`` (some sandbox could
        not be read, so an address may be in use unseen) nothing is removed and the
        store stays ``damaged``. Returns what changed, by kind.
        """
        for owner in in_use:
            _validate_owner(owner)
        report: dict[str, list[str]] = {"recorded": [], "removed": [], "conflicts": []}
        with self._locked():
            by_ip = self._read_allocations()
            users: dict[IPv4Address, list[str]] = {}
            for owner, addresses in in_use.items():
                for ip in addresses:
                    if self._allocatable(IPv4Address(ip)):
                        users.setdefault(IPv4Address(ip), []).append(owner)
            for ip, owners in sorted(users.items()):
                recorded = by_ip.get(ip)
                if len(owners) > 1:
                    # Two live pods on one address (the harm this module exists to
                    # prevent, e.g. after a store was restored from a backup): keep
                    # the recorded one; the others get a new address at their next
                    # setup, which replaces the address on their eth0.
                    keep = recorded if recorded in owners else sorted(owners)[0]
                    report["conflicts"].append(f"{ip}: {', '.join(sorted(owners))} (kept {keep})")
                    owners = [keep]
                owner = owners[0]
                if recorded != owner:
                    _atomic_write(self._path_of(ip), f"{owner}\n")
                    by_ip[ip] = owner
                    report["recorded"].append(f"{ip}={owner} (was {recorded or 'free'})")
            using = {owner for ip, owners in users.items() for owner in owners if by_ip.get(ip) == owner}
            kept: set[str] = set()
            for ip, owner in sorted(by_ip.items()):
                if ip in users:
                    continue
                if not complete:
                    continue
                if is_unknown_owner(owner) or owner in using or owner in kept:
                    _unlink_missing_ok(self._path_of(ip))
                    report["removed"].append(f"{ip}={owner}")
                else:
                    kept.add(owner)
            if report["recorded"] or report["removed"]:
                _fsync_dir(self.state_dir)
            self.damaged = not complete
        return report

    # --------------------------------------------------------------- store set-up

    def _open_store(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IPAMConfigError(f"IPAM state_dir {self.state_dir}: cannot create: {exc}") from exc
        with self._locked():
            self._remove_stale_temp_files()
            self._check_or_claim_network()

    def _check_or_claim_network(self) -> None:
        marker = self.state_dir / NETWORK_FILE
        recorded = _read_marker(marker)
        if recorded == str(self.network):
            return
        # No marker (a fresh store), or one that is garbled or names another CIDR.
        # What is allocated decides: addresses outside our CIDR mean the store
        # belongs to another pod CIDR whose pods may still run; otherwise every file
        # is one of ours and the marker is simply (re)written.
        foreign = sorted(
            name
            for name in os.listdir(self.state_dir)
            if (ip := _parse_ip(name)) is not None and not self._allocatable(ip)
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise IPAMConfigError(
                f"IPAM state_dir {self.state_dir} belongs to pod CIDR "
                f"{recorded or '(marker unreadable)'} and holds addresses outside pod CIDR "
                f"{self.network} ({shown}); refusing to mix CIDRs. Fix: remove the pods of "
                f"the old CIDR, then delete those address files (or the whole directory) "
                f"before changing the CIDR"
            )
        if marker.exists():
            log.warning("ipam.network_marker_repaired", state_dir=str(self.state_dir),
                        found=recorded or "(unreadable)", pod_cidr=str(self.network))
        _atomic_write(marker, f"{self.network}\n")
        _fsync_dir(self.state_dir)

    def _remove_stale_temp_files(self) -> None:
        # Safe: temp files are only written while holding the flock we hold now.
        for name in os.listdir(self.state_dir):
            if name.startswith(TEMP_PREFIX):
                _unlink_missing_ok(self.state_dir / name)

    # ------------------------------------------------------------------- helpers

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing drops the flock

    def _allocatable(self, ip: IPv4Address) -> bool:
        return self._first <= int(ip) <= self._last

    def _path_of(self, ip: IPv4Address) -> Path:
        return self.state_dir / str(ip)

    def _read_allocations(self) -> dict[IPv4Address, str]:
        allocations: dict[IPv4Address, str] = {}
        dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in os.listdir(dir_fd):
                ip = _parse_ip(name)
                if ip is None or not self._allocatable(ip):
                    continue
                owner = self._read_owner(name, dir_fd=dir_fd)
                if owner is not None:
                    allocations[ip] = owner
        finally:
            os.close(dir_fd)
        if len(set(allocations.values())) != len(allocations):
            self.damaged = True  # an owner named by two files
        return allocations

    def _read_owner(self, path: Path | str, *, dir_fd: int | None = None) -> str | None:
        # Plain fd I/O relative to the directory: this runs for every address on every
        # allocation, and text file objects and path joins cost more than the read.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        try:
            data = os.read(fd, _MAX_OWNER_FILE_BYTES)
        finally:
            os.close(fd)
        owner = _parse_owner(data)
        if owner is None:
            # Not written by this module (names appear only with their full content):
            # keep the address reserved rather than guess, until repair() learns from
            # the runtime who, if anyone, uses it.
            name = os.path.basename(path)
            if not self.damaged:
                log.warning("ipam.damaged_allocation", address=name, content=data[:64].hex())
            self.damaged = True
            return unknown_owner(name)
        return owner

    def _read_cursor(self) -> IPv4Address | None:
        try:
            ip = _parse_ip((self.state_dir / CURSOR_FILE).read_text().strip())
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        if ip is None or not self._allocatable(ip):
            return None
        return ip

    def _write_cursor(self, ip: IPv4Address) -> None:
        # The cursor is only a hint (which address to try first), so its content is
        # not fsync'd: rename keeps it whole across kill -9, and if a power cut
        # garbles it, _read_cursor falls back to the start of the range.
        _atomic_write(self.state_dir / CURSOR_FILE, f"{ip}\n", durable=False)

    def _candidates(self, cursor: IPv4Address | None) -> Iterator[IPv4Address]:
        """All allocatable addresses, starting right after the cursor and wrapping."""
        start = self._first if cursor is None else int(cursor) + 1
        if start > self._last:
            start = self._first
        for value in range(start, self._last + 1):
            yield IPv4Address(value)
        for value in range(self._first, start):
            yield IPv4Address(value)

    def _reserve(self, ip: IPv4Address, owner: str) -> bool:
        """Create the address file exclusively; False if someone else holds it."""
        temp = self.state_dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        _write_new_file(temp, f"{owner}\n")
        try:
            os.link(temp, self._path_of(ip))
        except FileExistsError:
            return False
        finally:
            _unlink_missing_ok(temp)
        return True  # the caller fsyncs the directory


# ---------------------------------------------------------------------- file helpers


def _validate_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise IPAMError(f"IPAM owner must be a non-empty string, got {owner!r}")
    if "\n" in owner or "\0" in owner or len(owner) > 253:
        raise IPAMError(f"IPAM owner {owner!r} must be <= 253 chars without newlines or NULs")


def _parse_owner(data: bytes) -> str | None:
    """The owner in an address file's content, or None when the content is damaged.

    This module writes exactly ``<owner>\\n``; anything else (empty, zero-filled,
    truncated before the newline, binary) did not come from it.
    """
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        return None
    try:
        owner = data[:-1].decode()
    except UnicodeDecodeError:
        return None
    if not owner or len(owner) > 253 or not owner.isprintable():
        return None
    return owner


def _read_marker(path: Path) -> str | None:
    """The CIDR the network marker names, canonical; None if missing or garbled."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_MARKER_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("ipam.network_marker_unreadable", path=str(path), error=str(exc))
        return None
    try:
        return str(parse_pod_cidr(data.decode().strip()))
    except (UnicodeDecodeError, IPAMConfigError):
        return None


@functools.lru_cache(maxsize=8192)  # the same few hundred names, parsed on every scan
def _parse_ip(name: str) -> IPv4Address | None:
    if not name[:1].isdigit():
        return None
    try:
        return IPv4Address(name)
    except ValueError:
        return None


def _write_new_file(path: Path, content: str, *, durable: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        data = content.encode()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, content: str, *, durable: bool = True) -> None:
    temp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    try:
        _write_new_file(temp, content, durable=durable)
        os.replace(temp, path)
    finally:
        _unlink_missing_ok(temp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_missing_ok(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
