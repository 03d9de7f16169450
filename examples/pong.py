"""A host that exists only as a pktipc client: answers ARP requests for an
IPv4 address and ICMP echo requests to it, on the interface each came in
on, through a broker that captures and sends there (pktipc serve -i IFACE
--tx), so that `ping ADDRESS` from the wire gets its replies.

    python examples/pong.py SERVER ADDRESS [--mac MAC] [--name NAME]

A reply is a copy of the request, made into this client's TX area, and
edited in place: addresses swapped, the ICMP type and the checksums. MAC
defaults to 02:00 followed by ADDRESS's bytes. Runs until Ctrl-C, and says
what it answered.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import struct
import sys
from types import FrameType

import pktipc

OUTGOING = 5        # the direction a descriptor's flags give to what this host sent


def checksum(data: memoryview | bytes) -> int:
    """The Internet checksum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def l3_offset(frame: memoryview) -> int:
    """Where the EtherType stands, past any VLAN tags (kept in replies)."""
    off = 12
    while off + 4 <= len(frame) and frame[off:off + 2] in (b"\x81\x00", b"\x88\xa8"):
        off += 4
    return off


class Pong:
    def __init__(self, tx: pktipc.Tx, addr: bytes, mac: bytes) -> None:
        self.tx, self.addr, self.mac = tx, addr, mac
        self.arps = self.echoes = 0

    def reply(self, p: pktipc.Packet) -> memoryview:
        """The request, copied into the TX area, addressed back to its sender."""
        buf = self.tx.allocate(p.caplen, p.iface)
        buf[:] = p.data
        buf[0:6] = p.data[6:12]
        buf[6:12] = self.mac
        return buf

    def answer(self, p: pktipc.Packet) -> None:
        d = p.data
        if p.linktype != 1 or p.caplen != p.wirelen or (p.flags >> 5) & 7 == OUTGOING:
            return
        et = l3_offset(d)
        kind, l3 = d[et:et + 2], et + 2
        if kind == b"\x08\x06" and len(d) >= l3 + 28 and d[l3:l3 + 8] == \
                b"\x00\x01\x08\x00\x06\x04\x00\x01" and d[l3 + 24:l3 + 28] == self.addr:
            buf = self.reply(p)
            buf[l3 + 6:l3 + 8] = b"\x00\x02"                 # a reply
            buf[l3 + 18:l3 + 28] = d[l3 + 8:l3 + 18]         # to the asker
            buf[l3 + 8:l3 + 14] = self.mac                   # from us
            buf[l3 + 14:l3 + 18] = self.addr
            self.tx.send(buf)
            self.arps += 1
            return
        if kind != b"\x08\x00" or len(d) < l3 + 20:
            return
        ihl, total = (d[l3] & 0x0F) * 4, int.from_bytes(d[l3 + 2:l3 + 4], "big")
        ip = d[l3:l3 + ihl]
        if (d[l3] >> 4 != 4 or ihl < 20 or total < ihl + 8 or l3 + total > len(d)
                or ip[9] != 1 or ip[16:20] != self.addr or int.from_bytes(ip[6:8], "big") & 0x3FFF
                or d[l3 + ihl] != 8 or d[l3 + ihl + 1] != 0 or checksum(ip)):
            return
        buf = self.reply(p)
        buf[l3 + 16:l3 + 20] = ip[12:16]                     # to the asker
        buf[l3 + 12:l3 + 16] = self.addr                     # from us
        buf[l3 + 8] = 64
        buf[l3 + 10:l3 + 12] = b"\0\0"
        buf[l3 + 10:l3 + 12] = checksum(buf[l3:l3 + ihl]).to_bytes(2, "big")
        icmp = l3 + ihl
        buf[icmp] = 0                                        # echo reply, the rest as it came
        buf[icmp + 2:icmp + 4] = b"\0\0"
        buf[icmp + 2:icmp + 4] = checksum(buf[icmp:l3 + total]).to_bytes(2, "big")
        self.tx.send(buf)
        self.echoes += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("server")
    ap.add_argument("address")
    ap.add_argument("--mac", help="the host's MAC address (default: 02:00 and ADDRESS)")
    ap.add_argument("--name", default="pong", help="client name (default: %(default)s)")
    a = ap.parse_args()
    try:
        addr = ipaddress.IPv4Address(a.address).packed
        mac = bytes.fromhex(a.mac.replace(":", "")) if a.mac else b"\x02\x00" + addr
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"not a unicast MAC address: {a.mac}")
    except ValueError as e:
        print(f"pong: {e}", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with pktipc.connect(a.server, a.name) as client:
            pong = Pong(client.tx(), addr, mac)
            while not stop:
                batch = client.next_batch(timeout=0.2)
                if batch is None:
                    continue
                with batch:
                    for p in batch:
                        pong.answer(p)
                pong.tx.flush(wait=False)    # handed over; not waited for
            pong.tx.flush(timeout=1.0)
    except pktipc.EndOfStream:
        pass
    except pktipc.PktipcError as e:
        print(f"pong: {e}", file=sys.stderr)
        return 1
    print(f"answered {pong.arps} ARP requests, {pong.echoes} echo requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
