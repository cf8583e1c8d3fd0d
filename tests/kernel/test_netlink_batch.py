"""Batched netlink requests on a real kernel (bridge/dataplane/netlink_batch.py): only the last request of a batch
asks for an acknowledgement, so a failed request must still be reported at its own place, in every batch, and
every other request must apply; several batches are sent by a second thread while the next are encoded, and a
request that cannot be encoded is reported without being sent. Witness: the IPVS table read back."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from bridge.core.config import Config
from bridge.core.keys import ServiceKey
from bridge.core.ops import AddDest, AddService, Op
from bridge.dataplane.kernel import open_kernel
from bridge.dataplane.netlink_batch import MAX_BATCH_BYTES
from tests.harness.netns import Netns

pytestmark = pytest.mark.kernel

CONFIG = Config(vip_cidrs=(ipaddress.IPv4Network("198.51.100.0/24"),))
WEB = ServiceKey("198.51.100.10", 80, "tcp")
MISSING = ServiceKey("198.51.100.11", 80, "tcp")
"""A service nobody adds: the kernel refuses a real server of it (ESRCH)."""


def test_a_failed_request_is_reported_at_its_place_in_any_batch_and_the_others_apply(
        netns: Callable[[str], Netns]) -> None:
    ns = netns("batch")
    # IPVS refuses an IPv4 real server it has no route to (inet_addr_type)
    ns.ip_batch(["link set lo up", "link add dummy0 type dummy", "link set dummy0 up",
                 "route add 10.1.0.0/22 dev dummy0"])
    ops: list[Op] = [AddService(WEB, "mh", ())]
    again: set[int] = set()
    missing: set[int] = set()
    unencodable: set[int] = set()
    for i in range(1, 1001):  # over 100 bytes each: several batches
        address = str(ipaddress.IPv4Address("10.1.0.0") + i)
        ops.append(AddDest(WEB, address, 80, 1))
        if i % 100 == 50:
            again.add(len(ops))  # the same real server again
            ops.append(AddDest(WEB, address, 80, 1))
        if i % 100 == 0:
            missing.add(len(ops))  # a real server of a service that does not exist
            ops.append(AddDest(MISSING, address, 80, 1))
        if i == 500:
            unencodable.add(len(ops))  # never sent: its error is the encoder's
            ops.append(AddDest(WEB, address, 70000, 1))
    assert len(ops) * 100 > 2 * MAX_BATCH_BYTES and max(missing) == len(ops) - 1, "the very last one fails too"
    with ns.entered(), open_kernel(CONFIG) as kernel:
        results = list(kernel.apply(ops))
        (service,) = kernel.read_services()
    assert [r.op for r in results] == ops
    failed = {i: str(r.error) for i, r in enumerate(results) if r.error}
    assert set(failed) == again | missing | unencodable, "each failure at its own place, nothing else failed"
    assert all(failed[i].startswith("ESRCH") for i in missing), failed
    assert all(failed[i].startswith("cannot encode") for i in unencodable), failed
    assert len(service.real_servers) == 1000
