"""Writing what a client receives as pcap (nanosecond) or pcapng files."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any, BinaryIO

import numpy as np

from .._errors import PktipcError
from .._layout import Iface

PCAP_NS_MAGIC = 0xA1B23C4D
PCAP_US_MAGIC = 0xA1B2C3D4
_PCAP_REC = np.dtype([("sec", "<u4"), ("nsec", "<u4"), ("incl", "<u4"), ("orig", "<u4")])
PCAP_TS_END = (1 << 32) * 1_000_000_000   # pcap seconds are an unsigned 32-bit count
_EPB_HEAD = np.dtype([("type", "<u4"), ("size", "<u4"), ("ifid", "<u4"), ("ts_hi", "<u4"),
                      ("ts_lo", "<u4"), ("caplen", "<u4"), ("wirelen", "<u4")])


def pcap_header(linktype: int, snaplen: int, micro: bool = False) -> bytes:
    """A classic pcap file header, little-endian, of nanosecond (or
    microsecond) timestamps."""
    return struct.pack("<IHHiIII", PCAP_US_MAGIC if micro else PCAP_NS_MAGIC, 2, 4, 0, 0,
                       snaplen, linktype)


def pcap_records(desc: np.ndarray[Any, Any], views: list[memoryview], micro: bool = False,
                 snaplen: int | None = None) -> bytes:
    """Classic pcap records of packets (times checked by the caller to lie
    within 1970-2106): nanosecond or microsecond timestamps; with `snaplen`,
    at most that many bytes of each, the wire length kept."""
    n = len(desc)
    rec = np.empty(n, dtype=_PCAP_REC)
    rec["sec"] = desc["ts_ns"] // 1_000_000_000
    sub = desc["ts_ns"] % 1_000_000_000
    rec["nsec"] = sub // 1000 if micro else sub
    rec["incl"] = desc["caplen"] if snaplen is None else np.minimum(desc["caplen"], snaplen)
    rec["orig"] = desc["wirelen"]
    if snaplen is not None and (desc["caplen"] > snaplen).any():
        views = [v[:snaplen] for v in views]
    raw = memoryview(rec.tobytes())
    heads = map(raw.__getitem__, map(slice, range(0, 16 * n, 16), range(16, 16 * n + 1, 16)))
    return b"".join(chain.from_iterable(zip(heads, views, strict=True)))


def _when(ts_ns: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_ns // 1000)
            ).strftime("%Y-%m-%d %H:%M:%S UTC")


class CaptureWriter:
    """Writes batches to `out`. What a format cannot hold is refused with
    PktipcError, never written otherwise: pcap holds one link type per file
    and times from 1970 to 2106 (its seconds are an unsigned 32-bit count);
    pcapng times from 1970 on. pcapng names every source of `ifaces` in an
    interface description block up front, so an empty stream is a valid
    file too."""

    def __init__(self, out: BinaryIO, ifaces: list[Iface], fmt: str = "pcap") -> None:
        if fmt not in ("pcap", "pcapng"):
            raise ValueError("format must be pcap or pcapng")
        self.out = out
        self.ifaces = ifaces
        self.fmt = fmt
        self.packets = 0
        self._linktype: int | None = None
        self._idb: dict[tuple[int, int], int] = {}   # (source, link type) -> interface id
        self._started = False

    def _start(self, linktype: int | None) -> None:
        self._started = True
        if self.fmt == "pcapng":
            parts: list[bytes | memoryview] = [
                struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)]
            for i, src in enumerate(self.ifaces):
                self._interface_id(i, src.linktype, parts)
            self.out.write(b"".join(parts))
            return
        if linktype is None:
            linktype = self.ifaces[0].linktype if self.ifaces else 1
        self._linktype = linktype
        snaplen = max((i.snaplen for i in self.ifaces if i.linktype == linktype), default=262144)
        self.out.write(pcap_header(linktype, snaplen))

    def write(self, desc: np.ndarray[Any, Any], views: list[memoryview]) -> None:
        """Writes packets: their descriptors and their bytes, in order. A
        packet the format cannot hold is refused (PktipcError) once those
        before it are written."""
        if not len(desc):
            return
        if not self._started:
            self._start(int(desc["linktype"][0]))
        ts = desc["ts_ns"]
        bad = (ts < 0) | (ts >= PCAP_TS_END) if self.fmt == "pcap" else ts < 0
        n = int(np.argmax(bad)) if bad.any() else len(desc)
        if self.fmt == "pcap":
            self._write_pcap(desc[:n], views[:n])
        else:
            self._write_pcapng(desc[:n], views[:n])
        self.packets += n
        if n < len(desc):
            t = int(ts[n])
            when = "before 1970" if t < 0 else "past 2106-02-07 06:28:15 UTC"
            hint = " (use --format pcapng)" if t >= 0 else ""
            raise PktipcError(f"packet {self.packets + 1}: its time, {_when(t)}, is {when}: "
                              f"a {self.fmt} file cannot hold it{hint}")

    def _write_pcap(self, desc: np.ndarray[Any, Any], views: list[memoryview]) -> None:
        other = desc["linktype"] != self._linktype
        if other.any():
            lt = int(desc["linktype"][np.argmax(other)])
            raise PktipcError(f"a packet of link type {lt} cannot go into a pcap file of "
                              f"link type {self._linktype}; use --format pcapng")
        self.out.write(pcap_records(desc, views))

    def _interface_id(self, iface: int, linktype: int, parts: list[bytes | memoryview]) -> int:
        idb = self._idb.get((iface, linktype))
        if idb is None:
            src = self.ifaces[iface] if iface < len(self.ifaces) else None
            name = (src.name if src else f"if{iface}").encode()[:255]
            snaplen = src.snaplen if src else 0
            opt_name = struct.pack("<HH", 2, len(name)) + name + b"\0" * (-len(name) % 4)
            opts = opt_name + struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)
            body = struct.pack("<HHI", linktype, 0, snaplen) + opts
            size = 12 + len(body)
            parts.append(struct.pack("<II", 1, size) + body + struct.pack("<I", size))
            idb = self._idb[iface, linktype] = len(self._idb)
        return idb

    def _write_pcapng(self, desc: np.ndarray[Any, Any], views: list[memoryview]) -> None:
        parts: list[bytes | memoryview] = []
        # An interface block first for a (source, link type) not named yet.
        keys = list(zip(desc["iface"].tolist(), desc["linktype"].tolist(), strict=True))
        ids = [self._interface_id(i, lt, parts) for i, lt in keys]
        n = len(desc)
        caplen = desc["caplen"].astype(np.int64)
        pad = -caplen % 4
        size = 32 + caplen + pad
        ts = desc["ts_ns"].view("<u8")      # checked: not before 1970
        head = np.empty(n, dtype=_EPB_HEAD)
        head["type"] = 6
        head["size"] = size
        head["ifid"] = ids
        head["ts_hi"] = ts >> 32
        head["ts_lo"] = ts & 0xFFFFFFFF
        head["caplen"] = caplen
        head["wirelen"] = desc["wirelen"]
        # Each trailer is the packet's padding and the block size again: the
        # last pad + 4 bytes of an 8-byte cell whose first four are zero.
        tail = np.zeros(n, dtype=[("zero", "<u4"), ("size", "<u4")])
        tail["size"] = size
        hv, tv = memoryview(head.tobytes()), memoryview(tail.tobytes())
        starts = (np.arange(n) * 8 + 4 - pad).tolist()
        heads = [hv[i * 28 : i * 28 + 28] for i in range(n)]
        tails = [tv[s : (i + 1) * 8] for i, s in enumerate(starts)]
        parts.extend(chain.from_iterable(zip(heads, views, tails, strict=True)))
        self.out.write(b"".join(parts))

    def finish(self) -> None:
        """Makes sure the file has its header even when no packet came."""
        if not self._started:
            self._start(None)
        self.out.flush()
