"""The `nodeagent join` subcommand: flags, progress lines on stderr, then the agent."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .token import JoinError, UsageError, normalise_server, parse_pins, parse_token


def add_parser(sub) -> None:
    join = sub.add_parser(
        "join", help="join a cluster with a bootstrap token (kubeadm-style discovery and TLS "
                     "bootstrap), then run the agent")
    join.add_argument("server", metavar="HOST:PORT", help="the API server, https://HOST:PORT")
    join.add_argument("--token", required=True, help="bootstrap token <id>.<secret>")
    join.add_argument("--discovery-token-ca-cert-hash", action="append", default=[],
                      dest="ca_cert_hashes", metavar="sha256:HEX",
                      help="SHA-256 of the cluster CA's SubjectPublicKeyInfo (repeatable; any "
                           "match pins the CA)")
    join.add_argument("--discovery-token-unsafe-skip-ca-verification", action="store_true",
                      dest="skip_ca", help="do not pin the cluster CA (unsafe)")
    join.add_argument("--node-name", help="node name (default: the host name)")
    join.add_argument("--config", help="the agent's YAML config file (root-dir, node-name ...)")
    join.add_argument("--root-dir", help="state directory (default /var/lib/nodeagent)")
    join.add_argument("--no-start", action="store_true",
                      help="only write the credentials; do not start the agent")
    join.add_argument("--force", action="store_true", help="join again on a joined node")
    join.add_argument("--timeout", default="5m",
                      help="give up after this long (retries and waiting for approval; default 5m)")
    join.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _progress(message: str) -> None:
    print(f"[join] {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from nodeagent.config import ConfigError, build_settings

    from .files import Layout
    from .flow import AlreadyJoined, JoinOptions, join, parse_duration

    try:
        # Everything about the command line is checked before any network call.
        token = parse_token(args.token)
        pins = parse_pins(args.ca_cert_hashes)
        if not pins and not args.skip_ca:
            raise UsageError("give --discovery-token-ca-cert-hash sha256:<hex> (printed by "
                             "`kubeadm token create --print-join-command`), or, unsafely, "
                             "--discovery-token-unsafe-skip-ca-verification")
        endpoint = normalise_server(args.server)
        timeout = parse_duration(args.timeout)
        flags = {"node_name": args.node_name, "root_dir": args.root_dir}
        # The kubeconfig join writes: set now so the settings validate.
        from nodeagent.config import Settings, load_config_file

        values = load_config_file(args.config) if args.config else {}
        root = args.root_dir or values.get("root_dir") or Settings.root_dir
        flags["kubeconfig"] = str(Layout(root).kubeconfig)
        settings = build_settings(args.config, flags)
    except (UsageError, ConfigError) as exc:
        print(f"nodeagent join: {exc}", file=sys.stderr)
        return 2
    opts = JoinOptions(endpoint=endpoint, token=token, pins=pins, node_name=settings.node_name,
                       root_dir=settings.root_dir, skip_ca_verification=args.skip_ca,
                       force=args.force, timeout=timeout, progress=_progress)
    try:
        result = asyncio.run(join(opts))
    except AlreadyJoined as exc:
        # Nothing changes, not even a second agent started next to the running one.
        _progress(str(exc))
        return 0
    except JoinError as exc:
        print(f"nodeagent join: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"nodeagent join: cannot write credentials under {settings.root_dir}: "
              f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or ''}); nothing half-written "
              "was left behind", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nodeagent join: interrupted", file=sys.stderr)
        return 130
    if result:
        _progress(f"node {result.node_name} joined {result.server}; kubeconfig {result.kubeconfig}")
    if args.no_start:
        _progress(f"configured only (--no-start); start with: nodeagent run --kubeconfig "
                  f"{settings.kubeconfig} --root-dir {settings.root_dir}"
                  + (f" --config {args.config}" if args.config else ""))
        return 0
    from nodeagent.cli import _run
    from nodeagent.logs import configure_logging

    import structlog

    configure_logging(args.log_level)
    return asyncio.run(_run(settings, structlog.get_logger("nodeagent")))
