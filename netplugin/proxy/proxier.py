"""ServiceProxy: Services + EndpointSlices in, one nftables table out.

Event handlers are the change trackers: they parse and validate the object (a bad
Service is logged and remembered in ``errors`` right away) and mark its service dirty.
The sync turns dirty services into fragments (pure), diffs them against what the kernel
was last given, and applies the difference as one atomic nfnetlink batch on a
dedicated worker thread. A failed batch changes nothing in the kernel; the services
stay dirty and the next attempt is a full resync (and if that fails too, a rebuild of
the whole table in one transaction). Full resyncs also run at start, every
``full_sync_period`` and when the table disappeared; ``run`` syncs at most once per
``min_sync_period``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import structlog

from . import conntrack
from .diff import AppliedState, NeedsRecreate, Plan, Transition, full_plan, preview, transition
from .encode import encode_plan
from .kernel import NftError, NftSocket
from .model import (
    Endpoint,
    HostPortMapping,
    InvalidService,
    ServiceError,
    ServicePort,
    canonical_ipv4,
    merge_endpoints,
    parse_service,
    service_key,
    slice_endpoints,
    slice_service,
)
from .routes import RTPROT_NODEAGENT, PodRoutes
from .ruleset import Fragment, ProxyConfig, global_fragment, normalize_host_port, service_fragment
from .show import describe_state

log = structlog.get_logger(__name__)

GLOBAL = ("", "")  # owner key of the global fragment (no service has an empty name)
TABLE_CHECK_PERIOD = 1.0
MAX_BACKOFF = 30.0

T = TypeVar("T")


class ProxySyncError(Exception):
    """A sync did not reach the kernel; it will be retried as a full resync."""


@dataclass
class _Outcome:
    transition: Transition
    target: AppliedState | None  # the whole new state after a full sync
    full: bool
    summary: dict[str, int]
    phases: dict[str, float]
    old_views: dict[Any, list]


_gc_pauses = 0
_gc_was_enabled = True
_gc_lock = threading.Lock()


@contextlib.contextmanager
def _gc_paused(pause: bool):
    """Pause the cyclic GC during big syncs: they allocate millions of short-lived
    objects, and every collection would rescan all live fragments. Counted, so that
    concurrent pauses (several proxies) end only with the last one."""
    global _gc_pauses, _gc_was_enabled
    if not pause:
        yield
        return
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _check_cidr(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Network(value, strict=False))
    except ValueError as exc:
        raise ValueError(f"{what}: {value!r} is not an IPv4 CIDR ({exc})") from None


class ServiceProxy:
    def __init__(
        self,
        *,
        table: str = "nodeagent",
        node_name: str,
        node_ips: list[str],
        cluster_cidr: str,
        service_cidr: str = "10.96.0.0/12",
        nodeport_range: tuple[int, int] = (30000, 32767),
        min_sync_period: float = 1.0,
        full_sync_period: float = 30.0,
        netns: str | None = None,
        pod_cidr: str | None = None,
        cascade_limit: int = 32,
    ) -> None:
        if not table or len(table) > 255 or "\0" in table:
            raise ValueError(f"table: {table!r} is not a valid nftables table name")
        for ip in node_ips:
            if canonical_ipv4(ip) is None:
                raise ValueError(f"node_ips: {ip!r} is not an IPv4 address")
        low, high = nodeport_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"nodeport_range: {nodeport_range!r} is not a port range")
        self._config = ProxyConfig(
            table=table,
            node_name=node_name,
            cluster_cidr=_check_cidr(cluster_cidr, "cluster_cidr"),
            service_cidr=_check_cidr(service_cidr, "service_cidr"),
            node_ips=tuple(node_ips),
            pod_cidr=_check_cidr(pod_cidr, "pod_cidr") if pod_cidr else None,
            cascade_limit=cascade_limit,
        )
        self._nodeport_range = tuple(nodeport_range)
        self._min_sync_period = min_sync_period
        self._full_sync_period = full_sync_period
        self._netns = netns

        # change trackers: objects are parsed and validated when they arrive (as
        # kube-proxy's trackers do), the sync only turns them into rules
        self._services: dict[tuple[str, str], list[ServicePort]] = {}
        self._slices: dict[tuple[str, str], dict[str, dict[tuple[str, str], list[Endpoint]]]] = {}
        self._slice_owner: dict[tuple[str, str], tuple[str, str]] = {}
        self._host_ports: list[HostPortMapping] = []
        self._host_port_errors: list[str] = []
        self._errors: dict[tuple[str, str], ServiceError] = {}

        self._dirty: set[tuple[str, str]] = set()
        self._global_dirty = True
        self._needs_full = True
        self._recreate = False
        self._last_full = float("-inf")
        self._state = AppliedState()

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nft-{table}")
        self._sock: NftSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._event_lock = threading.Lock()
        self.syncs = 0
        self.full_syncs = 0
        self.failures = 0
        self.last_sync_seconds = 0.0
        self.last_sync_phases: dict[str, float] = {}
        # Optional: called with (seconds, full, error) after each sync (metrics).
        self.observer: Callable[[float, bool, BaseException | None], None] | None = None

    # ------------------------------------------------------------------ inputs

    @property
    def table(self) -> str:
        return self._config.table

    @property
    def errors(self) -> list[ServiceError]:
        """Services that are currently not programmed, and why."""
        return sorted(self._errors.values(), key=lambda e: e.service)

    def on_service(self, event: str, svc: dict) -> None:
        key = service_key(svc)
        ports: list[ServicePort] | None = None
        error: ServiceError | None = None
        if event != "DELETED":
            try:
                ports = parse_service(svc, self._nodeport_range).ports  # type: ignore[arg-type]
            except InvalidService as exc:
                error = exc.error
        with self._event_lock:
            if ports is None:
                self._services.pop(key, None)
            else:
                self._services[key] = ports
            previous = self._errors.pop(key, None)
            if error is not None:
                self._errors[key] = error
            self._dirty.add(key)
        if error is not None and error != previous:
            log.error("service skipped", service=error.service, field=error.field, reason=error.message)
        self._wake()

    def on_endpoint_slice(self, event: str, slice_: dict) -> None:
        meta = slice_.get("metadata") or {}
        slice_id = (meta.get("namespace") or "default", meta.get("name") or "")
        owner = slice_service(slice_)
        with self._event_lock:
            previous = self._slice_owner.pop(slice_id, None)
            if previous is not None:
                self._slices.get(previous, {}).pop(slice_id[1], None)
                self._dirty.add(previous)
            if event != "DELETED" and owner is not None:
                self._slices.setdefault(owner, {})[slice_id[1]] = slice_endpoints(slice_)
                self._slice_owner[slice_id] = owner
                self._dirty.add(owner)
        if owner is None and event != "DELETED":
            log.warning("endpoint slice without service label ignored", slice=f"{slice_id[0]}/{slice_id[1]}")
        self._wake()

    def set_host_ports(self, mappings: list[HostPortMapping]) -> None:
        valid: list[HostPortMapping] = []
        errors: list[str] = []
        claimed: dict[tuple[str, str | None, int], HostPortMapping] = {}
        for mapping in mappings:
            try:
                norm = normalize_host_port(mapping)
            except ValueError as exc:
                errors.append(f"hostPort {mapping}: {exc}")
                continue
            key = (norm.protocol, norm.host_ip, norm.host_port)
            if key in claimed and claimed[key] != norm:
                errors.append(f"hostPort {norm.protocol}/{norm.host_port} for {norm.pod_ip} "
                              f"conflicts with {claimed[key].pod_ip}")
                continue
            if key not in claimed:
                claimed[key] = norm
                valid.append(norm)
        for error in errors:
            log.error("hostPort skipped", error=error)
        with self._event_lock:
            self._host_ports = valid
            self._host_port_errors = errors
            self._global_dirty = True
        self._wake()

    def _wake(self) -> None:
        loop, event = self._loop, self._wakeup
        if loop is None or event is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    # ------------------------------------------------------------------ loop

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._lock = asyncio.Lock()

    async def run(self) -> None:
        """Sync until cancelled. Cancellation leaves the installed rules in place."""
        self._bind_loop()
        assert self._wakeup is not None
        failures = 0
        last_attempt = float("-inf")
        while True:
            now = time.monotonic()
            due_full = self._needs_full or now - self._last_full >= self._full_sync_period
            if self._dirty or self._global_dirty or due_full:
                delay = self._min_sync_period if failures == 0 else min(
                    MAX_BACKOFF, self._min_sync_period * (2 ** failures))
                wait = last_attempt + delay - now
                if wait > 0:
                    await asyncio.sleep(wait)
                last_attempt = time.monotonic()
                try:
                    await self._sync(full=due_full)
                    failures = 0
                except ProxySyncError:
                    failures += 1
                except Exception:
                    failures += 1
                    log.exception("proxy sync crashed; retrying", table=self.table)
                continue
            timeout = min(TABLE_CHECK_PERIOD, max(0.0, self._last_full + self._full_sync_period - now))
            self._wakeup.clear()
            if self._dirty or self._global_dirty:
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                if not await self._table_present():
                    log.warning("proxy table vanished; resyncing", table=self.table)
                    self._needs_full = True

    async def sync_now(self) -> None:
        """Apply pending changes now (a full sync if one is due). Raises ProxySyncError."""
        self._bind_loop()
        full = self._needs_full or time.monotonic() - self._last_full >= self._full_sync_period
        if not full and not await self._table_present():
            full = self._needs_full = True  # the table vanished: a repair, not routine
        await self._sync(full=full)

    async def full_resync(self) -> None:
        self._bind_loop()
        await self._sync(full=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _socket(self) -> NftSocket:
        if self._sock is None:
            self._sock = NftSocket(self._netns)
        return self._sock

    async def _table_present(self) -> bool:
        try:
            return await self._call(lambda: self._socket().table_exists(self.table))
        except OSError as exc:
            log.warning("cannot check the proxy table", error=str(exc))
            return False

    # ------------------------------------------------------------------ sync

    async def _sync(self, full: bool) -> None:
        assert self._lock is not None
        async with self._lock:
            with self._event_lock:
                dirty, self._dirty = self._dirty, set()
                global_dirty, self._global_dirty = self._global_dirty, False
                services = {key: self._services.get(key) for key in dirty}
                slices = {key: list(self._slices.get(key, {}).values()) for key in dirty}
                for key in dirty:  # forget services and slices that are gone for good
                    if key not in self._services and not self._slices.get(key):
                        self._slices.pop(key, None)
                host_ports = list(self._host_ports)
            started = time.monotonic()
            try:
                await self._apply(dirty, services, slices, global_dirty, host_ports, full)
            except BaseException as exc:
                self._observe(time.monotonic() - started, full, exc)
                with self._event_lock:
                    self._dirty |= dirty
                    self._global_dirty |= global_dirty
                self._needs_full = True
                if isinstance(exc, (NftError, OSError, NeedsRecreate)):
                    self.failures += 1
                    if full:
                        # a full sync that failed may have hit a table whose objects
                        # cannot be updated in place: rebuild it from scratch next time
                        self._recreate = True
                    log.error("proxy sync failed; will retry with a full resync",
                              table=self.table, full=full, error=str(exc))
                    raise ProxySyncError(str(exc)) from exc
                raise
            self.last_sync_seconds = time.monotonic() - started
            self._observe(self.last_sync_seconds, full, None)

    def _observe(self, seconds: float, full: bool, error: BaseException | None) -> None:
        if self.observer is not None and not isinstance(error, asyncio.CancelledError):
            try:
                self.observer(seconds, full, error)
            except Exception:
                pass  # metrics never break a sync

    async def _apply(self, dirty: set[tuple[str, str]], services: dict, slices: dict,
                     global_dirty: bool, host_ports: list[HostPortMapping], full: bool) -> None:
        # All the work (ruleset, diff, encoding, netlink) runs on the worker thread so
        # that a large sync never stalls the event loop; the applied state is swapped
        # here, on the loop, so readers such as describe() never see it half-updated.
        routine_full = full and not (self._needs_full or self._recreate or dirty or global_dirty)
        outcome = await self._call(self._compute_and_write, dirty, services, slices,
                                   global_dirty, host_ports, full)
        if outcome.target is not None:
            self._state = outcome.target
        else:
            self._state.adopt(outcome.transition)
        if outcome.full:
            self._needs_full = False
            self._recreate = False
            self._last_full = time.monotonic()
            self.full_syncs += 1
        self.syncs += 1
        self.last_sync_phases = outcome.phases
        self._report_conflicts(outcome.transition)
        # Info only when something changed: the periodic full resync rewrites the
        # table (like kube-proxy's) with nothing new in it, and would otherwise log a
        # line every 30 s forever.
        changed = any(outcome.summary.values()) and not (routine_full and outcome.full)
        (log.info if changed else log.debug)(
            "proxy synced", table=self.table, full=outcome.full, services=len(dirty), **outcome.summary)
        await self._flush_conntrack(outcome.old_views, outcome.transition.fragments)

    def _compute_and_write(self, dirty: set[tuple[str, str]], services: dict, slices: dict,
                           global_dirty: bool, host_ports: list[HostPortMapping], full: bool) -> "_Outcome":
        started = time.perf_counter()
        cpu_started = time.thread_time()
        phases: dict[str, float] = {}
        with _gc_paused(full or len(dirty) > 1000):
            updates: dict[Any, Fragment | None] = {}
            if global_dirty or GLOBAL not in self._state.fragments:
                updates[GLOBAL] = global_fragment(self._config, host_ports)
            for key in dirty:
                updates[key] = self._build_service(key, services[key], slices[key])
            recreate = self._recreate
            base = self._state
            try:
                trans = transition(base, updates, with_plan=not full)
            except NeedsRecreate as exc:
                log.warning("proxy table needs to be rebuilt", table=self.table, reason=str(exc))
                full = recreate = True
                base = AppliedState()
                trans = transition(base, {**self._state.fragments, **updates}, with_plan=False)
            old_views = {key: self._old_views(key) for key in updates if key != GLOBAL}
            phases["build"] = time.perf_counter() - started
            target = None
            if full:
                mark = time.perf_counter()
                target = preview(base, trans)
                phases["preview"] = time.perf_counter() - mark
                summary = self._write_full(target, recreate, phases)
            else:
                summary = self._write(trans.plan, phases)
        phases["total"] = time.perf_counter() - started
        phases["cpu"] = time.thread_time() - cpu_started  # this thread, user + system (incl. netlink)
        return _Outcome(trans, target, full, summary, phases, old_views)

    def _old_views(self, key: Any) -> list:
        frag = self._state.fragments.get(key)
        return frag.services if frag else []

    def _build_service(self, key: tuple[str, str], ports: list[ServicePort] | None,
                       slices: list[dict[tuple[str, str], list[Endpoint]]]) -> Fragment | None:
        if not ports:  # deleted, invalid, headless or ExternalName
            return None
        groups: dict[tuple[str, str], list[list[Endpoint]]] = {}
        for parsed in slices:
            for port_key, eps in parsed.items():
                groups.setdefault(port_key, []).append(eps)
        endpoints = {port_key: merge_endpoints(lists) for port_key, lists in groups.items()}
        return service_fragment(self._config, ports, endpoints)

    def _write(self, plan: Plan, phases: dict[str, float]) -> dict[str, int]:
        if plan.is_empty():
            return plan.summary()
        sock = self._socket()
        mark = time.perf_counter()
        batch = encode_plan(self.table, plan, sock.next_seq())
        now = time.perf_counter()
        phases["encode"], mark = now - mark, now
        sock.send_batch(batch)
        phases["kernel"] = time.perf_counter() - mark
        summary = plan.summary()
        summary["messages"] = len(batch)
        return summary

    def _write_full(self, target: AppliedState, recreate: bool, phases: dict[str, float]) -> dict[str, int]:
        sock = self._socket()
        mark = time.perf_counter()
        if recreate:
            names = None
            recreate = sock.table_exists(self.table)  # nothing to delete otherwise
        else:
            names = sock.list_names(self.table)
        phases["list"] = time.perf_counter() - mark
        chains, sets = names if names is not None else (None, None)
        plan = full_plan(target, chains, sets, recreate=recreate)
        phases["plan"] = time.perf_counter() - mark
        return self._write(plan, phases)

    def _report_conflicts(self, trans: Transition) -> None:
        for conflict in trans.conflicts:
            log.error("service address already in use by another service; not programmed",
                      service=_owner_name(conflict.owner), map=conflict.set_name,
                      key=" . ".join(str(k) for k in conflict.key), held_by=_owner_name(conflict.holder))

    async def _flush_conntrack(self, old_views: dict, updates: dict) -> None:
        targets: list[conntrack.FlushTarget] = []
        for key, old in old_views.items():
            frag = updates.get(key)
            targets += conntrack.stale_udp_targets(old, frag.services if frag else [])
        if not targets:
            return
        try:
            deleted = await self._call(conntrack.flush, targets, self._netns)
            log.info("flushed stale UDP conntrack entries", table=self.table, count=deleted)
        except Exception as exc:  # best effort: stale entries also time out by themselves
            log.warning("conntrack cleanup failed", table=self.table, error=str(exc))

    # ------------------------------------------------------------------ output

    def counts(self) -> dict[str, int]:
        """Sizes of what is programmed: services, endpoint slices, map/set elements and
        chains (served as metrics)."""
        state = self._state
        return {
            "services": len(self._services),
            "endpointslices": sum(len(v) for v in self._slices.values()),
            "elements": len(state.claims),
            "chains": sum(len(f.chains) for f in state.fragments.values()) + len(state.shared),
            "rules": sum(len(c.rules) for f in state.fragments.values() for c in f.chains.values())
            + sum(len(chain.rules) for chain, _n in state.shared.values()),
        }

    def describe(self) -> str:
        return describe_state(self._config, self._state, self.errors, self._host_port_errors)

    def close(self) -> None:
        """Release the netlink socket and worker thread (rules stay installed)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._executor.submit(sock.close)
        self._executor.shutdown(wait=True)


def _owner_name(owner: Any) -> str:
    if owner == GLOBAL:
        return "hostPorts"
    return f"{owner[0]}/{owner[1]}"


async def cleanup(table: str = "nodeagent", netns: str | None = None,
                  route_proto: int | None = RTPROT_NODEAGENT) -> None:
    """Remove everything the proxy installed: its table (and with it every chain, map
    and set) and the pod routes carrying ``route_proto`` (None: leave routes alone).
    Idempotent."""
    from . import nfnl

    def delete_table() -> None:
        sock = NftSocket(netns)
        try:
            batch = nfnl.Batch(first_seq=sock.next_seq())
            batch.delete_table(table)
            try:
                sock.send_batch(batch)
            except NftError as exc:
                if not all(err == errno.ENOENT for _, err, _, _ in exc.errors):
                    raise
        finally:
            sock.close()

    await asyncio.to_thread(delete_table)
    if route_proto is not None:
        removed = await PodRoutes(node_name="", netns=netns, proto=route_proto).cleanup()
        if removed:
            log.info("pod routes removed", routes=removed)
    log.info("proxy rules removed", table=table)
