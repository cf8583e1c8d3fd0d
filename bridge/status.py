"""`status`: what this agent owns in the kernel, the table fingerprint each virtual service implies, and
the last pass's report from the state file."""

from __future__ import annotations

from typing import Any

from bridge.config import Config
from bridge.dataplane.diff import dest_id
from bridge.dataplane.kernel import ApplyError, open_kernel
from bridge.dataplane.state import LiveService, LiveState
from bridge.maglev import Dest, build_table, fingerprint
from bridge.render import status_json
from bridge.store import load_state


def live_dests(service: LiveService, last_weights: dict[str, int]) -> tuple[tuple[Dest, ...], bool]:
    """The kernel's dests as the model needs them; True when a remembered weight had to be assumed
    (the kernel never reports last_weight, and this agent has no memory of it)."""
    assumed = False
    dests = []
    for rs in service.real_servers:
        last = rs.weight or last_weights.get(dest_id(service.key, rs.address, rs.port))
        if last is None:
            assumed = True
            last = 0
        dests.append(Dest(rs.address, rs.port, rs.weight, last))
    return tuple(dests), assumed


def service_fingerprints(services: tuple[LiveService, ...], last_weights: dict[str, int]) -> dict[str, str]:
    prints = {}
    for service in services:
        dests, assumed = live_dests(service, last_weights)
        prints[f"{service.vip}:{service.port}/{service.protocol}"] = fingerprint(build_table(dests)) + (
            "?" if assumed else ""
        )
    return prints


def read_status(config: Config) -> dict[str, Any]:
    stored = load_state(config.state_file)
    with open_kernel(config) as kernel:
        try:
            live = kernel.read()
            kernel_note = None
        except ApplyError as exc:
            live = LiveState((), kernel.read_links(), kernel.read_routes())
            kernel_note = str(exc)
    data = status_json(live, stored.report, service_fingerprints(live.services, dict(stored.memory.last_weights)))
    data["kernel_note"] = kernel_note
    return data
