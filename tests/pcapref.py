"""An independent reading of a capture file: libpcap itself, through ctypes.

Tests compare what pktipc delivers with what this returns. It shares no code
with pktipc (not its C ingest, not its cffi module), so a mistake in one is
not repeated in the other.

Timestamps are taken as the formats define them, and this is the one place
the tests say so: a classic pcap record's seconds and sub-second fields are
unsigned 32-bit counts (the IETF pcap draft; libpcap reads them unsigned
since 2024, Debian 12's libpcap 1.10 still signed), so libpcap's values are
reinterpreted as unsigned; a pcapng timestamp is an unsigned 64-bit tick
count, which libpcap converts correctly. Either becomes nanoseconds since
1970 in a Python int, without bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import NamedTuple

PCAP_TSTAMP_PRECISION_NANO = 1
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
NS_MAGICS = (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")     # classic, nanoseconds
PCAP_ERRBUF_SIZE = 256
PCAP_ERROR_BREAK = -2   # pcap_next_ex on a savefile: no more packets

# libpcap's pcap_datalink() returns DLT_* values; files and descriptors carry
# LINKTYPE_*. They differ only for these (libpcap's pcap-common.c).
DLT_TO_LINKTYPE = {
    11: 100,   # DLT_ATM_RFC1483
    12: 101,   # DLT_RAW
    15: 102,   # DLT_SLIP_BSDOS
    16: 103,   # DLT_PPP_BSDOS
    19: 106,   # DLT_ATM_CLIP
}


class PcapError(Exception):
    """libpcap refused to open the file; the message is libpcap's."""


class Packet(NamedTuple):
    ts_ns: int
    caplen: int
    wirelen: int
    data: bytes


class PcapRef(NamedTuple):
    linktype: int              # LINKTYPE_* value
    packets: list[Packet]
    error: str | None          # libpcap's error if it stopped before the end


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    lib = ctypes.CDLL(name)
    lib.pcap_open_offline_with_tstamp_precision.argtypes = [
        ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p]
    lib.pcap_open_offline_with_tstamp_precision.restype = ctypes.c_void_p
    lib.pcap_next_ex.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(_PktHdr)),
                                 ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte))]
    lib.pcap_next_ex.restype = ctypes.c_int
    lib.pcap_datalink.argtypes = [ctypes.c_void_p]
    lib.pcap_datalink.restype = ctypes.c_int
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_close.restype = None
    return lib


_lib = _load()


def _ts_ns(magic: bytes, ts: _Timeval) -> int:
    """Nanoseconds since 1970 of a record, as its format defines them. With
    nanosecond precision libpcap keeps nanoseconds in tv_usec, having
    multiplied a microsecond file's field by 1000."""
    if magic == PCAPNG_MAGIC:
        return ts.tv_sec * 1_000_000_000 + ts.tv_usec
    sec = ts.tv_sec & 0xFFFFFFFF
    if magic in NS_MAGICS:
        return sec * 1_000_000_000 + (ts.tv_usec & 0xFFFFFFFF)
    return sec * 1_000_000_000 + ((ts.tv_usec // 1000) & 0xFFFFFFFF) * 1000


def read_pcap(path: str) -> PcapRef:
    """Every packet libpcap reads from `path`, with nanosecond timestamps.

    Raises PcapError when libpcap cannot open the file; an error after the
    first packets is returned in `error`, with the packets read before it.
    """
    errbuf = ctypes.create_string_buffer(PCAP_ERRBUF_SIZE)
    p = _lib.pcap_open_offline_with_tstamp_precision(
        str(path).encode(), PCAP_TSTAMP_PRECISION_NANO, errbuf)
    if not p:
        raise PcapError(errbuf.value.decode(errors="replace"))
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        dlt = _lib.pcap_datalink(p)
        packets: list[Packet] = []
        error: str | None = None
        hdr = ctypes.POINTER(_PktHdr)()
        data = ctypes.POINTER(ctypes.c_ubyte)()
        while True:
            r = _lib.pcap_next_ex(p, ctypes.byref(hdr), ctypes.byref(data))
            if r == 1:
                h = hdr.contents
                packets.append(Packet(_ts_ns(magic, h.ts), h.caplen, h.len,
                                      ctypes.string_at(data, h.caplen)))
            elif r == PCAP_ERROR_BREAK:
                break
            else:
                error = (_lib.pcap_geterr(p) or b"").decode(errors="replace")
                break
        return PcapRef(DLT_TO_LINKTYPE.get(dlt, dlt), packets, error)
    finally:
        _lib.pcap_close(p)

