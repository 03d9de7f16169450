"""interpret=True: packets decoded by dpkt, an optional extra
(pip install 'pktipc[decode]'). pktipc decodes nothing itself.

dpkt is a well-kept BSD-licensed decoder among the fastest in pure Python;
pypacker, faster when only the link layer is looked at (it decodes lazily)
and as fast down to the transport layer, is GPL-licensed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache
from typing import Any

MISSING = "interpret=True decodes packets with dpkt, which is not installed: " \
    "pip install 'pktipc[decode]'"


def require() -> None:
    """Raises ImportError, saying what to install, when dpkt is missing."""
    try:
        import dpkt  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None


def _ip(data: bytes) -> Any:
    import dpkt

    return (dpkt.ip6.IP6 if data[:1] and data[0] >> 4 == 6 else dpkt.ip.IP)(data)


@cache
def decoder(linktype: int) -> Callable[[bytes], Any]:
    """How packets of a LINKTYPE_* value are decoded: into dpkt's object for
    their link layer; a link type dpkt has no decoder for, or a packet it
    cannot decode (truncated, malformed), is handed over as its bytes."""
    import dpkt

    layers: dict[int, Callable[[bytes], Any]] = {
        0: dpkt.loopback.Loopback, 108: dpkt.loopback.Loopback,   # NULL, LOOP
        1: dpkt.ethernet.Ethernet,
        9: dpkt.ppp.PPP, 50: dpkt.ppp.PPP,                          # PPP, PPP_HDLC
        101: _ip, 228: dpkt.ip.IP, 229: dpkt.ip6.IP6,               # RAW, IPV4, IPV6
        105: dpkt.ieee80211.IEEE80211, 127: dpkt.radiotap.Radiotap,
        113: dpkt.sll.SLL, 276: dpkt.sll2.SLL2,                     # Linux cooked v1, v2
    }
    layer = layers.get(linktype)
    if layer is None:
        return bytes

    def decode(data: bytes) -> Any:
        try:
            return layer(data)
        except (dpkt.Error, struct.error, IndexError, KeyError, ValueError):
            return data

    return decode
