"""`maglev-bridge`: plan, apply, run, status. Every command prints what it did or would do."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

# Each command imports the heavy parts it needs (the agent, netlink, numpy, Nomad's client) itself: imported
# here, they were 2.15 G of the 3.41 G instructions of `plan` on 10,000 instances (callgrind). The errors `main`
# catches live in modules that import none of them.
from bridge import version
from bridge.catalog.consul_format import CatalogFormatError
from bridge.catalog.file import load_catalog
from bridge.cli.jobs import add_jobs_commands
from bridge.core.config import Config, ConfigError, load_config
from bridge.core.desired import compute_desired
from bridge.core.model import Snapshot
from bridge.dataplane.errors import ApplyError
from bridge.files.store import StateLock, StateLocked
from bridge.inspect.errors import ExplainError
from bridge.inspect.text import desired_json, desired_text, dumps, outcome_text, status_text

if TYPE_CHECKING:
    from bridge.agent.reconcile import Reconciler

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if getattr(args, "role", None):
        config = replace(config, role=args.role)
    if getattr(args, "catalog", None):
        config = replace(config, catalog_file=args.catalog)
    return config


def _reconciler(config: Config) -> Reconciler:
    """The role's reconciler, picked once: `apply` runs its one pass, `run` runs its passes."""
    if config.role == "backend":
        from bridge.agent.backend import BackendReconciler

        return BackendReconciler(config)
    from bridge.agent.director import DirectorReconciler

    return DirectorReconciler(config)


def _snapshot(config: Config) -> Snapshot:
    if not config.catalog_file:
        raise ConfigError("catalog_file: no catalog given (use --catalog FILE or set catalog_file)")
    return load_catalog(config.catalog_file)


def cmd_plan(args: argparse.Namespace) -> int:
    config = _config(args)
    snapshot = _snapshot(config)
    local = config.local_address
    if local is None:
        from bridge.dataplane.kernel import open_kernel

        try:
            with open_kernel(config) as kernel:
                local = kernel.default_local_address()
        except ApplyError:
            local = "0.0.0.0"
    desired = compute_desired(snapshot, config, local)
    print(dumps(desired_json(desired)) if args.format == "json" else desired_text(desired))
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """Holds the agent's state-file lock while it runs (a dry run writes nothing and needs none): with an
    agent running on the same state file, `apply` refuses rather than race it for the drain deadlines."""
    config = _config(args)
    snapshot = _snapshot(config)
    reconciler = _reconciler(config)
    if args.dry_run:
        outcome = reconciler.once(snapshot, dry_run=True)
    else:
        with StateLock(config.state_file):
            outcome = reconciler.once(snapshot, dry_run=False)
    print(outcome_text(outcome))
    return EXIT_FAILED if outcome.failed else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from bridge.inspect.status import read_status

    config = _config(args)
    if args.discover:
        from bridge.inspect.discover import discover, discovery_text

        found = discover(config, args.datacenter)
        print(dumps({"directors": [d.__dict__ | {"label": d.label} for d in found.directors],
                     "disagreeing": found.disagreeing}) if args.format == "json" else discovery_text(found))
        return EXIT_FAILED if found.disagreeing else EXIT_OK
    data = read_status(config)
    print(dumps(data) if args.format == "json" else status_text(data))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from bridge.core.maglev import Dest
    from bridge.inspect.explain import ServiceView, explain_flow, explain_shares, parse_client, parse_service

    config = _config(args)
    key = parse_service(args.vip)
    if args.catalog:
        desired = compute_desired(_snapshot(config), config, config.local_address or "0.0.0.0")
        vs = next((v for v in desired.virtual_services if v.key == key), None)
        if vs is None:
            raise ExplainError(f"{args.vip}: the catalog's desired state has no such virtual service")
        view = ServiceView(
            key.text, vs.flags, tuple(Dest(r.address, r.port, r.weight, r.last_weight) for r in vs.real_servers),
            {r.address: r.backend for r in vs.real_servers},
            source=f"desired state of {config.catalog_file}, {config.encapsulation} encapsulation",
            allow=vs.allow, service=vs.service,
        )
    else:
        from bridge.inspect.status import live_view  # the kernel's view: netlink

        view = live_view(config, key)
    if args.shares:
        print("\n".join(explain_shares(view, config.mh_table_size)))
        return EXIT_OK
    if not args.client:
        raise ExplainError("explain needs a client (<client-ip>[:<port>]) unless --shares is given")
    client, port = parse_client(args.client, key)
    lines, _ = explain_flow(view, client, port, config.mh_table_size)
    print("\n".join(lines))
    return EXIT_OK


def cmd_maintenance(args: argparse.Namespace) -> int:
    """`on` withdraws this director's announcements itself (so it works with the agent stopped or wedged),
    then waits until the running agent has made a pass that saw it; `off` lets the agent announce again."""
    from bridge.cli.maintenance import maintenance_command

    lines, ok = maintenance_command(_config(args), args.action, args.reason, args.wait)
    print("\n".join(lines))
    return EXIT_OK if ok else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    """The agent holds its state file's lock for its whole life; SIGHUP re-reads the same file with the
    same command-line overrides."""
    from bridge.agent.shell import run_agent

    config = _config(args)
    with StateLock(config.state_file) as lock:
        if lock.note:
            logging.getLogger("maglev-bridge").warning("%s", lock.note)
        return run_agent(_reconciler(config), reload=lambda: _config(args))


class _Version(argparse.Action):
    """`--version`, looked up only when asked: reading the installed build's metadata costs every command
    about 30 ms (importlib.metadata)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version of this build and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maglev-bridge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, catalog: bool = True, role: bool = True) -> None:
        p.add_argument("--config", help="YAML configuration file (see maglev-bridge.example.yaml)")
        if catalog:
            p.add_argument("--catalog", help="catalog JSON file: service name -> Consul health entries")
        if role:
            p.add_argument("--role", choices=("director", "backend"), help="override the configured role")

    p = sub.add_parser("plan", help="print the desired state; change nothing")
    common(p, role=False)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="make the kernel match the catalog once")
    common(p)
    p.add_argument("--dry-run", action="store_true", help="print the operations, in order, without running them")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("run", help="the long-running agent")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explain", help="which backend a flow goes to, and why (the kernel's Maglev table)")
    common(p, role=False)
    p.add_argument("vip", metavar="VIP:PORT[/PROTO]", help="the virtual service, e.g. 198.51.100.1:80/tcp")
    p.add_argument("client", nargs="?", metavar="CLIENT[:PORT]", help="the flow's source address and port")
    p.add_argument("--shares", action="store_true", help="each real server's share of the table against its weight")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("status", help="what the agent owns in the kernel now")
    common(p, catalog=False, role=False)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--discover", action="store_true",
                   help="every director of the data centre through Consul DNS, with their table fingerprints")
    p.add_argument("--datacenter", help="with --discover: another data centre than the configured one")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("maintenance", help="take this director out of rotation (withdraw its VIPs) or back")
    common(p, catalog=False, role=False)
    p.add_argument("action", choices=("on", "off", "status"))
    p.add_argument("--reason", default="", help="with on: why (shown in status, /health and status --discover)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the running agent to confirm (default 30; 0: do not wait)")
    p.set_defaults(func=cmd_maintenance)

    add_jobs_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("maglev-bridge").setLevel(logging.DEBUG)
    try:
        code: int = args.func(args)
    except (ConfigError, CatalogFormatError, ExplainError, StateLocked) as exc:
        print(f"maglev-bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApplyError as exc:
        print(f"maglev-bridge: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code

