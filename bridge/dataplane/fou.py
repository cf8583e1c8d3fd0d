"""The `fou` generic-netlink family (the receive side of `ip fou add`), which pyroute2 lacks.

Written on pyroute2's own generic-netlink socket, the same way pyroute2 implements its IPVS and MPTCP
families. Attribute numbers are from include/uapi/linux/fou.h.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket, GenericNetlinkSocket

FOU_GENL_NAME = "fou"
FOU_GENL_VERSION = 1
FOU_CMD_ADD = 1
FOU_CMD_DEL = 2
FOU_CMD_GET = 3
FOU_ENCAP_DIRECT = 1
FOU_ENCAP_GUE = 2
IPPROTO_IPIP = 4


class foumsg(genlmsg):  # type: ignore[misc]
    prefix = "FOU_ATTR_"
    nla_map = (
        ("FOU_ATTR_UNSPEC", "none"),
        ("FOU_ATTR_PORT", "be16"),
        ("FOU_ATTR_AF", "uint8"),
        ("FOU_ATTR_IPPROTO", "uint8"),
        ("FOU_ATTR_TYPE", "uint8"),
        ("FOU_ATTR_REMCSUM_NOPARTIAL", "flag"),
        ("FOU_ATTR_LOCAL_V4", "ip4addr"),
        ("FOU_ATTR_LOCAL_V6", "ip6addr"),
        ("FOU_ATTR_PEER_V4", "ip4addr"),
        ("FOU_ATTR_PEER_V6", "ip6addr"),
        ("FOU_ATTR_PEER_PORT", "be16"),
        ("FOU_ATTR_IFINDEX", "int32"),
    )


@dataclass(frozen=True)
class FouPort:
    port: int
    ipproto: int
    encap_type: int
    family: int = socket.AF_INET
    """The receiving socket's family: an AF_INET6 one (`ip fou add ... -6`) is IPv6-only (fou_nl_parse sets
    ipv6_v6only), so one port number may receive over both families on two sockets."""


class AsyncFou(AsyncGenericNetlinkSocket):  # type: ignore[misc]
    async def setup_endpoint(self) -> None:
        if getattr(self.local, "transport", None) is not None:
            return
        await super().setup_endpoint()
        await self.bind(FOU_GENL_NAME, foumsg)

    async def request(self, cmd: int, attrs: list[tuple[str, Any]], flags: int) -> list[Any]:
        msg = foumsg()
        msg["cmd"] = cmd
        msg["version"] = FOU_GENL_VERSION
        msg["attrs"] = attrs
        return [m async for m in await self.nlm_request(msg, msg_type=self.prid, msg_flags=flags)]


class Fou(GenericNetlinkSocket):  # type: ignore[misc]
    async_class = AsyncFou

    def _request(self, cmd: int, attrs: list[tuple[str, Any]], flags: int) -> list[Any]:
        result: list[Any] = self._run_with_cleanup(self.asyncore.request, cmd, attrs, flags)
        return result

    def ports(self) -> list[FouPort]:
        try:
            msgs = self._request(FOU_CMD_GET, [], NLM_F_REQUEST | NLM_F_DUMP)
        except NetlinkError:
            return []
        return [
            FouPort(
                port=int(m.get_attr("FOU_ATTR_PORT")),
                ipproto=int(m.get_attr("FOU_ATTR_IPPROTO") or 0),
                encap_type=int(m.get_attr("FOU_ATTR_TYPE") or 0),
                family=int(m.get_attr("FOU_ATTR_AF") or socket.AF_INET),
            )
            for m in msgs
            if m.get_attr("FOU_ATTR_AF") in (None, socket.AF_INET, socket.AF_INET6)
        ]

    def _port_attrs(self, port: int, family: int) -> list[tuple[str, Any]]:
        return [("FOU_ATTR_PORT", port), ("FOU_ATTR_AF", family)]

    def add(self, port: int, *, gue: bool = False, family: int = socket.AF_INET) -> None:
        """`ip fou add port N ipproto 4`, or with `gue` `ip fou add port N gue` (GUE names the inner protocol in
        its own header, so it takes no ipproto); with `family` AF_INET6 the same over IPv6 (`... -6`)."""
        if gue:
            attrs = [*self._port_attrs(port, family), ("FOU_ATTR_TYPE", FOU_ENCAP_GUE)]
        else:
            attrs = [*self._port_attrs(port, family), ("FOU_ATTR_IPPROTO", IPPROTO_IPIP),
                     ("FOU_ATTR_TYPE", FOU_ENCAP_DIRECT)]
        self._request(FOU_CMD_ADD, attrs, NLM_F_REQUEST | NLM_F_ACK)

    def delete(self, port: int, family: int = socket.AF_INET) -> None:
        self._request(FOU_CMD_DEL, self._port_attrs(port, family), NLM_F_REQUEST | NLM_F_ACK)
