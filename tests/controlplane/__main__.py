"""Run the test control plane as a process: `python -m tests.controlplane`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import structlog

from .api import Options
from .server import ControlPlane


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane",
                                     description="Kubernetes API server for nodeagent tests")
    parser.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: random)")
    parser.add_argument("--state-dir", default=None,
                        help="CA, keys, kubeconfigs and objects, kept across restarts (default: a temp dir)")
    parser.add_argument("--bookmark-interval", type=float, default=60.0,
                        help="seconds between watch BOOKMARK events")
    parser.add_argument("--auto-approve-csrs", action="store_true",
                        help="approve kubelet client/serving CSRs automatically")
    parser.add_argument("--signing-duration", type=float, default=None,
                        help="most seconds a signed CSR certificate lives (default: one year)")
    parser.add_argument("--pod-cidr", default=None,
                        help="allocate a /24 of this range to each new Node's spec.podCIDR")
    parser.add_argument("--no-service-account-admission", action="store_true",
                        help="do not inject the kube-api-access projected volume into pods")
    parser.add_argument("--bootstrap-token", action="append", default=[],
                        help="create this bootstrap token (repeatable); 'new' makes a random one")
    parser.add_argument("--print-kubeconfig", action="store_true",
                        help="print the admin kubeconfig content after its path")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # stdout carries only the kubeconfig path (and what was asked for); logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    options = Options(auto_approve_csrs=args.auto_approve_csrs, signing_duration=args.signing_duration,
                      pod_cidr=args.pod_cidr,
                      service_account_admission=not args.no_service_account_admission)
    cp = ControlPlane(args.state_dir, port=args.port, options=options,
                      bookmark_interval=args.bookmark_interval)
    await cp.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        print(cp.admin_kubeconfig, flush=True)
        for token in args.bootstrap_token:
            created = cp.create_bootstrap_token(None if token == "new" else token)
            print(f"bootstrap-token {created} ca-cert-hash {cp.ca.spki_sha256()}", flush=True)
        if args.print_kubeconfig:
            print(cp.admin_kubeconfig.read_text(), flush=True)
        print(f"serving {cp.url} (admin token {cp.admin_token})", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
