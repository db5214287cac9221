"""Let traffic into and out of the pod bridge through the host's iptables FORWARD chain.

Why this exists: with ``br_netfilter`` loaded and ``net.bridge.bridge-nf-call-iptables=1``
(as on every Docker host), frames *bridged* between two ports of our bridge are also run
through iptables' FORWARD chain (as ``-i <bridge> -o <bridge>``), and Docker sets that
chain's policy to DROP. Pods on the same bridge then cannot reach each other.

The per-bridge option ``nf_call_iptables`` (IFLA_BR_NF_CALL_IPTABLES) does not help: the
kernel runs the hooks when the global sysctl *or* the bridge option is on, so a bridge
can only opt in, never out (checked on this host: with the option 0 the frames are still
dropped). Turning the global sysctl off would change every bridge on the machine. So we
own one iptables chain, ``NODEAGENT-PODNET``, jumped to from the top of FORWARD, holding
two ACCEPT rules per pod bridge: what leaves through it (pod-to-pod frames, traffic the
service proxy DNATs to pods) and what enters from it (pod egress). Traffic that does not
touch our bridge is left to the host's own rules.

iptables has no netlink API of its own (under iptables-nft its rules are nftables rules
in a private encoding), so the ``iptables`` tool is run -- asynchronously, and only from
``start()``/``destroy()``, never per pod.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil

import structlog

from netplugin.types import NetworkError

log = structlog.get_logger(__name__)

CHAIN = "NODEAGENT-PODNET"
_JUMP = ["-m", "comment", "--comment", "nodeagent pod networks", "-j", CHAIN]
_TIMEOUT_S = 20.0
_LOCK_WAIT_S = "5"
_RULE_COMMENT = re.compile(r'nodeagent pod network ([^"\s]+)"?')  # iptables -w: wait for the xtables lock instead of failing


def bridge_rules(bridge: str) -> list[list[str]]:
    """Accept what enters or leaves the pod bridge: bridged pod-to-pod frames, traffic the
    service proxy DNATs to pods (NodePort, hostPort, externalIPs from other hosts) and
    pod egress, which Docker's FORWARD DROP policy would otherwise discard (the same
    rules flannel and the CNI bridge plugin install)."""
    comment = ["-m", "comment", "--comment", f"nodeagent pod network {bridge}"]
    return [
        ["-o", bridge, *comment, "-j", "ACCEPT"],
        ["-i", bridge, *comment, "-j", "ACCEPT"],
    ]


def iptables_available() -> bool:
    return shutil.which("iptables") is not None


async def _iptables(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "iptables", "-w", _LOCK_WAIT_S, "-t", "filter", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _TIMEOUT_S)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, (out if proc.returncode == 0 else err).decode(errors="replace")


async def _must(*args: str) -> str:
    rc, text = await _iptables(*args)
    if rc != 0:
        raise NetworkError(f"iptables {' '.join(args)} failed (exit {rc}): {text.strip()}")
    return text


async def _ensure_chain() -> None:
    rc, _ = await _iptables("-S", CHAIN)
    if rc != 0:
        rc, text = await _iptables("-N", CHAIN)
        if rc != 0 and "exists" not in text:
            raise NetworkError(f"iptables -N {CHAIN} failed (exit {rc}): {text.strip()}")
    rc, _ = await _iptables("-C", "FORWARD", *_JUMP)
    if rc != 0:
        await _must("-I", "FORWARD", "1", *_JUMP)
        log.info("iptables FORWARD jump added", chain=CHAIN)


async def ensure_bridge_forwarding(bridge: str) -> bool:
    """Make sure frames bridged between ports of ``bridge`` pass FORWARD; idempotent.

    Returns False (and logs) when the host has no ``iptables`` tool, in which case
    nothing could have installed a DROP policy through it either.
    """
    if not iptables_available():
        log.warning("iptables not found; not managing FORWARD for the pod bridge", bridge=bridge)
        return False
    await _ensure_chain()
    for rule in bridge_rules(bridge):
        rc, _ = await _iptables("-C", CHAIN, *rule)
        if rc != 0:
            await _must("-A", CHAIN, *rule)
            log.info("pod bridge forwarding allowed", bridge=bridge, chain=CHAIN, rule=" ".join(rule))
    return True


async def remove_bridge_forwarding(bridge: str) -> None:
    """Delete every rule of ours for ``bridge`` (whatever rule shape an older version
    installed: matched by its comment); idempotent."""
    if not iptables_available():
        return
    rc, text = await _iptables("-S", CHAIN)
    if rc != 0:
        return
    for line in text.splitlines():
        match = _RULE_COMMENT.search(line)
        if line.startswith(f"-A {CHAIN} ") and match and match.group(1) == bridge:
            args = shlex.split(line)
            args[0] = "-D"
            await _iptables(*args)


async def bridges_with_rules() -> set[str]:
    """Bridges that have a rule of ours in the chain."""
    if not iptables_available():
        return set()
    rc, text = await _iptables("-S", CHAIN)
    if rc != 0:
        return set()
    found = set()
    for line in text.splitlines():
        match = _RULE_COMMENT.search(line)
        if line.startswith(f"-A {CHAIN} ") and match:
            found.add(match.group(1))
    return found
