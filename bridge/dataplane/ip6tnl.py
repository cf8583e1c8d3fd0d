"""The protocol of `ip6tnl0`, the ip6_tunnel module's fallback device (`ip -6 tunnel change ip6tnl0 mode any`),
which a backend receiving GUE over IPv6 needs.

fou hands the inner packet of a GUE packet that came over IPv6 back to the IPv6 layer, which gives it to
ip6_tunnel (IPPROTO_IPIP: ip4ip6_rcv, IPPROTO_IPV6: ip6ip6_rcv). A packet from any remote is taken only by the
fallback device `ip6tnl0`, only while it is up, and only when its protocol is the packet's or 0 ("any"); the
module creates it with IPPROTO_IPV6, so IPv4 VIPs over an IPv6 underlay are dropped until it is "any"
(ipxip6_rcv: `tproto != ipproto && tproto != 0`).

Written here because nothing else can change it on the kernels the agent supports: rtnetlink's changelink
refuses the fallback device with EINVAL until Linux 6.17 (net-next commit "ip6_tunnel: enable to change proto of
fb tunnels", June 2025), so `ip link set ip6tnl0 type ip6tnl mode any` and pyroute2 fail on Debian's 6.1, and
only the old tunnel ioctl (SIOCCHGTUNNEL, which ip6_tnl_siocdevprivate passes to ip6_tnl0_update: "for default
tnl0 device allow to change only the proto") works. pyroute2 has no tunnel ioctls. The protocol is read back
through rtnetlink (IFLA_IP6TNL_PROTO), where pyroute2 decodes it.
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

FALLBACK = "ip6tnl0"
ANY = 0
SIOCCHGTUNNEL = 0x89F0 + 3
"""SIOCDEVPRIVATE + 3 (include/uapi/linux/if_tunnel.h)."""
PARM = struct.Struct("=16siBBBxIi16s16s")
"""struct ip6_tnl_parm (include/uapi/linux/ip6_tunnel.h): name, link, proto, encap_limit, hop_limit, (padding),
flowinfo, flags, laddr, raddr: 64 bytes."""


def set_protocol(proto: int) -> None:
    """`ip -6 tunnel change ip6tnl0 mode any` (proto 0), ip4ip6 (4) or ip6ip6 (41); OSError from the kernel.
    Every other field is zero, as the fallback device's are: the kernel finds the device by them
    (ip6_tnl_locate) and then changes only the protocol."""
    parm = ctypes.create_string_buffer(PARM.pack(FALLBACK.encode(), 0, proto, 0, 0, 0, 0, bytes(16), bytes(16)),
                                       PARM.size)
    # struct ifreq: the device name, then ifr_data (a pointer to the parameters), padded to 40 bytes
    ifreq = struct.pack("@16sP", FALLBACK.encode(), ctypes.addressof(parm)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCCHGTUNNEL, ifreq)
