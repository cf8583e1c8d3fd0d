"""Text and JSON views of plans, passes and live state. `plan --format json` is a stable interface for
scripts; its shape is documented in the README and must only grow, never change."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import msgspec

from bridge.core.addr import bracketed, host_prefix
from bridge.core.allow import describe as describe_allow
from bridge.core.encap import Forwarding
from bridge.core.keys import DestKey, ServiceKey
from bridge.core.live import LiveState
from bridge.core.model import DesiredState, Rejection
from bridge.core.outcome import PassOutcome
from bridge.core.printable import printable
from bridge.files.maintenance import Maintenance


def desired_json(desired: DesiredState) -> dict[str, Any]:
    return {
        "virtual_services": [
            {
                "vip": vs.vip,
                "port": vs.port,
                "protocol": vs.protocol,
                "scheduler": vs.scheduler,
                "flags": list(vs.flags),
                "service": vs.service,
                "allow": None if vs.allow is None else list(vs.allow),
                "real_servers": [
                    {"address": rs.address, "port": rs.port, "weight": rs.weight, "backend": rs.backend,
                     "node": rs.node, "last_weight": rs.last_weight,
                     "standby": None if rs.standby is None else asdict(rs.standby)}
                    for rs in vs.real_servers
                ],
            }
            for vs in desired.virtual_services
        ],
        "tunnels": [asdict(t) for t in desired.tunnels],
        "vip_routes": list(desired.vip_routes),
        "rejected": [asdict(r) for r in desired.rejected],
        "sysctls": dict(desired.sysctls),
        "sync_daemons": None if desired.sync_daemons is None else [asdict(d) for d in desired.sync_daemons],
        "forwarding": asdict(desired.forwarding),
    }


def rejections_text(rejected: Sequence[Rejection] | Sequence[dict[str, Any]]) -> list[str]:
    """Every name escaped: they come from whoever registered the service (see bridge/core/printable.py)."""
    lines = []
    for r in rejected:
        d = asdict(r) if isinstance(r, Rejection) else r
        what = f"tag '{printable(d['tag'])}'" if d["tag"] else "catalog entry"
        lines.append(f"  REJECTED service {printable(d['service'])} instance {printable(d['instance'])} {what}: "
                     f"{printable(d['reason'], 1000)}")
    return lines


def desired_text(desired: DesiredState) -> str:
    lines = []
    for vs in desired.virtual_services:
        lines.append(f"{vs.key}  service {printable(vs.service)}  scheduler {vs.scheduler}"
                     f"  flags {','.join(vs.flags) or '-'}  allow {describe_allow(vs.allow)}")
        for rs in vs.real_servers:
            note = "" if rs.weight == rs.last_weight else f" (remembers {rs.last_weight})"
            if rs.standby is not None:
                note = f" standby via {rs.standby.describe()} (no slot)"
            lines.append(f"  -> {bracketed(rs.address)}:{rs.port}  weight {rs.weight}{note}  backend {rs.backend} "
                         f"({printable(rs.node)})")
    for t in desired.tunnels:
        lines.append(f"tunnel {t.name}: {t.local} -> {t.remote} fou:{t.fou_port}, route {t.tunnel_address}/32")
    if desired.forwarding.method == "tunnel":
        lines.append(f"real servers forward by IPVS tunnel: {desired.forwarding.describe()} (no links, no routes)")
    lines.extend(f"sysctl {name} = {value}" for name, value in desired.sysctls)
    lines.extend(f"connection sync {d.state} on {d.interface} syncid {d.syncid}" for d in desired.sync_daemons or ())
    if desired.rejected:
        lines.append(f"{len(desired.rejected)} rejected claim(s):")
        lines.extend(rejections_text(desired.rejected))
    if not desired.virtual_services:
        lines.append("no virtual services")
    return "\n".join(lines)


def outcome_text(outcome: PassOutcome) -> str:
    lines = []
    verb = "applied" if outcome.applied else "would run"
    if not outcome.steps:
        lines.append(f"{outcome.role}: nothing to change")
    else:
        lines.append(f"{outcome.role}: {verb} {len(outcome.steps)} operation(s):")
        for i, step in enumerate(outcome.steps, 1):
            status = f"FAILED: {step.error}" if step.error else ("ok" if outcome.applied else "")
            lines.append(f"  {i:3d}. {step.description}  {status}".rstrip())
    lines.extend(f"  draining {d}" for d in outcome.draining)
    lines.extend(f"  note: {n}" for n in outcome.notes)
    lines.extend(rejections_text(outcome.rejected))
    return "\n".join(lines)


def status_json(live: LiveState, report: dict[str, Any], fingerprints: Mapping[ServiceKey, str],
                standby: frozenset[DestKey] = frozenset()) -> dict[str, Any]:
    """`standby`: the real servers to mark as standby ones (bridge/inspect/status.py, `standby_servers`)."""
    return {
        "virtual_services": [
            {
                "vip": s.vip, "port": s.port, "protocol": s.protocol, "scheduler": s.scheduler,
                "flags": list(s.flags), "fingerprint": fingerprints.get(s.key),
                "real_servers": [{**asdict(rs), "standby": DestKey(s.key, rs.address, rs.port) in standby}
                                 for rs in s.real_servers],
            }
            for s in live.services
        ],
        "tunnels": [asdict(link) for link in live.links],
        "routes": [asdict(r) for r in live.routes],
        "sysctls": dict(live.sysctls),
        "announced": list(live.announced),
        "sync_daemons": [asdict(d) for d in live.sync_daemons],
        "filter": {"table": live.filter.table, "allows": [
            {"vip": e.key.vip, "port": e.key.port, "protocol": e.key.protocol,
             "prefixes": None if e.prefixes is None else list(e.prefixes), "drops": e.drops, "whole": e.whole}
            for e in live.filter.allows]},
        "last_pass": report,
    }


def service_label(found: dict[str, Any]) -> str:
    """A virtual service of this agent's /status data as its key's text (`status` prints it)."""
    return ServiceKey(found["vip"], found["port"], found["protocol"]).text


def status_text(data: dict[str, Any]) -> str:
    lines = [f"{'VIRTUAL SERVICE':<26} {'SCHED':<6} {'FLAGS':<20} {'TABLE':<17} REAL SERVERS (kernel list order)"]
    for s in data["virtual_services"]:
        label = service_label(s)
        flags = ",".join(s["flags"]) or "-"
        lines.append(f"{label:<26} {s['scheduler']:<6} {flags:<20} {s['fingerprint'] or '-':<17} "
                     f"{len(s['real_servers'])}")
        for rs in s["real_servers"]:
            lines.append(f"    -> {bracketed(rs['address']) + ':' + str(rs['port']):<22} weight {rs['weight']:<6} "
                         f"active {rs['active_conns']:<6} inactive {rs['inactive_conns']}{_via(rs)}")
    if not data["virtual_services"]:
        lines.append("(no virtual services owned by this agent)")
    lines.append("")
    lines.append(f"{'TUNNEL':<12} {'LOCAL':<16} {'REMOTE':<16} {'FOU':<6} UP")
    for link in data["tunnels"]:
        lines.append(f"{link['name']:<12} {link['local'] or '-':<16} {link['remote'] or '-':<16} "
                     f"{link['encap_dport']:<6} {'yes' if link['up'] else 'no'}")
    lines.append("")
    lines.append(f"{'ROUTE':<18} {'TABLE':<6} DEV")
    for r in data["routes"]:
        lines.append(f"{host_prefix(r['dst']):<18} {r['table']:<6} {r['dev']}")
    lines.extend(_director_text(data))
    report = data.get("last_pass") or {}
    if report:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.get("at", 0)))
        failed = [o for o in report.get("operations", []) if o.get("error")]
        lines.append("")
        lines.append(f"last pass ({report.get('role')}) at {when}: {len(report.get('operations', []))} operation(s),"
                     f" {len(failed)} failed")
        lines.extend(f"  FAILED {o['description']}: {o['error']}" for o in failed)
        lines.extend(f"  draining {d}" for d in report.get("draining", []))
        lines.extend(rejections_text(report.get("rejected", [])))
    return "\n".join(lines)


def _via(rs: dict[str, Any]) -> str:
    """A real server's forwarding when it is not direct routing (`.get`: older agents do not report it)."""
    found = rs.get("forwarding") or {"method": "route"}
    standby = "  standby (weight 0, no slot)" if rs.get("standby") else ""
    if found["method"] == "route":
        return standby
    return "  via " + Forwarding(**found).describe() + standby


