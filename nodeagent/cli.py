"""`nodeagent` command line: run, version (more subcommands join as features land)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from nodeagent.config import ConfigError, build_settings

from nodeagent import __version__ as VERSION


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="A Kubernetes node agent: kubelet, Docker runtime shim and service proxy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the node agent")
    run.add_argument("--manifest-dir", help="directory of Pod (and Service) manifests")
    run.add_argument("--kubeconfig", help="kubeconfig of the cluster to join")
    run.add_argument("--config", help="YAML file with the same settings as the flags")
    run.add_argument("--node-name", help="node name (default: the host name)")
    run.add_argument("--pod-cidr", help="pod address range of this node (default 10.244.0.0/24)")
    run.add_argument("--status-address", help="HOST:PORT of the status endpoint (default 127.0.0.1:10255)")
    run.add_argument("--root-dir", help="state directory (default /var/lib/nodeagent)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"nodeagent {VERSION}")
        return 0

    from nodeagent.logs import configure_logging

    configure_logging(args.log_level)
    log = structlog.get_logger("nodeagent")
    flags = {
        "manifest_dir": args.manifest_dir,
        "kubeconfig": args.kubeconfig,
        "node_name": args.node_name,
        "pod_cidr": args.pod_cidr,
        "status_address": args.status_address,
        "root_dir": args.root_dir,
    }
    try:
        settings = build_settings(args.config, flags)
    except ConfigError as exc:
        print(f"nodeagent: {exc}", file=sys.stderr)
        return 2
    if settings.kubeconfig:
        # A bad kubeconfig is a usage error: say which file and field, exit 2.
        from nodeagent.kube import KubeConfigError, load_kubeconfig

        try:
            load_kubeconfig(settings.kubeconfig)
        except KubeConfigError as exc:
            print(f"nodeagent: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(_run(settings, log))


async def _run(settings, log) -> int:
    from nodeagent.agent import Agent

    agent = Agent(settings)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Stopping the agent leaves pods running (like kubelet): they are adopted on
        # the next start.
        loop.add_signal_handler(sig, task.cancel)
    try:
        await agent.run()
    except asyncio.CancelledError:
        log.info("nodeagent stopped")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
