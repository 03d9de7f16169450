"""The flow hash (pktipc/_broker/engine/flowhash.c) and the owner rule (pktipc_shm.h): both
directions of a flow hash alike, for every protocol the hash reads;
fragments of a datagram hash alike; VLAN tags do not change a flow; tunnels
hash on their inner flow only when asked; rendezvous ownership moves about
1/N of the flows when a member joins or leaves. Under AddressSanitizer and
UndefinedBehaviorSanitizer, over every real capture and fuzzed, in
test_sanitized.py."""

from __future__ import annotations

import random
import struct

import numpy as np
from conftest import all_captures
from hypothesis import given, settings
from hypothesis import strategies as st
from pcapref import read_pcap
from pktipc._shm import ffi, lib

from pktipc._layout import PKT_DTYPE

TUNNELS = lib.PKB_HASH_TUNNELS
ETH, RAW, IPV4, IPV6, SLL, SLL2, NULL, LOOP, HDLC = 1, 101, 228, 229, 113, 276, 0, 108, 104


def flow_hash(frame: bytes, linktype: int = ETH, opts: int = 0) -> int:
    return int(lib.pkb_flow_hash(frame, len(frame), linktype, opts))


# --- frames, written from the RFCs, independently of the C ---------------------------


def csum_free_ip4(src: bytes, dst: bytes, proto: int, payload: bytes, *, frag: int = 0,
                  ident: int = 1, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), ident, frag,
                       64, proto, 0, src, dst) + options + payload


def ip6(src: bytes, dst: bytes, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), nh, 64) + src + dst + payload


