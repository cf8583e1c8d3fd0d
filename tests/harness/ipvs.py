"""Reading IPVS counters the way an operator does (``ipvsadm -Ln --stats --exact``), as an independent
witness of what the agent programmed."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class IpvsStats:
    conns: int
    inpkts: int
    outpkts: int
    inbytes: int
    outbytes: int


_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def _count(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text)
    if not m:
        raise ValueError(f"not an ipvsadm counter: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_stats(out: str, vip: str, port: int, proto: str) -> IpvsStats:
    """The virtual service's line of ``ipvsadm -L -n --stats --exact -t|-u VIP:PORT`` output."""
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0].upper() == proto.upper():
            c, ip_, op, ib, ob = (_count(f) for f in fields[2:7])
            return IpvsStats(c, ip_, op, ib, ob)
    raise AssertionError(f"no {proto} {vip}:{port} in:\n{out}")
