"""`nodeagent` command line: run, status, logs, proxy show, join, install-service,
cleanup, version."""

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

    proxy = sub.add_parser("proxy", help="inspect the service proxy of a running agent")
    proxy_sub = proxy.add_subparsers(dest="proxy_command", required=True)
    show = proxy_sub.add_parser("show", help="print each service with its frontends and endpoints")
    show.add_argument("--status-address", default="127.0.0.1:10255",
                      help="the running agent's status endpoint (default 127.0.0.1:10255)")

    status = sub.add_parser("status", help="node and pods of a running agent, with CPU and memory use")
    status.add_argument("--status-address", default="127.0.0.1:10255",
                        help="the running agent's status endpoint (default 127.0.0.1:10255)")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")

    cleanup = sub.add_parser(
        "cleanup",
        help="remove what the agent installed on this host (nftables table, pod routes, "
             "pod bridge and its forwarding rules); pods' containers are left alone",
    )
    cleanup.add_argument("--config", help="the agent's config file, for its names")
    cleanup.add_argument("--bridge-name", help="pod bridge (default nabr0)")
    cleanup.add_argument("--proxy-table", help="nftables table (default nodeagent)")

    from nodeagent import logscmd

    logscmd.add_parser(sub)
    from nodeagent.join.cli import add_parser as add_join_parser
    from nodeagent.systemd import add_install_parser

    add_join_parser(sub)
    add_install_parser(sub)

    sub.add_parser("version", help="print the version")
    return parser


def _proxy_show(address: str) -> int:
    import urllib.error
    import urllib.request

    url = f"http://{address}/proxy"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            sys.stdout.write(resp.read().decode())
        return 0
    except urllib.error.HTTPError as exc:
        print(f"nodeagent: {url}: {exc.code} (is the service proxy enabled?)", file=sys.stderr)
    except OSError as exc:
        print(f"nodeagent: cannot reach the agent at {url}: {exc}", file=sys.stderr)
    return 1


async def _cleanup(args) -> int:
    from netplugin.podnet import BridgeNetwork
    from netplugin.proxy import cleanup as proxy_cleanup
    from nodeagent.config import Settings, load_config_file

    values = load_config_file(args.config) if args.config else {}
    settings = Settings(**{k: v for k, v in values.items()})
    bridge = args.bridge_name or settings.bridge_name
    table = args.proxy_table or settings.proxy_table
    await proxy_cleanup(table=table)
    network = BridgeNetwork(bridge_name=bridge, pod_cidr=settings.pod_cidr,
                            state_dir=f"{settings.root_dir}/ipam")
    await network.destroy()
    await network.stop()
    print(f"removed nftables table ip {table}, our pod routes, bridge {bridge} and its forwarding rules")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"nodeagent {VERSION}")
        return 0
    if args.command == "status":
        from nodeagent.server.statuscmd import main as status_main

        if args.watch is not None and args.watch <= 0:
            print("nodeagent: --watch: expected a positive number of seconds", file=sys.stderr)
            return 2
        return status_main(args.status_address, args.watch)
    if args.command == "proxy":
        return _proxy_show(args.status_address)
    if args.command == "logs":
        from nodeagent import logscmd

        return logscmd.run(args)
    if args.command == "join":
        from nodeagent.join.cli import main as join_main

        return join_main(args)
    if args.command == "install-service":
        from nodeagent.systemd import install_service

        return install_service(args)
    if args.command == "cleanup":
        try:
            return asyncio.run(_cleanup(args))
        except ConfigError as exc:
            print(f"nodeagent: {exc}", file=sys.stderr)
            return 2

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
    # Logging is set up only once the settings are good: usage errors are plain
    # messages, and a rejected command line leaves the process's logging untouched.
    from nodeagent.logs import configure_logging

    configure_logging(args.log_level)
    log = structlog.get_logger("nodeagent")
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
