"""Reproduces docs/PROXY.md "Why not kube-proxy's exact layout": kernel cost of
candidate nf_tables layouts for N ClusterIP services x E endpoints.

    .venv/bin/python bench/proxy_layouts.py [--services 1000,2000,10000] [--endpoints 10]
                                            [--layouts all] [--give-up-after 10]

For every layout and size, in a fresh, empty network namespace (nothing is routed or
sent anywhere; the namespace is deleted afterwards):

* **full sync**: the whole table as one ``nft -f`` transaction. Reported is the
  *kernel part*: the system CPU time of the ``nft`` process, which is where the
  kernel validates and commits the batch (netlink requests are processed in the
  sender's context), so nft's own parsing (user time) is not counted and other load
  on the machine affects it far less than wall time. Median of --runs, the table
  deleted in between; the wall time is reported too.
* **endpoint change**: one endpoint of the middle service is replaced, as the layout
  has to do it (rewrite a chain, or swap map elements), as one ``nft -f`` on the
  loaded table; system CPU time again (it includes nft listing the objects it
  needs), median of --changes samples.

A layout whose full sync took longer than --give-up-after seconds is not tried at
larger sizes (kube-proxy's per-service anonymous maps grow super-linearly).

Layouts (all share the dispatch map ``service-ips``: daddr . proto . port -> verdict):

* ``anon-vmaps``   kube-proxy's nftables mode: a chain per service holding
                   ``numgen random mod E vmap { 0 : goto ep.., ... }`` (an anonymous
                   verdict map each) and a chain per endpoint (masquerade mark + DNAT)
* ``named-vmaps``  the same with a named verdict map per service
* ``ep-chains``    a chain per endpoint, chosen by a probability cascade of
                   ``numgen random mod (E-k) == 0 goto ep..`` rules in the service chain
* ``inline-dnat``  the cascade with the DNAT inline (no endpoint chains)
* ``shared-map``   one data map ``frontend . slot -> endpoint``, looked up from a chain
                   per service (a map binding per chain)
* ``pick-n``       this project's design: one shared ``pick-E`` chain per endpoint
                   count doing that lookup; services are only map elements
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _proxy_common import ENDPOINT_BASE, SERVICE_BASE, machine, netns

TABLE = "layoutbench"
HEAD = f"""table ip {TABLE} {{
  map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
  chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
  chain nat-output {{ type nat hook output priority -100; policy accept;
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
"""


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address(SERVICE_BASE + 16 + i))


def ep(i: int, e: int, endpoints: int, generation: int = 0) -> str:
    return str(ipaddress.IPv4Address(ENDPOINT_BASE + 256 + (i * endpoints + e) + generation * 2_000_000))


def dispatch(n: int, target: Callable[[int], str]) -> str:
    elements = ",\n    ".join(f"{vip(i)} . tcp . 80 : {target(i)}" for i in range(n))
    return f"add element ip {TABLE} service-ips {{\n    {elements} }}\n"


def ep_chain(i: int, e: int, endpoints: int, generation: int = 0) -> str:
    address = ep(i, e, endpoints, generation)
    return (f"  chain ep-{i}-{e}-{generation} {{\n    ip saddr {address} meta mark set 0x4000\n"
            f"    meta l4proto tcp dnat to {address}:8080\n  }}\n")


def cascade(rule: Callable[[int], str], endpoints: int) -> str:
    lines = []
    for k in range(endpoints - 1):
        lines.append(f"    numgen random mod {endpoints - k} 0 {rule(k)}")
    lines.append(f"    {rule(endpoints - 1)}")
    return "\n".join(lines)


# --- layouts: (full table text, text of one endpoint change of service i) -------------


def anon_vmaps(n: int, e: int) -> tuple[str, Callable[[int, int], str]]:
    def svc(i: int, gen_of: Callable[[int], int]) -> str:
        vmap = ", ".join(f"{k} : goto ep-{i}-{k}-{gen_of(k)}" for k in range(e))
        return f"numgen random mod {e} vmap {{ {vmap} }}"

    body = "".join(ep_chain(i, k, e) for i in range(n) for k in range(e))
    body += "".join(f"  chain svc-{i} {{\n    {svc(i, lambda k: 0)}\n  }}\n" for i in range(n))

    def change(i: int, gen: int) -> str:
        return (f"table ip {TABLE} {{\n{ep_chain(i, 3, e, gen)}}}\n"
                f"flush chain ip {TABLE} svc-{i}\n"
                f"add rule ip {TABLE} svc-{i} {svc(i, lambda k: gen if k == 3 else 0)}\n"
                f"delete chain ip {TABLE} ep-{i}-3-{gen - 1}\n")
    return HEAD + body + "}\n" + dispatch(n, lambda i: f"goto svc-{i}"), change


def named_vmaps(n: int, e: int) -> tuple[str, Callable[[int, int], str]]:
    body = "".join(ep_chain(i, k, e) for i in range(n) for k in range(e))
    for i in range(n):
        elements = ", ".join(f"{k} : goto ep-{i}-{k}-0" for k in range(e))
        body += f"  map eps-{i} {{\n    typeof numgen random mod {e} : verdict; elements = {{ {elements} }}\n  }}\n"
        body += f"  chain svc-{i} {{\n    numgen random mod {e} vmap @eps-{i}\n  }}\n"

    def change(i: int, gen: int) -> str:
        return (f"table ip {TABLE} {{\n{ep_chain(i, 3, e, gen)}}}\n"
                f"delete element ip {TABLE} eps-{i} {{ 3 }}\n"
                f"add element ip {TABLE} eps-{i} {{ 3 : goto ep-{i}-3-{gen} }}\n"
                f"delete chain ip {TABLE} ep-{i}-3-{gen - 1}\n")
    return HEAD + body + "}\n" + dispatch(n, lambda i: f"goto svc-{i}"), change


def ep_chains(n: int, e: int) -> tuple[str, Callable[[int, int], str]]:
    body = "".join(ep_chain(i, k, e) for i in range(n) for k in range(e))
    body += "".join(f"  chain svc-{i} {{\n{cascade(lambda k, i=i: f'goto ep-{i}-{k}-0', e)}\n  }}\n"
                    for i in range(n))

    def change(i: int, gen: int) -> str:
        address = ep(i, 3, e, gen)
        return (f"flush chain ip {TABLE} ep-{i}-3-0\n"
                f"add rule ip {TABLE} ep-{i}-3-0 ip saddr {address} meta mark set 0x4000\n"
                f"add rule ip {TABLE} ep-{i}-3-0 meta l4proto tcp dnat to {address}:8080\n")
    return HEAD + body + "}\n" + dispatch(n, lambda i: f"goto svc-{i}"), change


def inline_dnat(n: int, e: int) -> tuple[str, Callable[[int, int], str]]:
    def rules(i: int, gen_of: Callable[[int], int]) -> str:
        return cascade(lambda k: f"meta l4proto tcp dnat to {ep(i, k, e, gen_of(k))}:8080", e)

    body = "".join(f"  chain svc-{i} {{\n{rules(i, lambda k: 0)}\n  }}\n" for i in range(n))

    def change(i: int, gen: int) -> str:
        lines = rules(i, lambda k: gen if k == 3 else 0).splitlines()
        return f"flush chain ip {TABLE} svc-{i}\n" + "".join(
            f"add rule ip {TABLE} svc-{i} {line.strip()}\n" for line in lines)
    return HEAD + body + "}\n" + dispatch(n, lambda i: f"goto svc-{i}"), change


_ENDPOINTS_MAP = ("  map endpoints {{\n    typeof ip daddr . th dport . numgen random mod {e} : ip daddr . th dport\n"
                  "  }}\n")


def _endpoint_elements(n: int, e: int) -> str:
    elements = ",\n    ".join(f"{vip(i)} . 80 . {k} : {ep(i, k, e)} . 8080" for i in range(n) for k in range(e))
    return f"add element ip {TABLE} endpoints {{\n    {elements} }}\n"


def _swap_element(i: int, e: int, gen: int) -> str:
    return (f"delete element ip {TABLE} endpoints {{ {vip(i)} . 80 . 3 }}\n"
            f"add element ip {TABLE} endpoints {{ {vip(i)} . 80 . 3 : {ep(i, 3, e, gen)} . 8080 }}\n")


_LOOKUP = "meta l4proto tcp dnat ip addr . port to ip daddr . th dport . numgen random mod {e} map @endpoints"


def shared_map(n: int, e: int) -> tuple[str, Callable[[int, int], str]]:
    body = _ENDPOINTS_MAP.format(e=e) + "".join(f"  chain svc-{i} {{\n    {_LOOKUP.format(e=e)}\n  }}\n" for i in range(n))
    text = HEAD + body + "}\n" + _endpoint_elements(n, e) + dispatch(n, lambda i: f"goto svc-{i}")
    return text, lambda i, gen: _swap_element(i, e, gen)


def pick_n(n: int, e: int) -> tuple[str, Callable[[int, int], str]]:
    body = _ENDPOINTS_MAP.format(e=e) + f"  chain pick-{e} {{\n    {_LOOKUP.format(e=e)}\n  }}\n"
    text = HEAD + body + "}\n" + _endpoint_elements(n, e) + dispatch(n, lambda i: f"goto pick-{e}")
    return text, lambda i, gen: _swap_element(i, e, gen)


LAYOUTS: dict[str, Callable[[int, int], tuple[str, Callable[[int, int], str]]]] = {
    "anon-vmaps": anon_vmaps,
    "named-vmaps": named_vmaps,
    "ep-chains": ep_chains,
    "inline-dnat": inline_dnat,
    "shared-map": shared_map,
    "pick-n": pick_n,
}


# --- measuring ---------------------------------------------------------------------------


def nft_times(ns: str, path: Path) -> tuple[float, float]:
    """(system CPU seconds, wall seconds) of ``nft -f path`` in ``ns``."""
    argv = ["ip", "netns", "exec", ns, "nft", "-f", str(path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    system = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - before
    if result.returncode != 0:
        raise RuntimeError(f"nft -f {path.name}: {result.stderr.strip()[:500]}")
    return system, wall


def measure(layout: str, n: int, e: int, runs: int, changes: int, workdir: Path) -> dict:
    text, change = LAYOUTS[layout](n, e)
    full = workdir / f"{layout}-{n}.nft"
    full.write_text(text)
    with netns("layouts") as ns:
        totals = []
        for _ in range(runs):
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "ip", TABLE],
                           capture_output=True)
            totals.append(nft_times(ns, full))
        samples = []
        middle = n // 2
        for gen in range(1, changes + 1):
            path = workdir / f"{layout}-{n}-change.nft"
            path.write_text(change(middle, gen))
            samples.append(nft_times(ns, path)[0])
    return {"layout": layout, "services": n, "endpoints": e,
            "full_sync_kernel_s": statistics.median(t[0] for t in totals),
            "full_sync_wall_s": statistics.median(t[1] for t in totals),
            "endpoint_change_kernel_ms": statistics.median(samples) * 1000,
            "runs": runs, "changes": changes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", default="1000,2000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--layouts", default="all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--give-up-after", type=float, default=10.0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.services.split(",")]
    layouts = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    print(json.dumps({"machine": machine()}), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="nodeagent-layouts-") as tmp:
        for layout in layouts:
            for n in sizes:
                result = measure(layout, n, args.endpoints, args.runs, args.changes, Path(tmp))
                results.append(result)
                print(json.dumps(result), flush=True)
                if result["full_sync_wall_s"] > args.give_up_after:
                    print(json.dumps({"layout": layout, "skipped_sizes_above": n}), flush=True)
                    break
    print(json.dumps({"loadavg_at_end": __import__("os").getloadavg()}), flush=True)
    print("\n| layout | services x endpoints | full sync, kernel part | one endpoint change, kernel part |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['services']} x {r['endpoints']} | {r['full_sync_kernel_s']:.2f} s "
              f"(wall {r['full_sync_wall_s']:.2f} s) | {r['endpoint_change_kernel_ms']:.2f} ms |")


if __name__ == "__main__":
    main()