def _director_text(data: dict[str, Any]) -> list[str]:
    """Encapsulation, sysctls, announcements, maintenance and sync daemons (`.get`: a status from an older
    agent lacks them)."""
    lines = [""]
    if data.get("encapsulation"):
        standby = data.get("standby_encapsulation")
        lines.append(f"encapsulation: {data['encapsulation']}"
                     + (f" (standby {standby} real servers at weight 0)" if standby else ""))
    if data.get("mtu_warning"):
        lines.append(f"WARNING: {data['mtu_warning']}")
    lines.extend(f"sysctl {name} = {'missing' if value is None else value}"
                 for name, value in data.get("sysctls", {}).items())
    maintenance = data.get("maintenance") or {"on": False}
    if data.get("bgp_table") is not None:
        announced = data.get("announced", [])
        lines.append(f"announced (table {data['bgp_table']}): {', '.join(announced) if announced else 'nothing'}")
        lines.append(f"maintenance: {maintenance_text(maintenance)}")
    lines.extend(f"connection sync {d['state']} on {d['interface']} syncid {d['syncid']}"
                 for d in data.get("sync_daemons", []))
    table = data.get("filter") or {"table": False, "allows": []}
    if table["table"] or table["allows"]:
        lines.append(f"filter (table inet maglev_bridge): {len(table['allows'])} allow list(s); every other "
                     "service accepts everyone")
    for e in table["allows"]:
        broken = "" if e["whole"] else "  (incomplete: the next pass rebuilds it)"
        pad = " " * (5 - len(e["protocol"]))  # as it always was: the protocol padded to 5
        lines.append(f"  {service_label(e)}{pad} allow {','.join(e['prefixes'] or []) or '-'}"
                     f"  dropped {e['drops']} packet(s){broken}")
    return lines


def maintenance_text(found: dict[str, Any]) -> str:
    if not found.get("on"):
        return "off"
    return Maintenance(found.get("reason", ""), found.get("since", 0.0), found.get("by", "")).describe()


def dumps(data: Any) -> str:
    """Compact (one line) when large: json's indenting encoder is pure Python and dominates a big plan. The
    compact form by msgspec's encoder, which writes a 100,000-instance plan 5x faster than json's C encoder
    (0.07 against 0.35 s of CPU, bench/plan_bench.py's catalog); json's when that text is not ASCII, since json
    escapes it (a node name in any script prints on any terminal's encoding), as for every small answer."""
    compact = msgspec.json.encode(data)
    if len(compact) <= 1_000_000:
        return json.dumps(data, indent=2)
    return compact.decode() if compact.isascii() else json.dumps(data)