def ext6(nh: int, body: bytes = b"\0" * 6) -> bytes:
    """A hop-by-hop, routing or destination options header (8-byte units)."""
    assert (len(body) + 2) % 8 == 0
    return bytes([nh, (len(body) + 2) // 8 - 1]) + body


def frag6(nh: int, offset: int, more: bool, ident: int = 7) -> bytes:
    return struct.pack("!BBHI", nh, 0, offset << 3 | int(more), ident)


def l4(proto: int, sport: int, dport: int, payload: bytes = b"data") -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 1024, 0, 0) + payload
    if proto == 17:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if proto == 132:
        return struct.pack("!HHII", sport, dport, 99, 0) + payload
    return payload      # ICMP and the like: no ports


def ether(dst: bytes, src: bytes, etype: int, payload: bytes, tags: tuple[int, ...] = ()) -> bytes:
    """tags: outermost first, as TPIDs (0x8100, 0x88a8, 0x9100)."""
    head = dst + src
    for i, tpid in enumerate(tags):
        head += struct.pack("!HH", tpid, 100 + i)
    return head + struct.pack("!H", etype) + payload


MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def sll(etype: int, payload: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, MAC_A + b"\0\0", etype) + payload


def sll2(etype: int, payload: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", etype, 0, 2, 1, 0, 6, MAC_A + b"\0\0") + payload


# --- flows ---------------------------------------------------------------------------------

addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
port = st.integers(0, 65535)


@st.composite
def flows(draw: st.DrawFn) -> tuple[int, bytes, bytes, int, int, int]:
    """(ip version, a, b, proto, port of a, port of b)."""
    v = draw(st.sampled_from([4, 6]))
    addr = addr4 if v == 4 else addr6
    proto = draw(st.sampled_from([6, 17, 132, 1, 58, 50]))
    return v, draw(addr), draw(addr), proto, draw(port), draw(port)


def ip_packet(flow: tuple[int, bytes, bytes, int, int, int], reverse: bool,
              payload: bytes = b"data") -> bytes:
    v, a, b, proto, pa, pb = flow
    if reverse:
        a, b, pa, pb = b, a, pb, pa
    body = l4(proto, pa, pb, payload)
    return csum_free_ip4(a, b, proto, body) if v == 4 else ip6(a, b, proto, body)


def framed(ip: bytes, linktype: int, tags: tuple[int, ...] = (), reverse: bool = False) -> bytes:
    etype = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    if linktype == ETH:
        src, dst = (MAC_B, MAC_A) if reverse else (MAC_A, MAC_B)
        return ether(dst, src, etype, ip, tags)
    if linktype in (RAW, IPV4, IPV6):
        return ip
    if linktype == SLL:
        return sll(etype, ip)
    if linktype == SLL2:
        return sll2(etype, ip)
    if linktype == NULL:
        return struct.pack("<I", 2 if etype == 0x0800 else 24) + ip
    if linktype == LOOP:
        return struct.pack(">I", 2 if etype == 0x0800 else 30) + ip
    assert linktype == HDLC
    return struct.pack("!BBH", 0x0F, 0, etype) + ip


def linktypes_for(v: int) -> list[int]:
    return [ETH, RAW, IPV4 if v == 4 else IPV6, SLL, SLL2, NULL, LOOP, HDLC]


# --- symmetry ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(flow=flows(), data=st.data())
def test_both_directions_hash_alike(flow: tuple[int, bytes, bytes, int, int, int],
                                    data: st.DataObject) -> None:
    lt = data.draw(st.sampled_from(linktypes_for(flow[0])))
    tags = data.draw(st.sampled_from([(), (0x8100,), (0x88A8, 0x8100), (0x9100, 0x8100)])) \
        if lt == ETH else ()
    there = framed(ip_packet(flow, False), lt, tags, reverse=False)
    back = framed(ip_packet(flow, True), lt, tags, reverse=True)
    h = flow_hash(there, lt)
    assert h != 0
    assert flow_hash(back, lt) == h
    assert flow_hash(there, lt, TUNNELS) == h         # nothing to decapsulate


@settings(max_examples=200, deadline=None)
@given(flow=flows(), tags=st.lists(st.sampled_from([0x8100, 0x88A8, 0x9100]), max_size=3))
def test_vlan_tags_do_not_change_the_flow(flow: tuple[int, bytes, bytes, int, int, int],
                                           tags: list[int]) -> None:
    ip = ip_packet(flow, False)
    assert flow_hash(framed(ip, ETH, tuple(tags))) == flow_hash(framed(ip, ETH))
    # ... nor the link type: the same IP packet is the same flow on any link.
    assert {flow_hash(framed(ip, lt), lt) for lt in linktypes_for(flow[0])} \
        == {flow_hash(framed(ip, ETH))}


@settings(max_examples=100, deadline=None)
@given(a=st.binary(min_size=6, max_size=6), b=st.binary(min_size=6, max_size=6),
       etype=st.sampled_from([0x0806, 0x88CC, 0x8863, 0x0060]))
def test_non_ip_frames_hash_by_mac_pair(a: bytes, b: bytes, etype: int) -> None:
    there = ether(b, a, etype, b"\x00\x01\x08\x00payload")
    back = ether(a, b, etype, b"\x00\x02\x08\x00other payload")
    assert flow_hash(there) == flow_hash(back) != 0
    assert flow_hash(ether(b, a, etype, b"", (0x8100,))) == flow_hash(there)


# --- fragments ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(flow=flows(), size=st.integers(17, 300), cut=st.integers(1, 8))
def test_fragments_of_a_datagram_hash_alike(flow: tuple[int, bytes, bytes, int, int, int],
                                            size: int, cut: int) -> None:
    v, a, b, proto, pa, pb = flow
    body = l4(proto, pa, pb, bytes(size))
    step = 8 * cut
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    hashes = set()
    for reverse in (False, True):
        src, dst = (b, a) if reverse else (a, b)
        for i, piece in enumerate(pieces):
            more = i < len(pieces) - 1
            if v == 4:
                pkt = csum_free_ip4(src, dst, proto, piece, frag=(0x2000 if more else 0)
                                    | (i * step // 8))
            else:
                pkt = ip6(src, dst, 44, frag6(proto, i * step // 8, more) + piece)
            if len(pieces) > 1:
                hashes.add(flow_hash(framed(pkt, ETH, reverse=reverse)))
    if len(pieces) > 1:
        assert len(hashes) == 1 and 0 not in hashes
        # addresses only: another protocol between the same hosts, fragmented, is alike
        other = csum_free_ip4(a, b, 47, b"x" * 8, frag=0x2000) if v == 4 else \
            ip6(a, b, 44, frag6(47, 0, True) + b"x" * 8)
        assert flow_hash(framed(other, ETH)) in hashes


def test_atomic_ipv6_fragment_is_the_whole_datagram() -> None:
    a, b = bytes(range(16)), bytes(range(16, 32))
    whole = ip6(a, b, 6, l4(6, 1000, 80))
    atomic = ip6(a, b, 44, frag6(6, 0, False) + l4(6, 1000, 80))
    assert flow_hash(atomic, RAW) == flow_hash(whole, RAW)


def test_ipv6_extension_headers_are_skipped() -> None:
    a, b = bytes(range(16)), bytes(range(16, 32))
    whole = ip6(a, b, 17, l4(17, 53, 5353))
    chained = ip6(a, b, 0, ext6(60) + ext6(43, bytes(14)) + ext6(17) + l4(17, 53, 5353))
    assert flow_hash(chained, RAW) == flow_hash(whole, RAW)
    back = ip6(b, a, 0, ext6(17) + l4(17, 5353, 53))
    assert flow_hash(back, RAW) == flow_hash(whole, RAW)


def test_flows_differ() -> None:
    rng = random.Random(5)
    seen = set()
    for _ in range(5000):
        flow = (4, rng.randbytes(4), rng.randbytes(4), 6, rng.randrange(65536),
                rng.randrange(65536))
        seen.add(flow_hash(framed(ip_packet(flow, False), ETH)))
    assert len(seen) >= 4990         # 32-bit hashes: a collision or two at most


# --- tunnels --------------------------------------------------------------------------------

OUT_A, OUT_B = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def gre(proto: int, inner: bytes, *, key: bool = False, seq: bool = False,
        csum: bool = False) -> bytes:
    flags = (0x80 if csum else 0) | (0x20 if key else 0) | (0x10 if seq else 0)
    extra = b"\0\0\0\0" * (csum + key + seq)
    return struct.pack("!BBH", flags, 0, proto) + extra + inner


def gtpu(inner: bytes, ext: bool = False) -> bytes:
    if not ext:
        return struct.pack("!BBHI", 0x30, 0xFF, len(inner), 0x1234) + inner
    # sequence, N-PDU, next extension: a PDU session container (type 0x85)
    return (struct.pack("!BBHIHBB", 0x34, 0xFF, len(inner) + 8, 0x1234, 0, 0, 0x85)
            + bytes([1, 0x10, 0x05, 0]) + inner)


def outer_ip(proto: int, payload: bytes, reverse: bool, v6: bool = False) -> bytes:
    a, b = (OUT_B, OUT_A) if reverse else (OUT_A, OUT_B)
    if v6:
        return ip6(a * 4, b * 4, proto, payload)
    return csum_free_ip4(a, b, proto, payload)


def udp(sport: int, dport: int, payload: bytes, reverse: bool) -> bytes:
    if reverse:
        sport, dport = dport, sport
    return l4(17, sport, dport, payload)


def encapsulations(inner_flow: tuple[int, bytes, bytes, int, int, int], reverse: bool
                   ) -> dict[str, tuple[bytes, bytes, int]]:
    """kind -> (outer Ethernet frame, the inner packet alone, its link type)."""
    ip = ip_packet(inner_flow, reverse)
    etype = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    inner_eth = framed(ip, ETH, (0x8100,), reverse)
    out: dict[str, tuple[bytes, bytes, int]] = {
        "gre": (outer_ip(47, gre(etype, ip), reverse), ip, RAW),
        "gre-key-seq": (outer_ip(47, gre(etype, ip, key=True, seq=True, csum=True), reverse),
                        ip, RAW),
        "gre-eth": (outer_ip(47, gre(0x6558, inner_eth), reverse), inner_eth, ETH),
        "erspan2": (outer_ip(47, gre(0x88BE, bytes(8) + inner_eth, seq=True), reverse),
                    inner_eth, ETH),
        "ipip": (outer_ip(4 if etype == 0x0800 else 41, ip, reverse), ip, RAW),
        "ip-in-ip6": (outer_ip(4 if etype == 0x0800 else 41, ip, reverse, v6=True), ip, RAW),
        "vxlan": (outer_ip(17, udp(49152, 4789, b"\x08\0\0\0\0\0\x2a\0" + inner_eth, reverse),
                           reverse), inner_eth, ETH),
        "gtpu": (outer_ip(17, udp(2152, 2152, gtpu(ip), reverse), reverse), ip, RAW),
        "gtpu-ext": (outer_ip(17, udp(2152, 2152, gtpu(ip, ext=True), reverse), reverse),
                     ip, RAW),
    }
    return {k: (framed(o, ETH, reverse=reverse), i, lt) for k, (o, i, lt) in out.items()}


@settings(max_examples=100, deadline=None)
@given(flow=flows())
def test_tunnels_hash_on_the_inner_flow(flow: tuple[int, bytes, bytes, int, int, int]) -> None:
    there, back = encapsulations(flow, False), encapsulations(flow, True)
    for kind, (frame, inner, lt) in there.items():
        h = flow_hash(frame, ETH, TUNNELS)
        assert h == flow_hash(inner, lt, TUNNELS) != 0, kind
        assert flow_hash(back[kind][0], ETH, TUNNELS) == h, kind


@settings(max_examples=50, deadline=None)
@given(flow=flows(), other=flows())
def test_without_tunnel_hashing_the_outer_flow_counts(
        flow: tuple[int, bytes, bytes, int, int, int],
        other: tuple[int, bytes, bytes, int, int, int]) -> None:
    mine, theirs, back = (encapsulations(flow, False), encapsulations(other, False),
                          encapsulations(flow, True))
    for kind, (frame, _, _) in mine.items():
        h = flow_hash(frame)
        assert h != 0
        if not kind.startswith("ip") or flow[0] == other[0]:   # (IP-in-IP: 4 or 41)
            assert flow_hash(theirs[kind][0]) == h, kind       # the inner flow does not matter
        assert flow_hash(back[kind][0]) == h, kind


def test_broken_inner_packet_keeps_the_outer_flow() -> None:
    vx = framed(outer_ip(17, udp(40000, 4789, b"\x08\0\0\0\0\0\x2a\0" + b"short", False),
                         False), ETH)
    assert flow_hash(vx, ETH, TUNNELS) == flow_hash(vx, ETH) != 0
    not_vxlan = framed(outer_ip(17, udp(40000, 4789, b"\0" * 8 + bytes(60), False), False), ETH)
    assert flow_hash(not_vxlan, ETH, TUNNELS) == flow_hash(not_vxlan, ETH)


def test_real_vxlan_capture() -> None:
    """vxlan.pcap carries a ping between two hosts inside VXLAN, each way
    from another UDP source port: only with tunnel hashing are the echo
    requests and replies one flow."""
    path = next(p for p in all_captures() if p.name == "vxlan.pcap")
    # outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8; the inner ethertype follows its MACs
    icmp = [p.data for p in read_pcap(str(path)).packets if p.data[62:64] == b"\x08\x00"]
    assert len(icmp) >= 4
    assert len({flow_hash(d, ETH, TUNNELS) for d in icmp}) == 1
    assert len({flow_hash(d, ETH) for d in icmp}) > 1


# --- the definition, pinned ----------------------------------------------------------------


M64 = 2**64 - 1


def fmix64(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    return x ^ (x >> 33)


def documented(kind: int, proto: int, a: bytes, pa: int, b: bytes, pb: int) -> int:
    """shm/LAYOUT.md's definition: the lower endpoint first; five products
    of 64-bit words, summed, mixed."""
    a, b = a.ljust(16, b"\0"), b.ljust(16, b"\0")
    if (b, pb) < (a, pa):
        a, pa, b, pb = b, pb, a, pa
    words = [int.from_bytes(x, "big") for x in (a[:8], a[8:], b[:8], b[8:])]
    words.append(kind << 40 | proto << 32 | pa << 16 | pb)
    mult = [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
            0x27D4EB2F165667C5]
    x = sum(w * m for w, m in zip(words, mult, strict=True)) & M64
    return (fmix64(x) >> 32) or 1


def test_the_hash_is_what_layout_md_says() -> None:
    a4, b4 = bytes([10, 0, 0, 9]), bytes([10, 0, 0, 1])
    tcp = framed(csum_free_ip4(a4, b4, 6, l4(6, 443, 50000)), ETH)
    assert flow_hash(tcp) == documented(2, 6, a4, 443, b4, 50000)
    a6, b6 = bytes(15) + b"\x02", bytes(15) + b"\x01"
    sctp = ip6(a6, b6, 132, l4(132, 9, 9))
    assert flow_hash(sctp, RAW) == documented(3, 132, a6, 9, b6, 9)
    frag = csum_free_ip4(a4, b4, 17, b"x" * 16, frag=0x2000)
    assert flow_hash(frag, RAW) == documented(2, 0, a4, 0, b4, 0)
    icmp = csum_free_ip4(a4, b4, 1, b"\x08\0\0\0")
    assert flow_hash(icmp, RAW) == documented(2, 1, a4, 0, b4, 0)
    arp = ether(MAC_B, MAC_A, 0x0806, bytes(28))
    assert flow_hash(arp) == documented(1, 0, MAC_A, 0, MAC_B, 0)


def test_nothing_to_hash_is_zero() -> None:
    assert flow_hash(b"") == 0
    assert flow_hash(b"\x01" * 13) == 0                    # shorter than an Ethernet header
    assert flow_hash(bytes(40), RAW) == 0                  # IP version 0
    assert flow_hash(bytes(60), 127) == 0                  # 802.11 radiotap: not read
    assert flow_hash(sll(0x0806, bytes(28)), SLL) == 0     # cooked, not IP: one address only


# --- ownership --------------------------------------------------------------------------


def owners(hashes: np.ndarray, members: list[int]) -> np.ndarray:
    """Owner slot of each hash, through the C selection function."""
    desc = np.zeros(len(hashes), dtype=PKT_DTYPE)
    desc["hash"] = hashes
    out = np.full(len(hashes), -1, dtype=np.int64)
    idx = np.empty(len(hashes), dtype=np.uint32)
    slots = np.array(members, dtype=np.uint32)
    for me in members:
        k = lib.pktipc_select(ffi.from_buffer("struct pktipc_pkt[]", desc), len(desc), ffi.NULL,
                              ffi.from_buffer("uint32_t[]", slots), len(slots), me,
                              ffi.from_buffer("uint32_t[]", idx))
        assert (out[idx[:k]] == -1).all()              # nobody else owns them
        out[idx[:k]] = me
    assert (out >= 0).all()                            # somebody owns each
    return out


def test_owner_spreads_flows_evenly_and_moves_few() -> None:
    hashes = np.random.default_rng(1).integers(1, 2**32, 200_000, dtype=np.uint32)
    four = owners(hashes, [0, 1, 2, 3])
    counts = np.bincount(four, minlength=4)
    assert counts.std() / counts.mean() < 0.02
    # A fifth member takes about a fifth, and only from the others: nothing
    # moves between the four.
    five = owners(hashes, [0, 1, 2, 3, 7])
    moved = four != five
    assert 0.18 < moved.mean() < 0.22
    assert (five[moved] == 7).all()
    # A member leaving gives up its own flows, and only those.
    three = owners(hashes, [0, 2, 3])
    assert ((four != three) == (four == 1)).all()
    # Members are a set: their order in the list changes nothing.
    assert (owners(hashes, [3, 1, 0, 2]) == four).all()


def test_share_counts_agree_with_select() -> None:
    rng = np.random.default_rng(2)
    desc = np.zeros(1000, dtype=PKT_DTYPE)
    desc["hash"] = rng.integers(0, 2**32, 1000, dtype=np.uint32)
    mask = np.packbits(rng.random(1000) < 0.5, bitorder="little")
    slots = np.array([4, 9, 2], dtype=np.uint32)
    counts = np.zeros(3, dtype=np.uint32)
    pk = ffi.from_buffer("struct pktipc_pkt[]", desc)
    lib.pktipc_share_counts(pk, 1000, ffi.from_buffer(mask), ffi.from_buffer("uint32_t[]", slots),
                            3, ffi.from_buffer("uint32_t[]", counts))
    out = np.empty(1000, dtype=np.uint32)
    got = [lib.pktipc_select(pk, 1000, ffi.from_buffer(mask),
                             ffi.from_buffer("uint32_t[]", slots), 3, int(s),
                             ffi.from_buffer("uint32_t[]", out)) for s in slots]
    assert counts.tolist() == got
    assert sum(got) == int(np.unpackbits(mask, bitorder="little")[:1000].sum())
    assert lib.pktipc_select(pk, 1000, ffi.NULL, ffi.from_buffer("uint32_t[]", slots), 3, 5,
                             ffi.from_buffer("uint32_t[]", out)) == 0     # not a member
    assert lib.pktipc_select(pk, 1000, ffi.NULL, ffi.NULL, 0, 0,
                             ffi.from_buffer("uint32_t[]", out)) == 1000  # undivided
